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
from sitlib.checks import ANSWER_TYPES  # noqa: E402
from sitlib.errors import BadInputError, SitError  # noqa: E402

TARGETS = {"sft_vs_base": 5.0, "dpo_vs_sft": 3.0}   # points of prompt-level accuracy (bench/README.md)
SHARED = ("device", "profile", "recipe", "items")
WHOLE = "a whole series 01-07 through bench_quality.py is needed"
DPO_KEYS = ("dpo_versus_sft", "dpo_eval_reward_accuracy")


def record(run_dir: Path) -> dict:
    found = sorted(run_dir.glob("quality_*.json"))
    if len(found) != 1:
        raise BadInputError(f"{run_dir}: expected one quality_<device>.json (written by bench_quality.py --keep), "
                            f"found {len(found)}")
    q = read_json(found[0], produced_by="bench/bench_quality.py")
    for key in ("device", "profile", "counts", "models", "versus_base", *DPO_KEYS):
        if key not in q or (not q[key] and key != "dpo_eval_reward_accuracy"):   # that one is None if unlogged
            raise BadInputError(f"{found[0]} has no {key!r} ({'no DPO result: ' * (key in DPO_KEYS)}{WHOLE})")
    if "benchmark_items" not in q["counts"] or any("prompt_level_accuracy" not in m for m in q["models"].values()):
        raise BadInputError(f"{found[0]}: no counts.benchmark_items or a model without prompt_level_accuracy ({WHOLE})")
    return q


def one_run(name: str, q: dict) -> dict:
    """The run's gains, as 07 counted them on the same items (points, won, lost, sign test p; the targets compare
    the points as 07 rounds them, to 0.1)."""
    vs_base = {c["variant"]: c for c in q["versus_base"]}
    if not {"sft", "dpo"} <= set(vs_base):
        raise BadInputError(f"{name}: its record's versus_base has no sft or dpo entry ({WHOLE})")
    gain = lambda c: {k: c[k] for k in ("points", "won", "lost", "sign_test_p")}   # noqa: E731
    seeds = [kv.split("=", 1)[1] for kv in q.get("recipe") or [] if kv.startswith("seed=")]
    return {"seed": int(seeds[-1]) if seeds else None,
            "accuracy": {v: m["prompt_level_accuracy"] for v, m in q["models"].items()},
            "sft_vs_base": gain(vs_base["sft"]), "dpo_vs_base": gain(vs_base["dpo"]),
            "dpo_vs_sft": gain(q["dpo_versus_sft"]), "dpo_eval_reward_accuracy": q["dpo_eval_reward_accuracy"]}


def kind(row: dict) -> str:
    exact = row["checks"] and all(c["type"] in ANSWER_TYPES for c in row["checks"])
    return "exact_answer" if exact else "instruction_following"


def answers(run_dirs: list[Path], variants: list[str], items: int) -> dict:
    """(run, variant) → 07's rows; every file must hold the record's item count and the first file's items."""
    out, first_ids = {}, None
    for i, d in enumerate(run_dirs):
        for v in variants:
            path = d / "benchmark" / f"{v}.json"
            rows = read_json(path, produced_by="07_benchmark_evaluation")["rows"]
            ids = sorted(row["prompt_id"] for row in rows)
            first_ids = first_ids or ids
            if len(rows) != items or ids != first_ids:
                raise BadInputError(f"{path}: its {len(rows)} items are not the {items} items of "
                                    f"{run_dirs[0] / 'benchmark' / (variants[0] + '.json')} that the records count")
            out[i, v] = rows
    return out


def passes_by(key, rows: dict, runs: int, variants: list[str]) -> dict:
    """Items passed per group (key(row)), per variant and run: where a variant gains and where it loses."""
    out: dict = {}
    for (i, v), variant_rows in rows.items():
        for row in variant_rows:
            group = out.setdefault(key(row), {"items": 0, **{w: [0] * runs for w in variants}})
            group["items"] += i == 0 and v == variants[0]
            group[v][i] += bool(row["passed"])
    return dict(sorted(out.items()))


def shared(q: dict) -> dict:
    return {"device": q["device"], "profile": q["profile"], "items": q["counts"]["benchmark_items"],
            "recipe": sorted(kv for kv in q.get("recipe") or [] if not kv.startswith("seed="))}


def summarize(run_dirs: list[Path], note: str | None = None) -> dict:
    if len({d.resolve() for d in run_dirs}) < len(run_dirs):
        raise BadInputError("a run folder is named twice")
    records = {str(d): record(d) for d in run_dirs}
    first = shared(next(iter(records.values())))
    for name, q in records.items():
        for key in SHARED:
            if shared(q)[key] != first[key]:
                raise BadInputError(f"{name}: {key} {shared(q)[key]!r} differs from the first run's {first[key]!r}")
    runs = {name: one_run(name, q) for name, q in records.items()}
    variants = list(next(iter(runs.values()))["accuracy"])
    rows = answers(run_dirs, variants, first["items"])
    gains = ("sft_vs_base", "dpo_vs_base", "dpo_vs_sft")
    return {**first, "runs": runs,
            "range": {g: [min(r[g]["points"] for r in runs.values()), max(r[g]["points"] for r in runs.values())]
                      for g in gains},
            "targets": {f"{g} >= {t:g}": sum(r[g]["points"] >= t for r in runs.values()) for g, t in TARGETS.items()}
            | {"both": sum(all(r[g]["points"] >= t for g, t in TARGETS.items()) for r in runs.values()),
               "runs": len(runs)},
            "by_category": passes_by(lambda row: row["category"], rows, len(run_dirs), variants),
            "by_kind": passes_by(kind, rows, len(run_dirs), variants),
            "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--note", default=None, help="how the runs were made (kept in the file)")
    a = ap.parse_args()
    try:
        body = summarize(a.run_dirs, a.note)
    except SitError as e:
        sys.exit(f"quality_runs: {e}")
    write_json(a.out, body)
    print(f"{a.out}: targets {body['targets']}, range {body['range']}")


if __name__ == "__main__":
    main()
