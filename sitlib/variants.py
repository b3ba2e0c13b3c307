"""The model variants compared in 07/08: the base student and each trained adapter, loaded on one base copy, and
the check that an adapter was trained from the current upstream files (data → SFT → DPO)."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .artifacts import read_json
from .errors import ConfigError, MissingInputError

# variant → (output-tree attribute, notebook that produces it)
ADAPTERS = {"sft": ("models_sft", "05_sft_training"), "prompt_tuning": ("models_prompt_tuning", "05b_prompt_tuning"),
            "dpo": ("models_dpo", "06_dpo_training")}
KNOWN = ["base", *ADAPTERS]
# the data files each adapter trains on, relative to the output root, and the notebook that writes them
INPUTS = {"sft": (["data/filtered/sft_train.jsonl", "data/filtered/sft_val.jsonl"], "03_quality_filtering"),
          "prompt_tuning": (["data/filtered/sft_train.jsonl", "data/filtered/sft_val.jsonl"], "03_quality_filtering"),
          "dpo": (["data/preference/dpo_train.jsonl", "data/preference/dpo_val.jsonl"], "04_preference_generation")}


def adapter_dir(session, name: str) -> Path:
    return getattr(session.paths, ADAPTERS[name][0]) / "final"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (its content, not its modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_digests(session, name: str) -> dict[str, str]:
    """What a training stage records in final/training_config.json under "inputs": {relative path: sha256} of the
    data files it trained on, so 07/08 can tell a stale adapter from a current one."""
    return {rel: file_digest(session.paths.root / rel) for rel in INPUTS[name][0]}


def _stale(name: str, why: str) -> MissingInputError:
    return MissingInputError(f"stale {name} adapter {why} (rerun {ADAPTERS[name][1]}, or leave '{name}' out of "
                             "evaluation.variants)")


def _check_row_counts(session, name: str, sizes: dict, notes: list[str]) -> None:
    """Without input hashes, the row counts 05/05b/06 record still catch data that changed size."""
    from .artifacts import count_jsonl_rows

    files = dict(zip(("train", "val"), INPUTS[name][0]))
    recorded = {part: n for key, n in sizes.items() for part in files if key.startswith(part)}
    for part, n in recorded.items():
        now = count_jsonl_rows(session.paths.root / files[part])
        if now != n:
            raise _stale(name, f"{adapter_dir(session, name)}: it was trained on {n} rows of {files[part]}, "
                               f"which now has {now}")
    notes.append("data row counts match (content not verified: its training_config.json records no input hashes)"
                 if recorded else "data not verified: its training_config.json records neither input hashes nor "
                 "row counts")


def _check_inputs(session, name: str, rec: dict, notes: list[str]) -> None:
    recorded = rec.get("inputs") or {}
    if not recorded:
        _check_row_counts(session, name, rec.get("data") or {}, notes)
        return
    producer = INPUTS[name][1]
    for rel, digest in recorded.items():
        path = session.paths.root / rel
        if not path.exists():
            raise MissingInputError(f"{path} is gone, so the {name} adapter cannot be checked against it "
                                    f"(rerun {producer}, then {ADAPTERS[name][1]})")
        if file_digest(path) != digest:
            raise _stale(name, f"{adapter_dir(session, name)}: {rel} changed since it was trained")
    notes.append(f"data verified: {', '.join(sorted(recorded))} unchanged")


def check_fresh(session, name: str) -> dict:
    """Raise MissingInputError naming the notebook to rerun when `name`'s adapter was trained from other inputs than
    the current ones; else {"variant", "fingerprint", "notes"} saying what was verified (and what could not be)."""
    if name == "base":
        return {"variant": "base", "fingerprint": None, "notes": ["the base model: no adapter"]}
    final = adapter_dir(session, name)
    cfg_file = final / "training_config.json"
    if not cfg_file.exists():
        raise MissingInputError(f"{final} has no training_config.json (an unfinished run or an older version): "
                                f"rerun {ADAPTERS[name][1]}")
    rec, notes = read_json(cfg_file), []
    _check_inputs(session, name, rec, notes)
    if name == "dpo":
        _check_dpo_chain(session, rec, notes)
    return {"variant": name, "fingerprint": rec.get("fingerprint"), "notes": notes}


def _check_dpo_chain(session, rec: dict, notes: list[str]) -> None:
    """DPO starts from the SFT adapter: the SFT adapter must be current, and the one DPO was trained on."""
    from .training import adapter_digest

    sft = adapter_dir(session, "sft")
    if not (sft / "adapter_config.json").exists():
        raise MissingInputError(f"missing SFT adapter {sft}, which the dpo adapter was trained on "
                                "(run 05_sft_training, then 06_dpo_training)")
    try:
        check_fresh(session, "sft")
    except MissingInputError as e:
        raise MissingInputError(f"{e}; the dpo adapter builds on it: then rerun 06_dpo_training") from e
    # 06 records it among its results (training_config.json "results"); top level is accepted as well
    want = rec.get("sft_adapter_digest") or (rec.get("results") or {}).get("sft_adapter_digest")
    if want is None:
        notes.append("SFT adapter not verified: its training_config.json records no sft_adapter_digest")
    elif adapter_digest(sft) != want:
        raise _stale("dpo", f"{adapter_dir(session, 'dpo')}: the SFT adapter in {sft} changed since it was trained")
    else:
        notes.append("SFT adapter verified: the one it was trained on")


def check_variants(session, names: list[str]) -> dict[str, dict]:
    """Fail before any generation if a requested variant is unknown, missing or stale; {name: check_fresh(...)}."""
    if not names:
        raise ConfigError("evaluation.variants is empty: name at least one of " + ", ".join(KNOWN))
    for name in names:
        if name not in KNOWN:
            raise ConfigError(f"evaluation.variants: unknown variant {name!r} (known: {', '.join(KNOWN)})")
        if name != "base" and not (adapter_dir(session, name) / "adapter_config.json").exists():
            raise MissingInputError(f"missing {name} adapter {adapter_dir(session, name)} (run {ADAPTERS[name][1]} "
                                    f"first, or leave '{name}' out of evaluation.variants)")
    return {name: check_fresh(session, name) for name in names}


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
    """Yield (name, model, tokenizer) for each variant, sharing one loaded copy of the base weights. Nothing is
    loaded when `names` is empty (every variant already finished)."""
    if not names:
        return
    from .models import load_model, load_tokenizer

    tok = load_tokenizer(session.config.models.student)
    base = load_model(session.config.models.student, session.profile)
    base.eval()
    for name in names:
        with loaded(base, session, name) as model:
            yield name, model, tok
