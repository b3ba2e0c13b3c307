"""Where a decode step's time goes: transformers' generate vs sitlib's pool (eager live window, and static shapes
replayed as CUDA graphs) at the same rows, on random weights of the teacher's shape; top-p sampling alone; how
often greedy rows agree between them; then the graph pool's top CUDA kernels (torch.profiler) for a few steps.

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
    def pool(sampling, static, procs=None):
        def run():
            G.STATIC_DECODE = static
            try:
                return G.generate_pool(model, tok, prompts, sampling, n, procs)
            finally:
                G.STATIC_DECODE = None
        return run

    cases = {
        "hf_generate_topp_block": lambda: hf(model, tok, prompts, [top_p] * n, n, [block], _NoBar()),
        "hf_generate_greedy": lambda: hf(model, tok, prompts, [greedy] * n, n, None, _NoBar()),
        "pool_eager_topp_block": pool(top_p, False, [block]),
        "pool_eager_greedy": pool(greedy, False),
        "pool_graphs_topp_block": pool(top_p, True, [block]),
        "pool_graphs_greedy": pool(greedy, True),
    }
    for name, fn in cases.items():
        print(name, "ms/step", per_step_ms(fn, a.new), flush=True)
    # the attention kernel of the graph step: SDPA's backends in turn (cuDNN is off in the pool by default)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    default = G._decode_kernels
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        order = [getattr(SDPBackend, name)] + [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
                                               if b.name != name]
        G._decode_kernels = lambda device, order=order: sdpa_kernel(order)
        try:
            print(f"pool_graphs_topp_block_{name.lower()}", "ms/step", per_step_ms(cases["pool_graphs_topp_block"],
                                                                                     a.new), flush=True)
        except RuntimeError as e:
            print(name, "failed:", str(e)[:200], flush=True)
    G._decode_kernels = default
    # what sampling alone costs per step at these rows (top-p sorts the whole vocabulary)
    scores = torch.randn(n, vocab, device="cuda")
    ones = torch.ones(n, device="cuda")
    pick = lambda: [G._choose(scores, ones, ones * 0.95, ones.bool(), True, True, torch.bfloat16) for _ in range(a.new)]
    print("top_p_choose_only", "ms/step", per_step_ms(pick, a.new), flush=True)
    # logits as peaked as a trained model's (random weights give nearly flat ones): the whole-vocabulary sort
    # against looking for each nucleus among the top 256 first (the CPU default; on a GPU still to be decided)
    peaked = (torch.randn(n, vocab, device="cuda") * 6).to(torch.bfloat16).float()   # nuclei of ~2-200 tokens
    for k in (0, 256):
        pick = lambda k=k: [G._choose(peaked, ones, ones * 0.95, ones.bool(), True, True, torch.bfloat16, k)
                            for _ in range(a.new)]
        print(f"top_p_choose_only_peaked_top_k_first_{k}", "ms/step", per_step_ms(pick, a.new), flush=True)
    # greedy rows: graphs (bucketed shapes) against the eager window and against transformers' generate
    eager, graphs = cases["pool_eager_greedy"](), cases["pool_graphs_greedy"]()
    ref = cases["hf_generate_greedy"]()
    same = lambda x, y: sum(p.text == q.text for p, q in zip(x, y)) / len(x)
    print("greedy_equal_share graphs_vs_eager", same(graphs, eager), "graphs_vs_hf", same(graphs, ref),
          "eager_vs_hf", same(eager, ref), flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        pool(G.Sampling.greedy(4), True)()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
