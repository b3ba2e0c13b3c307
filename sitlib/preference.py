"""Stage 04: preference pairs — N samples per instruction at varied temperatures, scored, best vs worst."""
from __future__ import annotations

import random
import time
import torch
from tqdm.auto import tqdm

from .artifacts import append_jsonl, read_jsonl, write_jsonl, write_metrics
from .config import PreferenceConfig
from .figures import histogram
from .generation import Sampling, chat_input_ids, generate


def prompts_from_sft(session) -> list[dict]:
    """Filtered instructions (train then val) as {id, prompt-text}, capped at preference.max_prompts."""
    p = session.paths
    rows = read_jsonl(p.data_filtered / "sft_train.jsonl", "03_quality_filtering") + \
        read_jsonl(p.data_filtered / "sft_val.jsonl", "03_quality_filtering")
    return [{"id": r["id"], "prompt": r["prompt"][-1]["content"]} for r in rows][: session.config.preference.max_prompts]


def sample_and_score(model, tok, scorer, items: list[dict], cfg: PreferenceConfig, seed: int) -> list[dict]:
    """One candidate record per item: every sample with its temperature, score and EOS flag."""
    torch.manual_seed(seed)
    inputs = chat_input_ids(tok, [[{"role": "user", "content": it["prompt"]}] for it in items])
    samples = []   # per temperature, a list over items
    for t in cfg.temperatures:
        samples.append(generate(model, tok, inputs, Sampling(cfg.max_new_tokens, t, cfg.top_p), cfg.batch_size))
    flat_p = [it["prompt"] for it in items for _ in cfg.temperatures]
    flat_c = [samples[k][i] for i in range(len(items)) for k in range(len(cfg.temperatures))]
    scores = scorer.score(flat_p, [c.text for c in flat_c], [c.ended for c in flat_c])
    records, n = [], len(cfg.temperatures)
    for i, it in enumerate(items):
        cands = [{"temperature": t, "text": c.text, "ended": c.ended, "score": s}
                 for t, c, s in zip(cfg.temperatures, flat_c[i * n:(i + 1) * n], scores[i * n:(i + 1) * n])]
        records.append({"id": it["id"], "prompt": it["prompt"], "scorer": scorer.name, "candidates": cands})
    return records


def to_pair(record: dict, min_margin: float) -> dict | None:
    """Best → chosen, worst → rejected; None unless the texts differ and the margin reaches min_margin."""
    cands = sorted(record["candidates"], key=lambda c: c["score"])
    worst, best = cands[0], cands[-1]
    margin = best["score"] - worst["score"]
    if margin < min_margin or best["text"].strip() == worst["text"].strip() or not best["text"].strip():
        return None
    return {"id": record["id"], "prompt": [{"role": "user", "content": record["prompt"]}],
            "chosen": [{"role": "assistant", "content": best["text"]}],
            "rejected": [{"role": "assistant", "content": worst["text"]}],
            "score_chosen": best["score"], "score_rejected": worst["score"], "margin": round(margin, 4),
            "scorer": record["scorer"]}


def run_preference(session, student=None, scorer=None) -> dict:
    """04: resumable sampling into data/preference/candidates.jsonl, then pairs split into dpo_{train,val}."""
    from .models import load_model, load_tokenizer
    from .scoring import build_scorer

    cfg, p = session.config.preference, session.paths
    items = prompts_from_sft(session)
    cand_path = p.data_preference / "candidates.jsonl"
    done_ids = {r["id"] for r in read_jsonl(cand_path)} if cand_path.exists() else set()
    todo = [it for it in items if it["id"] not in done_ids]
    if done_ids:
        print(f"resuming: {len(done_ids)} prompts already scored in {cand_path}")
    t0 = time.perf_counter()
    if todo:
        name = session.config.models.student
        tok, model = student or (load_tokenizer(name), load_model(name, session.profile))
        scorer = scorer or build_scorer(session, (tok, model))
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="preference", unit="prompt")
        for start in range(0, len(todo), cfg.chunk_size):
            chunk = todo[start:start + cfg.chunk_size]
            append_jsonl(cand_path, sample_and_score(model, tok, scorer, chunk, cfg, session.config.seed + start))
            bar.update(len(chunk))
        bar.close()
    return finish_pairs(session, time.perf_counter() - t0, len(todo))


def finish_pairs(session, seconds: float, sampled: int) -> dict:
    cfg, p = session.config.preference, session.paths
    records = read_jsonl(p.data_preference / "candidates.jsonl")
    pairs = [x for x in (to_pair(r, cfg.min_margin) for r in records) if x]
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} of {len(records)} prompts gave a pair with margin ≥ {cfg.min_margin}: "
                         "too few for DPO; lower preference.min_margin or raise preference.max_prompts")
    random.Random(session.config.seed).shuffle(pairs)
    n_val = max(1, round(len(pairs) * cfg.val_fraction))
    write_jsonl(p.data_preference / "dpo_train.jsonl", pairs[n_val:])
    write_jsonl(p.data_preference / "dpo_val.jsonl", pairs[:n_val])
    margins = [x["margin"] for x in pairs]
    all_margins = [max(c["score"] for c in r["candidates"]) - min(c["score"] for c in r["candidates"]) for r in records]
    histogram(all_margins, p.evaluation_figures / "preference_margins.png", "Best − worst score per prompt",
              "margin", cfg.min_margin)
    metrics = {"prompts": len(records), "pairs": len(pairs), "dpo_train": len(pairs) - n_val, "dpo_val": n_val,
               "mean_margin": round(sum(margins) / len(margins), 4), "min_margin": cfg.min_margin,
               "scorer": records[0]["scorer"], "samples_per_prompt": len(cfg.temperatures),
               "prompts_sampled_this_run": sampled, "seconds_this_run": round(seconds, 2)}
    ended = {(r["id"], c["text"]): c["ended"] for r in records for c in r["candidates"]}
    metrics["chosen_ended_rate"] = round(sum(ended[(x["id"], x["chosen"][0]["content"])] for x in pairs) / len(pairs), 4)
    write_metrics(p.evaluation_metrics / "preference_metrics.json", metrics, session.config)
    return metrics


def first_pair(session) -> dict:
    row = read_jsonl(session.paths.data_preference / "dpo_train.jsonl", "04_preference_generation")[0]
    return {"prompt": row["prompt"][0]["content"], "chosen": row["chosen"][0]["content"],
            "rejected": row["rejected"][0]["content"], "margin": row["margin"]}
