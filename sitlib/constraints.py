"""Verifiable constraints for training data: IFEval instruction types appended to an instruction, checked by code.

The instruction texts, their arguments and the checkers are IFEval's (through `sitlib.checks`); the table of
which types contradict each other is IFEval's own registry, plus the pairs below that it leaves out.
"""
from __future__ import annotations

import copy
import random
from functools import lru_cache

# Types never drawn: repeat_prompt asks to copy the request back (its argument is the request itself, and a model
# taught to echo learns nothing useful); two_responses needs two full answers, too long for the answer budget.
EXCLUDED = {"combination:repeat_prompt", "combination:two_responses"}

# Pairs IFEval's registry allows that cannot both hold: a reply wrapped whole in quotes cannot end on a fixed
# phrase; an end phrase must be last, so no P.S. after it; all-lowercase text cannot write "P.S.".
EXTRA_CONFLICTS = [("startend:quotation", "startend:end_checker"),
                   ("startend:end_checker", "detectable_content:postscript"),
                   ("change_case:english_lowercase", "detectable_content:postscript"),
                   ("change_case:english_capital", "detectable_content:postscript"),
                   ("detectable_format:json_format", "startend:quotation")]


@lru_cache(maxsize=1)
def conflicts() -> dict[str, frozenset]:
    """instruction id → the ids it cannot be combined with (symmetric, each conflicts with itself)."""
    from if_verifiable.ifeval import instructions_registry as reg

    table = reg.conflict_make(copy.deepcopy(reg.INSTRUCTION_CONFLICTS))
    for a, b in EXTRA_CONFLICTS:
        table.setdefault(a, {a}).add(b)
        table.setdefault(b, {b}).add(a)
    return {k: frozenset(v) for k, v in table.items()}


def usable_types() -> list[str]:
    from .checks import IFEVAL_TYPES

    return sorted(t for t in IFEVAL_TYPES if t not in EXCLUDED)


def compatible(ids: list[str]) -> bool:
    """True when no two of the ids conflict (and none repeats)."""
    table = conflicts()
    return all(b not in table.get(a, frozenset({a})) for i, a in enumerate(ids) for b in ids[i + 1:])


def draw(rng: random.Random, max_constraints: int) -> list[dict]:
    """1..max_constraints compatible constraints, {"id", "kwargs", "text"} each, drawn with `rng`."""
    from .checks import ifeval_instruction

    want = rng.randint(1, max(1, max_constraints))
    types = usable_types()
    rng.shuffle(types)
    picked: list[dict] = []
    for t in types:
        if len(picked) == want:
            break
        if not compatible([p["id"] for p in picked] + [t]):
            continue   # skip a type that contradicts one already drawn
        text, kwargs = ifeval_instruction(t, rng=rng)
        picked.append({"id": t, "kwargs": kwargs, "text": text})
    return picked


def apply(instruction: str, constraints: list[dict]) -> str:
    """The instruction with the constraints' sentences appended, as IFEval writes its prompts."""
    return " ".join([instruction.rstrip()] + [c["text"].strip() for c in constraints])


def check(constraints: list[dict], response: str, prompt: str = "") -> list[bool]:
    """One bool per constraint: does the response follow it (IFEval's strict checker)."""
    from .checks import ifeval_check

    return [bool(ifeval_check(c["id"], c["kwargs"], response, prompt)) for c in constraints]


def passes(constraints: list[dict], response: str, prompt: str = "") -> bool:
    return bool(response.strip()) and all(check(constraints, response, prompt))
