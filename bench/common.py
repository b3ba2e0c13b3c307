"""What the benchmarks share: the real model shapes on random weights, MFU, and the results file."""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

SHAPES = {  # Llama-3.1-8B-Instruct (teacher) and Llama-3.2-3B (student), vocab 128256
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    # SmolLM2-135M-Instruct, the embedded model: what the series trains on the GPU machine
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,   # smoke runs
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=512),
}
# dense bf16 tensor-core peak per card (vendor data sheets, SXM where both exist), for MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}


def llama_config(shape: str, **over):
    from transformers import LlamaConfig

    kw = {"vocab_size": 128256, **SHAPES[shape], **over}
    return LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def random_model(shape: str, attn: str = "sdpa"):
    """bf16 Llama of `shape` with random weights straight on the GPU (weights do not change speed)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape)
    cfg._attn_implementation = attn
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    return model.eval()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms_per_call(fn, repeats: int) -> float:
    """Milliseconds per call of `fn`: one warm call, then `repeats` timed between device syncs."""
    import time

    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return round(1000 * (time.perf_counter() - t) / repeats, 3)


def param_count(shape: str) -> int:
    """Parameters of `shape` (built on the meta device: no memory, no time)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(shape)).parameters())


def save_random_model(shape: str, path: Path) -> Path:
    """The same, saved once under `path` (for code that loads by name: from_pretrained, 4-bit loading)."""
    if not (path / "config.json").exists():
        m = random_model(shape)
        m.save_pretrained(path)
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return path


def peak_flops() -> float | None:
    name = device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def mfu(flops_per_s: float) -> float | None:
    peak = peak_flops()
    return round(flops_per_s / peak, 4) if peak else None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    # the CUDA caching allocator's setting (PYTORCH_CUDA_ALLOC_CONF changes step times: bench/README.md)
    out["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "default"
    return out


def results_path(out_dir: str) -> Path:
    name = "".join(c if c.isalnum() else "_" for c in device_name()).strip("_")
    return Path(out_dir) / f"{dt.date.today().isoformat()}_{name}.json"


def record(section: str, data: dict, out_dir: str) -> Path:
    """Merge `data` under `section` into today's results file for this device (temp file + rename)."""
    path = results_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.loads(path.read_text()) if path.exists() else {}
    body.update(device=device_name(), versions=versions())
    body[section] = data
    text = json.dumps(body, indent=2) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if os.environ.get("OUT"):       # the GPU machine's copy-back folder
        (Path(os.environ["OUT"]) / path.name).write_text(text)
    print(text, flush=True)
    return path
