"""Several GPUs of one host: world facts, rank-0 writes, batch bookkeeping for DDP, data-parallel generation.

Training runs under `accelerate launch` (torchrun underneath): every process runs the same stage, the Trainer
wraps the model in DDP/FSDP/DeepSpeed from the environment accelerate sets, and only rank 0 writes artefacts.
Generation needs no collective at all: `generate_data_parallel` starts one process per device, each with its own
model, and merges the results in the order of the work list, so the rows equal a one-GPU run's.

Usage (see docs/multi_gpu.md):
    accelerate launch --config_file accelerate_configs/ddp.yaml -m sitlib.distributed sft --profile h100
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .errors import ConfigError, PipelineError, SitError
from .artifacts import jsonl_lines

# ---------------------------------------------------------------- world facts


@dataclass(frozen=True)
class World:
    """This process's place among the processes accelerate/torchrun started (one process: 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer (set by accelerate/torchrun)") \
            from None


def world() -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as accelerate launch and torchrun set them; defaults for one process."""
    w = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if w.size < 1 or not 0 <= w.rank < w.size:
        raise ConfigError(f"RANK={w.rank} WORLD_SIZE={w.size}: expected 0 ≤ RANK < WORLD_SIZE")
    return w


def is_main_process() -> bool:
    return world().is_main


def main_process_only(fn: Callable) -> Callable:
    """Decorator for artefact writes: the call runs on rank 0 and returns None on the other ranks.

    Only for writes that need nothing from the other ranks; a collective (trainer.evaluate) must run on all.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


def print_main(*args, **kwargs) -> None:
    """print() on rank 0 only: one log line per run, not one per GPU."""
    if is_main_process():
        print(*args, **kwargs)


def wait_for_everyone() -> None:
    """Barrier across the launched processes; nothing to wait for in a single process."""
    if not world().is_distributed:
        return
    from accelerate import PartialState

    # PartialState joins the process group accelerate/torchrun described in the environment (gloo on CPU, NCCL
    # on GPUs); the Trainer later reuses that group.
    PartialState().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. removes stale checkpoints, writes a marker); the others then run it
    on the state rank 0 left, so every rank reaches the same answer without racing on the files."""
    main = is_main_process()
    if not main:
        wait_for_everyone()
    yield
    if main:
        wait_for_everyone()


def device_index() -> int:
    """The GPU index this process owns: LOCAL_RANK under accelerate launch, 0 otherwise."""
    return world().local_rank


def uses_sharded_weights() -> bool:
    """accelerate launch with an FSDP or DeepSpeed config (it announces them in the environment)."""
    return any(os.environ.get(k, "false").lower() in ("1", "true")
               for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def device_map_for_load() -> Optional[dict]:
    """device_map for from_pretrained on GPUs: this rank's own card ({"": LOCAL_RANK}; a fixed 0 puts every
    rank's model on the first card). None under FSDP/DeepSpeed: the model loads on the CPU and the wrapper shards
    it onto the GPUs — the point for a student that does not fit one card."""
    return None if uses_sharded_weights() else {"": device_index()}


# ---------------------------------------------------------------- batch bookkeeping


def accumulation_for_world(batch_size: int, gradient_accumulation: int, world_size: int) -> tuple[int, str]:
    """Gradient accumulation per process that keeps the configured effective batch on `world_size` processes.

    Effective batch = batch_size × gradient_accumulation on one process = batch_size × accumulation × world_size
    on several; the learning rate was tuned for that effective batch, so it stays as configured.
    Returns (accumulation, the log line). A split that cannot keep the batch exactly is a ConfigError.
    """
    for name, value in (("batch_size", batch_size), ("gradient_accumulation", gradient_accumulation),
                        ("world size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r}: expected a positive integer")
    effective = batch_size * gradient_accumulation
    if world_size == 1:
        return gradient_accumulation, (f"1 process: effective batch {effective} = batch_size {batch_size} × "
                                       f"gradient_accumulation {gradient_accumulation}")
    if gradient_accumulation % world_size:
        fits = [(b, effective // (b * world_size)) for b in range(batch_size, 0, -1)
                if effective % (b * world_size) == 0]
        keep = (f"batch_size={fits[0][0]} with gradient_accumulation={fits[0][1] * world_size} keeps it, or "
                if fits else "")
        raise ConfigError(
            f"gradient_accumulation={gradient_accumulation} cannot be split over {world_size} processes while "
            f"keeping the effective batch {effective} (batch_size {batch_size} × {gradient_accumulation}): {keep}"
            f"choose a gradient_accumulation that is a multiple of {world_size}")
    accum = gradient_accumulation // world_size
    return accum, (f"{world_size} processes: gradient_accumulation {gradient_accumulation} → {accum} per process, "
                   f"effective batch stays {effective} (batch_size {batch_size} × {accum} × {world_size} processes); "
                   f"learning rate unchanged")


def for_world(training_args: dict, world_size: Optional[int] = None) -> dict:
    """TrainingArguments keywords adjusted for the launched world (a copy); logs the batch line on rank 0.

    - gradient_accumulation_steps: `accumulation_for_world`, so the effective batch and lr stay as configured;
    - ddp_find_unused_parameters=False: every trainable weight (LoRA, prompt embeddings) gets a gradient each
      step, so DDP need not walk the graph for unused ones (and must not, with reentrant checkpointing).
    The configured values (and so the run's fingerprint) do not change: a checkpoint resumes on any world size.
    """
    size = world().size if world_size is None else world_size
    accum, line = accumulation_for_world(int(training_args["per_device_train_batch_size"]),
                                         int(training_args["gradient_accumulation_steps"]), size)
    print_main(line)
    out = dict(training_args, gradient_accumulation_steps=accum)
    if size > 1:
        out["ddp_find_unused_parameters"] = False
    return out


# ---------------------------------------------------------------- data-parallel generation


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Round-robin share of `items` for `rank` (items rank, rank + W, ...): chunk sizes stay balanced."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"shard rank={rank} of world_size={world_size}: expected 0 ≤ rank < world_size")
    return list(items[rank::world_size])


def merge(shards: Sequence[Sequence]) -> list:
    """Inverse of `shard`: merge([shard(x, r, W) for r in range(W)]) == list(x)."""
    shards = [list(s) for s in shards]
    total, w = sum(map(len, shards)), len(shards)
    for r, s in enumerate(shards):
        if len(s) != len(range(r, total, w)):
            raise PipelineError(f"shard {r} of {w} holds {len(s)} results, expected {len(range(r, total, w))}")
    return [shards[i % w][i // w] for i in range(total)]


def default_devices() -> list[str]:
    """Every visible GPU, or one CPU process."""
    import torch

    n = torch.cuda.device_count()   # NVML only: does not initialise CUDA in this process
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def _results_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.jsonl")) if folder.exists() else []


def done_results(folder: Path) -> dict:
    """id → result of every work item finished so far, whatever number of devices wrote them."""
    out = {}
    for path in _results_files(Path(folder)):
        for n, line in jsonl_lines(path):   # "\n" only: results may hold U+2028 and friends
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise PipelineError(f"{path}, line {n}: not valid JSON (delete the file to redo its items)") \
                    from None
            out[rec["id"]] = rec["result"]
    return out


def _pin_device(device: str) -> str:
    """In a fresh worker: make `device` the only visible GPU (before CUDA starts), so code that loads onto
    GPU 0 (device_map={"": 0}) lands on this worker's card. Returns the device name inside the worker."""
    if not device.startswith("cuda"):
        return "cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[index] if visible else str(index)
    os.environ["CUDA_VISIBLE_DEVICES"] = physical
    return "cuda:0"


def _serve(rank: int, process: Callable, work: list, devices: list[str], folder: str,
           after_each: Optional[Callable] = None) -> None:
    """Rank `rank`'s share of `work` through `process`; each finished item appended (atomically) to its file."""
    from .artifacts import append_jsonl

    out = Path(folder) / f"shard-{rank:03d}-of-{len(devices):03d}.jsonl"
    for item in shard(work, rank, len(devices)):
        append_jsonl(out, [{"id": item["id"], "result": process(item)}])
        if after_each is not None:
            after_each()


def _worker(rank: int, load_fn: Callable, work: list, devices: list[str], folder: str, cpu_threads: int) -> None:
    """One process: its device, its model, its shard."""
    device = _pin_device(devices[rank]) if len(devices) > 1 else devices[rank]
    import torch

    if device == "cpu":
        torch.set_num_threads(cpu_threads)   # W processes share the cores instead of each taking them all
    if shard(work, rank, len(devices)):
        _serve(rank, load_fn(device), work, devices, folder)


def _spawned(i: int, first: int, *args) -> None:
    """mp numbers its processes from 0; they serve ranks first, first + 1, ..."""
    _worker(first + i, *args)


def generate_data_parallel(load_fn: Callable[[str], Callable[[dict], Any]], work: Sequence[dict],
                           devices: Optional[Sequence[str]] = None, results_dir: Optional[str | Path] = None,
                           local: Optional[Callable[[dict], Any]] = None) -> list:
    """Run `work` over one model per device and return the results in the order of `work`.

    load_fn(device) loads a model onto `device` ("cuda:0" inside each worker, or "cpu") and returns a function
    item → result (JSON-serialisable). load_fn must be picklable (a module-level function, a functools.partial
    or a dataclass instance): workers are spawned, not forked, so CUDA starts fresh in each.
    Each item is a dict with a unique "id" (int or str); seed inside the item's work by its id, and a chunk
    gives the same rows on any device and any number of devices.
    results_dir keeps finished items (shard-*.jsonl, one per worker, keyed by id): a rerun after a kill skips
    them, also with a different number of devices. Without it the results go to a temporary folder.
    local: item → result for devices[0], run in this process (a model the caller has already loaded there), so
    that device holds one model, not two; the other devices get spawned workers.
    """
    import tempfile

    devices = list(devices or default_devices())
    ids = [it["id"] for it in work]
    if len(set(ids)) != len(ids):
        raise ConfigError("generate_data_parallel: work items need unique 'id' values")
    tmp = None
    if results_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sit-dp-")
        results_dir = tmp.name
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = done_results(folder)
        todo = [it for it in work if it["id"] not in done]
        if done:
            print_main(f"resuming: {len(work) - len(todo)} of {len(work)} items already done in {folder}")
        if todo:
            _run_workers(load_fn, todo, devices, folder, local)
        done = done_results(folder)
        missing = [i for i in ids if i not in done]
        if missing:
            raise PipelineError(f"{len(missing)} work items have no result in {folder} (first: {missing[0]!r})")
        return [done[i] for i in ids]
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run_workers(load_fn: Callable, todo: list, devices: list[str], folder: Path,
                 local: Optional[Callable] = None) -> None:
    cpu_threads = max(1, (os.cpu_count() or 1) // len(devices))
    if len(devices) == 1 and local is None:   # no process to start: same code, this process
        _worker(0, load_fn, todo, devices, str(folder), cpu_threads)
        return
    busy = min(len(devices), len(todo))   # ranks with work: round-robin gives the first ones an item each
    first = 0 if local is None else 1
    ctx = _start(first, busy, load_fn, todo, devices, folder, cpu_threads) if busy > first else None
    try:
        if local is not None:   # same code, this process, the caller's model
            with _threads(devices[0], cpu_threads):
                # a worker that failed stops this process's share too, not only at the end
                _serve(0, local, todo, devices, str(folder), ctx and (lambda: ctx.join(timeout=0)))
        while ctx is not None and not ctx.join():
            pass
    except BaseException as e:
        for p in ctx.processes if ctx is not None else []:
            if p.is_alive():
                p.terminate()
        _reraise(e)


def _start(first: int, busy: int, load_fn: Callable, todo: list, devices: list[str], folder: Path,
           cpu_threads: int):
    """Spawned workers for ranks first..busy-1."""
    import torch.multiprocessing as mp

    return mp.start_processes(_spawned, args=(first, load_fn, todo, devices, str(folder), cpu_threads),
                              nprocs=busy - first, join=False, start_method="spawn")


@contextlib.contextmanager
def _threads(device: str, n: int) -> Iterator[None]:
    """On CPU this process shares the cores with its workers for the duration."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reraise(e: BaseException) -> None:
    """A worker's own error: a user's mistake stays one line, a bug keeps the worker's traceback."""
    import torch.multiprocessing as mp

    if isinstance(e, mp.ProcessRaisedException):
        first = str(e).strip().splitlines()[-1]
        if any(t.__name__ + ":" in first for t in _user_errors()):
            raise PipelineError(f"a generation worker failed: {first}") from None
    raise e


def _user_errors() -> list[type]:
    from . import errors

    return [t for t in vars(errors).values() if isinstance(t, type) and issubclass(t, SitError)]


@dataclass(frozen=True)
class ModelWorker:
    """A load_fn for generate_data_parallel: tokenizer + model of `name` under `profile` in each worker (with the
    PEFT adapter in folder `adapter`, if any), then make_process(tok, model) → (item → result). make_process must be
    module-level (picklable)."""
    name: str
    profile: Any
    make_process: Callable
    role: str = "teacher"
    adapter: Optional[str] = None

    def __call__(self, device: str) -> Callable[[dict], Any]:
        from .hardware import apply_memory_limit, detect, set_precision
        from .models import load_model, load_tokenizer

        set_precision(self.profile)   # the matmul precision the calling process runs with
        if device.startswith("cuda"):   # SIT_EMULATE_GPU_GB caps each worker's card as sitlib.setup caps the first
            apply_memory_limit(detect())
        tok = load_tokenizer(self.name)
        # on a GPU the worker sees only its own card, as cuda:0; load_model puts the model there
        model = load_model(self.name, self.profile, role=self.role)
        if self.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter).eval()
        return self.make_process(tok, model)


def chunks(ids: Sequence[int], chunk_size: int) -> list[dict]:
    """Work items {"id": first row id, "ids": [...]} of chunk_size row ids each, e.g. the ids a stage still lacks.

    A chunk is the unit of randomness: seed its sampling by its "id", and it gives the same rows on any device
    and with any number of devices (a one-device data-parallel run included).
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size}: expected a positive integer")
    ids = list(ids)
    return [{"id": ids[s], "ids": ids[s:s + chunk_size]} for s in range(0, len(ids), chunk_size)]


# ---------------------------------------------------------------- notebooks


def notebook_launch(fn: Callable, num_processes: int, *args, mixed_precision: str = "no", port: int = 29500) -> None:
    """Run fn(*args) in `num_processes` processes from a notebook (accelerate.notebook_launcher: fork + torchrun
    environment), e.g. a cell that trains with the Trainer on 2 GPUs.

    The processes are forked from the kernel, so nothing in the kernel may have started CUDA before (sitlib.setup
    does, through GPU detection): define fn so it calls setup itself, and launch it from a fresh kernel.
    """
    import torch
    from accelerate import notebook_launcher

    if num_processes > 1 and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise PipelineError("CUDA is already started in this kernel, so it cannot fork GPU processes: restart "
                            "the kernel and run this cell before anything touches the GPU (sitlib.setup "
                            "included; call it inside the launched function), or run the stage with "
                            "`accelerate launch` from a shell cell")
    notebook_launcher(fn, args=args, num_processes=num_processes, mixed_precision=mixed_precision,
                      use_port=str(port))


# ---------------------------------------------------------------- stage notebooks under accelerate launch

# training stages (the Trainer spreads them over the launched processes); by CLI name and notebook number
TRAINING_STAGES = {"sft": "05", "prompt-tuning": "05b", "dpo": "06"}


def run_stages_on_world(stages: list[str], output_dir: str | Path, profile: str = "auto",
                        config_path: Optional[str] = None, params: Optional[dict] = None, log=print) -> Path:
    """Run training stages' notebooks in every process `accelerate launch` started; returns the run folder.

    Each process executes the notebook with papermill; its kernel inherits RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT, so the Trainer inside joins one process group (NCCL on GPUs, gloo on CPU).
    Rank 0 runs the normal pipeline: it holds the output tree's lock and writes runs/<timestamp>/. The other ranks
    work inside that run: no lock of their own, executed copies and logs in a temporary folder (its path is
    printed). If any rank fails, torchrun stops the others.
    """
    import tempfile

    from . import pipeline

    unknown = [s for s in stages if s not in TRAINING_STAGES.values()]
    if unknown:
        raise ConfigError(f"stage(s) {', '.join(unknown)} under accelerate launch: only the training stages "
                          f"({', '.join(TRAINING_STAGES.values())}) run on several processes; generation stages "
                          "run one model per GPU by themselves (sitlib.distributed.generate_data_parallel)")
    w = world()
    if w.is_main:
        return pipeline.run_pipeline(stages, Path(output_dir), profile, config_path, params, log=log)
    run_dir = Path(tempfile.mkdtemp(prefix=f"sit-rank{w.rank}-"))
    log(f"rank {w.rank} of {w.size}: executed notebooks and logs in {run_dir}")
    parameters = pipeline.build_parameters(profile, Path(output_dir).resolve(), config_path, params or {})
    with open(os.devnull, "w") as quiet:   # rank 0 shows the notebook's output; the log keeps this rank's
        for stage in stages:
            pipeline.run_notebook(stage, run_dir, parameters, stream=quiet)
    return run_dir


def build_parser():
    import argparse

    from .config import parse_value

    def kv(text: str):
        if "=" not in text:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as sft.epochs=1, got {text!r}")
        k, v = text.split("=", 1)
        return k.strip(), parse_value(v)

    ap = argparse.ArgumentParser(
        prog="accelerate launch --config_file accelerate_configs/ddp.yaml -m sitlib.distributed",
        description="A training stage's notebook in every process accelerate launch starts.")
    ap.add_argument("stage", choices=sorted(TRAINING_STAGES) + sorted(TRAINING_STAGES.values()))
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("-p", "--param", action="append", type=kv, default=[],
                    help="config key or notebook parameter, e.g. -p sft.epochs=1 -p seed=7 (repeatable)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    import sys

    from .runtime import resolve_output_dir

    args = build_parser().parse_args(argv)
    w = world()
    try:
        stage = TRAINING_STAGES.get(args.stage, args.stage)
        run_dir = run_stages_on_world([stage], resolve_output_dir(args.output_dir), args.profile, args.config,
                                      dict(args.param))
    except SitError as e:
        print(f"error (rank {w.rank} of {w.size}): {e}", file=sys.stderr)
        return 2
    print_main(f"executed notebooks and logs: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
