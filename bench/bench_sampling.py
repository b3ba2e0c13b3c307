"""Top-p sampling alone (`sitlib.generation._choose`), per decode step: the whole-vocabulary sort against looking
for each nucleus among the top k first, on logits as flat as random weights give and as peaked as a trained
model's. Runs on the CPU (where the pool looks among the top 256 first) or on a GPU, where sitlib's Triton
nucleus sampler (what the pool uses there) is timed too, at each --kernel-blocks setting
(entries per loop step x warps [x entries per program [x keys tested per search pass]]).

    python bench/bench_sampling.py [--rows 16] [--vocab 49152] [--device cpu] [--kernel-blocks 1024x4,512x4x4096]
                                   [--out bench/results]

Merges {"sampling_<device>": {...}} into bench/results/<date>_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import ms_per_call, record  # noqa: E402

from sitlib import generation as G, nucleus  # noqa: E402
from sitlib.generation import _choose  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)   # SmolLM2's
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kernel-blocks", default=f"{nucleus.BLOCK}x{nucleus.NUM_WARPS}",
                    help="nucleus kernel settings to time: ENTRIESxWARPS[xSEGMENT[xKEYS]],...")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n = a.rows
    ones = torch.ones(n, device=a.device)
    # the pool sorts the model's own 16-bit logits as keys on a GPU (a bf16 model), float32 ones on the CPU
    key = torch.bfloat16 if a.device.startswith("cuda") else None
    res: dict = {"rows": n, "vocab": a.vocab, "top_p": 0.95, "temperature": 1.0, "sort_keys": str(key)}
    # scale 1: nearly flat (random weights); scale 6: nuclei of a few to a few hundred tokens
    for name, scale in (("flat", 1.0), ("peaked", 6.0)):
        scores = (torch.randn(n, a.vocab, generator=g) * scale).to(a.device)
        if key is not None:   # a bf16 model's logits, as float32 (what the sorting paths get)
            scores = scores.to(key).float()
        G.NUCLEUS_KERNEL = False   # the sorting paths
        for k in (0, 256):
            ms = ms_per_call(lambda: _choose(scores, ones, ones * 0.95, ones.bool(), True, True, key, k), a.repeats)
            res[f"{name}_top_k_first_{k}_ms"] = ms
            print(name, k, ms, "ms", flush=True)
        G.NUCLEUS_KERNEL = True
        if not nucleus.available(scores.device):
            continue
        default = (nucleus.BLOCK, nucleus.NUM_WARPS, nucleus.SEGMENT, nucleus.CANDIDATES)
        half = scores.to(key)   # the model's own logits, as the kernel could read them (no float32 copy)
        for setting in a.kernel_blocks.split(","):
            values = [int(v) for v in setting.split("x")]
            nucleus.BLOCK, nucleus.NUM_WARPS, nucleus.SEGMENT, nucleus.CANDIDATES = values + list(default[len(values):])
            for label, x in (("float32", scores), ("bf16", half)):
                ms = ms_per_call(lambda: _choose(x, ones, ones * 0.95, ones.bool(), True, True, key), a.repeats)
                res[f"{name}_kernel_{label}_{setting}_ms"] = ms
                print(name, "kernel", label, setting, ms, "ms", flush=True)
        nucleus.BLOCK, nucleus.NUM_WARPS, nucleus.SEGMENT, nucleus.CANDIDATES = default
    record(f"sampling_{a.device}", res, a.out)


if __name__ == "__main__":
    main()
