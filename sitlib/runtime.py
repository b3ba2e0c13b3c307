"""Where we run: Colab detection, Drive mount, the output tree, seeds, and fetching files by Drive id/URL."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

DRIVE_ROOT = Path("/content/drive")
COLAB_OUTPUT = DRIVE_ROOT / "MyDrive" / "synthetic-instruction-tuner"


def in_colab() -> bool:
    return "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") is not None


@dataclass(frozen=True)
class OutputTree:
    root: Path

    def __getattr__(self, name: str) -> Path:
        # e.g. tree.data_raw, tree.models_sft, tree.evaluation_metrics
        if name in _DIRS:
            return self.root / _DIRS[name]
        raise AttributeError(name)

    def create(self) -> "OutputTree":
        for rel in _DIRS.values():
            (self.root / rel).mkdir(parents=True, exist_ok=True)
        return self


_DIRS = {
    "data_raw": "data/raw", "data_filtered": "data/filtered", "data_preference": "data/preference",
    "models_sft": "models/sft", "models_prompt_tuning": "models/prompt_tuning", "models_dpo": "models/dpo",
    "evaluation_metrics": "evaluation/metrics", "evaluation_figures": "evaluation/figures",
    "evaluation_results": "evaluation/results", "runs": "runs",
}


def resolve_output_dir(output_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument, else SIT_OUTPUT_DIR, else Drive on Colab (mounted here), else ./outputs."""
    if output_dir:
        return Path(output_dir).expanduser().resolve()
    if os.environ.get("SIT_OUTPUT_DIR"):
        return Path(os.environ["SIT_OUTPUT_DIR"]).expanduser().resolve()
    if in_colab():
        mount_drive()
        return COLAB_OUTPUT
    return Path("outputs").resolve()


def mount_drive() -> None:
    if (DRIVE_ROOT / "MyDrive").exists():
        return
    from google.colab import drive  # only importable on Colab

    drive.mount(str(DRIVE_ROOT))


def output_tree(output_dir: str | os.PathLike | None = None) -> OutputTree:
    return OutputTree(resolve_output_dir(output_dir)).create()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fetch(source: str, dest: str | os.PathLike, quiet: bool = True) -> Path:
    """Download a Drive file id, Drive URL or plain URL to `dest` (atomically); reuse an existing file."""
    import gdown

    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    is_url = "://" in source
    try:
        result = gdown.download(url=source if is_url else None, id=None if is_url else source,
                                output=str(tmp), quiet=quiet, use_cookies=False)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {source!r}: {e}") from None
    if result is None or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {source!r}")
    os.replace(tmp, dest)
    return dest
