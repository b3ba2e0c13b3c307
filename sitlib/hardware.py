"""Accelerator detection, the hardware profile (data, not branches), and precision set-up in one place."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ConfigError, ProfileError

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
EMULATE_ENV = "SIT_EMULATE_GPU_GB"
# A card reports a little less than its label (a 40 GB A100 shows 39.4 GiB, a T4 14.7 GiB): a profile measured
# for a card fits any card with at least this share of that memory.
LABEL_TOLERANCE = 0.95


@dataclass(frozen=True)
class Profile:
    name: str
    device: str                     # "cuda" or "cpu"
    dtype: str                      # torch dtype name for weights / compute
    load_in_4bit: bool = False      # QLoRA (NF4 + double quant) for the student
    teacher_4bit: Optional[bool] = None   # the teacher in 4-bit; None = same as the student
    gradient_checkpointing: bool = False
    tf32: bool = False
    padding_free: bool = False      # TRL padding-free batches (needs a varlen-capable attention)
    # transformers attention implementation; a name starting with "sit_" is registered by sitlib.attention
    attn_implementation: str = "sdpa"
    liger: bool = False             # Liger's kernels in SFT and prompt tuning, when liger_kernel is importable
    bf16_adapters: bool = False     # trainable weights in bf16 like the base (PEFT keeps them in fp32)
    min_memory_gb: float = 0.0      # the card size (GB) this profile's settings were measured for
    overrides: dict = field(default_factory=dict)   # dotted config keys this profile sets

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.dtype == "float16"

    @property
    def teacher_in_4bit(self) -> bool:
        return self.load_in_4bit if self.teacher_4bit is None else self.teacher_4bit

    @property
    def adapters_bf16(self) -> bool:
        """Trainable weights kept in bf16 (training.match_adapter_dtype): asked for, and the base is bf16."""
        return self.bf16_adapters and self.bf16

    @property
    def weights_key(self) -> str:
        """Changes exactly when the student's training checkpoints stop being resumable: dtype, 4-bit and the
        adapters' dtype (an optimizer state of fp32 adapters does not fit bf16 ones)."""
        return self.dtype + ("-4bit" if self.load_in_4bit else "") + ("-bf16-adapters" if self.adapters_bf16 else "")


_EMBEDDED = {"models.student": "embedded", "models.teacher": "embedded", "models.scorer": "offline"}

# bench/bench_memory.py measures every stage of every profile on an emulated card of its size, with rows of
# models.max_seq_length tokens; bench/results/memory_<device>.json holds the peaks (target: <= 90% of the card).
# sit_varlen (FlashAttention-2 varlen for padding-free rows): 10,359 vs 7,745 real tok/s for SDPA on padded rows,
# same h100 settings, losses equal within 0.01%, lower peak (bench/results/2026-11-29_NVIDIA_H200.json)
# Liger (fused RMSNorm, SwiGLU, RoPE, and linear + cross-entropy without the logits) and bf16 adapters (PEFT's fp32
# adapters cast every LoRA input: aten::copy_ took 21% of the GPU time of the 3B SFT step). At 24 rows per
# micro-batch: 18,802 real tok/s, 22,960 with Liger, 26,976 with both; peak 52.6 → 36.1 GB; 9 losses within 0.5%
# (bench/results/sft_levers_NVIDIA_H200.json). bf16 adapters are what TRL does for QLoRA (the QLoRA paper's recipe).
_BF16 = dict(device="cuda", dtype="bfloat16", tf32=True, attn_implementation="sit_varlen", liger=True,
             bf16_adapters=True)
# 80 GB cards. SFT packs whole rows into sequences of 12,288 tokens, one per optimizer step: the 3B step was
# launch-bound (its kernels ran 0.96 s of 2.19 s at 8 x 3 rows), and one large micro-batch of a known size keeps
# the GPU fed with bounded memory. 3B shape: 27,405 real tok/s against 7,913 for stock TRL's best (3.46x), losses
# within 0.01% of SDPA on the same packed batches (bench/results/2026-11-30_NVIDIA_H200.json); rows of 1,024 tokens
# peaked at 39.6 GB (memory_NVIDIA_H200.json). DPO and prompt tuning take larger micro-batches at the same rows
# per optimizer step (fewer, larger steps, as for SFT, whose step waited on the host): DPO 8 x 2 with Liger ran
# 11,525 real tok/s against 6,889 at 4 x 4 (dpo_pt_levers_NVIDIA_H200.json) and peaked at 48.1 GB with rows of
# 1,024 tokens; prompt tuning 24 x 1 ran 24,040 against 9,849 at 12 x 2 and peaked at 48.9 GB.
# Generation pools are sized by free memory (generate never keeps more rows in flight than fit); the batch sizes
# here only cap them, so the 8B teacher on an 80 GB card stays memory-bound (peak 69.8 GB) while the embedded
# 135M teacher keeps up to 2,048 rows in flight: 02's answer pass took 40.6 s, against 47.5 s (the first pass) and
# 50.8 s at 1,024 rows (profile_answers_NVIDIA_H200.json). On an H200 the 8B shape made 17,193 tok/s with 2,048
# prompts and the pool sized by memory, 17,534 at 1,024 rows (2026-11-30_NVIDIA_H200.json).
# The reward model keeps its own batch (scoring.REWARD_BATCH).
# Recipe: half the instructions carry verifiable constraints, answered 8 times each (more rows pass the checks
# for SFT and give pass/fail pairs for DPO), and DPO at 2e-5 so the LoRA policy moves within its ~25 steps
# (bench/results/quality_run_NVIDIA_H200_default_recipe/ is a run of this profile, before lora.dropout 0).
# lora.dropout 0: as bench_training.py measured sitlib's SFT (no dropout kernels per adapter and step)
_80GB = {"sft.batch_size": 1, "sft.gradient_accumulation": 1, "sft.pack_tokens": 12288,
         "dpo.batch_size": 8, "dpo.gradient_accumulation": 2,
         "prompt_tuning.batch_size": 24, "prompt_tuning.gradient_accumulation": 1,
         "generation.batch_size": 2048, "preference.batch_size": 1024, "evaluation.batch_size": 256,
         "generation.constraint_share": 0.5, "generation.constraint_samples": 8, "dpo.learning_rate": 2e-5,
         "lora.dropout": 0.0}
PROFILES: dict[str, Profile] = {
    # 2 CPU cores: the embedded 135M model as teacher and student, counts small enough for minutes.
    "cpu": Profile("cpu", "cpu", "float32", overrides={
        **_EMBEDDED, "models.max_seq_length": 384,
        "generation.num_instructions": 32, "generation.batch_size": 16, "generation.chunk_size": 16,
        "generation.instruction_max_new_tokens": 64, "generation.response_max_new_tokens": 160,
        "generation.system_prompt": "You are a helpful assistant. Keep every answer under 80 words.",
        "filter.target_count": 16, "filter.min_score": 0.3, "filter.val_fraction": 0.2,
        "preference.max_prompts": 8, "preference.temperatures": [0.7, 1.1], "preference.max_new_tokens": 96,
        "preference.batch_size": 12, "preference.min_margin": 0.05, "preference.val_fraction": 0.2,
        "preference.chunk_size": 8, "generation.constraint_samples": 2,
        "sft.epochs": 2.0, "sft.batch_size": 4, "sft.gradient_accumulation": 1, "sft.learning_rate": 2e-4,
        "sft.save_steps": 4, "sft.eval_steps": 4, "sft.logging_steps": 1, "sft.warmup_ratio": 0.1,
        "prompt_tuning.epochs": 2.0, "prompt_tuning.batch_size": 4, "prompt_tuning.gradient_accumulation": 1,
        "prompt_tuning.save_steps": 4, "prompt_tuning.eval_steps": 4, "prompt_tuning.logging_steps": 1,
        "prompt_tuning.warmup_ratio": 0.1,
        "dpo.epochs": 1.0, "dpo.batch_size": 2, "dpo.gradient_accumulation": 1, "dpo.save_steps": 2,
        "dpo.eval_steps": 2, "dpo.logging_steps": 1, "dpo.learning_rate": 5e-6,
        "evaluation.benchmark_items": 24, "evaluation.max_new_tokens": 64, "evaluation.batch_size": 24,
        "evaluation.agent_episodes": 4, "evaluation.agent_max_turns": 3, "evaluation.agent_max_new_tokens": 48,
    }),
    # T4, 15 GB, compute capability 7.5: no bf16 hardware, so fp16 + 4-bit QLoRA + checkpointing.
    "t4": Profile("t4", "cuda", "float16", load_in_4bit=True, gradient_checkpointing=True, min_memory_gb=15,
                  overrides={
        "sft.batch_size": 4, "sft.gradient_accumulation": 6, "sft.optimizer": "paged_adamw_8bit",
        "prompt_tuning.batch_size": 4, "prompt_tuning.gradient_accumulation": 6,
        "dpo.batch_size": 2, "dpo.gradient_accumulation": 8, "generation.batch_size": 16,
        "preference.batch_size": 8, "evaluation.batch_size": 16, "models.max_seq_length": 768,
    }),
    # L4, 22.5 GB, cc 8.9: bf16; the 8B teacher in 4-bit (its bf16 weights alone take 15 of the 22.5 GB);
    # the 3B student in bf16 (6 GB) with checkpointing and small micro-batches, same effective batch as h100.
    "l4": Profile("l4", teacher_4bit=True, gradient_checkpointing=True, padding_free=True, min_memory_gb=22.5,
                  **_BF16, overrides={
        "sft.batch_size": 4, "sft.gradient_accumulation": 6,
        "prompt_tuning.batch_size": 4, "prompt_tuning.gradient_accumulation": 6,
        "dpo.batch_size": 2, "dpo.gradient_accumulation": 8, "generation.batch_size": 32,
        "preference.batch_size": 16, "evaluation.batch_size": 32,
    }),
    # A100 40 GB (the original author's card): bf16 LoRA without checkpointing. At 6 x 4 SFT peaked at 38.6 GB
    # and DPO at 4 x 4 at 39.9 GB (rows of 1,024 tokens), so both run smaller micro-batches, effective batch kept.
    "a100-40gb": Profile("a100-40gb", padding_free=True, min_memory_gb=40, **_BF16, overrides={
        "sft.batch_size": 4, "sft.gradient_accumulation": 6,
        "prompt_tuning.batch_size": 6, "prompt_tuning.gradient_accumulation": 4,
        "dpo.batch_size": 2, "dpo.gradient_accumulation": 8, "generation.batch_size": 64,
        "preference.batch_size": 32, "evaluation.batch_size": 64,
    }),
    # 80 GB cards: bf16 LoRA without 4-bit or checkpointing (measured 2.4x faster than 4-bit on an H100).
    "a100-80gb": Profile("a100-80gb", padding_free=True, min_memory_gb=80, **_BF16, overrides=dict(_80GB)),
    "h100": Profile("h100", padding_free=True, min_memory_gb=80, **_BF16, overrides=dict(_80GB)),
}
ALIASES = ("a100",)   # resolved by the card's memory: a100-40gb or a100-80gb
GPU_CARDS_GB = {"t4": 15, "l4": 22.5, "a100-40gb": 40, "a100-80gb": 80, "h100": 80}


def profile_for(compute_capability: Optional[tuple], memory_gb: float) -> str:
    """The profile for a card: by compute capability (bf16 needs >= 8.0) and by memory (what fits)."""
    if compute_capability is None:
        return "cpu"
    cc = tuple(compute_capability)
    # below 8.0 there is no bf16 hardware; a bf16-capable card smaller than an L4 gets the 15 GB settings too
    if cc < (8, 0) or memory_gb < LABEL_TOLERANCE * PROFILES["l4"].min_memory_gb:
        return "t4"
    if memory_gb < 30:
        return "l4"
    if memory_gb < 60:
        return "a100-40gb"
    return "h100" if cc >= (9, 0) else "a100-80gb"


@dataclass(frozen=True)
class Detection:
    device_name: str
    compute_capability: Optional[tuple]
    memory_gb: float                # what the profile was picked for (the emulated size under SIT_EMULATE_GPU_GB)
    profile: str
    reason: str
    device_memory_gb: float = 0.0   # the physical card's memory

    @property
    def emulated(self) -> bool:
        return self.device_memory_gb > 0 and abs(self.memory_gb - self.device_memory_gb) > 1e-6


def emulated_gb() -> Optional[float]:
    raw = os.environ.get(EMULATE_ENV)
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        raise ConfigError(f"{EMULATE_ENV}={raw!r}: expected a number of GB, e.g. 40") from None
    if gb <= 0:
        raise ConfigError(f"{EMULATE_ENV}={raw!r}: expected a positive number of GB")
    return gb


def detect() -> Detection:
    """Pick a profile from the hardware present right now (so a Colab runtime switch is picked up on rerun)."""
    import torch

    if not torch.cuda.is_available():
        return Detection("cpu", None, 0.0, "cpu", "no CUDA device: embedded model on the CPU")
    props = torch.cuda.get_device_properties(0)
    cc = (props.major, props.minor)
    device_gb = props.total_memory / 2**30
    mem = device_gb
    if (gb := emulated_gb()) is not None:
        if gb > device_gb:
            raise ConfigError(f"{EMULATE_ENV}={gb:g} is more than this card's {device_gb:.1f} GB")
        mem = gb
    name = profile_for(cc, mem)
    # bf16 by compute capability: is_bf16_supported() says True on a T4 through slow emulation.
    precision = "fp16 + 4-bit QLoRA" if PROFILES[name].fp16 else "bf16 + tf32"
    reason = f"compute capability {cc[0]}.{cc[1]}, {mem:.1f} GB{' (emulated)' if mem != device_gb else ''}: {precision}"
    return Detection(props.name, cc, mem, name, reason, device_gb)


def resolve_name(name: str, det: Detection) -> str:
    """A profile name as the user wrote it → a key of PROFILES ("auto" and the "a100" alias resolved)."""
    if name == "auto":
        return det.profile
    if name == "a100":
        return "a100-40gb" if det.memory_gb < 60 else "a100-80gb"
    if name not in PROFILES:
        raise ConfigError(f"unknown profile '{name}' (choose auto, a100, {', '.join(PROFILES)})")
    return name


def check_fits(profile: Profile, det: Detection) -> None:
    """A profile chosen by hand must fit the card present: one line naming its memory and the profile that fits."""
    if profile.device == "cuda" and det.profile == "cpu":
        raise ProfileError(f"profile '{profile.name}' needs a CUDA GPU and none is present; "
                           f"use PROFILE='cpu' or 'auto'")
    if det.memory_gb and det.memory_gb < LABEL_TOLERANCE * profile.min_memory_gb:
        size = f"{profile.min_memory_gb:g}"
        raise ProfileError(f"profile '{profile.name}' was measured for a{'n' if size[0] == '8' else ''} {size} GB card "
                           f"and this card has {det.memory_gb:.1f} GB: use PROFILE='{det.profile}' (or 'auto')")


def get_profile(name: str = "auto") -> tuple[Profile, Detection]:
    det = detect()
    profile = PROFILES[resolve_name(name, det)]
    if name != "auto":   # "auto" is already the profile that fits best (the t4 settings on any small card)
        check_fits(profile, det)
    return profile, det


def apply_memory_limit(det: Detection) -> None:
    """Under SIT_EMULATE_GPU_GB, make this process see the emulated card: its CUDA allocator is capped at that
    share of the real one, and torch.cuda.mem_get_info (which code sizing batches by free memory reads) reports
    the emulated card's total and what the allocator may still take."""
    if not det.emulated:
        return
    import torch

    torch.cuda.set_per_process_memory_fraction(det.memory_gb / det.device_memory_gb, 0)
    limit = int(det.memory_gb * 2**30)
    real = getattr(torch.cuda.mem_get_info, "__wrapped__", torch.cuda.mem_get_info)

    def mem_get_info(device=None):
        free, _ = real(device)
        return min(free, max(0, limit - torch.cuda.memory_reserved(device))), limit

    mem_get_info.__wrapped__ = real
    torch.cuda.mem_get_info = mem_get_info


def set_precision(profile: Profile) -> None:
    """The one place that sets matmul precision flags."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = profile.tf32
    torch.backends.cudnn.allow_tf32 = profile.tf32
    torch.set_float32_matmul_precision("high" if profile.tf32 else "highest")


def torch_dtype(profile: Profile):
    import torch

    return getattr(torch, profile.dtype)


# ---------------------------------------------------------------- measured costs per stage

# a stage's name in bench/results/memory_*.json → its notebook number (the key of a timed series run)
NOTEBOOKS = {"setup": "01", "generate": "02", "filter": "03", "preference": "04", "sft": "05",
             "prompt_tuning": "05b", "dpo": "06", "benchmark": "07", "agent": "08", "compare": "09"}


def _results(root: Path, pattern: str):
    for path in sorted(root.glob(pattern)):
        try:
            yield path, json.loads(path.read_text())
        except (OSError, ValueError):
            continue


def stage_costs(stage: str, results_dir: Optional[Path] = None) -> list[dict]:
    """Measured cost of one stage (a name such as "sft", or a notebook number such as "05"), one dict per
    measurement: peak GB per GPU profile from bench/results/memory_*.json, and seconds from a timed series run
    (bench/bench_series.py: the "series" section of bench/results/<date>_<device>.json). [] when nothing is
    measured."""
    root = Path(results_dir) if results_dir else RESULTS_DIR
    name = next((k for k, v in NOTEBOOKS.items() if v == stage), stage)
    rows = []
    for path, data in _results(root, "memory_*.json"):
        for prof, entry in data.get("profiles", {}).items():
            st = entry.get("stages", {}).get(name)
            if st and st.get("peak_gb") is not None:
                rows.append({"device": data.get("device"), "profile": prof, "card_gb": entry.get("card_gb"),
                             "peak_gb": st["peak_gb"], "ok": st.get("ok"), "seconds": None, "model": None,
                             "source": path.name})
    for path, data in _results(root, "*.json"):
        series = data.get("series") if isinstance(data, dict) else None
        seconds = (series or {}).get("stages", {}).get(NOTEBOOKS.get(name, stage))
        if seconds is not None:
            rows.append({"device": data.get("device"), "profile": series.get("profile"),
                         "card_gb": GPU_CARDS_GB.get(series.get("profile")), "peak_gb": None, "ok": None,
                         "seconds": seconds, "model": series.get("model"), "source": path.name})
    return rows


def describe_stage_costs(stage: str, results_dir: Optional[Path] = None) -> str:
    """The notebooks' "measured cost of this stage" lines (never an estimate)."""
    rows = stage_costs(stage, results_dir)
    if not rows:
        return f"measured cost of {stage}: nothing measured yet (bench/bench_memory.py, bench/bench_series.py)"
    lines = [f"measured cost of {stage}:"]
    for r in rows:
        if r["peak_gb"] is not None:
            lines.append(f"  {r['profile']}: peak {r['peak_gb']:.1f} GB of its {r['card_gb']:g} GB card (measured on "
                         f"an {r['device']} limited to {r['card_gb']:g} GB, bench/results/{r['source']})")
        else:
            lines.append(f"  {r['profile']}: {r['seconds'] / 60:.1f} min on an {r['device']} with {r['model']} "
                         f"(bench/results/{r['source']})")
    return "\n".join(lines)
