"""Verifiable constraints for training data: IFEval instruction types appended to an instruction, checked by code.

The instruction texts, their arguments and the checkers are IFEval's (through `sitlib.checks`); the table of
which types contradict each other is IFEval's own registry, plus the pairs below that it leaves out.
"""
from __future__ import annotations

import copy
import random
from functools import lru_cache

# Types only code can answer for a small teacher, drawn only where generation.constraint_repair is on (sitlib.repair):
# repeat_prompt asks to copy the request back first, two_responses for two answers split by "******". No sample of
# the embedded model did either on the suite (0 of 8), so without repair they would only add failed rows.
REPAIR_ONLY = {"combination:repeat_prompt", "combination:two_responses"}
# Its argument is the request itself: attach() fills it; the instruction goes before the request, as IFEval asks it.
REPEAT = "combination:repeat_prompt"

# Pairs IFEval's registry allows that cannot both hold: a reply wrapped whole in quotes cannot end on a fixed
# phrase; an end phrase must be last, so no P.S. after it; all-lowercase text cannot write "P.S.".
EXTRA_CONFLICTS = [("startend:quotation", "startend:end_checker"),
                   ("startend:end_checker", "detectable_content:postscript"),
                   ("change_case:english_lowercase", "detectable_content:postscript"),
                   ("change_case:english_capital", "detectable_content:postscript"),
                   ("detectable_format:json_format", "startend:quotation"),
                   # the request to repeat holds the no-comma sentence, which has a comma
                   ("combination:repeat_prompt", "punctuation:no_comma")]


@lru_cache(maxsize=1)
def conflicts() -> dict[str, frozenset]:
    """instruction id → the ids it cannot be combined with (symmetric, each conflicts with itself)."""
    from if_verifiable.ifeval import instructions_registry as reg

    table = reg.conflict_make(copy.deepcopy(reg.INSTRUCTION_CONFLICTS))
    for a, b in EXTRA_CONFLICTS:
        table.setdefault(a, {a}).add(b)
        table.setdefault(b, {b}).add(a)
    return {k: frozenset(v) for k, v in table.items()}


def usable_types(repair: bool = False) -> list[str]:
    from .checks import IFEVAL_TYPES

    return sorted(t for t in set(IFEVAL_TYPES) | {REPEAT} if repair or t not in REPAIR_ONLY)


def compatible(ids: list[str]) -> bool:
    """True when no two of the ids conflict (and none repeats)."""
    table = conflicts()
    return all(b not in table.get(a, frozenset({a})) for i, a in enumerate(ids) for b in ids[i + 1:])


def draw(rng: random.Random, max_constraints: int, repair: bool = False) -> list[dict]:
    """1..max_constraints compatible constraints, {"id", "kwargs", "text"} each, drawn with `rng` (REPAIR_ONLY
    types too where `repair`). A repeat_prompt's request ("?" here) is filled in by attach()."""
    from .checks import ifeval_instruction

    want = rng.randint(1, max(1, max_constraints))
    types = usable_types(repair)
    rng.shuffle(types)
    picked: list[dict] = []
    for t in types:
        if len(picked) == want:
            break
        if not compatible([p["id"] for p in picked] + [t]):
            continue   # skip a type that contradicts one already drawn
        text, kwargs = ifeval_instruction(t, {"prompt_to_repeat": "?"} if t == REPEAT else None, rng=rng)
        picked.append({"id": t, "kwargs": kwargs, "text": text})
    return picked


def attach(instruction: str, constraints: list[dict]) -> tuple[str, list[dict]]:
    """(the prompt, the constraints as checked): the constraints' sentences appended to the instruction, as IFEval
    writes its prompts; a repeat_prompt's sentence goes first and the rest of the prompt is the request to repeat."""
    rep = next((c for c in constraints if c["id"] == REPEAT), None)
    rest = " ".join([instruction.rstrip()] + [c["text"].strip() for c in constraints if c is not rep])
    if rep is None:
        return rest, constraints
    bound = [{**c, "kwargs": {"prompt_to_repeat": rest}} if c is rep else c for c in constraints]
    return f"{rep['text'].strip()}\n{rest}", bound   # the line break as the suite writes it


def apply(instruction: str, constraints: list[dict]) -> str:
    """The prompt of attach()."""
    return attach(instruction, constraints)[0]


def check(constraints: list[dict], response: str, prompt: str = "") -> list[bool]:
    """One bool per constraint: does the response follow it (IFEval's strict checker)."""
    from .checks import ifeval_check

    return [bool(ifeval_check(c["id"], c["kwargs"], response, prompt)) for c in constraints]


def _check_item(item: tuple) -> list[bool]:
    return check(*item)


def check_workers(n_items: int) -> int:
    """Processes for n_items checks: IFEval's language and case checkers run langdetect, and 02's 3,880 sampled
    answers took 15.6 s to check on one core of an H200 machine while the GPU waited (bench/profile_answers.py).
    Spread where there are cores to spare and enough items to pay for starting workers (each imports nltk); none on
    2-core machines (Colab's smaller ones, CI), inside a process multiprocessing started (a GPU shard's worker: the
    shards already check side by side), or under a main module that is a file: a spawned worker imports it again,
    which runs a script written without an `if __name__ == "__main__"` guard a second time. A notebook kernel's
    main module has no file."""
    import multiprocessing
    import os
    import sys

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if cores < 4 or n_items < 256 or multiprocessing.parent_process() is not None or main:
        return 0
    return min(8, cores - 1)


def check_many(items: list[tuple], workers: int = 0) -> list[list[bool]]:
    """check(constraints, response, prompt) of every item, in order; with workers > 1 in that many spawned
    processes (spawned, not forked: the caller may hold CUDA). langdetect is seeded on import (checks.py), so a
    worker scores a text as this process does."""
    if workers <= 1:
        return [check(*item) for item in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_check_item, items, chunksize=max(1, len(items) // (4 * workers))))


def passes(constraints: list[dict], response: str, prompt: str = "") -> bool:
    return bool(response.strip()) and all(check(constraints, response, prompt))
