"""KV-cached text generation shared by every stage (Magpie, preference sampling, evaluation, agent).

`generate` keeps a pool of rows in flight: a row that stops (EOS or its token limit) leaves the pool at once and a
waiting prompt takes its place, so no batch runs to its longest row. The pool is as large as GPU memory allows
(free memory over the KV cache of one row at full length), not a fixed chunk. The KV cache is preallocated per
pool, so a decode step writes one column instead of copying the whole cache (transformers' DynamicCache
concatenates on every step). Models the pool cannot drive (prompt tuning's virtual tokens, sliding-window or
hybrid caches) go through `generate` of transformers in length-sorted batches, with the KV cache.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import decode_attention, nucleus
from .models import fused_layers


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True

    @classmethod
    def greedy(cls, max_new_tokens: int) -> "Sampling":
        return cls(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, do_sample=False)


@dataclass
class Completion:
    text: str
    n_tokens: int
    ended: bool          # stopped on EOS (not cut off at max_new_tokens)


def eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys([tok.eos_token_id, *ids]))


def chat_input_ids(tok, conversations: Sequence[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation through the tokenizer's chat template, ready for the assistant turn.

    Rendered to text, then tokenized without special tokens: the template already holds BOS (no double BOS).
    """
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


class BlockFirstTokens:
    """Logits processor: forbid `banned` tokens until the row has produced a non-blank token.

    Magpie's fix against solution-shaped "instructions": no markdown header (`#`, `##`, ...) may open one.
    `prompt_len` is where generation starts in `input_ids`: one int (left-padded batches of `model.generate`)
    or one per row (the pool, where rows join at different times).
    """

    def __init__(self, banned: Sequence[int], blank: torch.Tensor, prompt_len: Union[int, torch.Tensor] = 0):
        self.banned = torch.tensor(sorted(set(banned)), dtype=torch.long)
        self.blank = blank            # bool per token id: decodes to whitespace only
        self.prompt_len = prompt_len

    @classmethod
    def markdown_headers(cls, tok) -> "BlockFirstTokens":
        blank = torch.tensor([not tok.decode([t]).strip() for t in range(len(tok))], dtype=torch.bool)
        return cls(markdown_header_tokens(tok), blank)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """blank / banned on `device`, copied once (a host-to-device copy every step would stall the GPU)."""
        if self.blank.device != device:
            self.blank, self.banned = self.blank.to(device), self.banned.to(device)
        return self.blank, self.banned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        blank_ids, banned = self._on(input_ids.device)
        # ids past the tokenizer's vocabulary (padded embedding rows) count as non-blank
        blank = blank_ids[input_ids.clamp(max=len(blank_ids) - 1)]
        if isinstance(self.prompt_len, torch.Tensor):
            cols = torch.arange(input_ids.shape[1], device=input_ids.device)
            in_prompt = cols.unsqueeze(0) < self.prompt_len.to(input_ids.device).unsqueeze(1)
            at_start = (blank | in_prompt).all(dim=1)
        else:
            at_start = blank[:, self.prompt_len:].all(dim=1)
        scores[:, banned] = torch.where(at_start.unsqueeze(1), float("-inf"), scores[:, banned])
        return scores


class RepetitionPenalty:
    """Logits processor: CTRL's repetition penalty (positive scores divided by `penalty`, negative ones multiplied)
    on every token the row has already *generated*. transformers' RepetitionPenaltyLogitsProcessor counts the prompt
    as well, which would steer an answer away from the instruction's own words (a keyword it must use).
    `prompt_len` as in BlockFirstTokens; both generation paths set it."""

    def __init__(self, penalty: float, prompt_len: Union[int, torch.Tensor] = 0):
        if penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, got {penalty}")
        self.penalty = penalty
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape
        cols = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        start = self.prompt_len.to(input_ids.device).unsqueeze(1) if isinstance(self.prompt_len, torch.Tensor) \
            else self.prompt_len
        # prompt columns (and ids past the scores, e.g. a padded embedding) go to a spare last column: every write
        # is True, so repeated ids need no ordering
        ids = torch.where((cols >= start) & (input_ids < vocab), input_ids, vocab)
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids, True)
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen[:, :vocab], penalised, scores)


def penalty_processors(penalty: Optional[float]) -> list:
    """A repetition penalty (generation.repetition_penalty or preference's) as a processor; none at 1.0."""
    return [] if penalty in (None, 1.0) else [RepetitionPenalty(penalty)]


def markdown_header_tokens(tok) -> list[int]:
    """Every token whose text, leading spaces removed, starts with '#'."""
    return [tid for tid in range(len(tok)) if tok.decode([tid]).lstrip(" \t").startswith("#")]


# ---------------------------------------------------------------- pool sizing

def kv_bytes_per_token(model) -> int:
    """Bytes of K and V cache one token takes over all layers (2 x layers x KV heads x head dim x dtype size)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(model.parameters()).dtype
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * size


def rows_that_fit(model, row_tokens: int, limit: int = 1024, memory_fraction: float = 0.7) -> int:
    """Rows in flight that fit in free GPU memory: each holds `row_tokens` of KV cache plus one step's logits
    (float32 scores, their sort and indices for top-p: ~20 bytes per vocabulary entry). The weights are already
    loaded, so free memory is what the model leaves; 30% stays free for prefill activations and the allocator."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return limit
    free, _ = torch.cuda.mem_get_info(device)
    per_row = kv_bytes_per_token(model) * row_tokens + 20 * model.config.get_text_config(decoder=True).vocab_size
    return max(1, min(limit, int(free * memory_fraction) // per_row))


# ---------------------------------------------------------------- the pool's KV cache

def _pool_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PoolLayer(_PoolLayer, DynamicLayer):
        pass

    return PoolLayer


class _PoolLayer:
    """One layer's K/V in buffers preallocated for the whole pool, [max rows, heads, columns, dim].

    Rows [0, rows) are in flight and columns [start, end) are live; every row shares the column layout (left
    padding, masked out), as in a padded batch. A decode step writes one column in place."""

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.k, self.v = keys, values
        self.rows = self.start = self.end = 0
        self.col: Optional[torch.Tensor] = None   # static decode: the column to write, on the device
        self.width = 0

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:self.rows, :, self.start:self.end]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:self.rows, :, self.start:self.end]

    def update(self, key_states, value_states, *args, **kwargs):
        if self.col is not None:   # static decode: shapes fixed by (rows, width), the column read from the device
            k, v = self.k[:self.rows], self.v[:self.rows]
            k.index_copy_(2, self.col, key_states)
            v.index_copy_(2, self.col, value_states)
            return k[:, :, :self.width], v[:, :, :self.width]
        n = key_states.shape[2]
        self.k[:self.rows, :, self.end:self.end + n] = key_states
        self.v[:self.rows, :, self.end:self.end + n] = value_states
        self.end += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


def quantized(model) -> bool:
    """bitsandbytes 4-/8-bit weights: their kernels were never measured under CUDA graphs, so such models keep the
    eager decode step (the T4 and L4 profiles' teacher)."""
    config = getattr(model, "config", None)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(config, "quantization_config", None) is not None)


# attention implementations that add a 4-D float mask to the scores (sit_varlen hands masked calls to SDPA)
STATIC_ATTENTION = ("sdpa", "eager", "sit_varlen")


def static_by_default(model, device: torch.device) -> bool:
    """The pool's default decode: static shapes replayed as CUDA graphs on CUDA, except for quantized weights and
    attention that does not take an additive 4-D mask (flash-attention kernels, flex attention)."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return device.type == "cuda" and not quantized(model) and attn in STATIC_ATTENTION


def is_prompt_learning(model) -> bool:
    """A PEFT prompt-learning model (prompt tuning): virtual tokens in front of every input."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def pool_supported(model) -> bool:
    """The pool drives plain decoder-only models whose every layer has a full-attention cache."""
    if is_prompt_learning(model):
        return False      # virtual tokens are added by PEFT's own generate
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:     # noqa: BLE001  (configs without a text decoder)
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


# ---------------------------------------------------------------- sampling

def _choose(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, sample: torch.Tensor,
            any_sample: Optional[bool] = None, any_top_p: Optional[bool] = None,
            key_dtype: Optional[torch.dtype] = None, top_k_first: int = 0, fallback: Optional[list] = None):
    """Next token per row: argmax where `sample` is False, else temperature + nucleus (top-p) sampling.
    `any_sample` / `any_top_p`, when the caller knows them, spare a device-to-host sync each.

    Sampling is Gumbel-max (argmax of logits + Gumbel noise draws token i with probability softmax(logits)_i), and
    top-p samples in sorted order: no scatter back over the vocabulary, no second softmax, no multinomial. At 256
    rows of a 128k vocabulary that was most of a step's sampling time. `key_dtype` (the model's logits dtype, e.g.
    bfloat16) sorts 16-bit keys: the order of the model's own values, in half the radix passes. `top_k_first` > 0
    looks for each nucleus among the top k tokens first (exact wherever their mass exceeds top_p; the other rows
    are sorted whole): on 2 CPU cores, 16 rows of a 49k vocabulary with peaked logits, a full sort took 55 ms per step
    and top-256 first 2.4 ms; on flat logits every row falls back (61 vs 54 ms; bench/bench_sampling.py). On an
    H200 (bf16 keys): 1.5 vs 4.0 ms at 1,024 rows of 49k, 2.1 vs 5.1 ms at 512 rows of 128k; flat 5.5 vs 4.0 and
    6.9 vs 5.1. `fallback`, when given, gets the share of sampled rows that were sorted whole appended.
    On a CUDA card with Triton (NUCLEUS_KERNEL), top-p rows skip all of that: nucleus.py finds each nucleus's
    boundary without sorting and draws in the same kernel."""
    greedy = scores.argmax(dim=-1)
    if not (bool(sample.any()) if any_sample is None else any_sample):
        return greedy
    temp = temperature.unsqueeze(1)
    if not (bool((top_p < 1).any()) if any_top_p is None else any_top_p):
        return torch.where(sample, _gumbel_argmax(scores / temp), greedy)
    if NUCLEUS_KERNEL and nucleus.available(scores.device):
        bits = {torch.bfloat16: 16, torch.float16: 11}.get(key_dtype, 32)
        picked = nucleus.draw(scores.contiguous(), torch.where(sample, temperature, 1.0), top_p, bits)
    elif 0 < top_k_first < scores.shape[-1]:
        vals, idx = scores.topk(top_k_first, dim=-1)   # sorted, descending
        logits = vals / temp
        probs = (logits - torch.logsumexp(scores / temp, dim=-1, keepdim=True)).exp()   # of the whole vocabulary
        picked = _nucleus_pick(logits, probs, idx, top_p)
        full = sample & (probs.sum(-1) <= top_p)   # nuclei reaching past the top k
        share = float(full.sum() / sample.sum().clamp(min=1))   # of the sampled rows; one sync, as `any` was
        if fallback is not None:
            fallback.append(share)
        if share > 0:
            rows = full.nonzero().squeeze(1)
            picked[rows] = _sorted_pick(scores[rows], temp[rows], top_p[rows], key_dtype)
    else:
        picked = _sorted_pick(scores, temp, top_p, key_dtype)
    return torch.where(sample, picked, greedy)


def _sorted_pick(scores, temp, top_p, key_dtype) -> torch.Tensor:
    """Top-p draw over the whole vocabulary, sorted."""
    keys = scores if key_dtype in (None, scores.dtype) else scores.to(key_dtype)
    idx = keys.sort(dim=-1, descending=True).indices   # temperature > 0 keeps the order
    logits = scores.gather(1, idx) / temp
    return _nucleus_pick(logits, logits.softmax(dim=-1), idx, top_p)


def _nucleus_pick(logits, probs, idx, top_p) -> torch.Tensor:
    """Gumbel-max draw among the leading tokens of descending `logits` (probabilities `probs`, ids `idx`) whose
    mass before them does not exceed top_p, as transformers' TopPLogitsWarper keeps them."""
    drop = (probs.cumsum(dim=-1) - probs) > top_p.unsqueeze(1)
    drop[:, 0] = False
    pos = _gumbel_argmax(logits.masked_fill(drop, float("-inf")))
    return idx.gather(1, pos.unsqueeze(1)).squeeze(1)


def _gumbel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """A draw per row with probability softmax(logits): argmax of logits + Gumbel noise (-log of Exp(1))."""
    return (logits - torch.empty_like(logits).exponential_().log()).argmax(dim=-1)


# ---------------------------------------------------------------- the pool

# Top-p on CUDA through sitlib's Triton sampler (nucleus.py), which needs no sort; False sorts as on the CPU
# (benchmarks time both).
NUCLEUS_KERNEL = True

# The pool's decode: None = static shapes + CUDA graphs where `static_by_default` says so (CUDA, no bitsandbytes
# weights, attention that takes an additive mask), the live window eagerly elsewhere; True/False force the static or the eager step (on CPU the static step runs without
# graphs: tests use it).
STATIC_DECODE: Optional[bool] = None
# Liger's layer kernels (models.fused_layers) in the pool's prefills and in the decode steps it captures as CUDA
# graphs, where Liger runs; False keeps transformers' layers (benchmarks time both).
FUSED_LAYERS = True
# The static step's attention: sitlib's Triton decode kernel where it runs (decode_attention.py), else transformers'
# SDPA path; False keeps SDPA everywhere (benchmarks time both).
DECODE_KERNEL = True

_META = (("pos", torch.long), ("n", torch.long), ("limit", torch.long), ("temp", torch.float32),
         ("top_p", torch.float32), ("sample", torch.bool), ("last", torch.long), ("gen_col", torch.long))


class _Pool:
    """Rows in flight, kept at the front of preallocated buffers: K/V per layer, the token and attention-mask
    window, per-row sampling settings. A finished row's slot is refilled by moving the last row into it."""

    def __init__(self, model, tok, stop: list[int], max_rows: int, cols: int, processors,
                 settings: Sequence[Sampling] = ()):
        self.model, self.processors = model, processors or []
        # known for the whole call: no device sync per step to ask whether any row samples or cuts its tail
        self.any_sample = any(s.do_sample for s in settings) if settings else None
        self.any_top_p = any(s.do_sample and s.top_p < 1 for s in settings) if settings else None
        self.device = next(model.parameters()).device
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.stop = torch.tensor(stop, device=self.device)
        self.max_rows, self.cols = max_rows, cols
        self.layers: list[_PoolLayer] = []
        self.cache = None
        self.size = self.start = self.end = 0
        self.ids = torch.full((max_rows, cols), self.pad, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(max_rows, cols, dtype=torch.long, device=self.device)
        self.meta = {k: torch.zeros(max_rows, dtype=t, device=self.device) for k, t in _META}
        self.index: list[int] = []          # input index per row
        self.out: list[list[int]] = []      # tokens picked per row (host side)
        # static decode (default on CUDA): every step runs at a bucketed (rows, width), so it can be replayed as a
        # CUDA graph, one launch instead of ~1,000 kernel launches per step
        self.static = static_by_default(model, self.device) if STATIC_DECODE is None else STATIC_DECODE
        self.col = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graphs: Optional[dict] = {}            # (rows, width) -> CUDAGraph; None once a capture failed
        self.graph_pool = None
        self.logits: Optional[torch.Tensor] = None   # every graph's logits land here
        # without the nucleus kernel (NUCLEUS_KERNEL False, or no Triton card), nuclei are searched among the top
        # 256 first (a trained model's nuclei are small). On a GPU, once most sampled
        # rows reached past them for `sort_whole_after` steps in a row (flat logits: random weights), the call sorts
        # whole: flat logits cost 5.5 ms that way against 4.0 sorted whole, peaked ones 1.5 against 4.0 (1,024 rows
        # of 49k on an H200). A few flat steps (a Magpie instruction's first words) must not switch it off; on a
        # CPU it stays on (flat 61 against 54 ms, peaked 2.4 against 55).
        self.top_k_first = 256
        self.sort_whole_after: Optional[int] = 16 if self.device.type == "cuda" else None
        self.flat_steps = 0
        self.mask_dtype = model.get_input_embeddings().weight.dtype
        if not self.mask_dtype.is_floating_point:
            self.mask_dtype = torch.float32

    def __len__(self) -> int:
        return self.size

    def _tensors(self):
        yield self.ids
        yield self.mask
        yield from self.meta.values()
        for layer in self.layers:
            yield layer.k
            yield layer.v

    def _pick(self, logits, ids, rows: slice) -> torch.Tensor:
        """Scores of `rows` -> next token; `ids` is their token window (ending at column `end`)."""
        scores = logits.float()   # the nucleus kernel reads float32 faster than bf16 (bench_sampling.py)
        meta = {k: v[rows] for k, v in self.meta.items()}
        for p in self.processors:
            if hasattr(p, "prompt_len"):
                p.prompt_len = meta["gen_col"] - (self.end - ids.shape[1])
            scores = p(ids, scores)
        # the model's 16-bit values sort in the same order while processors only set -inf (the header block)
        exact = all(isinstance(p, BlockFirstTokens) for p in self.processors)
        share: list = []
        picks = _choose(scores, meta["temp"], meta["top_p"], meta["sample"], self.any_sample, self.any_top_p,
                        key_dtype=logits.dtype if exact else None, top_k_first=self.top_k_first, fallback=share)
        if share and self.sort_whole_after is not None:
            self.flat_steps = self.flat_steps + 1 if share[0] > 0.5 else 0
            if self.flat_steps >= self.sort_whole_after:
                self.top_k_first = 0
        return picks

    def admit(self, items: list[tuple[int, list[int], Sampling]]) -> None:
        """Prefill `items` (input index, prompt ids, sampling) at the pool's width into the next free rows."""
        if not self.size:
            self.start = 0
            self.end = max(len(p) for _, p, _ in items)
        width = self.end - self.start
        assert all(len(p) <= width for _, p, _ in items), "prompts are admitted longest first"
        n, lo = len(items), self.size
        rows = slice(lo, lo + n)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, (_, p, _) in enumerate(items):   # left padding: every row's next token goes to column `end`
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)          # position ids as transformers' generate makes them
        with self._fused():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        if not self.layers:
            layer_cls = _pool_layer_class()   # a transformers cache layer, so Cache sees attention layers
            self.layers = [layer_cls(layer.keys.new_zeros(self.max_rows, layer.keys.shape[1], self.cols,
                                                           layer.keys.shape[3]),
                                      layer.values.new_zeros(self.max_rows, layer.values.shape[1], self.cols,
                                                             layer.values.shape[3]))
                           for layer in out.past_key_values.layers]
        cols = slice(self.start, self.end)
        for layer, new in zip(self.layers, out.past_key_values.layers):
            layer.k[rows, :, cols], layer.v[rows, :, cols] = new.keys, new.values
        self.ids[rows], self.mask[rows] = self.pad, 0
        self.ids[rows, cols], self.mask[rows, cols] = ids, mask
        for key, value in (("pos", mask.sum(-1)), ("n", 1), ("gen_col", self.end),
                           ("limit", [s.max_new_tokens for _, _, s in items]),
                           ("temp", [max(s.temperature, 1e-5) for _, _, s in items]),
                           ("top_p", [s.top_p for _, _, s in items]), ("sample", [s.do_sample for _, _, s in items])):
            self.meta[key][rows] = torch.as_tensor(value, dtype=self.meta[key].dtype).to(self.device) \
                if not isinstance(value, torch.Tensor) else value
        self.meta["last"][rows] = self._pick(out.logits[:, -1], ids, rows)
        del out
        self.size += n
        self.index += [i for i, _, _ in items]
        self.out += [[] for _ in items]

    def step(self) -> None:
        """One decode step for every row in flight: feed each row's last token, pick the next."""
        if self.end == self.cols:
            self._shift()
        live = slice(0, self.size)
        col = self.end
        self.ids[live, col] = self.meta["last"][live]
        self.mask[live, col] = 1
        if self.cache is None:   # a transformers Cache over the pool's layers, built once (~1 ms each time)
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
            self.cache.layers = self.layers
        if self.static:
            logits = self._static_step(col)[:self.size]
        else:
            for layer in self.layers:
                layer.rows, layer.start, layer.end = self.size, self.start, self.end
            out = self.model(input_ids=self.meta["last"][live].unsqueeze(1),
                             attention_mask=self.mask[live, self.start:col + 1],
                             position_ids=self.meta["pos"][live].unsqueeze(1), past_key_values=self.cache,
                             use_cache=True)
            logits = out.logits[:, -1]
        self.end = col + 1
        self.meta["pos"][live] += 1
        self.meta["n"][live] += 1
        self.meta["last"][live] = self._pick(logits, self.ids[live, self.start:self.end], live)

    # ------------------------------------------------------------ static decode and its CUDA graphs

    def _bucket(self, col: int) -> tuple[int, int]:
        """(rows, width) of a static step: rows rounded up to an eighth of the pool, columns [0, width) rounded
        up to a quarter of the buffers; at most 32 shapes, so at most 32 graphs per call."""
        rows_step = max(8, -(-self.max_rows // 8))
        cols_step = max(32, -(-self.cols // 4))
        rows = min(self.max_rows, -(-self.size // rows_step) * rows_step)
        return rows, min(self.cols, -(-(col + 1) // cols_step) * cols_step)

    def _static_forward(self, rows: int, width: int) -> torch.Tensor:
        """The decode forward at a fixed shape: rows [0, rows) (rows past the live ones are idle slots, their
        outputs unused) attend columns [0, width) through an additive 4-D mask (0 or the dtype's minimum: SDPA and
        eager attention both add it to the scores); K/V are written at column `self.col`. Every row also sees its
        own new column, so an idle slot never has an all-masked (NaN) row."""
        for layer in self.layers:
            layer.rows, layer.width, layer.col = rows, width, self.col
        attend = self.mask[:rows, :width].bool().index_fill(1, self.col, True)
        bias = torch.zeros(attend.shape, dtype=self.mask_dtype, device=self.device).masked_fill(
            ~attend, torch.finfo(self.mask_dtype).min)
        kernel = decode_attention.active(self.model) if DECODE_KERNEL else contextlib.nullcontext()
        with kernel:
            out = self.model(input_ids=self.meta["last"][:rows].unsqueeze(1), attention_mask=bias[:, None, None, :],
                             position_ids=self.meta["pos"][:rows].unsqueeze(1), past_key_values=self.cache,
                             use_cache=True)
        return out.logits[:, -1]

    def _static_step(self, col: int) -> torch.Tensor:
        """Logits of one static step: on CUDA a captured graph per shape (the first step at a shape runs eagerly,
        which also warms it up for the capture), elsewhere the same forward eagerly. Every graph writes its logits
        into one buffer, so the graphs' own outputs need not stay allocated."""
        self.col.fill_(col)
        rows, width = self._bucket(col)
        if self.device.type != "cuda" or self.graphs is None:
            return self._static_forward(rows, width)
        graph = self.graphs.get((rows, width))
        if graph is not None:
            graph.replay()
            return self.logits[:rows]
        with self._fused():   # the warm-up step and the capture; replays run the captured kernels
            logits = self._static_forward(rows, width)
            if self.logits is None:
                self.logits = logits.new_empty(self.max_rows, logits.shape[-1])
            try:
                self.graphs[(rows, width)] = self._capture(rows, width)
            except RuntimeError as e:   # e.g. a model whose forward syncs with the host: decode on without graphs
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); decoding without graphs")
                self.graphs = None
        return logits

    def _fused(self):
        """Liger's layer kernels where this pool captures CUDA graphs (its eager steps stay stock)."""
        graphs = self.static and self.device.type == "cuda" and self.graphs is not None
        return fused_layers(self.model) if FUSED_LAYERS and graphs else contextlib.nullcontext(False)

    def _capture(self, rows: int, width: int):
        with torch.cuda.device(self.device):   # capture on the model's GPU (a worker's may not be the current one)
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()   # one memory pool: graphs replay one at a time
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.graph_pool):
                self.logits[:rows].copy_(self._static_forward(rows, width))
        return g

    def harvest(self) -> list[int]:
        """Append every row's last pick to its tokens; return the rows that stop (a stop token, or their limit).
        One device-to-host copy per step."""
        live = slice(0, self.size)
        last = self.meta["last"][live]
        done = torch.isin(last, self.stop) | (self.meta["n"][live] >= self.meta["limit"][live])
        tokens, flags = torch.stack([last, done.long()]).tolist()
        for row, t in zip(self.out, tokens):
            row.append(t)
        return [r for r, f in enumerate(flags) if f]

    def remove(self, done: list[int]) -> None:
        """Free the rows `done`: the last rows in flight move into their slots (only those rows are copied)."""
        keep = self.size - len(done)
        gone = set(done)
        holes = [r for r in done if r < keep]
        movers = [r for r in range(keep, self.size) if r not in gone]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for t in self._tensors():
                t[dst] = t[src]
            for h, m in zip(holes, movers):
                self.index[h], self.out[h] = self.index[m], self.out[m]
        del self.index[keep:], self.out[keep:]
        self.size = keep
        if keep:   # drop leading columns no row in flight uses
            used = self.mask[:keep, self.start:self.end].any(dim=0).nonzero()
            self.start += int(used[0]) if used.numel() else 0

    def _shift(self) -> None:
        """The buffers' right edge is reached: move the live columns [start, end) to the left edge."""
        width, live = self.end - self.start, slice(0, self.size)
        self.ids[live, :width] = self.ids[live, self.start:self.end].clone()
        self.mask[live, :width] = self.mask[live, self.start:self.end].clone()
        self.mask[live, width:] = 0
        for layer in self.layers:
            layer.k[live, :, :width] = layer.k[live, :, self.start:self.end].clone()
            layer.v[live, :, :width] = layer.v[live, :, self.start:self.end].clone()
        self.meta["gen_col"][live] -= self.start
        self.start, self.end = 0, width


def _completion(tok, tokens: list[int], stop: set[int], limit: int) -> Completion:
    ended = bool(tokens) and tokens[-1] in stop
    body = tokens[:-1] if ended else tokens[:limit]
    return Completion(tok.decode(body, skip_special_tokens=True).strip(), len(body), ended)


def pool_columns(inputs: list[list[int]], per_row: Sequence[Sampling]) -> int:
    """Columns of the pool's buffers: the longest row at full length, plus half again so that the live window
    (which slides right as rows come and go) is moved back to the left edge only every so many steps."""
    longest = max(map(len, inputs)) + max(s.max_new_tokens for s in per_row) + 1
    return longest + max(16, longest // 2)


def _decode_kernels(device: torch.device):
    """SDPA without its cuDNN backend on CUDA. cuDNN builds an execution plan for every new (rows, length) shape,
    and in the pool both change at every step; the memory-efficient and flash kernels need no plan."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.inference_mode()
def generate_pool(model, tok, inputs: list[list[int]], sampling: Union[Sampling, Sequence[Sampling]],
                  max_rows: int, logits_processors: Optional[list] = None, bar=None,
                  prefill_tokens: int = 32_768) -> list[Completion]:
    """Generate for every input with at most `max_rows` rows in flight; a finished row's slot goes to a waiting
    prompt. Prompts are admitted longest first (a newcomer always fits the live window), in prefill groups of at
    most `prefill_tokens` tokens, once a quarter of the slots are free (fewer, larger prefills)."""
    per_row = [sampling] * len(inputs) if isinstance(sampling, Sampling) else list(sampling)
    stop = eos_ids(model, tok)
    max_rows = max(1, min(max_rows, len(inputs)))
    pool = _Pool(model, tok, stop, max_rows, pool_columns(inputs, per_row), logits_processors, per_row)
    waiting = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    results: list[Optional[Completion]] = [None] * len(inputs)
    refill_below = max(1, (3 * max_rows) // 4)
    with _decode_kernels(pool.device):
        _run_pool(pool, tok, inputs, per_row, waiting, results, refill_below, prefill_tokens, bar)
    return results  # type: ignore[return-value]


def _run_pool(pool, tok, inputs, per_row, waiting, results, refill_below, prefill_tokens, bar) -> None:
    stop_set = set(pool.stop.tolist())
    max_rows = pool.max_rows
    while waiting or len(pool):
        if waiting and len(pool) < refill_below:
            while waiting and len(pool) < max_rows:   # groups join back to back: each pick is recorded once
                width = (pool.end - pool.start) if len(pool) else len(inputs[waiting[0]])
                group = max(1, min(max_rows - len(pool), prefill_tokens // max(1, width)))
                take, waiting = waiting[:group], waiting[group:]
                pool.admit([(i, inputs[i], per_row[i]) for i in take])
        done = pool.harvest()
        if done:
            for r in done:
                i = pool.index[r]
                results[i] = _completion(tok, pool.out[r], stop_set, per_row[i].max_new_tokens)
            if bar is not None:
                bar.update(len(done))
            pool.remove(done)
            if not len(pool):
                continue
        pool.step()


# ---------------------------------------------------------------- transformers' generate (fallback)

@torch.inference_mode()
def _hf_generate_batch(model, tok, batch: list[list[int]], sampling: Sampling,
                       logits_processors: Optional[list] = None) -> list[Completion]:
    pad = tok.pad_token_id
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(batch):   # left padding: new tokens line up at the right edge
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    device = next(model.parameters()).device
    stop = eos_ids(model, tok)
    kwargs = dict(do_sample=sampling.do_sample, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                  eos_token_id=stop, use_cache=True)
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    soft = is_prompt_learning(model)   # decoded from embeddings: the output holds only the new tokens
    if logits_processors:
        from transformers import LogitsProcessorList

        for p in logits_processors:
            if hasattr(p, "prompt_len"):
                p.prompt_len = 0 if soft else width
        kwargs["logits_processor"] = LogitsProcessorList(logits_processors)
    ids, mask = ids.to(device), mask.to(device)
    if soft:
        new = model.get_base_model().generate(**soft_prompt_inputs(model, ids, mask), **kwargs).cpu()
    else:
        new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:].cpu()
    results = []
    for row in new.tolist():
        n, ended = len(row), False
        for j, t in enumerate(row):
            if t in stop:
                n, ended = j, True
                break
        while n and row[n - 1] == pad and not ended:
            n -= 1
        results.append(Completion(tok.decode(row[:n], skip_special_tokens=True).strip(), n, ended))
    return results


def soft_prompt_inputs(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The base model's inputs for a prompt-tuned PEFT model: its virtual-token embeddings in front of each
    left-padded prompt's embeddings, the mask extended over them.

    PEFT's own generate goes wrong with the KV cache (PEFT 0.21 + transformers 5.24: an untrained text-init soft
    prompt answered "What is 2 + 3?" with "2 +You are a helpfulYouYou…" from the third new token on) and drops
    position ids, so left padding would shift the prompt's positions. The base model's generate, given the
    embeddings, keeps the cache and takes positions from the mask (virtual tokens 0..n-1, then the prompt,
    as in training), so a batch decodes as each prompt would alone."""
    from peft import PeftType

    kind = model.active_peft_config.peft_type
    if kind not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):   # prefix tuning's "prompt" is a KV cache
        from .errors import ConfigError

        raise ConfigError(f"generation of a {kind.value} model is not supported: only soft prompts (prompt tuning)")
    base = model.get_base_model()
    embeds = base.get_input_embeddings()(ids)
    soft = model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)
    ones = torch.ones(soft.shape[:2], dtype=mask.dtype, device=mask.device)
    return {"inputs_embeds": torch.cat([soft, embeds], 1), "attention_mask": torch.cat([ones, mask], 1)}


# ---------------------------------------------------------------- public entry points

def generate_batch(model, tok, batch: list[list[int]], sampling: Sampling,
                   logits_processors: Optional[list] = None) -> list[Completion]:
    """All of `batch` in flight at once (one small call, e.g. a chat reply)."""
    if pool_supported(model):
        return generate_pool(model, tok, batch, sampling, len(batch), logits_processors)
    return _hf_generate_batch(model, tok, batch, sampling, logits_processors)


def generate(model, tok, inputs: list[list[int]], sampling: Union[Sampling, Sequence[Sampling]],
             batch_size: Optional[int] = None, logits_processors: Optional[list] = None,
             desc: Optional[str] = None) -> list[Completion]:
    """Generate for every input; results in input order.

    `sampling` is one setting for all inputs or one per input (e.g. several temperatures in one call).
    `batch_size` caps the rows in flight; None or 0 sizes the pool by free GPU memory (`rows_that_fit`). On a GPU
    the pool never exceeds what fits, whatever `batch_size` says.
    """
    if not inputs:
        return []
    per_row = [sampling] * len(inputs) if isinstance(sampling, Sampling) else list(sampling)
    bar = tqdm(total=len(inputs), desc=desc, unit="row", disable=desc is None)
    try:
        fit = rows_that_fit(model, pool_columns(inputs, per_row), limit=len(inputs))
        if pool_supported(model):
            rows = min(fit, batch_size) if batch_size else fit
            return generate_pool(model, tok, inputs, per_row, max(1, rows), logits_processors, bar)
        # transformers' generate on padded batches (prompt tuning): at most what fits as well
        return _generate_hf_batches(model, tok, inputs, per_row, max(1, min(batch_size or 16, fit)),
                                    logits_processors, bar)
    finally:
        bar.close()


def _generate_hf_batches(model, tok, inputs, per_row, batch_size, processors, bar) -> list[Completion]:
    """model.generate over length-sorted batches of equal sampling settings."""
    order = sorted(range(len(inputs)), key=lambda i: (repr(per_row[i]), len(inputs[i])))
    results: list[Optional[Completion]] = [None] * len(inputs)
    start = 0
    while start < len(order):
        s = per_row[order[start]]
        idx = [i for i in order[start:start + batch_size] if per_row[i] == s]
        for i, c in zip(idx, _hf_generate_batch(model, tok, [inputs[i] for i in idx], s, processors)):
            results[i] = c
        bar.update(len(idx))
        start += len(idx)
    return results  # type: ignore[return-value]
