"""Stage 03: quality filtering — rules, exact/near-duplicate removal, pseudo-instruction detection, SFT splits."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Optional

from .artifacts import write_json, write_jsonl
from .config import FilterConfig

REFUSAL = re.compile(r"\b(I(?:'m| am) sorry,? but I|I(?:'m| am) (?:unable|not able) to|I can(?:no|')t (?:help|assist|provide|do)|"
                     r"as an AI(?: language model)?|I (?:do not|don't) have (?:the ability|access))", re.I)
# A short list of slurs/threat words: a coarse screen, not a toxicity model (none ships offline).
TOXIC = re.compile(r"\b(kill (?:yourself|him|her|them)|fuck\w*|shit\w*|bitch\w*|cunt|nigg\w*|fag\w*|"
                   r"retard\w*|whore|slut|rape\w*|bomb-making|nazi)\b", re.I)
TEMPLATE_LEAK = re.compile(r"<\|(?:im_start|im_end|eot_id|start_header_id|end_header_id|endoftext)\|>|^\s*(?:user|assistant)\s*\n", re.I)
PSEUDO = [
    (re.compile(r"^\s*#{1,6}\s"), "starts with a markdown header"),
    (re.compile(r"#{1,6}\s*Step\s*\d", re.I), "'## Step N' solution layout"),
    (re.compile(r"^\s*Step\s*\d+\s*[:.]", re.I), "starts with 'Step N:'"),
    (re.compile(r"the final answer is", re.I), "'The final answer is'"),
    (re.compile(r"\\boxed\{"), "\\boxed{} answer"),
    (re.compile(r"^\s*(?:Solution|Answer|Explanation)\s*:", re.I), "starts with 'Solution:'/'Answer:'"),
]
SOLUTION_WORDS = re.compile(r"\b(therefore|thus|hence|we get|we have|substitut\w*|simplif\w*|solving)\b", re.I)
REQUEST_START = re.compile(
    r"^\s*(?:please\s+)?(?:write|explain|describe|give|list|create|generate|summari[sz]e|translate|compose|make|"
    r"tell|suggest|provide|help|compare|classify|rewrite|edit|draft|design|calculate|find|name|identify|convert|"
    r"how|what|why|when|where|who|which|can|could|would|should|is|are|do|does|i need|i want|i'm|i am)\b", re.I)

REASONS = ["bad_row", "instruction_too_short", "instruction_too_long", "response_too_short", "response_too_long",
           "non_english", "repetitive", "template_leak", "refusal", "toxic", "truncated_instruction",
           "truncated_response", "pseudo_instruction", "low_score", "duplicate", "near_duplicate"]


def _text(value) -> str:
    """A plain string, or TRL conversational messages → the content of the last message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return str(value[-1]["content"])
    raise TypeError("expected a string or a list of {role, content} messages")


def row_texts(row: dict) -> tuple[str, str]:
    if "instruction" in row and "response" in row:
        return _text(row["instruction"]), _text(row["response"])
    if "prompt" in row and "completion" in row:
        return _text(row["prompt"]), _text(row["completion"])
    raise KeyError("needs 'instruction' and 'response' (or 'prompt' and 'completion')")


def pseudo_instruction(text: str) -> Optional[str]:
    """Why `text` reads as a solution or answer rather than a request, or None."""
    for pattern, why in PSEUDO:
        if pattern.search(text):
            return why
    if "?" not in text and not REQUEST_START.search(text):
        hits = len(SOLUTION_WORDS.findall(text)) + min(text.count("="), 2)
        if hits >= 3:
            return "worked-solution prose"
    return None


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def quality_score(instruction: str, response: str) -> float:
    """Content score in [0, 1]: an average of length adequacy, lexical variety, request shape, answer shape."""
    iw, rw = len(instruction.split()), len(response.split())
    length = min(iw / 8, 1.0) * 0.5 + min(rw / 40, 1.0) * 0.5
    words = response.lower().split()
    variety = len(set(words)) / len(words) if words else 0.0
    request = 1.0 if ("?" in instruction or REQUEST_START.search(instruction)) else 0.4
    answer = 1.0 if re.search(r"[.!?)`\]]\s*$", response.strip()) else 0.5
    return round((length + variety + request + answer) / 4, 4)


def rule_reasons(row: dict, cfg: FilterConfig) -> list[str]:
    inst, resp = row_texts(row)
    iw, rw = len(inst.split()), len(resp.split())
    reasons = []
    if iw < cfg.min_instruction_words:
        reasons.append("instruction_too_short")
    if iw > cfg.max_instruction_words:
        reasons.append("instruction_too_long")
    if rw < cfg.min_response_words:
        reasons.append("response_too_short")
    if rw > cfg.max_response_words:
        reasons.append("response_too_long")
    both = inst + resp
    if both and sum(ord(c) > 127 for c in both) / len(both) > cfg.max_non_ascii_ratio:
        reasons.append("non_english")
    if max(repeated_ngram_ratio(inst), repeated_ngram_ratio(resp)) > cfg.max_repeated_ngram_ratio:
        reasons.append("repetitive")
    if TEMPLATE_LEAK.search(inst) or TEMPLATE_LEAK.search(resp):
        reasons.append("template_leak")
    if REFUSAL.search(resp):
        reasons.append("refusal")
    if TOXIC.search(both):
        reasons.append("toxic")
    if cfg.drop_truncated and row.get("instruction_complete") is False:
        reasons.append("truncated_instruction")
    if cfg.drop_truncated and row.get("response_complete") is False:
        reasons.append("truncated_response")
    if pseudo_instruction(inst):
        reasons.append("pseudo_instruction")
    if quality_score(inst, resp) < cfg.min_score:
        reasons.append("low_score")
    return reasons


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def mark_duplicates(rows: list[dict], texts: list[str], threshold: float, seed: int = 1) -> list[Optional[str]]:
    """'duplicate' / 'near_duplicate' / None per row; rows earlier in the list win (pass them best first)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    seen: set[str] = set()
    marks: list[Optional[str]] = []
    for i, text in enumerate(texts):
        norm = normalise(text)
        if norm in seen:
            marks.append("duplicate")
            continue
        words = norm.split()
        shingles = {" ".join(words[j:j + 3]) for j in range(max(len(words) - 2, 1))}
        mh = MinHash(num_perm=64, seed=seed)
        for s in shingles:
            mh.update(s.encode())
        if lsh.query(mh):
            marks.append("near_duplicate")
            continue
        seen.add(norm)
        lsh.insert(str(i), mh)
        marks.append(None)
    return marks


def filter_rows(rows: list[dict], cfg: FilterConfig) -> tuple[list[dict], list[dict], dict]:
    """(kept rows best-first, rejected rows with 'reasons', stats)."""
    scored = []
    for row in rows:
        inst, resp = row_texts(row)
        scored.append((quality_score(inst, resp), row, rule_reasons(row, cfg)))
    scored.sort(key=lambda t: -t[0])   # stable: the best copy of a duplicate cluster is kept
    clean = [t for t in scored if not t[2]]
    marks = mark_duplicates([t[1] for t in clean], [row_texts(t[1])[0] for t in clean], cfg.near_duplicate_threshold)
    dup_of = {id(t[1]): m for t, m in zip(clean, marks)}
    kept, rejected, counts = [], [], Counter()
    for score, row, reasons in scored:
        if id(row) in dup_of and dup_of[id(row)]:
            reasons = [dup_of[id(row)]]
        counts.update(reasons)
        (rejected if reasons else kept).append({**row, "quality_score": score, **({"reasons": reasons} if reasons else {})})
    stats = {"input_rows": len(rows), "kept": len(kept), "rejected": len(rejected),
             "reasons": {r: counts.get(r, 0) for r in REASONS if counts.get(r, 0)}}
    return kept, rejected, stats


def read_rows(path: Path, skip_bad: bool) -> tuple[list[dict], list[str]]:
    """Rows of a JSONL file; bad lines (not JSON, missing fields, wrong types) are errors naming the line."""
    rows, problems = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise TypeError("not a JSON object")
            row_texts(row)
            rows.append(row)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e).strip("'\"")
            problems.append(f"{path}, line {n}: {msg}")
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more + "; pass --skip-bad-rows to report and skip them")
    return rows, problems


def strip_added(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("quality_score", "reasons")}


def filter_file(inp: Path, out: Path, cfg: FilterConfig, stats_path: Optional[Path] = None,
                rejected_path: Optional[Path] = None, skip_bad: bool = False, seed: int = 42) -> dict:
    """CLI `filter`: any JSONL of instruction/response (or prompt/completion) rows → kept rows, same fields."""
    if not Path(inp).exists():
        raise FileNotFoundError(f"input not found: {inp}")
    rows, problems = read_rows(inp, skip_bad)
    kept, rejected, stats = filter_rows(rows, cfg)
    if problems:
        stats["reasons"]["bad_row"] = len(problems)
        stats["bad_rows"] = problems
    write_jsonl(out, [strip_added(r) for r in kept])
    if rejected_path:
        write_jsonl(rejected_path, rejected)
    if stats_path:
        write_json(stats_path, stats)
    return stats


def to_sft(row: dict) -> dict:
    inst, resp = row_texts(row)
    return {"id": row.get("id"), "prompt": [{"role": "user", "content": inst}],
            "completion": [{"role": "assistant", "content": resp}], "quality_score": row["quality_score"]}


def split(kept: list[dict], cfg: FilterConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Top `target_count` by score, shuffled with the seed, then a val_fraction split (at least one val row)."""
    chosen = [to_sft(r) for r in kept[: cfg.target_count]]
    random.Random(seed).shuffle(chosen)
    n_val = max(1, round(len(chosen) * cfg.val_fraction)) if len(chosen) > 1 else 0
    return chosen[n_val:], chosen[:n_val]


def run_filter(session) -> dict:
    """03: data/raw/instructions.jsonl → data/filtered/{sft_train,sft_val}.jsonl + filter_stats.json + figure."""
    from .artifacts import read_jsonl, write_metrics
    from .figures import filter_funnel

    p, cfg = session.paths, session.config
    raw = read_jsonl(p.data_raw / "instructions.jsonl", produced_by="02_magpie_generation")
    kept, rejected, stats = filter_rows(raw, cfg.filter)
    train, val = split(kept, cfg.filter, cfg.seed)
    if len(train) < 2 or not val:
        raise ValueError(f"only {len(kept)} of {len(raw)} rows passed the filter ({stats['reasons']}): too few for "
                         "train/val splits; generate more rows in 02 (generation.num_instructions) or relax filter.*")
    stats.update(sft_train=len(train), sft_val=len(val),
                 pseudo_instruction_examples=[row_texts(r)[0][:160] for r in rejected
                                              if "pseudo_instruction" in r["reasons"]][:5])
    write_jsonl(p.data_filtered / "sft_train.jsonl", train)
    write_jsonl(p.data_filtered / "sft_val.jsonl", val)
    write_jsonl(p.data_filtered / "rejected.jsonl", rejected)
    write_metrics(p.data_filtered / "filter_stats.json", stats, cfg)
    filter_funnel(stats, p.evaluation_figures / "filter_funnel.png")
    return stats
