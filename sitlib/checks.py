"""Checks scored by code: IFEval's instruction checkers (from the maintained `if-verifiable` package) and the
exact-answer checks of the built-in suite.

IFEval's sentence counter and word tokenizer look up NLTK's punkt model, which NLTK normally downloads at run time.
Nothing may download here, so sitlib ships a small punkt_tab model of its own (sitlib/data/nltk_data: no trained
collocations or sentence starters, an abbreviation list written for this project) and puts it first on NLTK's
search path: sentences then split on . ! ? except after a listed abbreviation, the same on every machine.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional

import nltk

from .errors import BadInputError

NLTK_DATA = Path(__file__).parent / "data" / "nltk_data"
if str(NLTK_DATA) not in nltk.data.path:
    nltk.data.path.insert(0, str(NLTK_DATA))

import langdetect  # noqa: E402  (IFEval's language and case checkers use it)
from if_verifiable.common import evaluate_instructions  # noqa: E402
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT  # noqa: E402

langdetect.DetectorFactory.seed = 0   # langdetect is random unless seeded: the same text must score the same

# Instruction ids whose description builds from random kwargs alone ("combination:repeat_prompt" needs the prompt
# to repeat, so it is usable only with explicit kwargs).
IFEVAL_TYPES: list[str] = sorted(k for k in INSTRUCTION_DICT if k != "combination:repeat_prompt")
ANSWER_TYPES = ("answer_number", "answer_text")
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


def _checker(instruction_id: str):
    if instruction_id not in INSTRUCTION_DICT:
        raise BadInputError(f"unknown IFEval instruction id {instruction_id!r} "
                            f"(known: {', '.join(sorted(INSTRUCTION_DICT))})")
    return INSTRUCTION_DICT[instruction_id](instruction_id)


def _build(instruction_id: str, kwargs: dict, seed: int) -> tuple[str, dict, bool]:
    """IFEval's description under a seeded global `random` (IFEval draws from it), the caller's state restored;
    also whether IFEval drew anything (it does for every kwarg missing or out of its range)."""
    checker = _checker(instruction_id)
    state = random.getstate()
    random.seed(seed)
    seeded = random.getstate()
    try:
        text = checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
        drew = random.getstate() != seeded
    except (TypeError, ValueError) as e:
        raise BadInputError(f"IFEval {instruction_id}: bad kwargs {kwargs!r} ({e})") from e
    finally:
        random.setstate(state)
    return text, dict(checker.get_instruction_args() or {}), drew


def ifeval_instruction(instruction_id: str, kwargs: Optional[dict] = None,
                       rng: Optional[random.Random] = None) -> tuple[str, dict]:
    """The instruction's text (IFEval's own wording) and the kwargs it used; the kwargs always rebuild the same text.

    Without kwargs they are drawn from IFEval's own ranges, seeded from `rng` (the caller's global random state is
    untouched). IFEval can draw an instruction it cannot check as written (e.g. "Paragraph 2 must start with …" of
    a one-paragraph answer, whose kwargs it silently redraws when rebuilt): such a draw is drawn again. Given kwargs
    that IFEval would complete or replace at random are a BadInputError."""
    if kwargs is not None:
        text, used, drew = _build(instruction_id, kwargs, 0)
        if drew:
            raise BadInputError(f"IFEval {instruction_id}: kwargs not usable as given ({kwargs!r}): IFEval would "
                                f"replace or complete them at random (e.g. {used!r})")
        return text, used
    rng = rng or random.Random()
    for _ in range(100):
        text, used, _drew = _build(instruction_id, {}, rng.getrandbits(64))
        if not _build(instruction_id, used, 0)[2]:
            return text, used
    raise BadInputError(f"IFEval {instruction_id}: no self-consistent instruction in 100 draws")


def ifeval_check(instruction_id: str, kwargs: Optional[dict], response: str, prompt: str = "") -> bool:
    """IFEval's strict check of one instruction (an empty or blank response never passes)."""
    _checker(instruction_id)
    results, _ = evaluate_instructions(response=response, instruction_id_list=[instruction_id],
                                       kwargs_list=[kwargs or {}], prompt=prompt,
                                       instruction_registry=INSTRUCTION_DICT)
    return bool(results) and results[0].strict_pass


# ---------------------------------------------------------------- exact-answer checks


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _sentences(text: str) -> list[str]:
    return [x for x in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if re.search(r"\w", x)]


def _copy_of(sentence: str) -> Optional[re.Pattern]:
    ws = re.findall(r"\w+", sentence)
    return re.compile(r"(?<!\w)" + r"\W+".join(map(re.escape, ws)) + r"(?!\w)\W*", re.I) if ws else None


def without_echo(response: str, prompt: str) -> str:
    """The response as an answer: when it repeats the prompt's question, every sentence copied from the prompt is
    taken out (case and punctuation aside), since the prompt may hold the answer itself ("What is 81 divided by 9?"
    → 9; "The capital of Veloria is Amberton. What is the capital of Veloria?"). A response that does not repeat
    the question is kept whole, so "The capital of Veloria is Amberton." stays a correct answer."""
    sents = sorted(_sentences(prompt), key=len, reverse=True)
    questions = [p for p in map(_copy_of, (x for x in sents if x.endswith("?"))) if p]
    if not any(q.search(response) for q in questions):
        return response
    for pat in filter(None, map(_copy_of, sents)):
        response = pat.sub(" ", response)
    return response


def numbers(text: str) -> list[float]:
    """Numbers in the text; a date (2023-03-01) or a range (10-20) is not read as negative numbers."""
    text = re.sub(r"\b\d{4}-\d{2}-\d{2}\b", " ", text)             # ISO dates are not numbers here
    text = re.sub(r"(?<=\d)\s*[-–]\s*(?=\d)", " to ", text)          # 10-20 is a range, not 10 and -20
    out = []
    for m in NUMBER.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            continue
    return out


def last_number(text: str) -> Optional[float]:
    found = numbers(text)
    return found[-1] if found else None


def answer_number(response: str, value: float, prompt: str = "") -> bool:
    """The last number of the response, copies of the prompt left out, is the answer (the suite's prompts ask for
    it last)."""
    x = last_number(without_echo(response, prompt))
    return x is not None and abs(x - value) < 1e-6


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, re.I) is not None


def answer_text(response: str, text: str, choices: Optional[list[str]] = None, prompt: str = "") -> bool:
    """The answer is named as a whole word or phrase outside any copy of the prompt, and no other listed choice is
    named there."""
    response = without_echo(response, prompt)
    if not _has(response, text):
        return False
    return not any(_has(response, c) for c in (choices or []) if c.lower() != text.lower())


def run_check(check: dict, response: str, prompt: str = "") -> bool:
    """One check of a suite item: {"type": <IFEval instruction id>, "kwargs": {...}} or
    {"type": "answer_number", "value": x} / {"type": "answer_text", "text": s, "choices": [...]}."""
    kind = check.get("type")
    if kind == "answer_number":
        return answer_number(response, float(check["value"]), prompt)
    if kind == "answer_text":
        return answer_text(response, check["text"], check.get("choices"), prompt)
    if kind in INSTRUCTION_DICT:
        return ifeval_check(kind, check.get("kwargs"), response, prompt)
    raise BadInputError(f"unknown check type {kind!r} (an IFEval instruction id or one of {', '.join(ANSWER_TYPES)})")
