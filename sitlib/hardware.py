"""Accelerator detection, the hardware profile (data, not branches), and precision set-up in one place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Profile:
    name: str
    device: str                     # "cuda" or "cpu"
    dtype: str                      # torch dtype name for weights / compute
    load_in_4bit: bool = False      # QLoRA (NF4 + double quant) for the student and teacher
    gradient_checkpointing: bool = False
    tf32: bool = False
    padding_free: bool = False      # TRL padding-free batches (needs a varlen-capable attention)
    overrides: dict = field(default_factory=dict)   # dotted config keys this profile sets

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.dtype == "float16"


_EMBEDDED = {"models.student": "embedded", "models.teacher": "embedded", "models.scorer": "offline"}

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
        "preference.chunk_size": 4,
        "sft.epochs": 2.0, "sft.batch_size": 4, "sft.gradient_accumulation": 1, "sft.learning_rate": 2e-4,
        "sft.save_steps": 4, "sft.eval_steps": 4, "sft.logging_steps": 1, "sft.warmup_ratio": 0.1,
        "prompt_tuning.epochs": 2.0, "prompt_tuning.batch_size": 4, "prompt_tuning.gradient_accumulation": 1,
        "prompt_tuning.save_steps": 4, "prompt_tuning.eval_steps": 4, "prompt_tuning.logging_steps": 1,
        "prompt_tuning.warmup_ratio": 0.1,
        "dpo.epochs": 1.0, "dpo.batch_size": 2, "dpo.gradient_accumulation": 1, "dpo.save_steps": 2,
        "dpo.eval_steps": 2, "dpo.logging_steps": 1, "dpo.learning_rate": 5e-6,
        "evaluation.benchmark_items": 12, "evaluation.max_new_tokens": 64, "evaluation.batch_size": 12,
        "evaluation.agent_episodes": 4, "evaluation.agent_max_turns": 3, "evaluation.agent_max_new_tokens": 48,
    }),
    # T4, 16 GB, compute capability 7.5: no bf16 hardware, so fp16 + 4-bit QLoRA + checkpointing.
    "t4": Profile("t4", "cuda", "float16", load_in_4bit=True, gradient_checkpointing=True, overrides={
        "sft.batch_size": 4, "sft.gradient_accumulation": 6, "sft.optimizer": "paged_adamw_8bit",
        "prompt_tuning.batch_size": 4, "prompt_tuning.gradient_accumulation": 6,
        "dpo.batch_size": 2, "dpo.gradient_accumulation": 8, "generation.batch_size": 16,
        "preference.batch_size": 8, "models.max_seq_length": 768,
    }),
    # bf16 LoRA without quantisation: measured 2.4x faster than 4-bit on an H100 (DESIGN.md).
    "a100": Profile("a100", "cuda", "bfloat16", tf32=True, padding_free=True, overrides={
        "generation.batch_size": 64, "preference.batch_size": 32}),
    # generation batch 256: 2,088 tok/s vs 1,871 at 128 on the 8B teacher shape (bench/results/generation_8b_*.json)
    "h100": Profile("h100", "cuda", "bfloat16", tf32=True, padding_free=True, overrides={
        "generation.batch_size": 256, "preference.batch_size": 64, "evaluation.batch_size": 64}),
}


@dataclass(frozen=True)
class Detection:
    device_name: str
    compute_capability: Optional[tuple]
    memory_gb: float
    profile: str
    reason: str


def detect() -> Detection:
    """Pick a profile from the hardware present right now (so a Colab runtime switch is picked up on rerun)."""
    import torch

    if not torch.cuda.is_available():
        return Detection("cpu", None, 0.0, "cpu", "no CUDA device: embedded model on the CPU")
    props = torch.cuda.get_device_properties(0)
    cc = (props.major, props.minor)
    mem = props.total_memory / 2**30
    # bf16 by compute capability: is_bf16_supported() says True on a T4 through slow emulation.
    if cc < (8, 0):
        return Detection(props.name, cc, mem, "t4", f"compute capability {cc[0]}.{cc[1]} < 8.0: fp16 + 4-bit QLoRA")
    if cc >= (9, 0):
        return Detection(props.name, cc, mem, "h100", f"compute capability {cc[0]}.{cc[1]} (Hopper): bf16 + tf32")
    return Detection(props.name, cc, mem, "a100", f"compute capability {cc[0]}.{cc[1]} (Ampere+): bf16 + tf32")


def get_profile(name: str = "auto") -> tuple[Profile, Detection]:
    det = detect()
    chosen = det.profile if name == "auto" else name
    if chosen not in PROFILES:
        raise ValueError(f"unknown profile '{name}' (choose auto, {', '.join(PROFILES)})")
    if chosen != "cpu" and det.profile == "cpu":
        raise RuntimeError(f"profile '{chosen}' needs a CUDA GPU and none is present; use PROFILE='cpu' or 'auto'")
    return PROFILES[chosen], det


def set_precision(profile: Profile) -> None:
    """The one place that sets matmul precision flags."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = profile.tf32
    torch.backends.cudnn.allow_tf32 = profile.tf32
    torch.set_float32_matmul_precision("high" if profile.tf32 else "highest")


def torch_dtype(profile: Profile):
    import torch

    return getattr(torch, profile.dtype)
