"""Stage 02: Magpie instruction generation — pre-query template → instruction, full template → response."""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .artifacts import append_jsonl, write_metrics
from .config import GenerationConfig
from .generation import BlockFirstTokens, Sampling, chat_input_ids, generate

SENTINEL = "\u2063SIT-USER-TURN\u2063"


def pre_query_text(tok, system_prompt: Optional[str]) -> str:
    """The chat template up to where the user's words begin (Magpie's pre-query template), for any template."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": SENTINEL}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    return rendered[: rendered.index(SENTINEL)]


def _system_prompt(cfg: GenerationConfig, rng: random.Random) -> Optional[str]:
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


def count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def generate_chunk(model, tok, cfg: GenerationConfig, start_id: int, n: int, teacher: str,
                   processors: list) -> list[dict]:
    """n instruction/response rows with ids start_id..start_id+n-1 (seeded by id, so reruns are reproducible)."""
    import torch

    rng = random.Random(start_id)
    torch.manual_seed(start_id)
    systems = [_system_prompt(cfg, rng) for _ in range(n)]
    inputs = [tok(pre_query_text(tok, s), add_special_tokens=False)["input_ids"] for s in systems]
    inst = generate(model, tok, inputs, Sampling(cfg.instruction_max_new_tokens, cfg.instruction_temperature,
                                                 cfg.instruction_top_p), cfg.batch_size, processors)
    texts, trimmed = [], []
    for i in inst:
        t = None if i.ended else trim_instruction(i.text)
        texts.append(t or i.text)
        trimmed.append(t is not None)
    convs = [([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": t}]
             for s, t in zip(systems, texts)]
    resp = generate(model, tok, chat_input_ids(tok, convs), Sampling(cfg.response_max_new_tokens,
                    cfg.response_temperature, cfg.response_top_p), cfg.batch_size)
    # instruction_complete: ended on EOS, or trimmed to whole sentences (instruction_trimmed says which)
    return [{"id": start_id + k, "instruction": t, "response": r.text, "system_prompt": s,
             "instruction_tokens": i.n_tokens, "response_tokens": r.n_tokens,
             "instruction_complete": i.ended or tr, "instruction_trimmed": tr, "response_complete": r.ended,
             "teacher": teacher}
            for k, (s, i, t, tr, r) in enumerate(zip(systems, inst, texts, trimmed, resp))]


def run_generation(model, tok, cfg: GenerationConfig, out_path: Path, metrics_path: Path, teacher: str,
                   full_config=None) -> dict:
    """Append rows to out_path in atomic chunks until cfg.num_instructions exist; resumes from what is there."""
    out_path = Path(out_path)
    done = count_rows(out_path)
    if done:
        print(f"resuming: {done} rows already in {out_path}")
    processors = []
    if cfg.block_markdown_headers:
        processors.append(BlockFirstTokens.markdown_headers(tok))
    t0, rows_made, tokens = time.perf_counter(), 0, 0
    bar = tqdm(total=cfg.num_instructions, initial=done, desc="Magpie", unit="row")
    while done < cfg.num_instructions:
        n = min(cfg.chunk_size, cfg.num_instructions - done)
        rows = generate_chunk(model, tok, cfg, done, n, teacher, processors)
        append_jsonl(out_path, rows)
        done += n
        rows_made += n
        tokens += sum(r["instruction_tokens"] + r["response_tokens"] for r in rows)
        bar.update(n)
        bar.set_postfix(rows_per_s=f"{rows_made / (time.perf_counter() - t0):.2f}")
    bar.close()
    seconds = time.perf_counter() - t0
    all_rows = [json.loads(x) for x in out_path.read_text().splitlines() if x.strip()]
    metrics = {
        "rows_total": len(all_rows), "rows_this_run": rows_made, "tokens_this_run": tokens,
        "seconds_this_run": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds and tokens else None,
        "instruction_complete_rate": _rate(all_rows, "instruction_complete"),
        "response_complete_rate": _rate(all_rows, "response_complete"),
        "instruction_trimmed_rate": _rate(all_rows, "instruction_trimmed"),
        "starts_with_markdown_header": sum(r["instruction"].lstrip().startswith("#") for r in all_rows),
        "teacher": teacher, "batch_size": cfg.batch_size,
    }
    write_metrics(metrics_path, metrics, full_config)
    return metrics


def _rate(rows: list[dict], key: str) -> Optional[float]:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else None


def load_teacher(session):
    """The teacher in the profile's precision (4-bit on t4); the embedded SmolLM2 on cpu."""
    from .models import load_model, load_tokenizer

    name = session.config.models.teacher
    return load_tokenizer(name), load_model(name, session.profile)


def run_magpie(session, teacher=None) -> dict:
    """02: fill data/raw/instructions.jsonl up to generation.num_instructions (resuming), write the metrics."""
    tok, model = teacher or load_teacher(session)
    p = session.paths
    return run_generation(model, tok, session.config.generation, p.data_raw / "instructions.jsonl",
                          p.evaluation_metrics / "generation_metrics.json", session.config.models.teacher,
                          session.config)


def sample_rows(session, n: int = 5) -> list[dict]:
    rows = [json.loads(x) for x in (session.paths.data_raw / "instructions.jsonl").read_text().splitlines()[:n]]
    return [{k: r[k] for k in ("id", "instruction", "response", "response_complete")} for r in rows]
