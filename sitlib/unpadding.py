"""Padding-free forwards for padded training batches: the backbone computes each real token once.

DPO pairs and prompt-tuning rows reach the model as padded batches: TRL 1.16 turns DPO's padding_free off, and
PEFT's prompt tuning prefixes its virtual tokens to each padded row (so TRL's packing cannot be used). `unpad(model)`
makes the model's backbone (the layers under the LM head) drop the padding first, run the real tokens of all rows
as one packed row through "sit_varlen" (FlashAttention-2 varlen: each row attends only to itself), and put the
hidden states back in the padded layout, so the trainer's loss code and fused LM heads see what they expect.

A prefix that rows share is computed once: a DPO prompt is the same in its chosen and its rejected row, and prompt
tuning's virtual tokens are the same in every row. Tokens with the same prefix at the same positions have the same
hidden states, so the row that shares only reads the prefix's keys and values (causal attention aligned to the
lower right) and gets the prefix's hidden states back; gradients of both rows flow into the one copy.

Only models loaded with attn_implementation="sit_varlen" are patched; others (the CPU profile) keep their forward.
Calls with a KV cache (generation) always take the original path.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from . import attention


def backbone(model) -> torch.nn.Module:
    """The decoder stack under the LM head, through a PEFT wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def virtual_tokens(model) -> int:
    """Virtual tokens a PEFT prompt-learning model puts before every row (0 for other models)."""
    cfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return int(cfg.num_virtual_tokens) if cfg is not None and getattr(cfg, "is_prompt_learning", False) else 0


def unpad(model, multiple: Optional[int] = None, pairs: bool = False) -> bool:
    """Patch `model`'s backbone so padded training batches run padding-free; calling it again updates the settings.
    multiple: the packed row is filled up to a multiple of this many tokens with a throwaway row, which bounds
    the number of distinct shapes. pairs: rows i and i + N/2 of a batch of N are one prompt's two answers (TRL's
    DPO batches), so their common prefix runs once. A prompt-learning model's virtual tokens run once per batch.
    Returns whether the model is patched (only "sit_varlen" models are)."""
    stack = backbone(model)
    if getattr(stack.config, "_attn_implementation", None) != attention.NAME:
        return False
    settings = dict(multiple=multiple, pairs=pairs, prefix=virtual_tokens(model))
    if getattr(stack, "_sit_unpadded", None) is not None:
        stack._sit_unpadded.update(settings)
        return True
    original = stack.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args or not _padded_training_call(kwargs, stack.training):
            return original(*args, **kwargs)
        return _unpadded(original, kwargs, **stack._sit_unpadded)

    stack.forward = forward
    stack._sit_unpadded = settings
    return True


def settings(model) -> Optional[dict]:
    """What unpad() set on `model` ({"multiple", "pairs", "prefix"}), None where it is not patched."""
    return getattr(backbone(model), "_sit_unpadded", None)


def _padded_training_call(kwargs: dict, training: bool) -> bool:
    """A cache-free forward of a padded 2-D batch (training, or evaluation of a loss), not a generation step.
    (transformers 5.24 calls the cache `cache`; earlier versions `past_key_values`.)"""
    mask, use_cache = kwargs.get("attention_mask"), kwargs.get("use_cache")
    if mask is None or mask.dim() != 2 or any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        return False
    if use_cache or (use_cache is None and not training):
        return False
    return not bool(mask.all())


@dataclass
class Layout:
    """Where the real tokens of a padded [N, L] batch go in the packed row, and back."""
    take: torch.Tensor             # [Tq] flat padded positions (row * L + column) of the tokens that run
    positions: torch.Tensor        # [Tq] their positions in their own row
    cu_q: torch.Tensor             # [rows + 1] bounds of each row's running tokens (queries)
    cu_k: torch.Tensor             # [rows + 1] bounds of each row's keys: shared prefix, then its own tokens
    kv_index: Optional[torch.Tensor]   # [Tk] packed token of each key; None where keys are the queries
    back: torch.Tensor             # [N * L] packed token whose hidden state each padded position gets
    max_q: int
    max_k: int
    filler: int                    # throwaway tokens after the real ones


def shared_prefixes(mask: torch.Tensor, input_ids: Optional[torch.Tensor], pairs: bool, prefix: int):
    """(donor row, shared tokens) per row, on the CPU: a row shares its first s real tokens with its donor."""
    n_rows = mask.shape[0]
    donor, shared = torch.arange(n_rows), torch.zeros(n_rows, dtype=torch.long)
    lengths = mask.sum(1)
    if prefix and n_rows > 1:      # prompt tuning: every row's first `prefix` tokens are the same virtual tokens
        donor[1:], shared[1:] = 0, prefix
    elif pairs and input_ids is not None and n_rows % 2 == 0 and n_rows > 1:
        half = n_rows // 2
        real = [row[m] for row, m in zip(input_ids, mask)]
        for i in range(half):
            a, b = real[i], real[i + half]
            n = min(len(a), len(b))
            differ = (a[:n] != b[:n]).nonzero()
            common = int(differ[0]) if len(differ) else n
            donor[i + half], shared[i + half] = i, common
    # every row keeps at least one token of its own to run (its queries), and a donor shares nothing itself
    shared = torch.minimum(shared, lengths - 1).clamp(min=0)
    shared[donor == torch.arange(n_rows)] = 0
    return donor, shared


def packed_layout(mask: torch.Tensor, multiple: Optional[int] = None, donor: Optional[torch.Tensor] = None,
                  shared: Optional[torch.Tensor] = None) -> Layout:
    """The packed layout of `mask`'s real tokens (CPU tensors), each row after the other; row r runs only its
    tokens after the first shared[r], reading those from row donor[r]."""
    n_rows, width = mask.shape
    lengths = mask.sum(1)
    shared = torch.zeros_like(lengths) if shared is None else shared
    donor = torch.arange(n_rows) if donor is None else donor
    row, col = mask.nonzero(as_tuple=True)                       # real tokens, row by row
    j = torch.arange(len(row)) - (lengths.cumsum(0) - lengths)[row]   # index of each in its row
    own = lengths - shared
    offset = own.cumsum(0) - own                                  # where each row's own tokens start, packed
    runs = j >= shared[row]
    packed = torch.where(runs, offset[row] + j - shared[row], offset[donor[row]] + j)
    back = torch.zeros(n_rows * width, dtype=torch.long)
    back[row * width + col] = packed
    total = int(own.sum())
    filler = (-total) % multiple if multiple else 0
    cu_q, cu_k = [torch.cat([own.new_zeros(1), x.cumsum(0)]) for x in (own, lengths)]
    kv_index = packed if bool(shared.any()) else None
    if filler:
        cu_q, cu_k = torch.cat([cu_q, cu_q[-1:] + filler]), torch.cat([cu_k, cu_k[-1:] + filler])
        if kv_index is not None:
            kv_index = torch.cat([kv_index, torch.arange(total, total + filler)])
    return Layout(take=(row * width + col)[runs], positions=j[runs], cu_q=cu_q.to(torch.int32),
                  cu_k=cu_k.to(torch.int32), kv_index=kv_index, back=back, max_q=max(int(own.max()), filler),
                  max_k=max(int(lengths.max()), filler), filler=filler)


def _unpadded(original, kwargs: dict, multiple: Optional[int], pairs: bool, prefix: int):
    mask = kwargs.pop("attention_mask").bool()
    input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    position_ids = kwargs.pop("position_ids", None)
    cpu_mask = mask.cpu()
    donor, shared = shared_prefixes(cpu_mask, None if input_ids is None else input_ids.cpu(), pairs, prefix)
    lay = packed_layout(cpu_mask, multiple, donor, shared)
    dev = mask.device
    take, positions = lay.take.to(dev), lay.positions.to(dev)
    if position_ids is not None:   # the caller's own positions for the real tokens
        positions = position_ids.expand_as(mask).reshape(-1)[take]
    positions = torch.cat([positions, torch.arange(lay.filler, device=dev)])
    if inputs_embeds is not None:
        flat = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])[take]
        kwargs["inputs_embeds"] = torch.cat([flat, flat.new_zeros(lay.filler, flat.shape[-1])]).unsqueeze(0)
    else:
        kwargs["input_ids"] = torch.cat([input_ids.reshape(-1)[take], input_ids.new_zeros(lay.filler)]).unsqueeze(0)
    kwargs.update(use_cache=False, position_ids=positions.unsqueeze(0), cu_seq_lens_q=lay.cu_q.to(dev),
                  cu_seq_lens_k=lay.cu_k.to(dev), max_length_q=lay.max_q, max_length_k=lay.max_k)
    if lay.kv_index is not None:
        kwargs["sit_kv_index"] = lay.kv_index.to(dev)
    out = original(**kwargs)
    hidden = out.last_hidden_state[0]
    padded = hidden[lay.back.to(dev)].view(*mask.shape, hidden.shape[-1])
    out.last_hidden_state = padded * mask.unsqueeze(-1).to(padded.dtype)
    return out
