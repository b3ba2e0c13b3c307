"""Generation throughput: the original series' way vs sitlib's batched, KV-cached generation, same run, same GPU.

Random weights of the real teacher/student shapes give true speeds (nothing is downloaded):
    python bench/bench_generation.py [--shape 8b|3b] [--out bench/results]
Writes bench/results/generation_<device>.json with tokens/s per variant and the speed-up over the original's way.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sitlib.generation import BlockFirstTokens, Sampling, generate  # noqa: E402

SHAPES = {  # Llama-3.1-8B-Instruct (teacher) and Llama-3.2-3B (student)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
}


class IdTokenizer:
    """Just what sitlib.generation needs from a tokenizer, for random-weight models (ids are the text)."""

    def __init__(self, vocab: int):
        self.pad_token_id, self.eos_token_id, self.vocab = 0, 2, vocab

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def build(shape: str, path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    if not (path / "config.json").exists():
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(path)
        del m
        torch.cuda.empty_cache()


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = fn()
    torch.cuda.synchronize()
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=SHAPES)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = Path(tempfile.gettempdir()) / f"bench_llama_{a.shape}"
    build(a.shape, path)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 128000) for _ in range(rng.randrange(20, 80))] for _ in range(a.prompts)]
    out = {"device": torch.cuda.get_device_name(0), "shape": a.shape, "torch": torch.__version__,
           "new_tokens": a.new, "prompts": a.prompts, "variants": {}}

    # 1. the original series: 4-bit NF4, use_cache=False, one prompt at a time (64 new tokens: it is slow)
    q = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    x = torch.tensor([prompts[0]], device="cuda")
    q.generate(x, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    n, dt = timed(lambda: q.generate(x, max_new_tokens=64, min_new_tokens=64, do_sample=True, use_cache=False,
                                     pad_token_id=0).shape[1] - x.shape[1])
    out["variants"]["original_4bit_nocache_bs1"] = {"tok_s": round(n / dt, 2), "tokens": n, "seconds": round(dt, 2)}
    del q
    torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)

    # 2. sitlib: bf16, KV cache, length-sorted left-padded batches, sampling + Magpie's header block
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0})
    tok = IdTokenizer(128256)
    # random ids have no text: block a fixed set of 200 ids at the start, as the header block does
    block = BlockFirstTokens(range(3, 203), torch.zeros(128256, dtype=torch.bool))
    sampling = Sampling(max_new_tokens=a.new, temperature=1.0, top_p=0.95)
    generate(m, tok, prompts[:8], Sampling(8), 8)   # warm-up
    for bs in [int(b) for b in a.batches.split(",")]:
        torch.cuda.reset_peak_memory_stats()
        res, dt = timed(lambda: generate(m, tok, prompts, sampling, bs, [block]))
        n = sum(c.n_tokens for c in res)
        out["variants"][f"sitlib_bf16_batch{bs}"] = {
            "tok_s": round(n / dt, 1), "tokens": n, "seconds": round(dt, 2),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        print(json.dumps(out), flush=True)
    base = out["variants"]["original_4bit_nocache_bs1"]["tok_s"]
    out["speedup_vs_original"] = {k: round(v["tok_s"] / base, 1) for k, v in out["variants"].items()}
    name = "".join(c if c.isalnum() else "_" for c in out["device"]).strip("_")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    dest = Path(a.out) / f"generation_{a.shape}_{name}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / dest.name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
