"""Attention for the pool's decode step: one new token per row against the row's cached keys, under an additive mask.

In that step transformers' SDPA path runs PyTorch's memory-efficient kernel, which tiles 64 queries per block;
a decode call has one query per head (4 per KV head with GQA), so most of each tile is padding. On an H200 it
took 267 us per layer at 512 rows of the 8B shape and 238 us at 1,024 rows of the 135M shape, the largest single
kernel of the step. The Triton kernel here runs one program per (row, KV head): all query heads of the group in
one tile, keys and values read once, an online softmax over blocks of columns, blocks of padding skipped. It took
123 and 84 us there (bench/results/profile_pool_{8b,135m}_NVIDIA_H200.json).
SDPA's flash kernel takes no mask, and the varlen kernel wants keys packed by token, not the pool's
[rows, heads, columns, dim] buffers; hence a kernel of our own.

    with decode_attention.active(model):   # only around the pool's static decode forward
        model(...)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

NAME = "sit_decode"
BLOCK_N, NUM_WARPS = 64, 4   # columns per loop step and warps per program (bench/profile_pool.py times others)


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def triton_card(device: torch.device) -> bool:
    """Triton on a CUDA card of compute capability >= 8.0 (where sitlib's kernels run)."""
    return device.type == "cuda" and _triton() is not None and torch.cuda.get_device_capability(device)[0] >= 8


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """A Triton card (triton_card), half precision."""
    return dtype in (torch.float16, torch.bfloat16) and triton_card(device)


@functools.lru_cache(maxsize=None)
def _kernel():
    triton, tl = _triton()

    @triton.jit
    def decode(Q, K, V, Bias, Out, scale, masked, W,
               sqb, sqh, skb, skh, skn, svb, svh, svn, sbb, sob, soh,
               G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)   # the row (64 bits: offsets pass 2**31 elements in large pools)
        h = tl.program_id(1).to(tl.int64)   # the KV head; its G query heads share the tile
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        live = g < G
        q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=live[:, None], other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        s_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(0, W, BN):
            n = start + tl.arange(0, BN)
            inside = n < W
            bias = tl.load(Bias + b * sbb + n, mask=inside, other=float("-inf")).to(tl.float32)
            if tl.max(bias, 0) > masked:           # blocks of masked columns only (padding) are not read
                k = tl.load(K + b * skb + h * skh + n[:, None] * skn + d[None, :], mask=inside[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale + bias[None, :]
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                s_sum = s_sum * alpha + tl.sum(p, 1)
                v = tl.load(V + b * svb + h * svh + n[:, None] * svn + d[None, :], mask=inside[:, None],
                            other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
        out = acc / s_sum[:, None]
        tl.store(Out + b * sob + (h * G + g)[:, None] * soh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=live[:, None])

    return decode


def decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
           scale: float) -> torch.Tensor:
    """query [B, H, 1, D], key/value [B, Hkv, W, D] (any strides with a contiguous last dim), bias [B, 1, 1, W]
    additive (0 where visible, the dtype's minimum where masked; every row sees at least one column) -> [B, 1, H, D].
    Blocks whose columns are all masked (left padding, the bucket's columns past the step) are skipped: their keys
    and values are never read."""
    rows, heads, _, dim = query.shape
    kv_heads, width = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = torch.empty(rows, 1, heads, dim, dtype=query.dtype, device=query.device)
    q, o, bias = query[:, :, 0], out[:, 0], bias.reshape(rows, width)
    with torch.cuda.device(query.device):   # Triton launches on the current device and its stream
        _kernel()[(rows, kv_heads)](
            q, key, value, bias, o, scale, torch.finfo(bias.dtype).min / 2, width,
            q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), bias.stride(0), o.stride(0), o.stride(1),
            G=groups, GP=max(16, 1 << (groups - 1).bit_length()), D=dim, BN=BLOCK_N, num_warps=NUM_WARPS)
    return out


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """A one-token step with a [B, 1, 1, W] float mask of its own per row, one dtype and head dim for query, keys
    and values (a power of two, 16-256, as the tile takes), contiguous last dims, where the kernel can run."""
    rows, heads, steps, dim = query.shape
    return (steps == 1 and bias is not None and bias.is_floating_point()
            and tuple(bias.shape) == (rows, 1, 1, key.shape[2]) and bias.stride(-1) == 1
            and key.shape[0] == value.shape[0] == rows and key.shape[1:] == value.shape[1:]
            and dim in (16, 32, 64, 128, 256) and key.shape[-1] == dim and heads % key.shape[1] == 0
            and query.dtype == key.dtype == value.dtype
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and available(query.device, query.dtype))


def sit_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, **kwargs):
    """transformers attention function: the kernel for a masked one-token step, SDPA's path for anything else."""
    plain = not any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if plain and fits(query, key, value, attention_mask) and not (module.training and dropout):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode(query, key, value, attention_mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sit_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@contextlib.contextmanager
def active(model):
    """The model's attention is `sit_decode` inside the block (set on its config, restored after), where the kernel
    can run; unchanged elsewhere."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    param = next(model.parameters())
    # configs with sub-configs (multimodal) would have each sub-config's own setting overwritten on restore
    if (before not in ("sdpa", "sit_varlen") or getattr(config, "sub_configs", None)
            or not available(param.device, param.dtype)):
        yield
        return
    register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
