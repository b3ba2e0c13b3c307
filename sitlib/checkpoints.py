"""Trainer checkpoints: resume from the newest complete one, never from a half-written or foreign one."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from .artifacts import write_json

MARKER = "fingerprint.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")
# any of these beside trainer_state.json means the weights were written (adapter for LoRA / prompt tuning,
# whole model otherwise; sharded models write an index)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_state(ckpt: Path) -> Optional[dict]:
    try:
        return json.loads((Path(ckpt) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(ckpt: Path) -> bool:
    """The Trainer writes weights, optimizer, scheduler and RNG state first and trainer_state.json last, so a
    parseable trainer_state.json beside the weights means the save finished."""
    ckpt = Path(ckpt)
    return _read_state(ckpt) is not None and any((ckpt / f).exists() for f in WEIGHT_FILES)


def tokens_seen(checkpoint: Optional[str | Path]) -> int:
    """Non-padding tokens the run had processed when `checkpoint` was saved (0 without one)."""
    if not checkpoint:
        return 0
    state = _read_state(Path(checkpoint)) or {}
    return int(state.get("num_input_tokens_seen", 0) or 0)


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest step) first."""
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)), reverse=True)


def _set_aside(ckpt_dir: Path, old_key: str) -> Path:
    """Move a tree written under other weights next to it (kept: the user may go back to that runtime)."""
    base = ckpt_dir.with_name(f"{ckpt_dir.name}-{old_key or 'unknown-weights'}")
    target = base if not base.exists() else base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_dir.rename(target)
    return target


def prepare_checkpoints(ckpt_dir: Path, fp: str, weights_key: str) -> Optional[str]:
    """The newest complete checkpoint of a run with the same config, data and weights, or None.

    - written under another `weights_key` (dtype / 4-bit / adapter dtype: optimizer states do not carry over):
      moved aside to `<ckpt_dir>-<old key>`, start fresh;
    - same weights but another config/data fingerprint: stale, removed;
    - a checkpoint cut off mid-save (no trainer_state.json or no weights): removed, the older one is used.
    """
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / MARKER
    if ckpt_dir.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("weights_key") != weights_key and any(_checkpoints(ckpt_dir)):
            moved = _set_aside(ckpt_dir, old.get("weights_key", ""))
            print(f"checkpoints in {ckpt_dir.name} were written with {old.get('weights_key') or 'unknown'} weights, "
                  f"this run uses {weights_key}: moved them to {moved}, starting fresh")
        elif old.get("fingerprint") != fp:
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fp, "weights_key": weights_key})
    for ckpt in _checkpoints(ckpt_dir):
        if is_complete(ckpt):
            print(f"resuming from {ckpt.name}")
            return str(ckpt)
        print(f"skipping incomplete {ckpt.name} (cut off while saving)")
        # removed so no half-written folder sits under a final name and the Trainer rewrites it at that step
        shutil.rmtree(ckpt)
    return None
