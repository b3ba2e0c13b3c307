"""The model variants compared in 07/08: the base student and each trained adapter, loaded on one base copy."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .artifacts import MissingInputError

# variant → (output-tree attribute, notebook that produces it)
ADAPTERS = {"sft": ("models_sft", "05_sft_training"), "prompt_tuning": ("models_prompt_tuning", "05b_prompt_tuning"),
            "dpo": ("models_dpo", "06_dpo_training")}
KNOWN = ["base", *ADAPTERS]


def adapter_dir(session, name: str):
    return getattr(session.paths, ADAPTERS[name][0]) / "final"


def check_variants(session, names: list[str]) -> None:
    """Fail before any generation if a requested variant is unknown or its adapter is missing."""
    if not names:
        raise ValueError("evaluation.variants is empty: name at least one of " + ", ".join(KNOWN))
    for name in names:
        if name not in KNOWN:
            raise ValueError(f"evaluation.variants: unknown variant {name!r} (known: {', '.join(KNOWN)})")
        if name != "base" and not (adapter_dir(session, name) / "adapter_config.json").exists():
            raise MissingInputError(f"missing {name} adapter {adapter_dir(session, name)} (run {ADAPTERS[name][1]} "
                                    f"first, or leave '{name}' out of evaluation.variants)")


@contextmanager
def loaded(base, session, name: str) -> Iterator:
    """The base with `name`'s adapter attached for the duration; the base comes back unchanged afterwards."""
    if name == "base":
        yield base
        return
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter_dir(session, name)))
    model.eval()
    try:
        yield model
    finally:
        if getattr(model, "peft_type", None) and str(model.peft_type).endswith("LORA"):
            model.unload()              # removes the LoRA layers without merging them
        else:
            model.get_base_model()      # prompt tuning wraps without touching the base's layers


def iter_variants(session, names: list[str]):
    """Yield (name, model, tokenizer) for each variant, sharing one loaded copy of the base weights."""
    from .models import load_model, load_tokenizer

    check_variants(session, names)
    tok = load_tokenizer(session.config.models.student)
    base = load_model(session.config.models.student, session.profile)
    base.eval()
    for name in names:
        with loaded(base, session, name) as model:
            yield name, model, tok
