"""Generation throughput, side by side in one process on random weights of the teacher's shape (nothing downloaded):
the original series' way, transformers' `generate` in padded batches of 256 (the best stock way), and
`sitlib.generation.generate` (the pool sized by free memory; its prefills and captured decode steps run Liger's layer
kernels where liger_kernel is installed, and --unfused-variant also times the pool without them). Every variant
samples (top-p 0.95) with the Magpie first-token block on, is warmed up at its own shape first, and reports tokens/s
and MFU.

    python bench/bench_generation.py [--shape 8b|3b] [--prompts 1024] [--new 128] [--out bench/results]

Merges {"generation": {...}} into bench/results/<date>_<device>.json (and $OUT/ when set).
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
from common import SHAPES, mfu, random_model, record, sync  # noqa: E402

from sitlib.generation import BlockFirstTokens, Sampling, _generate_hf_batches, generate  # noqa: E402
from sitlib import generation as G  # noqa: E402
from sitlib.models import fused_layers  # noqa: E402


class IdTokenizer:
    """What sitlib.generation needs from a tokenizer, for random-weight models (ids stand for text)."""

    pad_token_id, eos_token_id = 0, 2

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


class _NoBar:
    def update(self, n):
        pass


def peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=SHAPES)
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=256)
    ap.add_argument("--pool-rows", default="auto,256", help="sitlib pool sizes to time: auto (memory) and/or numbers")
    ap.add_argument("--seed-new", type=int, default=16, help="new tokens for the (slow) original way")
    ap.add_argument("--sdpa-variant", action="store_true",
                    help="also time the pool with SDPA in its decode step (sitlib's decode kernel off)")
    ap.add_argument("--sort-variant", action="store_true",
                    help="also time the pool with top-p by sorting (sitlib's nucleus kernel off)")
    ap.add_argument("--unfused-variant", action="store_true",
                    help="also time the pool without Liger's layer kernels (generation.FUSED_LAYERS off)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    model = random_model(a.shape)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    tok = IdTokenizer(vocab)
    rng = random.Random(0)
    # prompt lengths around --prompt-len (Magpie's pre-query templates and chat prompts vary a little)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(a.prompt_len // 2, a.prompt_len))]
               for _ in range(a.prompts)]
    # random ids have no text: block a fixed set of 200 ids as the first token, as the header block does
    block = BlockFirstTokens(range(3, min(203, vocab)), torch.zeros(vocab, dtype=torch.bool))
    samp = Sampling(max_new_tokens=a.new, temperature=1.0, top_p=0.95)
    res: dict = {"shape": a.shape, "prompts": a.prompts, "new_tokens": a.new, "parameters": n_params}

    def report(name, tokens, seconds, **extra):
        res[name] = {"tok_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2),
                     "mfu": mfu(2 * n_params * tokens / seconds), **extra}
        print(name, res[name], flush=True)

    # 1. the original series' way: no KV cache, one prompt at a time (it was 4-bit NF4 too, slower still: the
    #    bf16 weights here are what this machine runs without bitsandbytes)
    x = torch.tensor([prompts[0]], device=model.device)
    kw = dict(do_sample=True, top_p=0.95, use_cache=False, pad_token_id=0, eos_token_id=2)
    model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)
    out, dt = timed(lambda: model.generate(x, max_new_tokens=a.seed_new, min_new_tokens=a.seed_new, **kw))
    report("seed_way", out.shape[1] - x.shape[1], dt, how=f"{str(model.dtype)[6:]}, use_cache=False, batch 1")

    # 2. transformers' generate, padded batches of --hf-batch, warm (one batch of the same shape first)
    per_row = [samp] * len(prompts)
    _generate_hf_batches(model, tok, prompts[:a.hf_batch], per_row, a.hf_batch, [block], _NoBar())
    reset_peak()
    out, dt = timed(lambda: _generate_hf_batches(model, tok, prompts, per_row, a.hf_batch, [block], _NoBar()))
    report(f"hf_generate_bs{a.hf_batch}", sum(c.n_tokens for c in out), dt, peak_gb=peak_gb())

    # 3. sitlib: the pool (rows leave as they stop, waiting prompts take their slots), sized by memory or fixed.
    #    Warm-up: the timed call itself, once (every row count and cache length it meets, so no graph is captured
    #    while timed).
    def pool(name, size, **extra):
        generate(model, tok, prompts, samp, size, [block])
        reset_peak()
        out, dt = timed(lambda: generate(model, tok, prompts, samp, size, [block]))
        report(name, sum(c.n_tokens for c in out), dt, peak_gb=peak_gb(), rows_in_flight=size or "auto (free memory)",
               **extra)

    with fused_layers(model) as on:   # whether Liger's layer kernels apply to this model and machine
        fused = G.FUSED_LAYERS and on
    if a.unfused_variant:
        before, G.FUSED_LAYERS = G.FUSED_LAYERS, False
        try:
            pool("sitlib_unfused_layers", None)
        finally:
            G.FUSED_LAYERS = before
    for rows in a.pool_rows.split(","):
        pool("sitlib" if rows == "auto" else f"sitlib_rows{rows}", None if rows == "auto" else int(rows),
             fused_layers=fused)
    # the same pool (auto rows) with one of sitlib's kernels off: SDPA in the decode step instead of the Triton
    # decode kernel, or top-p by sorting instead of the Triton nucleus sampler
    for wanted, flag, name in ((a.sdpa_variant, "DECODE_KERNEL", "sitlib_sdpa_decode"),
                               (a.sort_variant, "NUCLEUS_KERNEL", "sitlib_sorted_top_p")):
        if not wanted:
            continue
        setattr(G, flag, False)
        try:
            pool(name, None, fused_layers=fused)
        finally:
            setattr(G, flag, True)
    hf = res[f"hf_generate_bs{a.hf_batch}"]["tok_per_s"]
    main_pool = "sitlib" if "sitlib" in res else next(k for k in res if k.startswith("sitlib_rows"))
    res["sitlib_over_hf_generate"] = round(res[main_pool]["tok_per_s"] / hf, 2)
    # the file names the stock entry hf_generate_bs256
    record("generation", res, a.out)


if __name__ == "__main__":
    main()
