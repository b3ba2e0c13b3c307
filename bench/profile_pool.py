"""Where one decode step of sitlib's pool spends its time, at a fixed number of rows on random weights: the whole
step as the pool runs it (harvest + step), the captured graph's replay alone, sampling alone, the same step
without graphs, then the top CUDA kernels of the step without graphs and the top host-side ops of the step with
them; each with transformers' SDPA and with sitlib's decode kernel in the step, then the kernel's other block
sizes. Steps are timed inside one width bucket, after the graphs of that bucket were captured.

    python bench/profile_pool.py [--shape 8b] [--rows 512] [--prompt 64] [--steps 40] [--variants ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_generation import IdTokenizer  # noqa: E402
from common import SHAPES, device_name, ms_per_call, random_model  # noqa: E402

from sitlib import decode_attention as DA  # noqa: E402
from sitlib import generation as G  # noqa: E402
from sitlib.models import fused_layers  # noqa: E402


def full_pool(model, tok, rows: int, prompt: int, new: int):
    """A pool of static steps (graphs on CUDA) with `rows` rows prefilled at `prompt` tokens each, the header
    block on."""
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(prompt - 1)] for _ in range(rows)]
    sampling = G.Sampling(new, 0.7, 0.9)
    procs = [G.BlockFirstTokens(range(3, 203), torch.zeros(vocab, dtype=torch.bool))]
    pool = G._Pool(model, tok, G.eos_ids(model, tok), rows, G.pool_columns(prompts, [sampling]), procs, [sampling])
    pool.static = True
    pool.admit([(i, p, sampling) for i, p in enumerate(prompts)])
    return pool


def whole_step(pool):
    def run():
        pool.harvest()   # rows are never removed here: every slot keeps decoding (the pool's steady state)
        pool.step()
    return run


def measure(model, tok, a, tables: bool = True) -> dict:
    out = {}
    # the bucket of columns [cols/4, cols/2): enter it, capture, then time inside it
    pool = full_pool(model, tok, a.rows, a.prompt, a.new)
    step = whole_step(pool)
    cols_step = max(32, -(-pool.cols // 4))
    while pool.end < cols_step + 2:
        step()
    room = 2 * cols_step - pool.end - 2
    n = min(a.steps, room)
    out["steps_timed"] = n
    out["ms_whole_step_graphs"] = ms_per_call(step, n // 2)
    rows, width = pool._bucket(pool.end)
    graph = pool.graphs.get((rows, width)) if pool.graphs else None
    out["ms_graph_replay"] = ms_per_call(graph.replay, n) if graph is not None else None
    live = slice(0, pool.size)
    ids = pool.ids[live, pool.start:pool.end]
    logits = pool.logits if pool.logits is not None else torch.randn(pool.size, model.config.vocab_size)
    out["ms_sampling"] = ms_per_call(lambda: pool._pick(logits[:pool.size], ids, live), n)
    if not tables:
        return out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(min(8, room - n // 2 - 2)):
            step()
        torch.cuda.synchronize()
    out["host_ops_graph_step"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                                           max_name_column_width=70)
    del pool, graph
    torch.cuda.empty_cache()
    eager = full_pool(model, tok, a.rows, a.prompt, a.new)
    eager.graphs = None   # the same static shapes, launched kernel by kernel
    step = whole_step(eager)
    while eager.end < cols_step + 2:
        step()
    out["ms_whole_step_no_graphs"] = ms_per_call(step, n // 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            step()
        torch.cuda.synchronize()
    out["cuda_kernels_no_graphs_8_steps"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                                       max_name_column_width=90)
    del eager
    torch.cuda.empty_cache()
    return out


def run(result: dict, name: str, r: dict) -> None:
    result["runs"][name] = r
    print(name, {k: v for k, v in r.items() if not isinstance(v, str)}, flush=True)
    for k, v in r.items():
        if isinstance(v, str):
            print(k, "\n", v, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=SHAPES)
    ap.add_argument("--rows", type=int, nargs="+", default=[512])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--variants", default="sdpa,decode_kernel,blocks",
                    help="any of sdpa, decode_kernel, blocks (the decode kernel's block sizes; these three with "
                         "transformers' layers) and fused (the decode kernel with Liger's layer kernels, in the "
                         "steps without graphs too)")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    model = random_model(a.shape, a.attn)
    tok = IdTokenizer(model.config.vocab_size)
    result = {"device": device_name(), "shape": a.shape, "attn": a.attn, "prompt": a.prompt, "runs": {}}
    variants = a.variants.split(",")
    G.FUSED_LAYERS = False   # transformers' layers, but in the fused variant
    with torch.inference_mode(), G._decode_kernels(torch.device("cuda")):
        for rows in a.rows:
            a_rows = argparse.Namespace(**{**vars(a), "rows": rows})
            for kernel in (False, True):   # transformers' SDPA, then sitlib's decode kernel, in the static step
                name = f"{rows}_{'decode_kernel' if kernel else 'sdpa'}"
                if name.split("_", 1)[1] in variants:
                    G.DECODE_KERNEL = kernel
                    run(result, name, measure(model, tok, a_rows))
        if "blocks" in variants:   # the decode kernel's block of columns and warps: the graph's replay, last rows
            for block_n, warps in ((32, 4), (64, 8), (128, 4), (128, 8)):
                DA.BLOCK_N, DA.NUM_WARPS = block_n, warps
                r = measure(model, tok, argparse.Namespace(**{**vars(a), "rows": a.rows[-1]}), tables=False)
                run(result, f"{a.rows[-1]}_decode_kernel_block{block_n}_warps{warps}", r)
            DA.BLOCK_N, DA.NUM_WARPS = 64, 4
        if "fused" in variants:   # the decode kernel with Liger's layer kernels, the steps without graphs included
            G.DECODE_KERNEL = G.FUSED_LAYERS = True
            for rows in a.rows:
                with fused_layers(model) as on:
                    r = {**measure(model, tok, argparse.Namespace(**{**vars(a), "rows": rows})), "fused_layers": on}
                run(result, f"{rows}_decode_kernel_fused", r)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"profile_pool_{a.shape}{a.tag}_{device_name().replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
