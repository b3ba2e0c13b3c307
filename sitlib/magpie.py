"""Stage 02: Magpie instruction generation — pre-query template → instruction, full template → response."""
from __future__ import annotations

import functools
import random
import re
import time
from pathlib import Path
from typing import Iterator, Optional

from tqdm.auto import tqdm

from .artifacts import append_jsonl, read_jsonl, write_metrics
from .config import GenerationConfig
from .generation import BlockFirstTokens, Sampling, chat_input_ids, generate, penalty_processors
from .sharding import Shards

SENTINEL = "\u2063SIT-USER-TURN\u2063"
SENTINEL_2 = "\u2063SIT-ASSISTANT-TURN\u2063"
SENTINEL_3 = "\u2063SIT-SECOND-USER-TURN\u2063"


# ---------------------------------------------------------------- the pre-query template

def user_turn_header(tok) -> str:
    """What the template writes before a user's words in the middle of a chat (e.g. `<|im_start|>user\\n`).

    Read from a two-turn render: the text between the assistant's words and the second user's words, less what
    the template writes after an assistant turn that ends the chat. No system block can sit there.
    """
    one = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": SENTINEL_2}]
    two = one + [{"role": "user", "content": SENTINEL_3}]
    r1 = tok.apply_chat_template(one, tokenize=False)
    r2 = tok.apply_chat_template(two, tokenize=False)
    between = r2[r2.index(SENTINEL_2) + len(SENTINEL_2): r2.index(SENTINEL_3)]
    after_assistant = r1[r1.index(SENTINEL_2) + len(SENTINEL_2):]
    if not between.startswith(after_assistant):
        raise ValueError("cannot read the user-turn header from this chat template")
    return between[len(after_assistant):]


def pre_query_text(tok, system_prompt: Optional[str] = None) -> str:
    """The chat template up to where the user's words begin (Magpie's pre-query template).

    Without a system prompt there is no system block at all, even where the template would add a default one
    (SmolLM2's "You are a helpful AI assistant named SmolLM…", Llama-3.1's "Cutting Knowledge Date…"): the
    text is the template's BOS, if it writes one, then the user-turn header. A configured system prompt is
    rendered by the template as usual.
    """
    if system_prompt:
        msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": SENTINEL}]
        rendered = tok.apply_chat_template(msgs, tokenize=False)
        return rendered[: rendered.index(SENTINEL)]
    rendered = tok.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    header, bos = user_turn_header(tok), tok.bos_token or ""
    # The BOS stays when the template writes one before the turns; a default system block after it goes. Where
    # the "BOS" opens every turn (ChatML tokenizers whose bos is <|im_start|>) it is part of the header already.
    real_bos = bos and rendered.startswith(bos) and not header.startswith(bos)
    return (bos if real_bos else "") + header


def system_prompt_for(cfg: GenerationConfig, rng: random.Random) -> Optional[str]:
    """The configured system prompt, plus one topic from generation.task_mix when a mix is given."""
    if not cfg.task_mix:
        return cfg.system_prompt
    topic = rng.choice(cfg.task_mix)
    return ((cfg.system_prompt + " ") if cfg.system_prompt else "") + f"The user asks about: {topic}."


def trim_instruction(text: str) -> Optional[str]:
    """A cut-off instruction trimmed to its first paragraph's whole sentences, or None if nothing whole remains.

    Small teachers ramble past the request; the first paragraph usually is the request. The response pass then
    sees only the trimmed text, so the pair stays consistent.
    """
    para = text.strip().split("\n\n")[0].strip()
    ends = [m.end() for m in re.finditer(r"[.?!](?=\s|$)", para)]
    if not ends:
        return None
    trimmed = para[: ends[-1]].strip()
    return trimmed if len(trimmed.split()) >= 3 else None


# ---------------------------------------------------------------- rows on disk (resume by id)

def done_ids(path: Path) -> set[int]:
    return {r["id"] for r in read_jsonl(path)} if Path(path).exists() else set()


def count_rows(path: Path) -> int:
    return len(done_ids(path))


def pending_ids(path: Path, n: int) -> list[int]:
    """Ids 0..n-1 not yet in the file: a killed run resumes with exactly the rows it lacks."""
    have = done_ids(path)
    return [i for i in range(n) if i not in have]


def row_rng(seed: int, row_id: int) -> random.Random:
    """One generator per row id: its system topic and constraints do not depend on where a run resumed."""
    return random.Random(seed * 1_000_003 + row_id)


# ---------------------------------------------------------------- the two passes

def header_processors(tok, cfg: GenerationConfig) -> list:
    return [BlockFirstTokens.markdown_headers(tok)] if cfg.block_markdown_headers else []


def draft_instructions(model, tok, cfg: GenerationConfig, ids: list[int], seed: int, processors: list,
                       teacher: str = "", shards: Optional[Shards] = None) -> list[dict]:
    """Pass 1, one `generate` call for every id: the teacher continues the pre-query template. With shards
    (several devices), one call per chunk of ids instead, the chunks spread over the devices."""
    import torch

    if shards is not None and ids:
        return _drafts_sharded(shards, model, tok, cfg, ids, seed, bool(processors), teacher)
    systems = [system_prompt_for(cfg, row_rng(seed, i)) for i in ids]
    inputs = [tok(pre_query_text(tok, s), add_special_tokens=False)["input_ids"] for s in systems]
    torch.manual_seed(seed + (ids[0] if ids else 0))
    outs = generate(model, tok, inputs, Sampling(cfg.instruction_max_new_tokens, cfg.instruction_temperature,
                                                 cfg.instruction_top_p), cfg.batch_size,
                    processors + penalty_processors(cfg.repetition_penalty))
    rows = []
    for i, s, o in zip(ids, systems, outs):
        t = None if o.ended else trim_instruction(o.text)
        # instruction_complete: ended on EOS, or trimmed to whole sentences (instruction_trimmed says which)
        rows.append({"id": i, "instruction": t or o.text, "raw_instruction": o.text, "system_prompt": s,
                     "instruction_tokens": o.n_tokens, "instruction_complete": o.ended or t is not None,
                     "instruction_trimmed": t is not None, "teacher": teacher})
    return rows


def add_constraints(rows: list[dict], cfg: GenerationConfig, seed: int) -> list[dict]:
    """A share (generation.constraint_share) of complete instructions gets verifiable constraints appended."""
    from . import constraints

    for row in rows:
        rng = row_rng(seed + 1, row["id"])
        if cfg.constraint_share <= 0 or rng.random() >= cfg.constraint_share or not row["instruction_complete"]:
            continue
        picked = constraints.draw(rng, cfg.max_constraints, cfg.constraint_repair)
        if picked:
            row["base_instruction"] = row["instruction"]
            row["instruction"], row["constraints"] = constraints.attach(row["instruction"], picked)
    return rows


def answer_jobs(rows: list[dict], cfg: GenerationConfig) -> list[tuple[int, list[dict]]]:
    """(row index, conversation) per answer to sample: one per row, constraint_samples per constrained row."""
    jobs = []
    for k, r in enumerate(rows):
        conv = ([{"role": "system", "content": r["system_prompt"]}] if r["system_prompt"] else []) + \
            [{"role": "user", "content": r["instruction"]}]
        jobs += [(k, conv)] * (max(1, cfg.constraint_samples) if r.get("constraints") else 1)
    return jobs


def finish_row(row: dict, samples: list, repair: bool = False, passed: Optional[list] = None) -> dict:
    """The row with its response; a constrained row keeps every sample, checked by code, and a passing one. With
    `repair` (generation.constraint_repair), where no sample passed, the first finished sample that code can edit
    into a passing answer (sitlib.repair) is kept in its edited form; the samples stay as they were written.
    `passed`: the samples' checks when already made (finish_rows), else they are made here."""
    from . import constraints
    from .repair import repair as repaired

    if not row.get("constraints"):
        s = samples[0]
        return {**row, "response": s.text, "response_tokens": s.n_tokens, "response_complete": s.ended}
    cons, task = row["constraints"], row["base_instruction"]
    if passed is None:
        passed = [constraints.check(cons, s.text, task) for s in samples]
    checked = [{"text": s.text, "n_tokens": s.n_tokens, "ended": s.ended, "passed": p}
               for s, p in zip(samples, passed)]
    for c in checked:
        c["pass"] = all(c["passed"])
    # the kept answer passes every check and ended on EOS (a cut-off answer is never the one kept)
    good = [c for c in checked if c["pass"] and c["ended"]]
    best, edited = (good[0] if good else checked[0]), None
    if repair and not good:
        done = [c["text"] for c in checked if c["ended"]]   # a second response is only ever a finished sample
        edited = next(((i, e) for i, c in enumerate(checked)
                       if c["ended"] and (e := repaired(cons, c["text"], task, done))), None)
    kept = checked[edited[0]] if edited else best
    # response_tokens: what the teacher wrote in the kept sample (an edit adds a few characters; a two_responses
    # edit adds a second sample, whose tokens are not counted here)
    out = {**row, "response": edited[1] if edited else best["text"], "response_tokens": kept["n_tokens"],
           "response_complete": kept["ended"], "samples": checked, "passing_samples": len(good),
           "constraint_pass": bool(good or edited), "repaired": edited is not None}
    return {**out, "repaired_from": edited[0]} if edited else out


def finish_rows(rows: list[dict], samples: list[list], repair: bool = False) -> list[dict]:
    """finish_row of each row, the constrained samples checked together (constraints.check_many: over several
    processes where there are many and the cores to spare)."""
    from . import constraints

    items = [(r["constraints"], s.text, r["base_instruction"]) for r, ss in zip(rows, samples) if r.get("constraints")
             for s in ss]
    results = iter(constraints.check_many(items, constraints.check_workers(len(items))))
    return [finish_row(r, ss, repair, [next(results) for _ in ss] if r.get("constraints") else None)
            for r, ss in zip(rows, samples)]


# Pass 2 hands `generate` this many batches' worth of answers per call: enough for its pool to refill as rows
# finish (no call runs to its longest row every batch), few enough that finished rows reach the file during a run.
SLICE_BATCHES = 4


def answer_rows(model, tok, cfg: GenerationConfig, rows: list[dict], seed: int,
                shards: Optional[Shards] = None) -> Iterator[list[dict]]:
    """Pass 2: every answer of every row (a row's samples side by side), handed to `generate` up to
    SLICE_BATCHES × generation.batch_size answers per call; yields the rows whose answers are all done after
    each call, so they can be written at once. With shards, the chunks of pass 1 spread over the devices: it
    yields every row once all are done (the shards folder is the checkpoint meanwhile)."""
    import torch

    if shards is not None and rows:
        yield _answers_sharded(shards, model, tok, cfg, rows, seed)
        return
    jobs = answer_jobs(rows, cfg)
    inputs = chat_input_ids(tok, [conv for _, conv in jobs])
    need = [0] * len(rows)
    for k, _ in jobs:
        need[k] += 1
    got: list[list] = [[] for _ in rows]
    torch.manual_seed(seed + 7919 + (rows[0]["id"] if rows else 0))
    sampling = Sampling(cfg.response_max_new_tokens, cfg.response_temperature, cfg.response_top_p)
    # batch_size 0: generate sizes its pool by free memory, so it gets everything at once
    step = max(cfg.chunk_size, SLICE_BATCHES * cfg.batch_size) if cfg.batch_size > 0 else max(1, len(jobs))
    for start in range(0, len(jobs), step):
        idx = list(range(start, min(start + step, len(jobs))))
        done = []
        for j, c in zip(idx, generate(model, tok, [inputs[j] for j in idx], sampling, cfg.batch_size,
                                      penalty_processors(cfg.repetition_penalty))):
            k = jobs[j][0]
            got[k].append(c)
            if len(got[k]) == need[k]:
                done.append(k)
        yield finish_rows([rows[k] for k in done], [got[k] for k in done], cfg.constraint_repair)


# ---------------------------------------------------------------- both passes over several devices

def teacher_shards(session) -> Optional[Shards]:
    """One teacher per device when generation.devices names several, finished chunks kept beside the rows for a
    resume; None when it is 1: 02 generates in this process, one call for all ids, as ever. Any other setting
    samples by chunks even on one device, so a one-GPU and a several-GPU run give the same rows."""
    from .sharding import plan

    return plan(session, session.config.models.teacher, "teacher",
                folder=session.paths.data_raw / ".instructions.shards", sampled=True)


# ids per chunk over several devices at most: the 80 GB profiles cap pools at 2,048 rows, and chunks that large
# would leave 1,500 instructions in 2 chunks, so 2 GPUs of 8 busy
SHARD_IDS = 256


def work_chunks(ids: list[int], cfg: GenerationConfig) -> list[dict]:
    """The unit of randomness over several devices: a full batch (at most SHARD_IDS ids), so each device's pool
    starts full. Seeded by its first id, a chunk gives the same rows on any device and any number of devices."""
    from .distributed import chunks

    return chunks(ids, max(cfg.chunk_size, min(cfg.batch_size, SHARD_IDS)))


def _draft_process(cfg: GenerationConfig, seed: int, block: bool, teacher: str, tok, model):
    processors = [BlockFirstTokens.markdown_headers(tok)] if block else []
    return lambda item: draft_instructions(model, tok, cfg, item["ids"], seed, processors, teacher)


def _answer_process(cfg: GenerationConfig, seed: int, tok, model):
    return lambda item: [r for done in answer_rows(model, tok, cfg, item["rows"], seed) for r in done]


def _drafts_sharded(shards: Shards, model, tok, cfg, ids, seed, block, teacher) -> list[dict]:
    from .sharding import run, settings

    work = work_chunks(ids, cfg)
    key = {"pass": "drafts", "cfg": settings(cfg), "seed": seed, "block": block, "teacher": teacher, "work": work}
    out = run(shards, model, tok, functools.partial(_draft_process, cfg, seed, block, teacher), work, key,
              shards.folder and shards.folder / "drafts")
    return [r for chunk in out for r in chunk]


def _answers_sharded(shards: Shards, model, tok, cfg, rows, seed) -> list[dict]:
    from .sharding import run, settings

    by_id = {r["id"]: r for r in rows}   # the chunks of pass 1, so each answer chunk seeds as its drafts did
    work = [{"id": c["id"], "rows": [by_id[i] for i in c["ids"]]} for c in work_chunks(list(by_id), cfg)]
    key = {"pass": "answers", "cfg": settings(cfg), "seed": seed, "work": work}
    out = run(shards, model, tok, functools.partial(_answer_process, cfg, seed), work, key,
              shards.folder and shards.folder / "answers")
    return [r for chunk in out for r in chunk]


# ---------------------------------------------------------------- the stage

def row_tokens(row: dict) -> int:
    """Tokens the teacher wrote for a row: its instruction and every answer it sampled."""
    answers = sum(x["n_tokens"] for x in row["samples"]) if "samples" in row else row["response_tokens"]
    return row["instruction_tokens"] + answers


def write_in_chunks(out_path: Path, batches: Iterator[list[dict]], chunk_size: int, total: int,
                    already: int = 0) -> dict:
    """Append finished rows atomically every `chunk_size` rows as batches complete (the resume checkpoint);
    returns rows, tokens, seconds and rows/s of this run."""
    t0, made, tokens, buffer = time.perf_counter(), 0, 0, []
    bar = tqdm(total=total, initial=already, desc="Magpie", unit="row")
    for finished in batches:
        buffer += finished
        while len(buffer) >= chunk_size or (buffer and already + made + len(buffer) == total):
            chunk, buffer = buffer[:chunk_size], buffer[chunk_size:]
            append_jsonl(out_path, chunk)
            made += len(chunk)
            tokens += sum(row_tokens(r) for r in chunk)
            bar.update(len(chunk))
            bar.set_postfix(rows_per_s=f"{made / (time.perf_counter() - t0):.2f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {"rows": made, "tokens": tokens, "seconds": seconds, "rows_per_second": made / seconds if made else None}


def run_generation(model, tok, cfg: GenerationConfig, out_path: Path, metrics_path: Path, teacher: str,
                   full_config=None, seed: int = 42, shards: Optional[Shards] = None) -> dict:
    """Fill out_path up to cfg.num_instructions rows (ids 0..n-1), resuming with the ids it lacks.

    `generate` gets the whole pending work at generation.batch_size; finished rows are appended atomically
    every generation.chunk_size rows (the checkpoint), independent of the batch. With shards, the pending ids go
    to the devices in chunks (`work_chunks`).
    """
    out_path = Path(out_path)
    todo = pending_ids(out_path, cfg.num_instructions)
    already = cfg.num_instructions - len(todo)
    if already:
        print(f"resuming: {already} rows already in {out_path}")
    t0 = time.perf_counter()
    run = {"rows": 0, "tokens": 0}
    if todo:
        rows = add_constraints(draft_instructions(model, tok, cfg, todo, seed, header_processors(tok, cfg), teacher,
                                                  shards), cfg, seed)
        run = write_in_chunks(out_path, answer_rows(model, tok, cfg, rows, seed, shards), cfg.chunk_size,
                              cfg.num_instructions, already)
    metrics = generation_metrics(read_jsonl(out_path), run["rows"], run["tokens"], time.perf_counter() - t0,
                                 teacher, cfg)
    write_metrics(metrics_path, metrics, full_config)
    return metrics


def generation_metrics(rows: list[dict], made: int, tokens: int, seconds: float, teacher: str,
                       cfg: GenerationConfig) -> dict:
    constrained = [r for r in rows if r.get("constraints")]
    return {
        "rows_total": len(rows), "rows_this_run": made, "tokens_this_run": tokens,
        "seconds_this_run": round(seconds, 2),
        "rows_per_second": round(made / seconds, 3) if seconds and made else None,
        "tokens_per_second": round(tokens / seconds, 2) if seconds and tokens else None,
        "instruction_complete_rate": _rate(rows, "instruction_complete"),
        "response_complete_rate": _rate(rows, "response_complete"),
        "instruction_trimmed_rate": _rate(rows, "instruction_trimmed"),
        "starts_with_markdown_header": sum(r["instruction"].lstrip().startswith("#") for r in rows),
        "constrained_rows": len(constrained),
        "constrained_rows_with_a_passing_answer": sum(r["passing_samples"] > 0 for r in constrained),
        "constrained_rows_repaired": sum(bool(r.get("repaired")) for r in constrained),
        "constraint_samples_passed": sum(r["passing_samples"] for r in constrained),
        "constraint_samples_total": sum(len(r["samples"]) for r in constrained),
        "teacher": teacher, "batch_size": cfg.batch_size, "chunk_size": cfg.chunk_size,
    }


def _rate(rows: list[dict], key: str) -> Optional[float]:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else None


def load_teacher(session):
    """The teacher in the profile's precision (4-bit on t4); the embedded SmolLM2 on cpu."""
    from .models import load_model, load_tokenizer

    name = session.config.models.teacher
    return load_tokenizer(name), load_model(name, session.profile, role="teacher")


def run_magpie(session, teacher=None) -> dict:
    """02 in one call (the CLI's): fill data/raw/instructions.jsonl, resuming, and write the metrics."""
    tok, model = teacher or load_teacher(session)
    p = session.paths
    return run_generation(model, tok, session.config.generation, p.data_raw / "instructions.jsonl",
                          p.evaluation_metrics / "generation_metrics.json", session.config.models.teacher,
                          session.config, session.config.seed, teacher_shards(session))


def constrained_example(session) -> list[dict]:
    """The first constrained row: each sampled answer with what every check said (IFEval's checkers, by code)."""
    rows = [r for r in read_jsonl(session.paths.data_raw / "instructions.jsonl", "02_magpie_generation")
            if r.get("constraints")]
    if not rows:
        return []
    r = rows[0]
    print("instruction:", r["instruction"])
    for c in r["constraints"]:
        print(f"  {c['id']}: {c['text']}  kwargs={c['kwargs']}")
    return [{"answer": s["text"][:200], "ended": s["ended"],
             **{c["id"]: ok for c, ok in zip(r["constraints"], s["passed"])},
             "kept": "edited by code" if r.get("repaired_from") == i else s["text"] == r["response"]}
            for i, s in enumerate(r["samples"])]


def sample_rows(session, n: int = 5, constrained: Optional[bool] = None) -> list[dict]:
    """A few rows to read: the instruction, the start of its answer and whether it ended on EOS."""
    rows = read_jsonl(session.paths.data_raw / "instructions.jsonl", "02_magpie_generation")
    if constrained is not None:
        rows = [r for r in rows if bool(r.get("constraints")) == constrained]
    return [{"id": r["id"], "instruction": r["instruction"], "response": r["response"][:300],
             "response_complete": r["response_complete"]} for r in rows[:n]]
