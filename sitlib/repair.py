"""Answers repaired by code: for the constraint types where one edit makes an answer follow the instruction.

IFEval ships checkers, not fixers, so the edits are written here. A small teacher almost never writes an
all-capital answer or one wrapped in quotes, so rejection sampling alone leaves those types without any
training row. Where every sample failed, 02 edits a finished sample (lower/upper case, commas dropped, end
phrase or P.S. appended, a title added, the answer wrapped as JSON or in quotes, the request repeated before it,
or two of the row's own finished samples joined as the two responses) and keeps the edit only if IFEval's
checkers then pass it. The unedited answers stay as the failed ones: 04 pairs them against it.

Off unless generation.constraint_repair is set. Measured on the embedded 135M model as its own teacher
(bench/results/quality_run_NVIDIA_H200/): the edited types improved (quotation 0 → 0.4), but SFT then opened
44 of 177 answers that asked for no quotes with a quote and DPO 68 (6 and 7 in a run without repair, which also
trained another recipe; prompt tuning, trained alike in both, 7 → 16). A wrapper edit seems to teach the wrapper
rather than the condition. A later run with these edits too (bench/results/quality_run_NVIDIA_H200_if_recipe/) lifted
SFT from 0.390 to 0.467 on the suite, but the habit came back (32 and 33 of 177) and the two added types stayed at 0.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Optional, Sequence

from . import constraints


def _no_comma(text: str, kwargs: dict, prompt: str, others: list[str]) -> str:
    # digit groups lose their comma ("1,000" → "1000"); elsewhere the comma goes, line breaks stay
    return re.sub(r"[ \t]*,", "", re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))


def _end_phrase(text: str, kwargs: dict, prompt: str, others: list[str]) -> Optional[str]:
    phrase = kwargs.get("end_phrase")
    return f"{text.rstrip()} {phrase}" if phrase else None


def _title(text: str, kwargs: dict, prompt: str, others: list[str]) -> str:
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", prompt)[:5] or ["Answer"]
    return f"<<{' '.join(w.capitalize() for w in words)}>>\n\n{text}"


def _postscript(text: str, kwargs: dict, prompt: str, others: list[str]) -> str:
    return f"{text.rstrip()}\n\n{kwargs.get('postscript_marker') or 'P.S.'} I hope this helps."


def _two_responses(text: str, kwargs: dict, prompt: str, others: list[str]) -> Optional[str]:
    # the second response is another finished sample of the same prompt: the shortest one that differs
    rest = sorted((o.strip() for o in others if o.strip() and o.strip() != text.strip() and "******" not in o), key=len)
    return f"{text.strip()}\n******\n{rest[0]}" if rest and "******" not in text else None


def _repeat_request(text: str, kwargs: dict, prompt: str, others: list[str]) -> Optional[str]:
    request = (kwargs.get("prompt_to_repeat") or "").strip()
    return f"{request}\n\n{text.strip()}" if request else None


def _plain(edit: Callable[[str], str]) -> Callable[[str, dict, str, list[str]], str]:
    return lambda text, kwargs, prompt, others: edit(text)


# instruction id → edit(text, kwargs, the task, the row's other finished samples) → text, or None where it cannot
# (its kwargs are missing, or no second sample). Applied in this order: the second response first (the edits below
# then hold for both), content, then the title, then case, then the repeated request (it must open the answer),
# then wrappers (quotes or JSON around everything else; case before JSON keeps its key lowercase).
EDITS: dict[str, Callable[[str, dict, str, list[str]], Optional[str]]] = {
    "combination:two_responses": _two_responses,
    "punctuation:no_comma": _no_comma,
    "startend:end_checker": _end_phrase,
    "detectable_content:postscript": _postscript,
    "detectable_format:title": _title,
    "change_case:english_lowercase": _plain(str.lower),
    "change_case:english_capital": _plain(str.upper),
    "combination:repeat_prompt": _repeat_request,
    "detectable_format:json_format": _plain(lambda t: json.dumps({"answer": t}, ensure_ascii=False)),
    "startend:quotation": _plain(lambda t: f'"{t.strip()}"'),
}
# applied whenever their constraint is there, passing or not: text added by another edit must follow the case too
REAPPLIED = {"change_case:english_lowercase", "change_case:english_capital"}


def repair(cons: list[dict], text: str, prompt: str = "", others: Sequence[str] = ()) -> Optional[str]:
    """The answer edited for each failed constraint that has an edit, if the result passes every check; else None
    (nothing to edit, or a failed constraint no edit can fix, such as a word count). `others`: the row's other
    finished samples (two_responses takes its second response from them)."""
    if not text.strip():
        return None
    failed = {c["id"] for c, ok in zip(cons, constraints.check(cons, text, prompt)) if not ok}
    if not failed or not failed <= EDITS.keys():
        return None
    kwargs = {c["id"]: c.get("kwargs") or {} for c in cons}
    todo = failed | (REAPPLIED & kwargs.keys())
    out: Optional[str] = text
    for cid, edit in EDITS.items():
        if cid in todo and out is not None:
            out = edit(out, kwargs[cid], prompt, list(others))
    return out if out is not None and constraints.passes(cons, out, prompt) else None
