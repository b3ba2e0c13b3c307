"""Building blocks of notebooks 05 / 05b / 06: data for TRL, trainer arguments, resume, train, answers, save.

The notebooks hold the stage's story (data shown, `LoraConfig` / `SFTConfig` / `DPOConfig` built in cells,
before/after answers, chat); these are the reusable steps they call, each small enough to read in one go.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .artifacts import read_json, read_jsonl, write_json, write_metrics
from .errors import BadInputError, ConfigError, HubAccessError, OutOfMemoryError
from .figures import training_curves
from .generation import Sampling, chat_input_ids, generate
from .models import liger_available

# resume point of a run: same fingerprint → newest complete checkpoint; other weights (a profile switch) → moved
# aside; other config/data → removed. Re-exported: the notebooks call training.prepare_checkpoints.
from . import checkpoints, lora, stalls, unpadding
from .checkpoints import tokens_seen  # noqa: F401
from .distributed import for_world, is_main_process, main_process_first, print_main, wait_for_everyone, world

SFT_FILES = ("sft_train.jsonl", "sft_val.jsonl")
DPO_FILES = ("dpo_train.jsonl", "dpo_val.jsonl")
SFT_PRODUCER, DPO_PRODUCER = "03_quality_filtering", "04_preference_generation"


# ---------------------------------------------------------------- data

def _rows(folder: Path, name: str, producer: str) -> list[dict]:
    rows = read_jsonl(folder / name, produced_by=producer)
    if not rows:
        raise BadInputError(f"{folder / name} is empty: rerun {producer} with more rows")
    return rows


def tokenize_sft(tok, row: dict, max_length: int) -> dict:
    """input_ids + completion_mask for one prompt/completion row, through the tokenizer's chat template.

    Written here rather than left to TRL: TRL's template diff also trains whatever the template puts after the
    EOS (SmolLM2: a newline). We end the sequence at the EOS, as generation does, so the loss covers exactly
    the answer and its EOS — the stop the model must learn.
    """
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    if not full.startswith(prompt):
        raise BadInputError("the chat template renders the prompt differently inside the full conversation "
                            f"(row id {row.get('id')!r}): it cannot mark where the answer starts")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id in c_ids:
        c_ids = c_ids[: c_ids.index(tok.eos_token_id) + 1]
    else:
        c_ids = c_ids + [tok.eos_token_id]
    ids = (p_ids + c_ids)[:max_length]
    return {"input_ids": ids, "completion_mask": ([0] * len(p_ids) + [1] * len(c_ids))[:max_length]}


def _selected(rows: list[dict], keep, path: Path, key: str, choice: str, why_none: str) -> list[dict]:
    """The rows `keep` accepts; none left is an error naming the file and the config key that asked for them."""
    kept = [r for r in rows if keep(r)]
    if not kept:
        raise BadInputError(f"{path}: {key} = {choice!r} leaves no row ({why_none}; or set {key} to 'all')")
    return kept


def sft_rows(session, section: str = "sft") -> tuple[list[dict], list[dict]]:
    """The (train, val) prompt/completion rows 03 wrote; `<section>.rows` = "constrained" keeps only the rows whose
    answer passes its code-checked constraints (as the teacher wrote it, or edited by code where 02 ran with
    generation.constraint_repair; such rows say "repaired"), without the unchecked Magpie rows."""
    folder, choice = session.paths.data_filtered, getattr(session.config, section).rows
    out = [_rows(folder, name, SFT_PRODUCER) for name in SFT_FILES]
    if choice == "constrained":
        why = ("rerun 02 with generation.constraint_share > 0, then 03",
               "none was held out: rerun 03 with a larger filter.val_fraction")
        out = [_selected(rows, lambda r: bool(r.get("constraints")), folder / name, f"{section}.rows", choice, w)
               for rows, name, w in zip(out, SFT_FILES, why)]
    per_row = getattr(getattr(session.config, section), "answers_per_row", 1)
    return with_passed_answers(out[0], per_row, folder / SFT_FILES[0], f"{section}.answers_per_row"), out[1]


def with_passed_answers(rows: list[dict], per_row: int, path: Path, key: str) -> list[dict]:
    """Each row, then up to per_row - 1 more rows with its other checked answers (03's `passed_answers`), the
    prompt the same, marked `further_answer`: rejection-sampling fine-tuning on every distinct passing sample, not
    only the first."""
    if per_row > 1:
        constrained = [r for r in rows if r.get("constraints")]
        checked = [r for r in constrained if not r.get("repaired")]   # a repaired row has no checked answer
        if not checked:
            why = (f"all {len(constrained)} constrained rows were repaired by code (generation.constraint_repair): "
                   "rerun 02 with more generation.constraint_samples, then 03") if constrained else \
                "rerun 02 with generation.constraint_share > 0, then 03"
            raise BadInputError(f"{path}: no constrained row with a passing sample, which {key} = {per_row} takes "
                                f"further answers from ({why})")
        if any("passed_answers" not in r for r in checked):
            raise BadInputError(f"{path}: its constrained rows have no passed_answers, which {key} = {per_row} "
                                "trains on (written before 03 kept them: rerun 03_quality_filtering)")
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "passed_answers"}   # every row alike, without the list
        out.append(row)
        out += [{**row, "completion": [{"role": "assistant", "content": a}], "further_answer": True}
                for a in r.get("passed_answers", [])[: per_row - 1]]
    return out


def tokenized_sft_split(session, tok, section: str = "sft"):
    """(train, val, val_prompts): token ids + completion masks as `datasets.Dataset`, and the val instructions."""
    from datasets import Dataset

    n = session.config.models.max_seq_length
    train, val = sft_rows(session, section)
    return (Dataset.from_list([tokenize_sft(tok, r, n) for r in train]),
            Dataset.from_list([tokenize_sft(tok, r, n) for r in val]),
            [r["prompt"][-1]["content"] for r in val])


def preference_split(session):
    """(train, val) `datasets.Dataset` of prompt/chosen/rejected conversations, as 04 wrote them; `dpo.pairs` other
    than "all" keeps only the pairs of that rule ("constraint_check": the checked pass → chosen, fail → rejected)."""
    from datasets import Dataset

    folder, cols, choice = session.paths.data_preference, ("prompt", "chosen", "rejected"), session.config.dpo.pairs
    out = []
    for name in DPO_FILES:
        rows = _rows(folder, name, DPO_PRODUCER)
        for n, r in enumerate(rows, 1):
            if missing := [c for c in cols if c not in r]:
                raise BadInputError(f"{folder / name}, line {n}: missing {', '.join(missing)} "
                                    "(expected prompt/chosen/rejected message lists)")
        if choice != "all":   # only the pairs made by one rule, e.g. pass → chosen, fail → rejected
            rows = _selected(rows, lambda r: r.get("pair_rule") == choice, folder / name, "dpo.pairs", choice,
                             f"no pair has pair_rule {choice!r}")
        out.append(Dataset.from_list([{c: r[c] for c in cols} for r in rows]))
    return out[0], out[1]


@dataclass
class LabelMask:
    """One tokenized row as (token text, trained?) pieces; prints with trained tokens in ⟦…⟧, HTML highlighted."""
    pieces: list[tuple[str, bool]]

    @property
    def trained_tokens(self) -> int:
        return sum(t for _, t in self.pieces)

    def __str__(self) -> str:
        out, inside = [], False
        for text, trained in self.pieces:
            if trained != inside:
                out.append("⟦" if trained else "⟧")
                inside = trained
            out.append(text)
        return "".join(out) + ("⟧" if inside else "")

    def __repr__(self) -> str:
        return (f"{len(self.pieces)} tokens, {self.trained_tokens} trained (inside ⟦ ⟧):\n" + str(self))

    def _repr_html_(self) -> str:
        spans = "".join(f'<span style="background:#c6efce">{html.escape(t)}</span>' if m else html.escape(t)
                        for t, m in self.pieces)
        return (f"<p>{len(self.pieces)} tokens; <span style='background:#c6efce'>green</span> = in the loss "
                f"({self.trained_tokens})</p><pre style='white-space:pre-wrap'>{spans}</pre>")


def show_label_mask(tok, row: dict, max_length: int = 4096) -> LabelMask:
    """The row as the model sees it (chat template applied), with the tokens the loss trains on marked."""
    ex = tokenize_sft(tok, row, max_length)
    return LabelMask([(tok.decode([i]), bool(m)) for i, m in zip(ex["input_ids"], ex["completion_mask"])])


def show_preference_pair(tok, row: dict) -> dict:
    """One preference pair: the prompt exactly as the chat template renders it, then both answers."""
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    shown = {"prompt as the model sees it": prompt, "chosen": row["chosen"][-1]["content"],
             "rejected": row["rejected"][-1]["content"]}
    return shown | {k: row[k] for k in ("chosen_score", "rejected_score", "margin") if k in row}


# ---------------------------------------------------------------- trainer arguments

def common_args(section, session, out_dir: Path, padding_free: bool) -> dict:
    """TrainingArguments shared by the three trainers, from the stage's config section and the profile."""
    prof = session.profile
    # for_world: under accelerate/torchrun, gradient accumulation shrinks with the number of processes so the
    # effective batch (and so the learning rate's meaning) stays as configured; the log says so
    return for_world(dict(
        output_dir=str(out_dir), num_train_epochs=section.epochs, max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size, per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation, learning_rate=section.learning_rate,
        # a float in [0, 1) is a ratio of the total steps: warmup can never exceed the run (the original's 100/114)
        warmup_steps=float(section.warmup_ratio), lr_scheduler_type=getattr(section, "lr_scheduler", "cosine"),
        logging_steps=section.logging_steps, save_strategy="steps", save_steps=section.save_steps,
        eval_strategy="steps", eval_steps=section.eval_steps, save_total_limit=2,
        bf16=prof.bf16, fp16=prof.fp16, use_cpu=prof.device == "cpu",
        # TRL turns checkpointing on by default; on 2 CPU cores it made SmolLM2 SFT 60% slower
        gradient_checkpointing=prof.gradient_checkpointing, padding_free=padding_free,
        # padding-free does not enforce max_length in TRL (it refuses one); tokenize_sft already truncated the rows
        max_length=None if padding_free else session.config.models.max_seq_length, report_to="none",
        seed=session.config.seed, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        save_only_model=False,
    ))


def prepare_checkpoints(ckpt_dir: Path, fp: str, weights_key: str) -> Optional[str]:
    """sitlib.checkpoints.prepare_checkpoints, rank 0 first: it moves and removes folders, which would race
    across processes; the other ranks then find the same resume point."""
    with main_process_first():
        return checkpoints.prepare_checkpoints(ckpt_dir, fp, weights_key)


def packed_for_world(sec, max_seq_length: int):
    """(section, tokens per packed sequence) for this world. On W processes one configured sequence of N tokens
    becomes W sequences of N / W, one per process (for_world then keeps the accumulation), so the tokens per
    optimizer step stay as configured; where N / W would cut rows of max_seq_length, for_world's rule decides."""
    size = world().size
    if size == 1 or sec.pack_tokens // size < max_seq_length:
        return sec, sec.pack_tokens
    print_main(f"{size} processes: each packs sequences of {sec.pack_tokens // size} tokens "
               f"(sft.pack_tokens {sec.pack_tokens} / {size})")
    return dataclasses.replace(sec, gradient_accumulation=sec.gradient_accumulation * size), sec.pack_tokens // size


def sft_args(session, section: str, ckpt_dir: Path):
    """`trl.SFTConfig` for "sft" (LoRA/QLoRA) or "prompt_tuning", from the resolved settings."""
    from trl import SFTConfig

    sec, prof, pack = getattr(session.config, section), session.profile, 0
    if section == "sft":
        extra = dict(optim=sec.optimizer, weight_decay=sec.weight_decay)
        padding_free = prof.padding_free
        if sec.pack_tokens:
            if not padding_free:
                raise ConfigError(f"config key 'sft.pack_tokens' ({sec.pack_tokens}) needs a padding-free profile; "
                                  f"'{prof.name}' is not: set it to 0")
            sec, pack = packed_for_world(sec, session.config.models.max_seq_length)
            extra.update(packing=True, packing_strategy="bfd")
    elif section == "prompt_tuning":
        # virtual tokens must prefix every row: padding-free packs rows into one sequence, so it stays off
        extra = dict(train_sampling_strategy="group_by_length", pad_to_multiple_of=pad_multiple(prof))
        padding_free = False
    else:
        raise ValueError(f"sft_args: section must be 'sft' or 'prompt_tuning', got {section!r}")
    args = common_args(sec, session, ckpt_dir, padding_free)
    if pack:
        args["max_length"] = pack   # the packed sequence's length (rows were truncated when tokenized)
    # Liger patches the model's classes at Trainer init; where it is not installed training runs without it
    return SFTConfig(**args, completion_only_loss=True, use_liger_kernel=prof.liger and liger_available(), **extra)


def dpo_args(session, ckpt_dir: Path):
    """`trl.DPOConfig` from the resolved `dpo` settings (β, loss type, lr, steps) and the profile."""
    from trl import DPOConfig

    d, prof = session.config.dpo, session.profile
    # TRL 1.16 turns DPO's padding_free off, so pairs of like length share batches (less padding to each batch's
    # longest pair); Liger's layer kernels (RMSNorm, RoPE, SwiGLU) as for SFT: TRL keeps its own fused LM head
    losses = {"loss_type": [d.loss_type]}
    if d.sft_weight > 0:
        losses = {"loss_type": [d.loss_type, "sft"], "loss_weights": [1.0, d.sft_weight]}
    return DPOConfig(**common_args(d, session, ckpt_dir, padding_free=False), beta=d.beta, ld_alpha=d.ld_alpha,
                     **losses, train_sampling_strategy="group_by_length",
                     use_liger_kernel=prof.liger and liger_available(), pad_to_multiple_of=pad_multiple(prof))


# Padded batches (DPO, prompt tuning) on a GPU are padded to a multiple of this many tokens, and where they run
# padding-free (sitlib.unpadding) the packed row is filled to it. Padded, on the 3B shape DPO ran 14,460 real tok/s
# with it against 9,150 at each batch's own longest length, and prompt tuning 27,758 against 22,564
# (bench/results/padding_NVIDIA_H200.json).
GPU_PAD_MULTIPLE = 64


def pad_multiple(prof) -> Optional[int]:
    """GPU_PAD_MULTIPLE on a GPU; None on the CPU, where padding is only more work."""
    return GPU_PAD_MULTIPLE if prof.device == "cuda" else None


def args_table(args):
    """The arguments that differ from the class's defaults, as a table (what this run actually chose)."""
    import pandas as pd

    rows = []
    for f in dataclasses.fields(args):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        value = getattr(args, f.name)
        if value != default and f.name not in ("logging_dir",):
            rows.append({"argument": f.name, "value": str(value), "default": str(default)})
    return pd.DataFrame(rows).set_index("argument")


# ---------------------------------------------------------------- fingerprints and checkpoints

def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(obj):
    """Plain JSON of a config; sets (PEFT keeps target_modules as one) become sorted lists, so the text, and a
    fingerprint over it, is the same in every process (a set's order changes with string hash seeds)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=lambda o: sorted(o, key=str) if isinstance(o, (set, frozenset)) else str(o)))


def sft_fingerprint(session, stage: str, train, val, peft_cfg) -> str:
    """What defines an SFT / prompt-tuning result: settings, PEFT config, model, data. Not the profile's name:
    a profile switch is handled by the checkpoints' weights key (moved aside, not deleted)."""
    cfg = session.config
    return fingerprint(stage, asdict(getattr(cfg, stage)), _jsonable(peft_cfg), cfg.models.student,
                       cfg.models.max_seq_length, train.to_list(), val.to_list())


def adapter_digest(adapter_dir: Path) -> str:
    """Content hash of a saved adapter (weights + config): a retrained SFT adapter changes it, a copy or a
    touched file does not."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(adapter_dir).iterdir()
                   if p.name.startswith("adapter_") and p.suffix in (".safetensors", ".bin", ".json"))
    if not files:
        raise FileNotFoundError(f"no adapter files in {adapter_dir}")
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def sft_adapter(session) -> Path:
    """models/sft/final, which 06 trains on; a missing one names the notebook to run."""
    from .errors import MissingInputError

    final = session.paths.models_sft / "final"
    if not (final / "adapter_config.json").exists():
        raise MissingInputError(f"missing SFT adapter {final} (run 05_sft_training first)")
    return final


def dpo_fingerprint(session, train, val, sft_final: Path) -> str:
    cfg = session.config
    return fingerprint("dpo", asdict(cfg.dpo), cfg.models.student, cfg.models.max_seq_length,
                       train.to_list(), val.to_list(), adapter_digest(sft_final))


# ---------------------------------------------------------------- train

def memory_report(profile) -> str:
    if profile.device == "cuda":
        return (f"GPU memory allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
                f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    # ru_maxrss is KiB on Linux: the whole process's peak, model load included
    return f"process peak memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def peak_memory_gb(profile) -> dict:
    if profile.device == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_memory_kind": "cuda_max_allocated"}
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_memory_kind": "process_max_rss"}


def oom_hint(session, section_name: str) -> str:
    sec = getattr(session.config, section_name)
    return (f"out of GPU memory on profile '{session.profile.name}': lower {section_name}.batch_size (now "
            f"{sec.batch_size}) and raise {section_name}.gradient_accumulation (now {sec.gradient_accumulation}) "
            f"to keep the effective batch, or lower models.max_seq_length (now "
            f"{session.config.models.max_seq_length})")


@contextlib.contextmanager
def oom_guard(session, section_name: str):
    """Turn CUDA OOM into one line naming the values to lower (the run's final files are not written)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if session.profile.device == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemoryError(oom_hint(session, section_name)) from None


def match_adapter_dtype(trainer, profile) -> None:
    """Trainable weights in the dtype the profile trains in, before the optimizer is built (at train()).
    bf16_adapters: PEFT keeps adapters in fp32 on a bf16 base, so every LoRA call casts its input; in bf16 they do
    not (DPO's frozen reference adapter too). fp16 AMP (a T4 has no bf16) cannot unscale the bf16 gradients TRL
    gives a 4-bit model's adapter, so there it goes back to fp32."""
    for p in trainer.model.parameters():
        if profile.adapters_bf16 and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
        elif profile.load_in_4bit and not profile.bf16 and p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.float()


def sft_trainer(model, args, train, val, tok, peft_config, callbacks: Optional[list] = None):
    """The SFTTrainer as notebook 05b builds it (batches of like length; padded rows run padding-free) and, on a
    GPU, with LoRA fused as 05 and 06 fuse it: one PEFT wrap, done by the trainer from `peft_config` (no
    get_peft_model beforehand). 05's own cell builds a plain SFTTrainer: its rows are packed or padding-free."""
    from trl import SFTTrainer

    trainer = length_grouped(SFTTrainer)(model=model, args=args, train_dataset=train, eval_dataset=val,
                                         processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    unpadding.unpad(trainer.model, args.pad_to_multiple_of)   # prompt tuning's padded rows run padding-free
    fuse_lora(trainer.model, args)
    return trainer


def fuse_lora(model, args) -> int:
    """On a GPU, the LoRA layers add their update inside one GEMM (sitlib.lora); the CPU keeps PEFT's forward.
    Returns how many layers were fused."""
    return lora.fuse(model) if lora.FUSED and not args.use_cpu else 0


def dpo_policy(session, sft_final: Path):
    """The student with the SFT adapter loaded trainable: the policy DPO starts from."""
    from peft import PeftModel

    from .models import load_model

    base = load_model(session.config.models.student, session.profile, for_training=True)
    return PeftModel.from_pretrained(base, str(sft_final), is_trainable=True)


def dpo_trainer(policy, args, train, val, tok, callbacks: Optional[list] = None):
    """The DPOTrainer exactly as notebook 06 builds it. No ref_model: TRL copies the policy's SFT adapter into a
    frozen "ref" adapter on the same base weights, so the reference is the SFT model and the base is loaded once."""
    from trl import DPOTrainer

    trainer = length_grouped(DPOTrainer)(model=policy, ref_model=None, args=args, train_dataset=train,
                                         eval_dataset=val, processing_class=tok, callbacks=callbacks)
    unpadding.unpad(trainer.model, args.pad_to_multiple_of)   # pairs run padding-free (policy and reference)
    fuse_lora(trainer.model, args)   # after TRL added the "ref" adapter: both adapters take the fused path
    return trainer


def row_lengths(dataset) -> list[int]:
    """Tokens of each tokenized row in a padded batch: a DPO pair's prompt plus its longer answer (TRL pads chosen
    and rejected to one length), else the row's input_ids."""
    if "prompt_ids" in dataset.column_names:
        return [len(p) + max(len(c), len(r)) for p, c, r in
                zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    return [len(ids) for ids in dataset["input_ids"]]


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' LengthGroupedSampler, its shuffle seeded by seed + epoch (set_epoch, which the Trainer calls
    every epoch) instead of the global RNG: a run resumed in epoch k skips the batches it already trained in the
    order it trained them, on every process alike."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, lengths, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=gen))


def length_grouped(trainer_cls):
    """`trainer_cls` (trl.SFTTrainer or trl.DPOTrainer) whose group_by_length batches come from
    EpochSeededLengthGroupedSampler; transformers' own sampler draws from the global RNG (a resume past the first
    epoch would see another order) and measures rows by an input_ids column, which DPO's tokenized pairs lack.
    Evaluation of pairs keeps the plain order (its batches are few). TRL 1.16 calls use_liger_kernel deprecated
    for DPO, yet still applies Liger's layer kernels (it keeps its own fused LM head): that warning is not shown.
    The class also steps without the Trainer's bookkeeping stalls (sitlib.stalls)."""
    import warnings

    from torch.utils.data import SequentialSampler

    class LengthGrouped(stalls.unstalled(trainer_cls)):
        def __init__(self, *args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*use_liger_kernel.*", category=FutureWarning)
                super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            ds = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, row_lengths(ds), seed)

        def _get_eval_sampler(self, eval_dataset):
            if eval_dataset is not None and "prompt_ids" in eval_dataset.column_names:
                return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
            return super()._get_eval_sampler(eval_dataset)

    LengthGrouped.__name__ = LengthGrouped.__qualname__ = f"LengthGrouped{trainer_cls.__name__}"
    return LengthGrouped


@dataclass
class TrainResult:
    training_loss: Optional[float]
    seconds: float
    tokens: int                          # non-padding tokens processed in this run (not before a resume)
    reused: Optional[dict] = None        # metrics of an earlier finished run with the same fingerprint


def run_trainer(trainer, resume: Optional[str], session, section_name: str) -> TrainResult:
    """trainer.train(), resuming from `resume`; timed, tokens counted, CUDA OOM → OutOfMemoryError."""
    match_adapter_dtype(trainer, session.profile)
    tokens_before = tokens_seen(resume)
    if session.profile.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with oom_guard(session, section_name):
        out = trainer.train(resume_from_checkpoint=resume)
    return TrainResult(out.training_loss, time.perf_counter() - t,
                       int(trainer.state.num_input_tokens_seen) - int(tokens_before))


def reuse_finished(trainer, final_dir: Path, fp: str) -> Optional[TrainResult]:
    """When final_dir holds a finished run with this fingerprint, load its adapter into the trainer's model and
    return its result (rerunning a finished notebook does not train again); else None."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    f = Path(final_dir) / "training_config.json"
    if not f.exists() or read_json(f).get("fingerprint") != fp:
        return None
    set_peft_model_state_dict(trainer.model, load_peft_weights(str(final_dir)), adapter_name="default")
    print(f"already trained with this config and data: {final_dir} (delete it to train again)")
    metrics = read_json(f)["results"]
    trainer.state.log_history = read_json(Path(final_dir) / "log_history.json")
    return TrainResult(metrics.get("train_loss"), metrics.get("runtime_seconds", 0.0),
                       metrics.get("tokens_this_run", 0), reused=metrics)


def evaluate(trainer, session, section_name: str) -> dict:
    """Eval loss (and DPO's reward accuracy / margin) on the held-out split, rounded."""
    with oom_guard(session, section_name):
        m = trainer.evaluate()
    return {k: round(float(v), 5) for k, v in m.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------- answers

def sample_tokens(cfg) -> int:
    """New tokens for before/after answers and the chat cell: the budget the evaluation gives the same models
    (evaluation.max_new_tokens), so the notebooks show answers of the length that is scored."""
    return cfg.evaluation.max_new_tokens


def _answers(model, tok, prompts: list[str], sampling: Sampling) -> list:
    """Completions of single-turn prompts through the chat template, in eval mode; the model's mode is given back."""
    was_training = model.training
    model.eval()
    inputs = chat_input_ids(tok, [[{"role": "user", "content": p}] for p in prompts])
    outs = generate(model, tok, inputs, sampling, batch_size=len(prompts) or 1)
    model.train(was_training)
    return outs


def sample_answers(model, tok, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers to single-turn prompts through the chat template."""
    outs = _answers(model, tok, prompts, Sampling.greedy(max_new_tokens))
    return [{"prompt": p, "answer": o.text, "stopped_on_eos": o.ended, "new_tokens": o.n_tokens}
            for p, o in zip(prompts, outs)]


def side_by_side(**answers: list[dict]):
    """One row per prompt, one column per named answer list, e.g. side_by_side(before=..., after=...)."""
    import pandas as pd

    names = list(answers)
    rows = [{"prompt": group[0]["prompt"], **{n: a["answer"] for n, a in zip(names, group)}}
            for group in zip(*answers.values())]
    return pd.DataFrame(rows).style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})


def chat(model, tok, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """One chat turn, printed when done; temperature 0 = greedy. Through sitlib's generation, as the sample answers
    above: in an H200 series run transformers' `generate` with a token streamer took 13.5-22.1 s for this one answer
    in 05/05b/06, where three sample answers took 1.8-3.0 s in 05 and 06
    (bench/results/quality_run_NVIDIA_H200/cell_seconds.json)."""
    sampling = Sampling(max_new_tokens, temperature, 0.95) if temperature > 0 else Sampling.greedy(max_new_tokens)
    reply = _answers(model, tok, [prompt], sampling)[0].text.strip()
    print(reply)
    return reply


# ---------------------------------------------------------------- save

def finish_training(session, stage: str, trainer, tok, result: TrainResult, eval_metrics: dict, fp: str,
                    final_dir: Path, data_sizes: dict, peft_cfg, extra: dict,
                    curve_extra: Optional[str] = None) -> dict:
    """Save adapter + tokenizer + training_config.json + log history, write <stage>_metrics.json and the curves.

    A reused finished run (same fingerprint) is returned as it was, nothing rewritten."""
    from .models import count_parameters

    if result.reused is not None:
        return result.reused
    for key, name in (("eval_rewards/accuracies", "eval_reward_accuracy"), ("eval_rewards/margins", "eval_reward_margin")):
        if key in eval_metrics:   # DPO only
            extra = {**extra, name: eval_metrics[key]}
    rate = session.config.cost.units_per_hour.get(session.profile.name)
    metrics = {
        "stage": stage, **count_parameters(trainer.model),
        "train_loss": round(result.training_loss, 5), "eval_loss": eval_metrics["eval_loss"],
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "runtime_seconds": round(result.seconds, 2), "tokens_this_run": result.tokens,
        "tokens_per_second": round(result.tokens / result.seconds, 2) if result.seconds > 0 else None,
        **peak_memory_gb(session.profile), "device": session.detection.device_name,
        "profile": session.profile.name, "compute_units_per_hour": rate,
        "compute_units": None if rate is None else round(result.seconds / 3600 * rate, 4),
        **data_sizes, **extra, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if is_main_process():   # one writer under several processes; the others wait at the barrier below
        _save_final(session, stage, trainer, tok, metrics, fp, final_dir, data_sizes, peft_cfg, curve_extra)
    wait_for_everyone()
    return metrics


def _save_final(session, stage, trainer, tok, metrics, fp, final_dir, data_sizes, peft_cfg, curve_extra) -> None:
    from .variants import input_digests

    # only the trained adapter: DPO's frozen "ref" copy is not part of the result
    trainer.model.save_pretrained(str(final_dir), selected_adapters=["default"])
    tok.save_pretrained(str(final_dir))
    write_json(final_dir / "log_history.json", trainer.state.log_history)
    training_curves(trainer.state.log_history, session.paths.evaluation_figures / f"{stage}_training_curves.png",
                    f"{stage}: loss", curve_extra)
    write_metrics(session.paths.evaluation_metrics / f"{stage}_metrics.json", metrics, session.config)
    # written last: its fingerprint marks final/ as complete (reuse_finished and the evaluation stages read it)
    write_json(final_dir / "training_config.json", {
        "base_model": session.config.models.student, "peft": _jsonable(peft_cfg),
        "training_args": _jsonable(trainer.args.to_dict()), "data": data_sizes, "results": metrics,
        "profile": session.profile.name, "timestamp": metrics["timestamp"], "fingerprint": fp,
        # sha256 of the data files trained on: 07/08 refuse an adapter whose inputs have changed since
        "inputs": input_digests(session, stage)})


def merge_adapter(session, adapter_dir: Path, out_dir: Path) -> Path:
    """Base + adapter merged into one standalone model (full precision: a 4-bit base cannot be merged)."""
    import os
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .hardware import torch_dtype
    from .models import load_tokenizer, resolve_model

    student = session.config.models.student
    base = AutoModelForCausalLM.from_pretrained(resolve_model(student), dtype=torch_dtype(session.profile))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = Path(str(out_dir) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(student).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return Path(out_dir)


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload a saved adapter (or merged model) folder to a Hub model repo; needs a token with write access."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as e:   # no token, no network, no rights: the user's to fix
        raise HubAccessError(f"could not push {folder} to {repo_id}: {type(e).__name__}: {str(e)[:200]} "
                             "(log in with `huggingface-cli login` or set HF_TOKEN)") from None
    return f"https://huggingface.co/{repo_id}"
