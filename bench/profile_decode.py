"""Where a decode step's time goes: transformers' generate vs sitlib's pool at the same rows, on random weights
of the teacher's shape; then the pool's top CUDA kernels (torch.profiler) for a few steps.

    python bench/profile_decode.py [--shape 8b] [--rows 256] [--new 32]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_generation import IdTokenizer, _NoBar  # noqa: E402
from common import SHAPES, random_model  # noqa: E402

from sitlib import generation as G  # noqa: E402


def per_step_ms(fn, steps: int) -> float:
    fn()   # warm at this shape
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - t) / steps, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=SHAPES)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    model = random_model(a.shape)
    vocab = model.config.vocab_size
    tok = IdTokenizer(vocab)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(32, 64))] for _ in range(a.rows)]
    block = G.BlockFirstTokens(range(3, 203), torch.zeros(vocab, dtype=torch.bool))
    top_p = G.Sampling(a.new, 1.0, 0.95)
    greedy = G.Sampling.greedy(a.new)
    n = a.rows
    hf = G._generate_hf_batches
    cases = {
        "hf_generate_topp_block": lambda: hf(model, tok, prompts, [top_p] * n, n, [block], _NoBar()),
        "hf_generate_greedy": lambda: hf(model, tok, prompts, [greedy] * n, n, None, _NoBar()),
        "pool_topp_block": lambda: G.generate_pool(model, tok, prompts, top_p, n, [block]),
        "pool_greedy": lambda: G.generate_pool(model, tok, prompts, greedy, n),
    }
    for name, fn in cases.items():
        print(name, "ms/step", per_step_ms(fn, a.new), flush=True)
    G._PoolLayer.keys = property(lambda self: self.k[:self.rows, :, self.start:self.end].contiguous())
    G._PoolLayer.values = property(lambda self: self.v[:self.rows, :, self.start:self.end].contiguous())
    print("pool_greedy_contiguous_kv", "ms/step", per_step_ms(cases["pool_greedy"], a.new), flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        G.generate_pool(model, tok, prompts, G.Sampling.greedy(4), n)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
