"""Where a series run's time went, cell by cell: the seconds papermill recorded for every code cell of the executed
notebooks in a run folder (<output tree>/runs/<timestamp>/), the slowest first.

    python bench/cell_seconds.py RUN_DIR [--top N] [--out FILE.json]      # --top 0 (default): every cell

Writes {notebook: {"total_seconds", "cells": [{"seconds", "cell": its first line}]}} to FILE (or prints it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sitlib.artifacts import write_json  # noqa: E402


def cell_seconds(run_dir: Path, top: int) -> dict:
    out = {}
    for nb in sorted(Path(run_dir).glob("*.ipynb")):
        code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        secs = [c["metadata"].get("papermill", {}).get("duration") or 0.0 for c in code]
        cells = [{"seconds": round(t, 1), "cell": "".join(c["source"]).split("\n")[0][:100]}
                 for c, t in sorted(zip(code, secs), key=lambda x: -x[1])]
        out[nb.stem] = {"total_seconds": round(sum(secs), 1), "cells": cells[:top or None]}
    if not out:
        sys.exit(f"cell_seconds: no executed notebook in {run_dir} (a run folder is <output tree>/runs/<timestamp>/)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    body = cell_seconds(Path(a.run_dir), a.top)
    if a.out:
        write_json(Path(a.out), body)
    print(json.dumps(body, indent=1))


if __name__ == "__main__":
    main()
