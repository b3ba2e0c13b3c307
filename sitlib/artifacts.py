"""Atomic writers (temp file + rename) for JSON, JSON Lines, CSV and figures; readers with clear errors."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import BadInputError, MissingInputError  # re-exported: artifacts.MissingInputError is errors'


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return _atomic_write_bytes(Path(path), text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Append a chunk atomically: the file is rewritten whole, so a kill leaves the old or the new file."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    new = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    return _atomic_write_bytes(path, old + new)


def read_jsonl(path: str | Path, produced_by: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        hint = f" (run {produced_by} first)" if produced_by else ""
        raise MissingInputError(f"missing input {path}{hint}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    return rows


def read_json(path: str | Path, produced_by: str | None = None) -> Any:
    path = Path(path)
    if not path.exists():
        hint = f" (run {produced_by} first)" if produced_by else ""
        raise MissingInputError(f"missing input {path}{hint}")
    return json.loads(path.read_text())


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _atomic_write_bytes(Path(path), buf.getvalue())


def write_metrics(path: str | Path, metrics: dict, config: Any = None) -> Path:
    """A stage's metrics JSON, with the resolved config that produced it beside it (`<name>.config.json`)."""
    path = Path(path)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else config
        write_json(path.with_name(path.stem + ".config.json"), cfg)
    return write_json(path, metrics)
