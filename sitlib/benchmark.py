"""Stage 07's building blocks: the built-in verifiable suite (IFEval instructions and exact-answer items scored by
code), per-variant generation that resumes, summaries, failed items, and IFEval's official prompts when the Hub is
reachable."""
from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .artifacts import jsonl_lines, parse_jsonl_line, read_json, write_json
from .checks import ANSWER_TYPES, run_check
from .errors import BadInputError

SUITE = Path(__file__).parent / "data" / "benchmark.jsonl"
OFFICIAL_DATASET = "google/IFEval"

# lm-eval's hf model scores whole sequences (logits over the vocabulary for every token), unlike the generation
# pool, which is sized by free memory: it keeps the batch the 80 GB profiles had before their pools grew (64)
LM_EVAL_BATCH = 64


def _valid(item: dict, path: Path, n: int) -> dict:
    from .checks import INSTRUCTION_DICT

    for c in item["checks"] if isinstance(item.get("checks"), list) and item["checks"] else [None]:
        if not isinstance(c, dict) or (c.get("type") not in INSTRUCTION_DICT and c.get("type") not in ANSWER_TYPES):
            raise BadInputError(f"{path}, line {n}: each check needs a 'type' (an IFEval instruction id or one of "
                                f"{', '.join(ANSWER_TYPES)}); got {c!r}")
    return item


def load_suite(n_items: int = 0, seed: int = 42, path: Path = SUITE) -> list[dict]:
    """The whole suite, or a seeded subset of n_items that keeps every category represented where possible."""
    fields = ("id", "category", "prompt", "checks")
    items = [_valid(parse_jsonl_line(path, n, line, fields), Path(path), n) for n, line in jsonl_lines(path)]
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
    """Every check of the item, in order (two checks of one type are two results), and whether all passed."""
    results = [{"type": c["type"], "passed": run_check(c, text, item["prompt"])} for c in item["checks"]]
    return {"checks": results, "passed": all(r["passed"] for r in results)}


def summarise(rows: list[dict]) -> dict:
    """Accuracies as exact means of the per-row results."""
    n = len(rows)
    checks = [c for r in rows for c in r["checks"]]
    cats, types = defaultdict(list), defaultdict(list)
    for r in rows:
        cats[r["category"]].append(r["passed"])
    for c in checks:
        types[c["type"]].append(c["passed"])
    return {"prompt_level_accuracy": round(sum(r["passed"] for r in rows) / n, 4),
            "instruction_level_accuracy": round(sum(c["passed"] for c in checks) / len(checks), 4),
            "eos_stop_rate": round(sum(r["stopped_on_eos"] for r in rows) / n, 4),
            "mean_output_tokens": round(sum(r["output_tokens"] for r in rows) / n, 2),
            "n_prompts": n, "n_checks": len(checks),
            "per_category": {c: round(sum(v) / len(v), 4) for c, v in sorted(cats.items())},
            "per_instruction": {t: round(sum(v) / len(v), 4) for t, v in sorted(types.items())}}


# ---------------------------------------------------------------- per-variant results that resume

def run_key(session, items: list[dict], fresh: dict) -> dict:
    """What a variant's results depend on: a rerun reuses them only when all of it is the same."""
    ev = session.config.evaluation
    suite = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
    return {"suite": suite, "max_new_tokens": ev.max_new_tokens, "student": session.config.models.student,
            "adapter_fingerprint": fresh.get("fingerprint")}


def variant_file(session, name: str, kind: str = "benchmark") -> Path:
    return session.paths.evaluation_results / kind / f"{name}.json"


def finished(session, name: str, key: dict, kind: str = "benchmark") -> Optional[dict]:
    """The saved results of `name` when they were made with the same key, else None."""
    f = variant_file(session, name, kind)
    if f.exists():
        saved = read_json(f)
        if saved.get("key") == key:
            return saved
    return None


def answers(session, name: str, model, tok, prompts: list[str], desc: str) -> list:
    """Greedy answers of variant `name` to each prompt: in this process, or split over the devices that
    generation.devices names (greedy, so the split changes no answer, up to floating-point kernels that depend
    on the batch: a near tie can go either way)."""
    from .generation import Sampling, chat_input_ids, generate
    from .sharding import for_variant, generate_greedy

    ev = session.config.evaluation
    inputs = chat_input_ids(tok, [[{"role": "user", "content": p}] for p in prompts])
    shards = for_variant(session, name)
    if shards is None:
        return generate(model, tok, inputs, Sampling.greedy(ev.max_new_tokens), ev.batch_size, desc=desc)
    return generate_greedy(shards, model, tok, inputs, Sampling.greedy(ev.max_new_tokens), ev.batch_size)


def generate_rows(session, name: str, model, tok, items: list[dict]) -> list[dict]:
    """Greedy answers of one variant to every item, each scored."""
    outs = answers(session, name, model, tok, [it["prompt"] for it in items], f"07 {name}")
    return [{"model": name, "prompt_id": it["id"], "category": it["category"], "prompt": it["prompt"],
             "output": o.text, "output_tokens": o.n_tokens, "stopped_on_eos": o.ended, **score_output(it, o.text)}
            for it, o in zip(items, outs)]


def run_variant(session, name: str, model, tok, items: list[dict], key: dict) -> dict:
    """One variant answers every item; rows and summary saved at once (a rerun skips a saved variant)."""
    return save_variant(session, name, key, generate_rows(session, name, model, tok, items))


def save_variant(session, name: str, key: dict, rows: list[dict], kind: str = "benchmark", summary=None) -> dict:
    """One variant's rows and summary, written atomically: a kill leaves either the old file or the new one."""
    out = {"variant": name, "key": key, "summary": summary or summarise(rows), "rows": rows}
    write_json(variant_file(session, name, kind), out)
    return out


def failed_items(rows: list[dict], k: int = 3) -> list[dict]:
    """Up to k failed items per variant, with the checks that failed."""
    out, seen = [], defaultdict(int)
    for r in rows:
        if not r["passed"] and seen[r["model"]] < k:
            seen[r["model"]] += 1
            out.append({"variant": r["model"], "id": r["prompt_id"], "prompt": r["prompt"], "output": r["output"],
                        "failed": [c["type"] for c in r["checks"] if not c["passed"]]})
    return out


def write_results(session, done: dict[str, dict], items: list[dict], official: dict, lm_eval: dict) -> dict:
    """evaluation/results/benchmark_results.json (read by 09) and the per-category figure, from the per-variant
    results."""
    from .comparison import grouped_bars_marked

    ev, p = session.config.evaluation, session.paths
    results = {"models": {n: d["summary"] for n, d in done.items()}, "suite": SUITE.name,
               "items": [it["id"] for it in items], "max_new_tokens": ev.max_new_tokens, "decoding": "greedy",
               "profile": session.profile.name, "official_ifeval": official, "lm_eval": lm_eval,
               "versus_base": versus_base(done), "dpo_versus_sft": dpo_versus_sft(done)}
    write_json(p.evaluation_results / "benchmark_results.json", results)
    grouped_bars_marked({n: d["summary"]["per_category"] for n, d in done.items()},
                        p.evaluation_figures / "benchmark_by_category.png",
                        f"Built-in suite ({len(items)} items): share passed by category", "prompt-level accuracy")
    return results


def category_table(done: dict[str, dict]):
    """Categories × variants: share of items passed, with the number of items per category."""
    import pandas as pd

    table = pd.DataFrame({n: d["summary"]["per_category"] for n, d in done.items()})
    counts = pd.Series([r["category"] for r in next(iter(done.values()))["rows"]]).value_counts()
    table.insert(0, "items", counts.reindex(table.index))
    overall = {n: d["summary"]["prompt_level_accuracy"] for n, d in done.items()}
    table.loc["all (prompt level)"] = {"items": int(counts.sum()), **overall}
    return table


def sign_test_p(won: int, lost: int) -> float:
    """Two-sided exact sign test on the items two variants disagree on: how likely a split at least this uneven
    is when neither variant is better (ties, the items both pass or both fail, carry no information)."""
    from math import comb

    n, k = won + lost, min(won, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def versus_base(done: dict[str, dict], base: str = "base") -> list[dict]:
    """Each variant against `base` on the same items: points gained, items won and lost, the sign test's p, the
    categories where it lost most, and how its answers changed (EOS stops, length): the measured part of *why* a
    variant scores below the base."""
    if base not in done:
        return []
    ref = {r["prompt_id"]: r for r in done[base]["rows"]}
    out = []
    for name, d in done.items():
        if name == base:
            continue
        net, won, lost = defaultdict(int), 0, 0
        for r in d["rows"]:
            b = ref[r["prompt_id"]]
            if r["passed"] != b["passed"]:
                won, lost = won + r["passed"], lost + b["passed"]
                net[r["category"]] += 1 if r["passed"] else -1
        s, sb = d["summary"], done[base]["summary"]
        # from the counts, not the rounded accuracies: the items are the same, so the gap is (won - lost) / n
        out.append({"variant": name, "points": round(100 * (won - lost) / len(d["rows"]), 1),
                    "won": won, "lost": lost, "sign_test_p": round(sign_test_p(won, lost), 4),
                    "lost_most": [f"{c} ({v})" for c, v in sorted(net.items(), key=lambda x: x[1]) if v < 0][:3],
                    "eos_stop_rate": (sb["eos_stop_rate"], s["eos_stop_rate"]),
                    "mean_output_tokens": (sb["mean_output_tokens"], s["mean_output_tokens"])})
    return out


def dpo_versus_sft(done: dict[str, dict]) -> Optional[dict]:
    """DPO against the SFT model it started from, as versus_base counts it: DPO's target is measured from SFT."""
    if "sft" not in done or "dpo" not in done:
        return None
    return versus_base({"sft": done["sft"], "dpo": done["dpo"]}, base="sft")[0]


PAIRED_KEYS = ("variant", "points", "won", "lost", "sign_test_p")


def paired_counts(done: dict[str, dict]) -> dict:
    """versus_base and dpo_versus_sft cut to their counts and sign test: what the records under bench/ keep."""
    def cut(c: dict) -> dict:
        return {k: c[k] for k in PAIRED_KEYS}

    vs = dpo_versus_sft(done)
    return {"versus_base": [cut(c) for c in versus_base(done)], "dpo_versus_sft": cut(vs) if vs else None}


def below_base_notes(comparisons: list[dict], alpha: float = 0.05) -> list[str]:
    """One sentence per variant below the base, from versus_base's numbers."""
    notes = []
    for c in comparisons:
        if c["points"] >= 0:
            continue
        chance = ("within what chance gives on these items" if c["sign_test_p"] >= alpha
                  else "more than chance explains")
        notes.append(f"{c['variant']}: {c['points']:+.1f} points against base — {c['lost']} items lost, {c['won']} won "
                     f"(sign test p = {c['sign_test_p']:.3f}: {chance}); lost most in "
                     f"{', '.join(c['lost_most']) or 'no category'}; EOS stops {c['eos_stop_rate'][0]:.2f} → "
                     f"{c['eos_stop_rate'][1]:.2f}, mean answer {c['mean_output_tokens'][0]:.0f} → "
                     f"{c['mean_output_tokens'][1]:.0f} tokens")
    return notes


# ---------------------------------------------------------------- IFEval's own prompts (needs the Hub)

def official_prompts(session) -> tuple[list, str]:
    """(samples, status): IFEval's 541 prompts through if-verifiable (datasets downloads google/IFEval), or no
    samples and a sentence saying why they were skipped."""
    import os

    if not session.config.evaluation.official_ifeval:
        return [], "not requested (evaluation.official_ifeval is false)"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return [], f"skipped: offline (HF_HUB_OFFLINE), and {OFFICIAL_DATASET} comes from the Hugging Face Hub"
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(OFFICIAL_DATASET, timeout=10)   # fail fast when the Hub is unreachable
        from if_verifiable import get_eval_data

        samples = list(get_eval_data("ifeval"))
    except Exception as e:   # no network, proxy, hub outage: say so, never fill in a number
        return [], f"skipped: {OFFICIAL_DATASET} could not be loaded from the Hub ({type(e).__name__}: {str(e)[:120]})"
    return samples, f"ran: {len(samples)} prompts of {OFFICIAL_DATASET}"


def score_official(samples: list, texts: list[str]) -> dict:
    """IFEval's strict and loose accuracies over its own prompts (if-verifiable's checks). Instruction level is
    over all instructions: an empty answer fails each of its prompt's instructions (if-verifiable lists none)."""
    from if_verifiable import evaluate_output_for_sample

    n_prompts = n_instr = 0
    tally = {"prompt_level_strict": 0, "prompt_level_loose": 0, "instruction_level_strict": 0,
             "instruction_level_loose": 0}
    for sample, text in zip(samples, texts):
        results, scores = evaluate_output_for_sample("ifeval", sample, text)
        n_prompts, n_instr = n_prompts + 1, n_instr + len(sample.instruction_id_list)
        tally["prompt_level_strict"] += scores.binary_strict
        tally["prompt_level_loose"] += scores.binary_loose
        tally["instruction_level_strict"] += sum(r.strict_pass for r in results)
        tally["instruction_level_loose"] += sum(r.loose_pass for r in results)
    out = {k: round(v / (n_prompts if k.startswith("prompt") else n_instr), 4) for k, v in tally.items()}
    return {**out, "n_prompts": n_prompts, "n_instructions": n_instr}


def run_official(session, name: str, model, tok, samples: list, key: dict) -> dict:
    """One variant on IFEval's prompts, scored; saved like the suite's results so a rerun skips it."""
    outs = answers(session, name, model, tok, [s.prompt for s in samples], f"IFEval {name}")
    rows = [{"model": name, "key": s.key, "prompt": s.prompt, "output": o.text} for s, o in zip(samples, outs)]
    return save_variant(session, name, key, rows, "ifeval_official", score_official(samples, [o.text for o in outs]))


# ---------------------------------------------------------------- optional lm-evaluation-harness tasks

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
                                          limit=ev.lm_eval_limit or None,
                                          batch_size=min(ev.batch_size, LM_EVAL_BATCH))
        except Exception as e:   # no network, unknown task: say so, never fill in a number
            return {"status": f"skipped: lm-eval failed ({type(e).__name__}: {e})"}
        out["models"][name] = res["results"]
    return out

