"""Habits a tuned model picked up, read from 07's per-variant answers: how many answers open with a double quote
where the item does not ask for quotes (repair's quote edit can teach the wrapper rather than the condition), and,
for DPO, on how many items its answer and its pass/fail outcome differ from its SFT model's (DPO can move answers
without moving the score).

    python bench/answer_habits.py BENCHMARK_DIR [--out FILE]
    python bench/answer_habits.py --across RUN/answer_habits.json ... [--out FILE]

BENCHMARK_DIR is a run's `evaluation/results/benchmark/` (or a copy under bench/results/); prints, and with --out
writes, {variant: {"items", "opens_with_quote"}}, DPO's with "against_sft": {"items", "answer_differs",
"outcome_differs", "by_category": {category: {"items", "passed", "reference_passed"}}} where both files are there
(`reference_passed`: the SFT model's passes on the same items).
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


def against(path: Path, reference: Path) -> dict:
    """Items both answered, and on how many the answer text and the pass/fail outcome differ."""
    rows = {r["prompt_id"]: r for r in read_json(path, "07_benchmark_evaluation")["rows"]}
    ref = {r["prompt_id"]: r for r in read_json(reference, "07_benchmark_evaluation")["rows"]}
    both = [k for k in rows if k in ref]
    by_category: dict = {}
    for k in both:   # where the outcomes move: items passed by each, per suite category
        c = by_category.setdefault(rows[k].get("category", "?"), {"items": 0, "passed": 0, "reference_passed": 0})
        c["items"] += 1
        c["passed"] += bool(rows[k]["passed"])
        c["reference_passed"] += bool(ref[k]["passed"])
    return {"items": len(both), "answer_differs": sum(rows[k]["output"] != ref[k]["output"] for k in both),
            "outcome_differs": sum(rows[k]["passed"] != ref[k]["passed"] for k in both),
            "by_category": dict(sorted(by_category.items()))}


def summary(benchmark_dir: Path) -> dict:
    """Every variant's habits in `benchmark_dir`, DPO's with its difference from SFT."""
    files = {f.stem: f for f in sorted(Path(benchmark_dir).glob("*.json"))}
    body = {v: habits(f) for v, f in files.items()}
    if "dpo" in files and "sft" in files:
        body["dpo"]["against_sft"] = against(files["dpo"], files["sft"])
    return body


def across(habit_files: list[Path]) -> dict:
    """DPO against its SFT model per category, summed over several runs' answer_habits.json (each run's gain
    listed too): a category that moves the same way in most runs is a habit of the recipe, not chance."""
    total: dict = {}
    for f in habit_files:
        by_category = read_json(f, "bench/answer_habits.py").get("dpo", {}).get("against_sft", {}).get("by_category")
        if by_category is None:
            raise SystemExit(f"answer_habits: {f} has no dpo.against_sft.by_category (run answer_habits.py on the "
                             "run's benchmark folder again)")
        for cat, c in by_category.items():
            t = total.setdefault(cat, {"items": 0, "passed": 0, "reference_passed": 0, "gain_per_run": []})
            for k in ("items", "passed", "reference_passed"):
                t[k] += c[k]
            t["gain_per_run"].append(c["passed"] - c["reference_passed"])
    return {"runs": [str(f) for f in habit_files],
            "by_category": dict(sorted(total.items(), key=lambda kv: kv[1]["passed"] - kv[1]["reference_passed"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark_dir", nargs="?")
    ap.add_argument("--across", nargs="+", default=None, metavar="ANSWER_HABITS_JSON",
                    help="instead: DPO against SFT per category, summed over these runs' answer_habits.json")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.across:
        body = across([Path(f) for f in a.across])
        print(json.dumps(body, indent=2))
        if a.out:
            write_json(Path(a.out), body)
        return
    if not a.benchmark_dir or not any(Path(a.benchmark_dir).glob("*.json")):
        sys.exit(f"answer_habits: no <variant>.json in {a.benchmark_dir} (run 07_benchmark_evaluation first)")
    body = summary(Path(a.benchmark_dir))
    print(json.dumps(body, indent=2))
    if a.out:
        write_json(Path(a.out), body)


if __name__ == "__main__":
    main()
