"""Habits a tuned model picked up, read from 07's per-variant answers: how many answers open with a double quote
where the item does not ask for quotes (repair's quote edit can teach the wrapper rather than the condition).

    python bench/answer_habits.py BENCHMARK_DIR [--out FILE]

BENCHMARK_DIR is a run's `evaluation/results/benchmark/` (or a copy under bench/results/); prints, and with --out
writes, {variant: {"items", "opens_with_quote"}}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from sitlib.artifacts import read_json, write_json  # noqa: E402

QUOTE_TYPES = {"startend:quotation"}


def habits(path: Path) -> dict:
    rows = read_json(path, "07_benchmark_evaluation")["rows"]
    free = [r for r in rows if not QUOTE_TYPES & {c["type"] for c in r.get("checks", [])}]
    return {"items": len(free), "opens_with_quote": sum(r["output"].lstrip().startswith('"') for r in free)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark_dir")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    files = sorted(Path(a.benchmark_dir).glob("*.json"))
    if not files:
        sys.exit(f"answer_habits: no <variant>.json in {a.benchmark_dir} (run 07_benchmark_evaluation first)")
    body = {f.stem: habits(f) for f in files}
    print(json.dumps(body, indent=2))
    if a.out:
        write_json(Path(a.out), body)


if __name__ == "__main__":
    main()
