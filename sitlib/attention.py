""""sit_varlen": attention for padding-free (packed) batches that never looks across row boundaries.

TRL's padding-free collator flattens a batch into one row and passes `cu_seq_lens_q/k` and `max_length_q/k`.
Through SDPA that row needs a block-diagonal mask, which rules out SDPA's flash kernel and costs the square of the
packed length. Here packed rows go to FlashAttention-2 varlen inside torch (`torch.nn.attention.varlen`, SM80+,
bf16/fp16); elsewhere (CPU, older cards) each row runs through SDPA alone, which is exact. Padded batches
(evaluation, generation) go through transformers' SDPA path unchanged.

    from sitlib import attention
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sit_varlen")
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

NAME = "sit_varlen"

# True: K/V heads are always repeated up to the query heads before the varlen kernel (the benchmark's
# "repeat_kv" variant: what passing them as they are gives)
REPEAT_KV = False


def varlen_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """FlashAttention-2 varlen runs on CUDA cards of compute capability >= 8.0, in half precision."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return _varlen_on_card(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _varlen_on_card(index: int) -> bool:
    """Cached per card: otherwise every attention call of every layer would ask."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 8


def best_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """"sit_varlen" where the varlen kernel runs (padding-free batches then skip the block-diagonal mask), else
    "sdpa" (the per-row fallback is exact but loops over rows in Python)."""
    return NAME if varlen_kernel_available(device, dtype) else "sdpa"


@functools.lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    """Keyword arguments of this torch's varlen_attn (they changed between 2.10 and 2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Row starts of one packed row, from positions that restart at 0 for each row."""
    pos = position_ids[0]
    starts = (pos == 0).nonzero().squeeze(1)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)


def _packed_boundaries(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> Optional[torch.Tensor]:
    """cu_seqlens when this call is a packed, cache-free row (from the collator, or from restarting positions)."""
    if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(device=query.device, dtype=torch.int32)
    pos = kwargs.get("position_ids")
    if pos is not None and pos.shape[-1] == query.shape[2] and bool((pos[0, 1:] == 0).any()):
        return _cu_seqlens_from_positions(pos)
    return None


def _varlen_kernel(q, k, v, cu: torch.Tensor, max_len: int, scaling: Optional[float]) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D], causal inside each row."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = {"scale": scaling}
    if "enable_gqa" in params:
        kw["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1] and (REPEAT_KV or "window_size" not in params):
        # torch 2.10 (is_causal, no window): repeat K/V heads. torch 2.11 (window_size, no GQA flag) hands K/V to
        # the FlashAttention kernel as they are, and the kernel shares each K/V head across its query heads: the
        # repeat's copies (and their gradients' sums) are saved
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)   # (-1, 0) is causal in torch >= 2.12
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def _per_row_sdpa(query, key, value, cu: torch.Tensor, dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """Exact fallback: each packed row through SDPA on its own slice. [1, H, T, D] -> [1, T, H, D]."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        outs.append(F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, is_causal=True,
            scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def sit_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, **kwargs):
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, S, D] -> ([B, T, H, D], None)."""
    cu = _packed_boundaries(query, key, attention_mask, kwargs)
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    drop = dropout if module.training else 0.0
    if drop == 0.0 and varlen_kernel_available(query.device, query.dtype):
        max_len = kwargs.get("max_length_q")
        max_len = int(max_len) if max_len is not None else int(cu.diff().max())
        # squeeze, not [0]: indexing's backward writes each gradient into a fresh zeroed tensor (a fill and a
        # strided copy per tensor and layer); squeeze and transpose give views both ways, in the layout the
        # projections and Liger's RoPE use, so no gradient is copied
        out = _varlen_kernel(*(t.squeeze(0).transpose(0, 1) for t in (query, key, value)),
                             cu, max_len, scaling)
        return out.unsqueeze(0), None
    return _per_row_sdpa(query, key, value, cu, drop, scaling), None


def sit_varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                    mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """No mask for packed or unpadded rows (the attention function knows the boundaries); SDPA's mask otherwise."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make attn_implementation="sit_varlen" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sit_varlen_attention)
    AttentionMaskInterface.register(NAME, sit_varlen_mask)
    return NAME
