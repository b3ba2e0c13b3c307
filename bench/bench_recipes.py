"""Training recipes compared on one finished run's data: 05 (SFT) and 06 (DPO) trained again under each recipe's
overrides (05b, prompt tuning, as well with --variants) through the stages' own building blocks, then scored on
the whole suite as 07 scores them.

    python bench/bench_recipes.py --tree DIR [--profile h100] [--variants sft,dpo,prompt_tuning]
                                  --recipe NAME [KEY=VALUE ...] [--recipe ...] [--out DIR]

DIR is a finished run's output tree: its data/ (from 02-04) is copied, never written. Each recipe trains in its own
tree (<work>/<NAME>); the base model is scored once. Writes <out>/recipes_<device>.json: {"device", "profile",
"tree", "items", "base": summary, "recipes": {NAME: {"overrides", VARIANT: summary + training numbers, "versus_base",
"dpo_versus_sft", "seconds"}}},
each summary as 07 writes it. A quick way to choose the 80 GB profiles' recipe before one full run through
bench_quality.py confirms it: only the series run's numbers go into quality_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from sitlib.artifacts import write_json  # noqa: E402
from sitlib.config import parse_value  # noqa: E402

# as bench_series.py: the embedded model as teacher and student, the offline scorer (the data came from that run)
EMBEDDED = {"models.student": "embedded", "models.teacher": "embedded", "models.scorer": "offline"}
SUMMARY = ("prompt_level_accuracy", "instruction_level_accuracy", "eos_stop_rate", "mean_output_tokens")


def train_sft(S, section: str = "sft") -> dict:
    """Notebook 05's steps (05b's for section "prompt_tuning"): rows, the adapter, TRL SFTTrainer, train, evaluate,
    save (no sample answers, no chat)."""
    from sitlib import models, training

    tok = models.load_tokenizer(S.config.models.student)
    train, val, _ = training.tokenized_sft_split(S, tok, section)
    model = models.load_model(S.config.models.student, S.profile, for_training=True)
    peft_cfg = models.lora_config(S.config.lora) if section == "sft" else \
        models.prompt_tuning_config(S.config.prompt_tuning, models.resolve_model(S.config.models.student))
    tree = S.paths.models_sft if section == "sft" else S.paths.models_prompt_tuning
    ckpt, final = tree / "checkpoints", tree / "final"
    trainer = training.sft_trainer(model, training.sft_args(S, section, ckpt), train, val, tok, peft_cfg)
    fp = training.sft_fingerprint(S, section, train, val, peft_cfg)
    result = training.run_trainer(trainer, training.prepare_checkpoints(ckpt, fp, S.profile.weights_key), S, section)
    ev = training.evaluate(trainer, S, section)
    return training.finish_training(S, section, trainer, tok, result, ev, fp, final,
                                    data_sizes={"train_rows": len(train), "val_rows": len(val)},
                                    peft_cfg=peft_cfg, extra={"method": "lora" if section == "sft" else section})


def train_dpo(S) -> dict:
    """Notebook 06's steps: pairs, the SFT adapter as policy and frozen reference, TRL DPOTrainer, save."""
    from sitlib import models, training

    tok = models.load_tokenizer(S.config.models.student)
    train, val = training.preference_split(S)
    sft_final = training.sft_adapter(S)
    policy = training.dpo_policy(S, sft_final)
    ckpt, final = S.paths.models_dpo / "checkpoints", S.paths.models_dpo / "final"
    trainer = training.dpo_trainer(policy, training.dpo_args(S, ckpt), train, val, tok)
    fp = training.dpo_fingerprint(S, train, val, sft_final)
    result = training.run_trainer(trainer, training.prepare_checkpoints(ckpt, fp, S.profile.weights_key), S, "dpo")
    ev = training.evaluate(trainer, S, "dpo")
    return training.finish_training(S, "dpo", trainer, tok, result, ev, fp, final,
                                    data_sizes={"train_pairs": len(train), "val_pairs": len(val)},
                                    peft_cfg=policy.peft_config["default"],
                                    extra={"method": "dpo", "sft_adapter_digest": training.adapter_digest(sft_final)},
                                    curve_extra="rewards/accuracies")


def score(S, names: list[str], items: list[dict]) -> dict:
    """Notebook 07's loop: each variant checked fresh, then answering every item (greedy)."""
    from sitlib import benchmark, variants

    fresh = variants.check_variants(S, names)
    return {n: benchmark.run_variant(S, n, model, tok, items, benchmark.run_key(S, items, fresh[n]))
            for n, model, tok in variants.iter_variants(S, names)}


def run_recipe(tree: Path, root: Path, profile: str, overrides: dict, items: list[dict], base: dict,
               variants: list[str]) -> dict:
    import sitlib
    from sitlib import benchmark

    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(tree / "data", root / "data")
    S = sitlib.setup(profile, str(root), None, overrides, verbose=False, models=("student",))
    t = time.perf_counter()
    trained = {}
    for name in variants:   # in this order: DPO starts from the SFT adapter
        trained[name] = train_dpo(S) if name == "dpo" else train_sft(S, name)
    done = {"base": base, **score(S, variants, items)}
    keep = ("steps", "train_rows", "train_pairs", "train_loss", "eval_loss", "eval_reward_accuracy",
            "eval_reward_margin", "runtime_seconds")
    return {"overrides": overrides,
            **{n: {**{k: done[n]["summary"][k] for k in SUMMARY},
                   **{k: m[k] for k in keep if k in m}} for n, m in trained.items()},
            **benchmark.paired_counts(done),
            "seconds": round(time.perf_counter() - t, 1)}


def parse_recipes(groups: list[list[str]]) -> dict[str, dict]:
    out = {}
    for name, *pairs in groups:
        if name == "base" or name in out:   # "base" is the folder the base model is scored in
            sys.exit(f"bench_recipes: --recipe {name}: {'reserved' if name == 'base' else 'named twice'}")
        bad = [p for p in pairs if "=" not in p]
        if bad:
            sys.exit(f"bench_recipes: --recipe {name}: {bad[0]!r} is not KEY=VALUE")
        out[name] = {**EMBEDDED, **{k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True, help="a finished run's output tree (its data/ is reused)")
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--recipe", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE]")
    ap.add_argument("--variants", default="sft,dpo", help="trained and scored per recipe: sft, dpo (needs sft), "
                    "prompt_tuning")
    ap.add_argument("--work", default=None, help="where each recipe's tree goes (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    recipes, tree = parse_recipes(a.recipe), Path(a.tree)
    order = ("sft", "prompt_tuning", "dpo")
    variants = [v for v in order if v in a.variants.split(",")]
    if not variants or set(a.variants.split(",")) - set(order) or ("dpo" in variants and "sft" not in variants):
        sys.exit(f"bench_recipes: --variants {a.variants!r}: name some of {', '.join(order)} (dpo needs sft)")
    if not (tree / "data" / "filtered" / "sft_train.jsonl").exists():
        sys.exit(f"bench_recipes: {tree} has no data/filtered/sft_train.jsonl (run 02-04 into it first)")
    work = Path(a.work or tempfile.mkdtemp(prefix="sit-recipes-"))

    import sitlib
    from sitlib import benchmark

    S = sitlib.setup(a.profile, str(work / "base"), None, EMBEDDED, verbose=False, models=("student",))
    items = benchmark.load_suite(S.config.evaluation.benchmark_items, S.config.seed)
    base = score(S, ["base"], items)["base"]
    body = {"device": S.detection.device_name, "profile": a.profile, "tree": str(tree), "items": len(items),
            "base": {k: base["summary"][k] for k in SUMMARY}, "recipes": {}}
    name = "".join(c if c.isalnum() else "_" for c in body["device"]).strip("_")
    for rname, overrides in recipes.items():
        body["recipes"][rname] = run_recipe(tree, work / rname, a.profile, overrides, items, base, variants)
        path = write_json(Path(a.out) / f"recipes_{name}.json", body)   # after each recipe: a cut run keeps some
        print(f"[{rname}] {json.dumps(body['recipes'][rname])}", flush=True)
    print(path)


if __name__ == "__main__":
    main()
