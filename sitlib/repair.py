"""Answers repaired by code: for the constraint types where one edit makes an answer follow the instruction.

IFEval ships checkers, not fixers, so the edits are written here. A small teacher almost never writes an
all-capital answer or one wrapped in quotes, so rejection sampling alone leaves those types without any
training row. Where every sample failed, 02 edits a finished sample (lower/upper case, commas dropped, end
phrase or P.S. appended, a title added, the answer wrapped as JSON or in quotes) and keeps the edit only if
IFEval's checkers then pass it. The unedited answers stay as the failed ones: 04 pairs them against it.

Off unless generation.constraint_repair is set. Measured on the embedded 135M model as its own teacher
(bench/results/quality_run_NVIDIA_H200/): the edited types improved (quotation 0 → 0.4), but SFT then opened
44 of 177 answers that asked for no quotes with a quote (6 without repair), DPO 68: a wrapper edit teaches the
wrapper, not the condition.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Optional

from . import constraints


def _title(text: str, kwargs: dict, prompt: str) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", prompt)[:5] or ["Answer"]
    return f"<<{' '.join(w.capitalize() for w in words)}>>\n\n{text}"


def _postscript(text: str, kwargs: dict, prompt: str) -> str:
    return f"{text.rstrip()}\n\n{kwargs.get('postscript_marker') or 'P.S.'} I hope this helps."


# instruction id → edit(text, kwargs, the task), in the order they are applied: content first, then the title,
# then case, then wrappers (quotes or JSON around everything else; case before JSON keeps its key lowercase)
EDITS: dict[str, Callable[[str, dict, str], str]] = {
    "punctuation:no_comma": lambda t, kw, p: re.sub(r"\s*,\s*", " ", t),
    "startend:end_checker": lambda t, kw, p: f"{t.rstrip()} {kw['end_phrase']}",
    "detectable_content:postscript": _postscript,
    "detectable_format:title": _title,
    "change_case:english_lowercase": lambda t, kw, p: t.lower(),
    "change_case:english_capital": lambda t, kw, p: t.upper(),
    "detectable_format:json_format": lambda t, kw, p: json.dumps({"answer": t}, ensure_ascii=False),
    "startend:quotation": lambda t, kw, p: f'"{t.strip()}"',
}


def repair(cons: list[dict], text: str, prompt: str = "") -> Optional[str]:
    """The answer edited for each failed constraint that has an edit, if the result passes every check; else None
    (nothing to edit, or a failed constraint no edit can fix, such as a word count)."""
    if not text.strip():
        return None
    failed = {c["id"] for c, ok in zip(cons, constraints.check(cons, text, prompt)) if not ok}
    if not failed or not failed <= EDITS.keys():
        return None
    kwargs = {c["id"]: c.get("kwargs") or {} for c in cons}
    out = text
    for cid, edit in EDITS.items():
        if cid in failed:
            out = edit(out, kwargs[cid], prompt)
    return out if constraints.passes(cons, out, prompt) else None
