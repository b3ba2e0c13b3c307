"""Stage 07: the built-in verifiable benchmark — instruction-following and exact-answer items scored by code."""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from .artifacts import write_json, write_jsonl
from .checks import run_check
from .figures import grouped_bars
from .generation import Sampling, chat_input_ids, generate
from .variants import check_variants, iter_variants

SUITE = Path(__file__).parent / "data" / "benchmark.jsonl"


def load_suite(n_items: int = 0, seed: int = 42, path: Path = SUITE) -> list[dict]:
    """The whole suite, or a seeded subset of n_items that keeps every category represented where possible."""
    items = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not n_items or n_items >= len(items):
        return items
    rng = random.Random(seed)
    by_cat = defaultdict(list)
    for it in items:
        by_cat[it["category"]].append(it)
    for lst in by_cat.values():
        rng.shuffle(lst)
    picked, cats = [], sorted(by_cat)
    while len(picked) < n_items:   # round-robin over categories
        for c in cats:
            if by_cat[c] and len(picked) < n_items:
                picked.append(by_cat[c].pop())
    return sorted(picked, key=lambda it: it["id"])


def score_output(item: dict, text: str) -> dict:
    results = {c["type"]: run_check(c, text) for c in item["checks"]}
    return {"checks": results, "passed": all(results.values())}


def summarise(rows: list[dict]) -> dict:
    """Accuracies as exact means of the per-row results."""
    n = len(rows)
    checks = [v for r in rows for v in r["checks"].values()]
    cats = defaultdict(list)
    for r in rows:
        cats[r["category"]].append(r["passed"])
    return {"prompt_level_accuracy": round(sum(r["passed"] for r in rows) / n, 4),
            "instruction_level_accuracy": round(sum(checks) / len(checks), 4),
            "eos_stop_rate": round(sum(r["stopped_on_eos"] for r in rows) / n, 4),
            "mean_output_tokens": round(sum(r["output_tokens"] for r in rows) / n, 2),
            "n_prompts": n, "n_checks": len(checks),
            "per_category": {c: round(sum(v) / len(v), 4) for c, v in sorted(cats.items())}}


def lm_eval_results(session) -> dict:
    """Optional lm-evaluation-harness tasks per variant; a clear note instead when it cannot run here."""
    import importlib.util
    import os

    ev = session.config.evaluation
    if not ev.lm_eval_tasks:
        return {"status": "not requested (evaluation.lm_eval_tasks is empty)"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"status": "skipped: the lm-eval package is not installed (pip install lm-eval)"}
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return {"status": "skipped: offline (its task data comes from the Hugging Face hub)"}
    import lm_eval

    from .models import resolve_model
    from .variants import adapter_dir

    base = resolve_model(session.config.models.student)
    out = {"status": "ran", "tasks": ev.lm_eval_tasks, "limit": ev.lm_eval_limit or None, "models": {}}
    for name in ev.variants:
        args = f"pretrained={base}" + ("" if name == "base" else f",peft={adapter_dir(session, name)}")
        try:
            res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(ev.lm_eval_tasks),
                                          limit=ev.lm_eval_limit or None, batch_size=ev.batch_size)
        except Exception as e:   # no network, unknown task: say so, never fill in a number
            return {"status": f"skipped: lm-eval failed ({type(e).__name__}: {e})"}
        out["models"][name] = res["results"]
    return out


def run_benchmark(session) -> dict:
    """07: every variant answers the same items greedily; rows, results and a per-category figure."""
    ev, p = session.config.evaluation, session.paths
    check_variants(session, ev.variants)
    items = load_suite(ev.benchmark_items, session.config.seed)
    rows, models = [], {}
    for name, model, tok in iter_variants(session, ev.variants):
        inputs = chat_input_ids(tok, [[{"role": "user", "content": it["prompt"]}] for it in items])
        outs = generate(model, tok, inputs, Sampling.greedy(ev.max_new_tokens), ev.batch_size, desc=f"07 {name}")
        vrows = [{"model": name, "prompt_id": it["id"], "category": it["category"], "prompt": it["prompt"],
                  "output": o.text, "output_tokens": o.n_tokens, "stopped_on_eos": o.ended, **score_output(it, o.text)}
                 for it, o in zip(items, outs)]
        rows += vrows
        models[name] = summarise(vrows)
    write_jsonl(p.evaluation_results / "benchmark_generations.jsonl", rows)
    results = {"models": models, "suite": SUITE.name, "items": [it["id"] for it in items],
               "max_new_tokens": ev.max_new_tokens, "decoding": "greedy", "profile": session.profile.name,
               "lm_eval": lm_eval_results(session)}
    write_json(p.evaluation_results / "benchmark_results.json", results)
    grouped_bars({m: r["per_category"] for m, r in models.items()}, p.evaluation_figures / "benchmark_by_category.png",
                 "Benchmark: share of items passed, by category", "prompt-level accuracy")
    return results
