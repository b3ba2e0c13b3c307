"""Padding-free forwards for padded training batches: the backbone computes the real tokens only.

DPO pairs and prompt-tuning rows reach the model as padded batches: TRL 1.16 turns DPO's padding_free off, and
PEFT's prompt tuning prefixes its virtual tokens to each padded row (so TRL's packing cannot be used). `unpad(model)`
makes the model's backbone (the layers under the LM head) drop the padding first, run the real tokens of all rows
as one packed row through "sit_varlen" (FlashAttention-2 varlen: each row attends only to itself), and put the
hidden states back in the padded layout, so the trainer's loss code and fused LM heads see what they expect.

Only models loaded with attn_implementation="sit_varlen" are patched; others (the CPU profile) keep their forward.
Calls with a KV cache (generation) always take the original path.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import attention


def backbone(model) -> torch.nn.Module:
    """The decoder stack under the LM head, through a PEFT wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def unpad(model, multiple: Optional[int] = None) -> bool:
    """Patch `model`'s backbone so padded training batches run padding-free; calling it again updates `multiple`:
    the packed row is filled up to a multiple of this many tokens with a throwaway row, which bounds the number of
    distinct shapes. Returns whether the model is patched (only "sit_varlen" models are)."""
    stack = backbone(model)
    if getattr(stack.config, "_attn_implementation", None) != attention.NAME:
        return False
    if getattr(stack, "_sit_unpadded", None) is not None:
        stack._sit_unpadded["multiple"] = multiple
        return True
    original = stack.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args or not _padded_training_call(kwargs, stack.training):
            return original(*args, **kwargs)
        return _unpadded(original, kwargs, stack._sit_unpadded["multiple"])

    stack.forward = forward
    stack._sit_unpadded = {"multiple": multiple}
    return True


def settings(model) -> Optional[dict]:
    """What unpad() set on `model` ({"multiple"}), None where it is not patched."""
    return getattr(backbone(model), "_sit_unpadded", None)


def _padded_training_call(kwargs: dict, training: bool) -> bool:
    """A cache-free forward of a padded 2-D batch (training, or evaluation of a loss), not a generation step.
    (transformers 5.24 calls the cache `cache`; earlier versions `past_key_values`.) Calls that ask for per-layer
    outputs, or give neither ids nor embeddings, keep the original path and its own layout and errors."""
    mask, use_cache = kwargs.get("attention_mask"), kwargs.get("use_cache")
    if mask is None or mask.dim() != 2 or any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        return False
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return False
    if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
        return False
    if use_cache or (use_cache is None and not training):
        return False
    return not bool(mask.all())


def packed_layout(mask: torch.Tensor, multiple: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(positions [T'], cu_seqlens, longest row, filler tokens) of the mask's real tokens packed row after row;
    T' = T + filler rounds T up to `multiple`, the filler being a row of its own."""
    lengths = mask.sum(1)
    positions = (mask.cumsum(1) - 1)[mask]
    total = int(positions.numel())
    filler = (-total) % multiple if multiple else 0
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    if filler:
        positions = torch.cat([positions, torch.arange(filler, device=mask.device)])
        cu = torch.cat([cu, cu.new_tensor([total + filler])])
    longest = max(int(lengths.max()), filler)
    return positions, cu.to(torch.int32), longest, filler


def _unpadded(original, kwargs: dict, multiple: Optional[int]):
    mask = kwargs.pop("attention_mask").bool()
    input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    position_ids = kwargs.pop("position_ids", None)
    positions, cu, longest, filler = packed_layout(mask, multiple)
    if position_ids is not None:   # the caller's own positions for the real tokens
        positions = torch.cat([position_ids.expand_as(mask)[mask], positions[positions.numel() - filler:]])
    if inputs_embeds is not None:
        packed = inputs_embeds[mask]
        kwargs["inputs_embeds"] = torch.cat([packed, packed.new_zeros(filler, packed.shape[-1])]).unsqueeze(0)
    else:
        kwargs["input_ids"] = torch.cat([input_ids[mask], input_ids.new_zeros(filler)]).unsqueeze(0)
    kwargs.update(use_cache=False, position_ids=positions.unsqueeze(0), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=longest, max_length_k=longest)
    out = original(**kwargs)
    hidden = out.last_hidden_state[0, :positions.numel() - filler]
    padded = hidden.new_zeros(*mask.shape, hidden.shape[-1])
    out.last_hidden_state = padded.masked_scatter(mask.unsqueeze(-1), hidden)
    return out
