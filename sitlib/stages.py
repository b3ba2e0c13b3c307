"""CLI stages: each runs what its notebook runs, through the same sitlib functions, and returns the metrics."""
from __future__ import annotations


def generate(session) -> dict:
    from .magpie import run_magpie

    return run_magpie(session)


def filter_stage(session) -> dict:
    from .filtering import run_filter

    return run_filter(session)


def preference(session) -> dict:
    from .preference import run_preference

    return run_preference(session)


def sft(session) -> dict:
    from .training import train_sft

    return train_sft(session)


def prompt_tuning(session) -> dict:
    from .training import train_prompt_tuning

    return train_prompt_tuning(session)


def dpo(session) -> dict:
    from .training import train_dpo

    return train_dpo(session)


def benchmark(session) -> dict:
    from .benchmark import run_benchmark

    return run_benchmark(session)


def agent_eval(session) -> dict:
    from .agent import run_agent_eval

    return run_agent_eval(session)


def compare(session, allow_missing: bool = False) -> dict:
    from .comparison import run_comparison

    result = run_comparison(session, allow_missing)
    return {"rows": result["rows"], "missing": result["missing"]}
