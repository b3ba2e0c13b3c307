"""Stage 03: quality filtering — rules, exact/near-duplicate removal, pseudo-instruction detection, SFT splits."""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Optional

from .artifacts import read_jsonl, write_jsonl, write_metrics
from .config import FilterConfig
from .errors import BadInputError, SitError

# Refusal phrasings; "as an AI" only in the disclaimer shape ("As an AI, I cannot…"), so "work as an AI engineer"
# passes.
REFUSAL = re.compile(r"\b(I(?:'m| am) sorry,? but I|I(?:'m| am) (?:unable|not able) to|I can(?:no|')t (?:help|assist|provide|do)|"
                     r"as an AI(?: language model| assistant)?,? I\b|I (?:do not|don't) have (?:the ability|access))", re.I)
# A short list of slurs and threats: a coarse screen, not a toxicity model (none ships offline). Whole words only,
# so "rapeseed", "flame retardant", "Fagus", "niggle" pass; no topic words ("Nazi" in a history question is
# history) and no "kill them" (pest control).
TOXIC = re.compile(r"\b(kill yourself|kys|fuck\w*|shit(?:s|ty|head)?|bitch(?:es)?|cunts?|nigg(?:er|a)s?|fag(?:s|gots?)?|"
                   r"retard(?:s|ed)?|whores?|sluts?|rap(?:e|ed|es|ing|ist|ists)|bomb-making)\b", re.I)
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
           "truncated_response", "pseudo_instruction", "constraint_failed", "low_score", "benchmark_overlap",
           "duplicate", "near_duplicate"]
# A training prompt that shares this much with a benchmark task would leak the test into training: Jaccard of word
# 3-gram sets, or every one of the task's 3-grams found in the instruction (the task with words around it). Less
# than all is too loose for short tasks: "Write a short poem about the sea…" shares 4 of the 5 3-grams of "Write a
# short poem about the moon."
BENCHMARK_JACCARD = 0.5
BENCHMARK_CONTAINMENT = 1.0
MATTR_WINDOW = 25   # words; variety is measured in windows this long so it does not fall with length


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


def mattr(words: list[str], window: int = MATTR_WINDOW) -> float:
    """Moving-average type-token ratio (Covington & McFall 2010): the mean share of distinct words over every
    window of `window` words. Plain type-token ratio falls as a text grows (words repeat), which would rank a
    short answer above a long one of the same quality; the moving window does not. Shorter texts: plain TTR."""
    if not words:
        return 0.0
    if len(words) <= window:
        return len(set(words)) / len(words)
    counts = Counter(words[:window])
    total = len(counts)
    for i in range(window, len(words)):   # slide: one word in, one out
        counts[words[i]] += 1
        out = words[i - window]
        counts[out] -= 1
        if not counts[out]:
            del counts[out]
        total += len(counts)
    return total / ((len(words) - window + 1) * window)


def quality_score(instruction: str, response: str) -> float:
    """Content score in [0, 1]: an average of length adequacy, lexical variety (MATTR), request shape, answer
    shape."""
    iw, rw = len(instruction.split()), len(response.split())
    length = min(iw / 8, 1.0) * 0.5 + min(rw / 40, 1.0) * 0.5
    variety = mattr(re.findall(r"[\w']+", response.lower()))
    request = 1.0 if ("?" in instruction or REQUEST_START.search(instruction)) else 0.4
    answer = 1.0 if re.search(r"[.!?)`\]}>\"]\s*$", response.strip()) else 0.5   # ends like a finished answer
    return round((length + variety + request + answer) / 4, 4)


def responses(row: dict, resp: str) -> list[str]:
    """The answers in a response: two for a row asked for two responses split by "******" (each measured alone for
    repetition: they answer one task twice), else the response whole."""
    parts = resp.split("******")
    two = any(c["id"] == "combination:two_responses" for c in row.get("constraints") or [])
    return parts if two and len(parts) == 2 else [resp]


def request(row: dict, inst: str) -> str:
    """The instruction as 03 scores and dedupes it: a repeat_prompt row's leading sentence (the same 37 words in
    every such row) left out, which leaves the request it asks to repeat."""
    from .constraints import REPEAT

    rep = next((c for c in row.get("constraints") or [] if c["id"] == REPEAT), None)
    return (rep.get("kwargs") or {}).get("prompt_to_repeat") or inst if rep else inst


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
    if max(repeated_ngram_ratio(inst), *map(repeated_ngram_ratio, responses(row, resp))) > cfg.max_repeated_ngram_ratio:
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
    if row.get("constraints") and not row.get("constraint_pass"):
        reasons.append("constraint_failed")   # rejection sampling: no answer passed the code checks
    if quality_score(request(row, inst), resp) < cfg.min_score:
        reasons.append("low_score")
    return reasons


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def shingles(text: str, n: int = 3) -> frozenset:
    words = normalise(text).split()
    return frozenset(tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1)))


def task_text(item: dict) -> str:
    """A benchmark prompt less the IFEval constraint sentences its checks name: the task itself. Training rows
    may share IFEval's constraint wording (that is what teaches it); they may not share the task."""
    from .checks import INSTRUCTION_DICT, ifeval_instruction

    text = item["prompt"]
    for check in item.get("checks", []):
        if check.get("type") in INSTRUCTION_DICT and check.get("kwargs") is not None:
            try:
                desc, _ = ifeval_instruction(check["type"], check["kwargs"])
            except SitError:
                continue
            text = text.replace(desc, " ")
    return text


def benchmark_shingles() -> list[frozenset]:
    """Word 3-gram sets of every task in the benchmark suite 07 scores (the whole suite, not a subset)."""
    from .benchmark import load_suite

    tasks = [task_text(it) for it in load_suite(0)]
    return [shingles(t) for t in tasks if normalise(t)]


def overlaps_benchmark(text: str, bench: list[frozenset]) -> bool:
    """True when `text` equals or nearly equals a benchmark task, or contains one almost word for word."""
    s = shingles(text)
    for b in bench:
        inter = len(s & b)
        if inter and (inter / len(s | b) >= BENCHMARK_JACCARD or inter / len(b) >= BENCHMARK_CONTAINMENT):
            return True
    return False


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


def filter_rows(rows: list[dict], cfg: FilterConfig, bench: Optional[list[frozenset]] = None
                ) -> tuple[list[dict], list[dict], dict]:
    """(kept rows best-first, rejected rows with 'reasons', stats). `bench`: benchmark_shingles() by default."""
    bench = benchmark_shingles() if bench is None else bench
    scored = []
    for row in rows:
        row, reasons = with_clean_answer(row, rule_reasons(row, cfg), cfg)
        inst, resp = row_texts(row)
        task = row.get("base_instruction") or inst   # a constrained row's task, without its constraint sentences
        reasons += ["benchmark_overlap"] if overlaps_benchmark(task, bench) else []
        scored.append((quality_score(request(row, inst), resp), row, reasons))
    scored.sort(key=lambda t: -t[0])   # stable: the best copy of a duplicate cluster is kept
    clean = [t for t in scored if not t[2]]
    marks = mark_duplicates([t[1] for t in clean], [request(t[1], row_texts(t[1])[0]) for t in clean],
                            cfg.near_duplicate_threshold)
    dup_of = {id(t[1]): m for t, m in zip(clean, marks)}
    kept, rejected, counts = [], [], Counter()
    for score, row, reasons in scored:
        if id(row) in dup_of and dup_of[id(row)]:
            reasons = [dup_of[id(row)]]
        counts.update(reasons)
        (rejected if reasons else kept).append({**row, "quality_score": score, **({"reasons": reasons} if reasons else {})})
    stats = {"input_rows": len(rows), "kept": len(kept), "rejected": len(rejected),
             "reasons": {r: counts.get(r, 0) for r in REASONS if counts.get(r, 0)},
             # kept constrained rows whose first passing answer broke a rule, kept on a later clean one
             "answers_replaced": sum(bool(r.get("answer_replaced")) for r in kept)}
    return kept, rejected, stats


def strip_added(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("quality_score", "reasons")}


def clean_passing_samples(row: dict, cfg: FilterConfig) -> list[dict]:
    """A constrained row's samples that passed every check, ended on EOS and pass 03's rules, distinct texts (and
    none the row's answer) in sample order. A repaired row has none (no sample passed)."""
    inst, resp = row_texts(row)
    seen, out = {normalise(resp)}, []
    for s in row.get("samples") or []:
        if not (s["pass"] and s["ended"]) or normalise(s["text"]) in seen:
            continue
        if rule_reasons({**row, "instruction": inst, "response": s["text"], "response_complete": True}, cfg):
            continue
        seen.add(normalise(s["text"]))
        out.append(s)
    return out


def other_passing_answers(row: dict, cfg: FilterConfig) -> list[str]:
    """A kept constrained row's other clean passing samples (clean_passing_samples): the further answers
    sft.answers_per_row trains on."""
    return [s["text"] for s in clean_passing_samples(row, cfg)]


def with_clean_answer(row: dict, reasons: list[str], cfg: FilterConfig) -> tuple[dict, list[str]]:
    """(row, its reasons). 02 keeps a constrained row's first passing, finished sample before 03's rules have run:
    where that answer breaks a rule, the row takes its first other such sample that breaks none
    (`answer_replaced`), so a row with a good checked answer is not lost; else the row as it was."""
    if not reasons or not row.get("constraints") or not row.get("constraint_pass") or row.get("repaired"):
        return row, reasons
    clean = clean_passing_samples(row, cfg)
    if not clean:
        return row, reasons
    text = clean[0]["text"]
    # the answer in the field the row holds it in: 02's `response`, or a TRL row's `completion`
    answer = {"response": text} if "response" in row else \
        {"completion": [{"role": "assistant", "content": text}] if isinstance(row["completion"], list) else text}
    return {**row, **answer, "response_tokens": clean[0].get("n_tokens"), "response_complete": True,
            "answer_replaced": True}, []


def to_sft(row: dict, cfg: Optional[FilterConfig] = None) -> dict:
    """TRL's prompt/completion row. A constrained row carries its constraints and the teacher's answers that
    failed them (04 uses those as `rejected`); with `cfg`, also its other answers that passed
    (other_passing_answers: `passed_answers`, read by 05 under sft.answers_per_row)."""
    inst, resp = row_texts(row)
    out = {"id": row.get("id"), "prompt": [{"role": "user", "content": inst}],
           "completion": [{"role": "assistant", "content": resp}], "quality_score": row["quality_score"]}
    if row.get("constraints"):
        out["constraints"] = [{"id": c["id"], "kwargs": c["kwargs"]} for c in row["constraints"]]
        out["base_instruction"] = row.get("base_instruction", inst)
        out["failed_answers"] = [s["text"] for s in row.get("samples", []) if not s["pass"]]
        if row.get("repaired"):   # the kept answer is a sample edited by code (generation.constraint_repair)
            out["repaired"] = True
        elif cfg is not None:
            out["passed_answers"] = other_passing_answers(row, cfg)
    return out


def split(kept: list[dict], cfg: FilterConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Top `target_count` by score, shuffled with the seed, then a val_fraction split (at least one val row)."""
    chosen = [to_sft(r, cfg) for r in kept[: cfg.target_count]]
    random.Random(seed).shuffle(chosen)
    n_val = max(1, round(len(chosen) * cfg.val_fraction)) if len(chosen) > 1 else 0
    return chosen[n_val:], chosen[:n_val]


def load_raw(session) -> list[dict]:
    return read_jsonl(session.paths.data_raw / "instructions.jsonl", produced_by="02_magpie_generation")


def check_enough(train: list[dict], val: list[dict], n_raw: int, stats: dict) -> None:
    if len(train) < 2 or not val:
        raise BadInputError(f"only {stats['kept']} of {n_raw} rows passed the filter ({stats['reasons']}): too few "
                            "for train/val splits; generate more rows in 02 (generation.num_instructions) or relax "
                            "filter.*")


def write_splits(session, train: list[dict], val: list[dict], rejected: list[dict], stats: dict) -> dict:
    """data/filtered/{sft_train,sft_val,rejected}.jsonl, filter_stats.json (+ its config) and the funnel figure."""
    from .figures import filter_funnel

    p = session.paths
    stats = {**stats, "sft_train": len(train), "sft_val": len(val),
             "constrained_kept": sum(bool(r.get("constraints")) for r in train + val),
             # further checked answers of the training rows (05 trains on them under sft.answers_per_row > 1)
             "passed_answers_train": sum(len(r.get("passed_answers", ())) for r in train)}
    write_jsonl(p.data_filtered / "sft_train.jsonl", train)
    write_jsonl(p.data_filtered / "sft_val.jsonl", val)
    write_jsonl(p.data_filtered / "rejected.jsonl", rejected)
    write_metrics(p.data_filtered / "filter_stats.json", stats, session.config)
    filter_funnel(stats, p.evaluation_figures / "filter_funnel.png")
    return stats


def funnel(stats: dict) -> list[dict]:
    """Rows left after each step, and what each reason removed (a row can have several reasons)."""
    steps = [{"step": "generated", "rows": stats["input_rows"]}, {"step": "kept", "rows": stats["kept"]}]
    steps += [{"step": k, "rows": stats[k]} for k in ("sft_train", "sft_val") if k in stats]
    return steps + [{"step": f"rejected: {r}", "rows": n} for r, n in stats["reasons"].items()]


def example_per_reason(rejected: list[dict], width: int = 160) -> list[dict]:
    """The first rejected row for every reason seen, shortened for reading."""
    out: dict[str, dict] = {}
    for r in rejected:
        for reason in r["reasons"]:
            if reason not in out:
                inst, resp = row_texts(r)
                out[reason] = {"reason": reason, "id": r.get("id"), "instruction": inst[:width],
                               "response": resp[:width], "all_reasons": r["reasons"]}
    return [out[k] for k in REASONS if k in out]


def show_rows(rows: list[dict], n: int = 3, width: int = 240) -> list[dict]:
    """A few rows shortened for reading (instruction, response, score, constraints where there are any)."""
    out = []
    for r in rows[:n]:
        inst, resp = row_texts(r)
        out.append({"id": r.get("id"), "quality_score": r.get("quality_score"), "instruction": inst[:width],
                    "response": resp[:width], "constraints": [c["id"] for c in r.get("constraints", [])]})
    return out


def run_filter(session) -> dict:
    """03 in one call (the CLI's): raw rows → filtered splits, stats and figure."""
    raw = load_raw(session)
    kept, rejected, stats = filter_rows(raw, session.config.filter)
    train, val = split(kept, session.config.filter, session.config.seed)
    check_enough(train, val, len(raw), stats)
    return write_splits(session, train, val, rejected, stats)
