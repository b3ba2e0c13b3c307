"""Atomic writers (temp file + rename) for JSON, JSON Lines, CSV and figures; readers with clear errors."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSON Lines file. Split on "\n" only: str.splitlines() also splits on U+2028,
    U+2029, U+0085 and other separators that json.dumps(ensure_ascii=False) leaves inside strings."""
    text = Path(path).read_bytes().decode("utf-8")
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield n, line


def count_jsonl_rows(path: str | Path) -> int:
    """Rows in a JSON Lines file (0 when absent): what a resumed stage has already written."""
    path = Path(path)
    return sum(1 for _ in jsonl_lines(path)) if path.exists() else 0


def _example(fields: Iterable[str]) -> str:
    return "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"


def parse_jsonl_line(path: str | Path, n: int, line: str, fields: Iterable[str] = ()) -> dict:
    """One row, or BadInputError "file:line: what is wrong (expected {...})"."""
    fields = tuple(fields)
    expected = f"expected one JSON object per line, like {_example(fields)}" if fields else \
        "expected one JSON object per line"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno}); {expected}") from None
    if not isinstance(row, dict):
        raise BadInputError(f"{path}:{n}: a JSON {type(row).__name__}, not an object; {expected}")
    missing = [f for f in fields if f not in row]
    if missing:
        raise BadInputError(f"{path}:{n}: missing field {missing[0]!r} ({expected})")
    return row


def read_jsonl(path: str | Path, produced_by: str | None = None, fields: Iterable[str] = ()) -> list[dict]:
    """Every row of a JSON Lines file. A missing file names the notebook that writes it; a bad line is a
    BadInputError naming file:line; `fields` are required in every row."""
    path = Path(path)
    if not path.exists():
        hint = f" (run {produced_by} first)" if produced_by else ""
        raise MissingInputError(f"missing input {path}{hint}")
    try:
        lines = list(jsonl_lines(path))
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (byte {e.start}); expected JSON Lines") from None
    return [parse_jsonl_line(path, n, line, fields) for n, line in lines]


def read_json(path: str | Path, produced_by: str | None = None) -> Any:
    path = Path(path)
    if not path.exists():
        hint = f" (run {produced_by} first)" if produced_by else ""
        raise MissingInputError(f"missing input {path}{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None


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
