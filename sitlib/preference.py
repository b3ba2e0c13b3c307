"""Stage 04: preference pairs — candidates from a model that can answer, checked and scored, best vs worst.

Candidates come from `preference.candidate_source`: "teacher" (the 02 teacher at each temperature) or "sft" (the
student with the 05 adapter). Never the raw base student: it has not learned the chat template it would be
prompted with. Constrained prompts pair an answer that passes every check (chosen) with one that fails (rejected);
the others pair the best-scored finished answer with the worst-scored one. A cut-off answer is never chosen.
"""
from __future__ import annotations

import functools
import random
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .artifacts import append_jsonl, read_jsonl, write_jsonl, write_metrics
from .config import PreferenceConfig
from .errors import BadInputError, ConfigError, MissingInputError
from .generation import Sampling, chat_input_ids, generate, penalty_processors
from .sharding import Shards

SOURCES = ("teacher", "sft")


def prompts_from_sft(session) -> list[dict]:
    """Filtered instructions (train then val), capped at preference.max_prompts: {id, prompt} plus, for a
    constrained row, its constraints and the 02 teacher's answers (the kept one passed, the failed ones did not),
    unless preference.teacher_answers is off.
    A kept answer that code edited (generation.constraint_repair) is left out: paired with the sample it was
    edited from, DPO would learn the edit (a quote added, commas dropped) rather than to follow the request."""
    p = session.paths
    rows = read_jsonl(p.data_filtered / "sft_train.jsonl", "03_quality_filtering") + \
        read_jsonl(p.data_filtered / "sft_val.jsonl", "03_quality_filtering")
    cfg = session.config.preference
    items = []
    for r in rows[: cfg.max_prompts]:
        it = {"id": r["id"], "prompt": r["prompt"][-1]["content"]}
        if r.get("constraints"):
            answers = ([] if r.get("repaired") else [r["completion"][-1]["content"]]) + r.get("failed_answers", [])
            it.update(constraints=r["constraints"], base_instruction=r.get("base_instruction", it["prompt"]),
                      answers_02=answers if cfg.teacher_answers else [])
        items.append(it)
    return items


def model_roles(session) -> tuple[str, ...]:
    """The configured models 04 loads: the candidate writer's base and, for the reward-model scorer, the reward."""
    roles = ("teacher",) if session.config.preference.candidate_source == "teacher" else ("student",)
    return roles + (("reward",) if session.config.models.scorer == "reward_model" else ())


def load_candidate_model(session):
    """(tokenizer, model, description) of the model that writes the candidates, per preference.candidate_source."""
    from .models import load_model, load_tokenizer

    source, models = session.config.preference.candidate_source, session.config.models
    if source == "teacher":
        model = load_model(models.teacher, session.profile, role="teacher")   # 4-bit where the profile says so
        return load_tokenizer(models.teacher), model, f"teacher {models.teacher}"
    if source == "sft":
        from peft import PeftModel

        from .variants import adapter_dir

        final = adapter_dir(session, "sft")
        if not (final / "adapter_config.json").exists():
            raise MissingInputError(f"preference.candidate_source is 'sft' but the SFT adapter {final} is missing "
                                    "(run 05_sft_training first, or set preference.candidate_source to 'teacher')")
        model = PeftModel.from_pretrained(load_model(models.student, session.profile), str(final)).eval()
        return load_tokenizer(models.student), model, f"sft adapter {final} on {models.student}"
    raise ConfigError(f"config key 'preference.candidate_source': expected one of {', '.join(SOURCES)}, "
                      f"got {source!r}")


def source_label(source: str, temperature: float) -> str:
    """"sft@0.8", or "sft@greedy" for temperature 0."""
    return f"{source}@{'greedy' if temperature == 0 else temperature}"


def sample_candidates(model, tok, items: list[dict], cfg: PreferenceConfig, seed: int) -> list[list]:
    """Completions per item, one per temperature: the sampled ones in one `generate` call (one Sampling per row),
    at most preference.batch_size rows in flight. A temperature of 0 is the greedy answer, decoded as 07 decodes
    (no repetition penalty; up to preference.max_new_tokens), in a second call."""
    import torch

    inputs = chat_input_ids(tok, [[{"role": "user", "content": it["prompt"]}] for it in items])
    temps = list(cfg.temperatures)
    hot = [t for t in temps if t != 0]
    torch.manual_seed(seed)
    flat = generate(model, tok, [x for x in inputs for _ in hot],
                    [Sampling(cfg.max_new_tokens, t, cfg.top_p) for _ in inputs for t in hot], cfg.batch_size,
                    penalty_processors(cfg.repetition_penalty)) if hot else []
    greedy = generate(model, tok, inputs, Sampling.greedy(cfg.max_new_tokens), cfg.batch_size) \
        if len(hot) < len(temps) else []
    out = []
    for i in range(len(items)):
        sampled = iter(flat[i * len(hot):(i + 1) * len(hot)])
        out.append([greedy[i] if t == 0 else next(sampled) for t in temps])
    return out


def candidate_records(items: list[dict], completions: list[list], cfg: PreferenceConfig, source: str,
                      scorer) -> list[dict]:
    """Every candidate with its source, temperature, EOS flag, score and, for a constrained prompt, its checks."""
    from . import constraints

    records = []
    for it, comps in zip(items, completions):
        cands = [{"source": source_label(source, t), "temperature": t, "text": c.text, "ended": c.ended}
                 for t, c in zip(cfg.temperatures, comps)]
        # the 02 teacher's answers of a constrained row (ended: 03 kept only finished ones as the completion)
        cands += [{"source": "02 teacher", "temperature": None, "text": a, "ended": True}
                  for a in it.get("answers_02", [])]
        if it.get("constraints"):
            for c in cands:
                c["passed"] = constraints.check(it["constraints"], c["text"], it["base_instruction"])
                c["pass"] = bool(c["text"].strip()) and all(c["passed"])
        records.append({**{k: it[k] for k in ("id", "prompt", "constraints") if k in it},
                        "candidate_source": source, "scorer": scorer.name, "candidates": cands})
    flat = [(r["prompt"], c) for r in records for c in r["candidates"]]
    scores = scorer.score([p for p, _ in flat], [c["text"] for _, c in flat], [c["ended"] for _, c in flat])
    for (_, c), s in zip(flat, scores):
        c["score"] = s
    return records


def wave_size(cfg: PreferenceConfig) -> int:
    """Prompts per generate call and checkpoint: preference.chunk_size, but never so few that the call's
    prompts × temperatures fall below a full preference.batch_size."""
    return max(cfg.chunk_size, -(-cfg.batch_size // max(1, len(cfg.temperatures))))


def candidate_shards(session) -> Optional[Shards]:
    """The candidate writer once per device when generation.devices names several (finished waves kept for a
    resume); None on one device: 04 samples in this process, as ever."""
    from .sharding import plan
    from .variants import adapter_dir

    models, folder = session.config.models, session.paths.data_preference / ".candidates.shards"
    if session.config.preference.candidate_source == "sft":
        return plan(session, models.student, "student", adapter_dir(session, "sft"), folder)
    return plan(session, models.teacher, "teacher", folder=folder)


def _sample_process(cfg: PreferenceConfig, seed: int, tok, model):
    from .sharding import plain

    return lambda item: [plain(c) for c in sample_candidates(model, tok, item["items"], cfg, seed + item["id"])]


def _sample_sharded(session, tok, model, waves: list[list[dict]], source: str, shards: Shards) -> list[list]:
    """Every wave's completions, the waves spread over the devices; each seeded as in one process (by its first
    prompt id), so the candidates equal a one-device run's."""
    from .sharding import completions, run, settings
    from .training import adapter_digest

    cfg, seed = session.config.preference, session.config.seed
    work = [{"id": w[0]["id"], "items": w} for w in waves]
    # the SFT adapter by content: a retrained one must not reuse the old adapter's finished waves
    adapter = shards.adapter and adapter_digest(Path(shards.adapter))
    key = {"cfg": settings(cfg), "seed": seed, "source": source, "model": shards.name, "adapter": adapter,
           "work": work}
    out = run(shards, model, tok, functools.partial(_sample_process, cfg, seed), work, key, shards.folder)
    return [[completions(c) for c in wave] for wave in out]


def sample_all(session, tok, model, scorer, items: list[dict], source: str) -> dict:
    """Resumable: candidates for every item not yet in data/preference/candidates.jsonl, appended per wave."""
    cfg, path = session.config.preference, session.paths.data_preference / "candidates.jsonl"
    old = read_jsonl(path) if path.exists() else []
    other = {r["candidate_source"] for r in old} - {source}
    if other:
        raise BadInputError(f"{path} holds candidates from {', '.join(sorted(other))}, not {source!r}: delete it to "
                            "sample anew, or set preference.candidate_source back")
    have = {r["id"] for r in old}
    todo = [it for it in items if it["id"] not in have]
    if have:
        print(f"resuming: {len(have)} prompts already have candidates in {path}")
    t0, bar = time.perf_counter(), tqdm(total=len(items), initial=len(items) - len(todo), desc="04", unit="prompt")
    step = wave_size(cfg)
    waves = [todo[start:start + step] for start in range(0, len(todo), step)]
    shards = candidate_shards(session) if waves else None
    sampled = _sample_sharded(session, tok, model, waves, source, shards) if shards else None
    for k, wave in enumerate(waves):
        comps = sampled[k] if sampled is not None else \
            sample_candidates(model, tok, wave, cfg, session.config.seed + wave[0]["id"])
        append_jsonl(path, candidate_records(wave, comps, cfg, source, scorer))
        bar.update(len(wave))
    bar.close()
    secs = time.perf_counter() - t0
    return {"prompts_sampled_this_run": len(todo), "seconds_this_run": round(secs, 2),
            "prompts_per_second": round(len(todo) / secs, 3) if todo and secs else None}


def read_candidates(session) -> list[dict]:
    return read_jsonl(session.paths.data_preference / "candidates.jsonl", "04_preference_generation")


def picks(record: dict, k: int = 1) -> list[tuple[dict, dict, str]]:
    """Up to k (chosen, rejected, rule) for one prompt, best first; none when it has no usable pair. Never a
    cut-off chosen. A checked prompt pairs its passing answers, best first, with its failing ones, worst first (each
    answer once), except that a failing greedy answer (temperature 0) is rejected first: with the SFT model writing
    the candidates it is the answer 07 scores, so that pair moves what evaluation sees. A scored prompt gives its
    best finished answer against its worst."""
    cands = [c for c in record["candidates"] if c["text"].strip()]
    if record.get("constraints"):
        good = sorted((c for c in cands if c["pass"] and c["ended"]), key=lambda c: -c["score"])
        bad = sorted((c for c in cands if not c["pass"]), key=lambda c: (c.get("temperature") != 0, c["score"]))
        return [(g, b, "constraint_check") for g, b in zip(good, bad)][:k]
    finished = [c for c in cands if c["ended"]]
    if not finished:
        return []
    return [(max(finished, key=lambda c: c["score"]), min(cands, key=lambda c: c["score"]), "score")]


def pick(record: dict) -> tuple[dict, dict, str] | None:
    """The prompt's best (chosen, rejected, rule), or None."""
    return next(iter(picks(record)), None)


def to_pairs(record: dict, min_margin: float, k: int = 1) -> list[dict]:
    """TRL's prompt/chosen/rejected rows of one prompt (at most k); score pairs need margin ≥ min_margin, check
    pairs only pass vs fail."""
    rows = []
    for best, worst, rule in picks(record, k):
        margin = best["score"] - worst["score"]
        if best["text"].strip() == worst["text"].strip() or (rule == "score" and margin < min_margin):
            continue
        rows.append({"id": record["id"], "prompt": [{"role": "user", "content": record["prompt"]}],
                     "chosen": [{"role": "assistant", "content": best["text"]}],
                     "rejected": [{"role": "assistant", "content": worst["text"]}],
                     "score_chosen": best["score"], "score_rejected": worst["score"], "margin": round(margin, 4),
                     "pair_rule": rule, "chosen_from": best["source"], "rejected_from": worst["source"],
                     "candidate_source": record["candidate_source"], "scorer": record["scorer"]})
    return rows


def to_pair(record: dict, min_margin: float) -> dict | None:
    """The prompt's best pair as TRL's row, or None."""
    return next(iter(to_pairs(record, min_margin)), None)


def margins(records: list[dict]) -> list[float]:
    """Chosen − rejected score of every prompt that has a pair, before the min_margin cut (the histogram)."""
    out = []
    for r in records:
        picked = pick(r)
        if picked:
            out.append(round(picked[0]["score"] - picked[1]["score"], 4))
    return out


def make_pairs(session, records: list[dict]) -> list[dict]:
    cfg = session.config.preference
    pairs = [x for r in records for x in to_pairs(r, cfg.min_margin, cfg.pairs_per_prompt)]
    if len(pairs) < 2:
        raise BadInputError(f"only {len(pairs)} of {len(records)} prompts gave a pair (margin ≥ "
                            f"{session.config.preference.min_margin} or pass vs fail): too few for DPO; lower "
                            "preference.min_margin or raise preference.max_prompts")
    return pairs


def write_pairs(session, pairs: list[dict], records: list[dict], sampling: dict) -> dict:
    """dpo_{train,val}.jsonl (seeded shuffle of the prompts: a prompt's pairs stay on one side), the margin histogram
    and preference_metrics.json."""
    from .figures import histogram

    cfg, p = session.config.preference, session.paths
    by_prompt: dict = {}
    for x in pairs:
        by_prompt.setdefault(x["id"], []).append(x)
    groups = list(by_prompt.values())
    random.Random(session.config.seed).shuffle(groups)
    wanted, val, train = max(1, round(len(pairs) * cfg.val_fraction)), [], []
    for group in groups:   # whole prompts into validation until it holds its share, training keeping some
        room = len(val) < wanted and len(val) + len(group) < len(pairs)
        (val if room else train).extend(group)
    if not val:   # one prompt held every pair (a tiny run): it gives to both sides
        val, train = train[:1], train[1:]
    write_jsonl(p.data_preference / "dpo_train.jsonl", train)
    write_jsonl(p.data_preference / "dpo_val.jsonl", val)
    n_val = len(val)
    histogram(margins(records), p.evaluation_figures / "preference_margins.png",
              "Chosen − rejected score per prompt", "margin", cfg.min_margin)
    ms = [x["margin"] for x in pairs]
    ended = {(r["id"], c["text"]): c["ended"] for r in records for c in r["candidates"]}
    metrics = {"prompts": len(records), "pairs": len(pairs), "dpo_train": len(pairs) - n_val, "dpo_val": n_val,
               "pairs_by_rule": {k: sum(x["pair_rule"] == k for x in pairs) for k in ("constraint_check", "score")},
               "mean_margin": round(sum(ms) / len(ms), 4), "min_margin": cfg.min_margin,
               "candidate_source": records[0]["candidate_source"], "scorer": records[0]["scorer"],
               "temperatures": list(cfg.temperatures), "samples_per_prompt": len(cfg.temperatures),
               "pairs_per_prompt": cfg.pairs_per_prompt,
               "chosen_ended_rate": round(sum(ended[(x["id"], x["chosen"][0]["content"])] for x in pairs)
                                          / len(pairs), 4),
               # who wrote each side: this run's candidates (source@temperature) or the 02 teacher's answers;
               # and how: greedy or at which temperature (the 02 teacher's answers under their own name)
               **{f"{side}_from": dict(Counter(x[f"{side}_from"].split("@")[0] for x in pairs))
                  for side in ("chosen", "rejected")},
               **{f"{side}_decoding": dict(Counter(x[f"{side}_from"].split("@")[-1] for x in pairs))
                  for side in ("chosen", "rejected")}, **sampling}
    write_metrics(p.evaluation_metrics / "preference_metrics.json", metrics, session.config)
    return metrics


def run_preference(session, candidate_model=None, scorer=None) -> dict:
    """04 in one call (the CLI's): sample (resuming), score, pair, write. candidate_model: (tok, model)."""
    from .scoring import build_scorer

    items = prompts_from_sft(session)
    source = session.config.preference.candidate_source
    if source not in SOURCES:
        raise ConfigError(f"config key 'preference.candidate_source': expected one of {', '.join(SOURCES)}, "
                          f"got {source!r}")
    tok, model = candidate_model or load_candidate_model(session)[:2]
    scorer = scorer or build_scorer(session, (tok, model))
    sampling = sample_all(session, tok, model, scorer, items, source)
    records = read_candidates(session)
    return write_pairs(session, make_pairs(session, records), records, sampling)


def show_candidates(record: dict, width: int = 200) -> list[dict]:
    """One prompt's candidates for reading: where each came from, its score, EOS flag and checks."""
    return [{"from": c["source"], "score": c["score"], "ended": c["ended"], "pass": c.get("pass"),
             "text": c["text"][:width]} for c in record["candidates"]]


def show_pair(pair: dict, width: int = 300) -> dict:
    return {"prompt": pair["prompt"][0]["content"][:width], "chosen": pair["chosen"][0]["content"][:width],
            "rejected": pair["rejected"][0]["content"][:width], "margin": pair["margin"], "rule": pair["pair_rule"],
            "chosen_from": pair["chosen_from"], "rejected_from": pair["rejected_from"]}
