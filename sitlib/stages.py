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
