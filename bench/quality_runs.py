"""Several whole-series quality runs of one recipe side by side (seeds, or reruns): each run's gains on the same
items, their range across runs, and in how many runs the quality targets hold (SFT ≥ base + 5 points, DPO ≥ SFT +
3 points of prompt-level accuracy).

    python bench/quality_runs.py RUN_DIR ... --out FILE [--note TEXT]

RUN_DIR: a folder `bench_quality.py --keep` wrote (it holds the run's quality_<device>.json). The runs must share
device, profile, suite size and recipe (the seed may differ). Writes {"device", "profile", "recipe", "items",
"runs": {RUN_DIR: {"seed", "accuracy": {variant: prompt-level}, "sft_vs_base", "dpo_vs_base", "dpo_vs_sft",
"dpo_eval_reward_accuracy"}}, "range": {gain: [min, max]}, "targets": {target: runs where it holds},
"by_category": {category: {"items", variant: [items passed, per run]}} and the same "by_kind" (exact_answer: every
check an answer_number / answer_text; instruction_following: the rest), from 07's answers in RUN_DIR/benchmark/,
"note"}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from sitlib.artifacts import read_json, write_json  # noqa: E402
from sitlib.errors import BadInputError  # noqa: E402

TARGETS = {"sft_vs_base": 5.0, "dpo_vs_sft": 3.0}   # points of prompt-level accuracy (bench/README.md)
SHARED = ("device", "profile", "recipe", "items")


def record(run_dir: Path) -> dict:
    found = sorted(run_dir.glob("quality_*.json"))
    if len(found) != 1:
        raise BadInputError(f"{run_dir}: expected one quality_<device>.json (written by bench_quality.py --keep), "
                            f"found {len(found)}")
    return read_json(found[0], produced_by="bench/bench_quality.py")


def one_run(q: dict) -> dict:
    """The run's gains, as 07 counted them on the same items (points, won, lost, sign test p; the targets compare
    the points as 07 rounds them, to 0.1)."""
    vs_base = {c["variant"]: c for c in q["versus_base"]}
    gain = lambda c: {k: c[k] for k in ("points", "won", "lost", "sign_test_p")}   # noqa: E731
    seeds = [kv.split("=", 1)[1] for kv in q["recipe"] or [] if kv.startswith("seed=")]
    return {"seed": int(seeds[-1]) if seeds else None,
            "accuracy": {v: m["prompt_level_accuracy"] for v, m in q["models"].items()},
            "sft_vs_base": gain(vs_base["sft"]), "dpo_vs_base": gain(vs_base["dpo"]),
            "dpo_vs_sft": gain(q["dpo_versus_sft"]), "dpo_eval_reward_accuracy": q["dpo_eval_reward_accuracy"]}


def kind(row: dict) -> str:
    exact = row["checks"] and all(c["type"].startswith("answer_") for c in row["checks"])
    return "exact_answer" if exact else "instruction_following"


def passes_by(key, run_dirs: list[Path], variants: list[str]) -> dict:
    """Items passed per group (key(row)), per variant and run: where a variant gains and where it loses."""
    out: dict = {}
    for i, d in enumerate(run_dirs):
        for v in variants:
            for row in read_json(d / "benchmark" / f"{v}.json", produced_by="07_benchmark_evaluation")["rows"]:
                group = out.setdefault(key(row), {"items": 0, **{w: [0] * len(run_dirs) for w in variants}})
                group["items"] += i == 0 and v == variants[0]
                group[v][i] += bool(row["passed"])
    return dict(sorted(out.items()))


def shared(q: dict) -> dict:
    return {"device": q["device"], "profile": q["profile"], "items": q["counts"]["benchmark_items"],
            "recipe": sorted(kv for kv in q["recipe"] or [] if not kv.startswith("seed="))}


def summarize(run_dirs: list[Path], note: str | None = None) -> dict:
    if len({d.resolve() for d in run_dirs}) < len(run_dirs):
        raise BadInputError("a run folder is named twice")
    records = {str(d): record(d) for d in run_dirs}
    for name, q in records.items():
        if not q.get("dpo_versus_sft") or "dpo_eval_reward_accuracy" not in q:
            raise BadInputError(f"{name}: no DPO result in its record (a whole series 01-07 is needed)")
    first = shared(next(iter(records.values())))
    for name, q in records.items():
        for key in SHARED:
            if shared(q)[key] != first[key]:
                raise BadInputError(f"{name}: {key} {shared(q)[key]!r} differs from the first run's {first[key]!r}")
    runs = {name: one_run(q) for name, q in records.items()}
    variants = list(next(iter(runs.values()))["accuracy"])
    kinds = passes_by(kind, run_dirs, variants)
    if sum(k["items"] for k in kinds.values()) != first["items"]:
        raise BadInputError(f"{run_dirs[0]}/benchmark: {sum(k['items'] for k in kinds.values())} items, its record "
                            f"says {first['items']}")
    gains = ("sft_vs_base", "dpo_vs_base", "dpo_vs_sft")
    return {**first, "runs": runs,
            "range": {g: [min(r[g]["points"] for r in runs.values()), max(r[g]["points"] for r in runs.values())]
                      for g in gains},
            "targets": {f"{g} >= {t:g}": sum(r[g]["points"] >= t for r in runs.values()) for g, t in TARGETS.items()}
            | {"both": sum(all(r[g]["points"] >= t for g, t in TARGETS.items()) for r in runs.values()),
               "runs": len(runs)},
            "by_category": passes_by(lambda row: row["category"], run_dirs, variants),
            "by_kind": kinds,
            "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--note", default=None, help="how the runs were made (kept in the file)")
    a = ap.parse_args()
    try:
        body = summarize(a.run_dirs, a.note)
    except BadInputError as e:
        sys.exit(f"quality_runs: {e}")
    write_json(a.out, body)
    print(f"{a.out}: targets {body['targets']}, range {body['range']}")


if __name__ == "__main__":
    main()
