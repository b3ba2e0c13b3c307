"""Training throughput of sitlib's own stages on a GPU: the h100 profile (bf16 LoRA, padding-free) against the
t4 profile (4-bit QLoRA, fp16, gradient checkpointing — the original series' recipe), same data, same GPU.

Random weights of the Llama-3.2-3B shape and a small BPE tokenizer built here (nothing is downloaded); the
rows are synthetic text, so only speed and memory mean anything:
    python bench/bench_training.py [--steps 30] [--out bench/results]
Writes bench/results/training_3b_<device>.json: tokens/s, peak memory and loss per profile, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import build_tiny_tokenizer  # noqa: E402  (a BPE tokenizer with a ChatML template)

from sitlib import training  # noqa: E402
from sitlib.artifacts import write_jsonl  # noqa: E402
from sitlib.session import setup  # noqa: E402

WORDS = ("the sea poem capital answer numbers photosynthesis list write short explain simple words what is "
         "title section sure here one two hello world step add").split()


def random_fingerprints() -> None:
    """On the GPU machine, datasets (carried via PYTHONPATH on Python 3.12) fails to pickle pyarrow's MonthDayNano
    while hashing a new Dataset; the hash only names cache files, so a random one changes nothing measured."""
    import secrets

    import datasets.arrow_dataset as ad

    ad.generate_fingerprint = lambda dataset: secrets.token_hex(8)


def build_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    tok = build_tiny_tokenizer(path)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                      num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    del m
    torch.cuda.empty_cache()


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi))) + "."


def write_data(S, rng) -> None:
    rows = [{"id": i, "prompt": [{"role": "user", "content": text(rng, 20, 80)}],
             "completion": [{"role": "assistant", "content": text(rng, 60, 220)}]} for i in range(1000)]
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:992])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[992:])
    pairs = [{"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
              "rejected": [{"role": "assistant", "content": text(rng, 60, 220)}]} for r in rows[:200]]
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[:192])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[192:])


def run(profile: str, model_dir: Path, steps: int, dpo: bool) -> dict:
    over = {"models.student": str(model_dir), "models.max_seq_length": 1024, "sft.max_steps": steps,
            "sft.save_steps": 10_000, "sft.eval_steps": 10_000, "sft.logging_steps": 5, "sft.sample_prompts": 0,
            "dpo.max_steps": 10, "dpo.save_steps": 10_000, "dpo.eval_steps": 10_000, "dpo.logging_steps": 5}
    S = setup(profile, tempfile.mkdtemp(prefix=f"sit-bench-{profile}-"), overrides=over, verbose=False)
    write_data(S, random.Random(0))
    torch.cuda.reset_peak_memory_stats()
    sft = training.train_sft(S)
    keep = ("method", "steps", "tokens_this_run", "runtime_seconds", "tokens_per_second", "peak_memory_gb",
            "train_loss", "trainable_parameters", "total_parameters")
    out = {"sft": {k: sft[k] for k in keep},
           "settings": {"batch": S.config.sft.batch_size, "accumulation": S.config.sft.gradient_accumulation,
                        "dtype": S.profile.dtype, "load_in_4bit": S.profile.load_in_4bit,
                        "gradient_checkpointing": S.profile.gradient_checkpointing,
                        "padding_free": S.profile.padding_free, "optimizer": S.config.sft.optimizer}}
    if dpo:
        torch.cuda.reset_peak_memory_stats()
        d = training.train_dpo(S)
        out["dpo"] = {k: d[k] for k in ("steps", "tokens_this_run", "runtime_seconds", "tokens_per_second",
                                        "peak_memory_gb", "train_loss", "eval_reward_accuracy")}
    print(json.dumps({profile: out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if os.environ.get("SIT_BENCH_RANDOM_FINGERPRINTS"):
        random_fingerprints()
    model_dir = Path(tempfile.gettempdir()) / "bench_llama_3b_tinytok"
    build_model(model_dir)
    res = {"device": torch.cuda.get_device_name(0), "shape": "Llama-3.2-3B (random weights)",
           "torch": torch.__version__, "steps": a.steps, "max_seq_length": 1024, "profiles": {}}
    res["profiles"]["t4"] = run("t4", model_dir, a.steps, dpo=False)
    res["profiles"]["h100"] = run("h100", model_dir, a.steps, dpo=True)
    res["sft_tokens_per_second_ratio_h100_over_t4"] = round(
        res["profiles"]["h100"]["sft"]["tokens_per_second"] / res["profiles"]["t4"]["sft"]["tokens_per_second"], 2)
    name = "".join(c if c.isalnum() else "_" for c in res["device"]).strip("_")
    body = json.dumps(res, indent=2) + "\n"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"training_3b_{name}.json").write_text(body)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"training_3b_{name}.json").write_text(body)
    print(body)


if __name__ == "__main__":
    main()
