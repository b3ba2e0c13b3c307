"""Constraint checkers for the benchmark suite: each takes the output text and the check's arguments → bool."""
from __future__ import annotations

import json
import re
from typing import Callable

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def bullets(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"^\s*[-*•]\s+\S", ln)]


def numbered(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"^\s*\d+[.)]\s+\S", ln)]


def json_object(text: str):
    """The output parsed as a JSON object (a ```json fence around it is allowed), or None."""
    t = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", t, re.S)
    if fence:
        t = fence.group(1)
    try:
        obj = json.loads(t)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def last_number(text: str):
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


CHECKS: dict[str, Callable[..., bool]] = {
    "max_words": lambda t, n: len(words(t)) <= n,
    "min_words": lambda t, n: len(words(t)) >= n,
    "max_sentences": lambda t, n: 1 <= len(sentences(t)) <= n,
    "exact_sentences": lambda t, n: len(sentences(t)) == n,
    "include_words": lambda t, words: all(_has_word(t, w) for w in words),
    "exclude_words": lambda t, words: bool(t.strip()) and not any(_has_word(t, w) for w in words),
    "exclude_chars": lambda t, chars: bool(t.strip()) and not any(c in t for c in chars),
    "word_frequency": lambda t, word, min: len(re.findall(rf"\b{re.escape(word)}\b", t, re.I)) >= min,
    "all_lowercase": lambda t: bool(re.search(r"[a-z]", t)) and t == t.lower(),
    "all_uppercase": lambda t: bool(re.search(r"[A-Z]", t)) and t == t.upper(),
    "json_object": lambda t: json_object(t) is not None,
    "json_keys": lambda t, keys: (o := json_object(t)) is not None and all(k in o for k in keys),
    "exact_bullets": lambda t, n: len(bullets(t)) == n,
    "min_numbered": lambda t, n: len(numbered(t)) >= n,
    "exact_paragraphs": lambda t, n: len(paragraphs(t)) == n,
    "no_commas": lambda t: bool(t.strip()) and "," not in t,
    "quoted": lambda t: len(t.strip()) > 2 and t.strip()[0] in "\"“" and t.strip()[-1] in "\"”",
    "title_brackets": lambda t: re.search(r"<<[^<>\n]+>>", t) is not None,
    "starts_with": lambda t, text: t.strip().lower().startswith(text.lower()),
    "ends_with": lambda t, text: t.strip().lower().endswith(text.lower()),
    "final_number": lambda t, value: (x := last_number(t)) is not None and abs(x - value) < 1e-6,
    "contains_answer": lambda t, text: _has_word(t, text),
}


def run_check(check: dict, text: str) -> bool:
    args = {k: v for k, v in check.items() if k != "type"}
    if check["type"] not in CHECKS:
        raise ValueError(f"unknown check type {check['type']!r} (known: {', '.join(sorted(CHECKS))})")
    return bool(CHECKS[check["type"]](text, **args))
