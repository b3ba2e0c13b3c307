"""Stages 05/05b/06: LoRA/QLoRA SFT, prompt tuning and DPO on TRL + PEFT — resumable, measured, saved."""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .artifacts import MissingInputError, read_json, read_jsonl, write_json, write_metrics
from .figures import training_curves
from .generation import Sampling, chat_input_ids, generate

SFT_FILES = ("sft_train.jsonl", "sft_val.jsonl")
DPO_FILES = ("dpo_train.jsonl", "dpo_val.jsonl")


# ---------------------------------------------------------------- data and arguments

def load_split(session, folder: Path, files: tuple[str, str], columns: tuple[str, ...], notebook: str):
    from datasets import Dataset

    out = []
    for name in files:
        rows = read_jsonl(folder / name, produced_by=notebook)
        if not rows:
            raise ValueError(f"{folder / name} is empty: rerun {notebook} with more rows")
        out.append(Dataset.from_list([{c: r[c] for c in columns} for r in rows]))
    return out[0], out[1]


def tokenize_sft(tok, row: dict, max_length: int) -> dict:
    """input_ids + completion_mask for one prompt/completion row, through the tokenizer's chat template.

    Written here rather than left to TRL: TRL's template diff also trains whatever the template puts after the
    EOS (SmolLM2: a newline). We end the sequence at the EOS, as generation does, so the loss covers exactly
    the answer and its EOS — the stop the model must learn.
    """
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id in c_ids:
        c_ids = c_ids[: c_ids.index(tok.eos_token_id) + 1]
    else:
        c_ids = c_ids + [tok.eos_token_id]
    ids = (p_ids + c_ids)[:max_length]
    return {"input_ids": ids, "completion_mask": ([0] * len(p_ids) + [1] * len(c_ids))[:max_length]}


def tokenized_sft_split(session, tok):
    from datasets import Dataset

    p, n = session.paths, session.config.models.max_seq_length
    out = []
    for name in SFT_FILES:
        rows = read_jsonl(p.data_filtered / name, produced_by="03_quality_filtering")
        if not rows:
            raise ValueError(f"{p.data_filtered / name} is empty: rerun 03_quality_filtering with more rows")
        out.append(Dataset.from_list([tokenize_sft(tok, r, n) for r in rows]))
    return out[0], out[1], [r["prompt"][-1]["content"] for r in rows]


def common_args(section, session, out_dir: Path, padding_free: bool) -> dict:
    """TrainingArguments shared by the three trainers, from the stage's config section and the profile."""
    prof = session.profile
    return dict(
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
        max_length=None if padding_free else session.config.models.max_seq_length, report_to="none", seed=session.config.seed,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, save_only_model=False,
    )


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_checkpoints(ckpt_dir: Path, fp: str) -> Optional[str]:
    """The newest checkpoint of a run with the same config and data, or None (stale ones are removed)."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = ckpt_dir / "fingerprint.json"
    if ckpt_dir.exists() and (not marker.exists() or json.loads(marker.read_text())["fingerprint"] != fp):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fp})
    last = get_last_checkpoint(str(ckpt_dir))
    if last:
        print(f"resuming from {Path(last).name}")
    return last


def peak_memory_gb(profile) -> dict:
    if profile.device == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_memory_kind": "cuda_max_allocated"}
    # ru_maxrss is KiB on Linux: the whole process's peak, model load included
    return {"peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_memory_kind": "process_max_rss"}


def oom_hint(session, section_name: str) -> str:
    sec = getattr(session.config, section_name)
    return (f"out of GPU memory on profile '{session.profile.name}': lower {section_name}.batch_size (now "
            f"{sec.batch_size}) and raise {section_name}.gradient_accumulation (now {sec.gradient_accumulation}) "
            f"to keep the effective batch, or lower models.max_seq_length (now "
            f"{session.config.models.max_seq_length})")


def fp32_adapters_without_bf16(trainer, profile) -> None:
    """TRL casts trainable weights of a 4-bit model to bf16; fp16 AMP (a T4 has no bf16) cannot unscale bf16
    gradients, so there the adapter goes back to fp32 before the optimizer is built (at train())."""
    if profile.load_in_4bit and not profile.bf16:
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype == torch.bfloat16:
                p.data = p.data.float()


def run_trainer(trainer, resume: Optional[str], session, section_name: str) -> tuple[object, float, int]:
    """Train (resuming), returning (TrainOutput, seconds, non-padding tokens processed in this run)."""
    fp32_adapters_without_bf16(trainer, session.profile)
    tokens_before = 0
    if resume:
        tokens_before = json.loads((Path(resume) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)
    if session.profile.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        out = trainer.train(resume_from_checkpoint=resume)
    except torch.cuda.OutOfMemoryError:
        raise RuntimeError(oom_hint(session, section_name)) from None
    return out, time.perf_counter() - t, int(trainer.state.num_input_tokens_seen) - int(tokens_before)


def sample_tokens(cfg) -> int:
    """Room for a whole answer: the response budget the training data was generated with, plus a margin."""
    return max(96, cfg.generation.response_max_new_tokens + 32)


def sample_answers(model, tok, prompts: list[str], max_new_tokens: int) -> list[dict]:
    model.eval()
    outs = generate(model, tok, chat_input_ids(tok, [[{"role": "user", "content": p}] for p in prompts]),
                    Sampling.greedy(max_new_tokens), batch_size=len(prompts) or 1)
    return [{"prompt": p, "answer": o.text, "stopped_on_eos": o.ended, "new_tokens": o.n_tokens}
            for p, o in zip(prompts, outs)]


def finish(session, stage: str, trainer, tok, train_out, seconds: float, tokens: int, fp: str,
           final_dir: Path, data_sizes: dict, peft_cfg, extra: dict, curve_extra: Optional[str] = None) -> dict:
    """Save adapter + tokenizer + training_config.json, write <stage>_metrics.json and the curves figure."""
    from .models import count_parameters

    eval_metrics = trainer.evaluate()
    for key, name in (("eval_rewards/accuracies", "eval_reward_accuracy"), ("eval_rewards/margins", "eval_reward_margin")):
        if key in eval_metrics:   # DPO only
            extra[name] = round(float(eval_metrics[key]), 5)
    hours = seconds / 3600
    rate = session.config.cost.units_per_hour.get(session.profile.name)
    metrics = {
        "stage": stage, **count_parameters(trainer.model),
        "train_loss": round(train_out.training_loss, 5), "eval_loss": round(eval_metrics["eval_loss"], 5),
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "runtime_seconds": round(seconds, 2), "tokens_this_run": tokens,
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        **peak_memory_gb(session.profile), "device": session.detection.device_name,
        "profile": session.profile.name, "compute_units_per_hour": rate,
        "compute_units": None if rate is None else round(hours * rate, 4),
        **data_sizes, **extra, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # only the trained adapter: DPO's frozen "ref" copy is not part of the result
    trainer.model.save_pretrained(str(final_dir), selected_adapters=["default"])
    tok.save_pretrained(str(final_dir))
    write_json(final_dir / "training_config.json", {
        "base_model": session.config.models.student, "peft": _jsonable(peft_cfg),
        "training_args": _jsonable(trainer.args.to_dict()), "data": data_sizes, "results": metrics,
        "profile": session.profile.name, "timestamp": metrics["timestamp"], "fingerprint": fp})
    write_json(final_dir / "log_history.json", trainer.state.log_history)
    training_curves(trainer.state.log_history, session.paths.evaluation_figures / f"{stage}_training_curves.png",
                    f"{stage}: loss", curve_extra)
    write_metrics(session.paths.evaluation_metrics / f"{stage}_metrics.json", metrics, session.config)
    return metrics


def _jsonable(obj):
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=str))


def _done(final_dir: Path, fp: str) -> Optional[dict]:
    """Metrics of a finished run with the same fingerprint (rerunning a finished stage does not retrain)."""
    f = final_dir / "training_config.json"
    if f.exists() and read_json(f).get("fingerprint") == fp:
        print(f"already trained with this config and data: {final_dir} (delete it to retrain)")
        return read_json(f)["results"]
    return None


# ---------------------------------------------------------------- stages

def _train_on_sft_data(session, stage: str, tree_dir: Path, peft_cfg, fp_parts: tuple, args_kw: dict,
                       extra: dict, callbacks: Optional[list]) -> dict:
    """The part 05 and 05b share: SFT rows → SFTTrainer with one PEFT config → resume → samples → artefacts."""
    from trl import SFTConfig, SFTTrainer

    from .models import load_model, load_tokenizer

    cfg = session.config
    tok = load_tokenizer(cfg.models.student)
    train, val, val_prompts = tokenized_sft_split(session, tok)
    fp = fingerprint(stage, *fp_parts, cfg.models.student, cfg.models.max_seq_length, session.profile.name,
                     train.to_list(), val.to_list())
    final_dir, ckpt_dir = tree_dir / "final", tree_dir / "checkpoints"
    if (done := _done(final_dir, fp)) is not None:
        return done
    resume = prepare_checkpoints(ckpt_dir, fp)
    model = load_model(cfg.models.student, session.profile, for_training=True)
    section = getattr(cfg, stage)
    args = SFTConfig(**common_args(section, session, ckpt_dir, args_kw.pop("padding_free")),
                     completion_only_loss=True, **args_kw)
    # one PEFT wrap: the trainer applies peft_config (no get_peft_model beforehand)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok,
                         peft_config=peft_cfg, callbacks=callbacks)
    out, secs, tokens = run_trainer(trainer, resume, session, stage)
    samples = sample_answers(trainer.model, tok, val_prompts[: cfg.sft.sample_prompts], sample_tokens(cfg))
    extra = {**extra, "samples": samples,
             "sample_eos_stop_rate": round(sum(s["stopped_on_eos"] for s in samples) / max(len(samples), 1), 4)}
    return finish(session, stage, trainer, tok, out, secs, tokens, fp, final_dir,
                  {"train_rows": len(train), "val_rows": len(val)}, peft_cfg, extra)


def train_sft(session, callbacks: Optional[list] = None) -> dict:
    """05: LoRA (bf16/fp32) or QLoRA (4-bit) SFT, completion-only loss through the chat template."""
    from .models import lora_config

    cfg = session.config
    return _train_on_sft_data(
        session, "sft", session.paths.models_sft, lora_config(cfg.lora), (asdict(cfg.sft), asdict(cfg.lora)),
        {"padding_free": session.profile.padding_free, "optim": cfg.sft.optimizer,
         "weight_decay": cfg.sft.weight_decay},
        {"method": "qlora_4bit" if session.profile.load_in_4bit else "lora"}, callbacks)


def train_prompt_tuning(session, callbacks: Optional[list] = None) -> dict:
    """05b: PEFT prompt tuning on the same data; padding and prompt masked, length-grouped batches."""
    from .models import prompt_tuning_config, resolve_model

    pt = session.config.prompt_tuning
    return _train_on_sft_data(
        session, "prompt_tuning", session.paths.models_prompt_tuning,
        prompt_tuning_config(pt, resolve_model(session.config.models.student)), (asdict(pt),),
        # padding-free packs rows into one sequence; virtual tokens must prefix every row, so it stays off here
        {"padding_free": False, "train_sampling_strategy": "group_by_length"},
        {"method": "prompt_tuning", "num_virtual_tokens": pt.num_virtual_tokens}, callbacks)


def train_dpo(session, callbacks: Optional[list] = None) -> dict:
    """06: DPO on base + SFT adapter (trainable); the reference is a frozen copy of that adapter on the same base."""
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from .models import load_model, load_tokenizer

    cfg, p = session.config, session.paths
    sft_final = p.models_sft / "final"
    train, val = load_split(session, p.data_preference, DPO_FILES, ("prompt", "chosen", "rejected"),
                            "04_preference_generation")
    if not (sft_final / "adapter_config.json").exists():
        raise MissingInputError(f"missing SFT adapter {sft_final} (run 05_sft_training first)")
    fp = fingerprint("dpo", asdict(cfg.dpo), cfg.models.student, cfg.models.max_seq_length, session.profile.name,
                     train.to_list(), val.to_list(), (sft_final / "adapter_config.json").stat().st_mtime)
    final_dir, ckpt_dir = p.models_dpo / "final", p.models_dpo / "checkpoints"
    if (done := _done(final_dir, fp)) is not None:
        return done
    resume = prepare_checkpoints(ckpt_dir, fp)
    tok = load_tokenizer(cfg.models.student)
    base = load_model(cfg.models.student, session.profile, for_training=True)
    model = PeftModel.from_pretrained(base, str(sft_final), is_trainable=True)
    d = cfg.dpo
    args = DPOConfig(**common_args(d, session, ckpt_dir, padding_free=False), beta=d.beta, loss_type=[d.loss_type])
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=val,
                         processing_class=tok, callbacks=callbacks)
    out, secs, tokens = run_trainer(trainer, resume, session, "dpo")
    # TRL adds a frozen copy of the SFT adapter ("ref") on the same base: the reference is the SFT model itself,
    # with no second copy of the base weights.
    extra = {"method": "dpo", "beta": d.beta, "loss_type": d.loss_type,
             "reference": "frozen copy of the SFT adapter on the shared base (no second base model)"}
    metrics = finish(session, "dpo", trainer, tok, out, secs, tokens, fp, final_dir,
                     {"train_pairs": len(train), "val_pairs": len(val)}, model.peft_config["default"], extra,
                     curve_extra="rewards/accuracies")
    return metrics
