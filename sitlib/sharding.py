"""Where a generating stage (02, 04, 07, 08) runs: in this process on one device, or one model per GPU.

`generation.devices` decides: 1 (the default) or "auto" on a machine with one GPU keeps the stage in this
process, unchanged (02 under "auto" keeps its chunked sampling there too, so its rows do not depend on the
number of GPUs). Several devices give the stage a `Shards`: its chunks go through
`distributed.generate_data_parallel`, this process serving the first GPU with the model it already holds and a
spawned worker loading the same model on each other GPU; results come back in the order of the work.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import distributed as dist
from .errors import ConfigError
from .generation import Completion, Sampling, generate

KEY = "generation.devices"


def resolve_devices(value: Any, profile_device: str, visible: Optional[int] = None) -> list[str]:
    """generation.devices → device names. "auto": every visible GPU when there are several, else one; a count n:
    the first n GPUs (n CPU processes on the cpu profile: the same code path, for tests); a list: those devices."""
    if visible is None:
        import torch

        # NVML only: CUDA is not started here, so spawned workers can still pick their own card
        visible = torch.cuda.device_count() if profile_device == "cuda" else 0
    if value == "auto":
        return [f"cuda:{i}" for i in range(visible)] if visible > 1 else ["cuda:0" if visible else "cpu"]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        if profile_device != "cuda":
            return ["cpu"] * value
        if value > visible:
            raise ConfigError(f"config key '{KEY}': {value} GPUs asked for, {visible} visible (use 'auto')")
        return [f"cuda:{i}" for i in range(value)]
    if isinstance(value, list) and value:
        devices = [_checked(d, profile_device, visible) for d in value]
        if profile_device == "cuda" and len(set(devices)) < len(devices):
            raise ConfigError(f"config key '{KEY}': {value!r} names a GPU twice (one model per GPU)")
        if devices[:1] != ["cuda:0"] and profile_device == "cuda" and len(devices) == 1:
            # one device is served in this process, with the model the notebook loaded on cuda:0
            raise ConfigError(f"config key '{KEY}': {value!r}: one GPU is the notebook's own, cuda:0 (to use another "
                              "card, set CUDA_VISIBLE_DEVICES before starting the notebook)")
        return devices
    raise ConfigError(f"config key '{KEY}': {value!r} (allowed: 'auto', a number of devices ≥ 1, or a list such "
                      "as ['cuda:0', 'cuda:1'])")


def _checked(device: Any, profile_device: str, visible: int) -> str:
    want = r"cuda:(\d+)" if profile_device == "cuda" else r"cpu"
    m = re.fullmatch(want, str(device))
    if not isinstance(device, str) or not m:
        raise ConfigError(f"config key '{KEY}': {device!r} is not a device of the {profile_device} profile "
                          f"(expected {'cuda:<index>' if profile_device == 'cuda' else 'cpu'})")
    if profile_device == "cuda" and int(m.group(1)) >= visible:
        raise ConfigError(f"config key '{KEY}': {device} is not visible ({visible} GPUs: cuda:0..cuda:{visible - 1})")
    return device


@dataclass(frozen=True)
class Shards:
    """A stage's generation over several devices: how a worker loads the model the stage uses (name, profile,
    role, adapter folder) and where finished chunks wait for a resume (None: a temporary folder)."""
    devices: tuple
    name: str
    profile: Any
    role: str = "student"
    adapter: Optional[str] = None
    folder: Optional[Path] = None


def plan(session, name: str, role: str = "student", adapter: Optional[Path] = None,
         folder: Optional[Path] = None, sampled: bool = False) -> Optional[Shards]:
    """The stage's Shards, or None when generation.devices resolves to one device: then the stage generates in
    this process exactly as it always has (no worker, no spawn). A `sampled` stage (02) whose setting is not 1
    gets Shards on one device too: its rows follow the chunks, so "auto" gives the same rows on one GPU as on
    several (served in this process, nothing spawned)."""
    setting = session.config.generation.devices
    devices = resolve_devices(setting, session.profile.device)
    if len(devices) < 2 and not (sampled and setting != 1):
        return None
    return Shards(tuple(devices), name, session.profile, role, str(adapter) if adapter else None, folder)


def for_variant(session, variant: str) -> Optional[Shards]:
    """07/08: the student with `variant`'s adapter (none for "base"); results only live as long as the call (the
    variant's results file is the checkpoint)."""
    from .variants import adapter_dir

    return plan(session, session.config.models.student, "student",
                None if variant == "base" else adapter_dir(session, variant))


def run(shards: Shards, model, tok, make_process: Callable, work: Sequence[dict], key: Optional[dict] = None,
        folder: Optional[Path] = None) -> list:
    """Results of `work` (items with a unique "id") in its order. This process serves the first device with
    `model` when it sits there; make_process(tok, model) → (item → JSON-serialisable result) must be
    module-level (workers are spawned). With a folder, `key` (what the results depend on) guards the resume."""
    if folder is not None:
        _claim(Path(folder), key or {})
    worker = dist.ModelWorker(shards.name, shards.profile, make_process, shards.role, shards.adapter)
    here = make_process(tok, model) if _device_of(model) == shards.devices[0] else None
    return dist.generate_data_parallel(worker, list(work), list(shards.devices), folder, local=here)


def _device_of(model) -> str:
    return str(next(model.parameters()).device)


def _claim(folder: Path, key: dict) -> None:
    """Keep the finished chunks in `folder` only if they were made for `key` (settings, seed, model, work): a
    rerun after a kill resumes them, a run with anything else changed starts from an empty folder."""
    from .artifacts import write_text

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    stamp = folder / "key.txt"
    if folder.exists() and (not stamp.exists() or stamp.read_text().strip() != digest):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(stamp, digest + "\n")


def settings(cfg) -> dict:
    """A config section as a resume key: every value but generation.devices (a resume may use other devices)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "devices"}


# ---------------------------------------------------------------- greedy generation split over the devices

def split(items: Sequence, parts: int) -> list[list]:
    """`items` in `parts` contiguous pieces of nearly equal size (no empty piece)."""
    n = len(items)
    bounds = [n * k // parts for k in range(parts + 1)]
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def plain(completions: Sequence[Completion]) -> list[list]:
    """Completions as JSON (they cross from a worker through its results file)."""
    return [[c.text, c.n_tokens, c.ended] for c in completions]


def completions(rows: Sequence[Sequence]) -> list[Completion]:
    return [Completion(*r) for r in rows]


def _generate_process(sampling: Sampling, batch_size: int, tok, model) -> Callable[[dict], list]:
    return lambda item: plain(generate(model, tok, item["inputs"], sampling, batch_size))


def generate_greedy(shards: Shards, model, tok, inputs: list[list[int]], sampling: Sampling,
                    batch_size: int) -> list[Completion]:
    """`generate` over the devices, one piece of the inputs each, completions in input order. Greedy only: a
    greedy answer does not depend on which rows share its batch; a sampled one would (seed per chunk instead)."""
    if sampling.do_sample:
        raise ValueError("generate_greedy splits the inputs by device count: sampled rows would depend on it")
    work = [{"id": k, "inputs": part} for k, part in enumerate(split(inputs, len(shards.devices)))]
    out = run(shards, model, tok, functools.partial(_generate_process, sampling, batch_size), work)
    return completions([c for part in out for c in part])
