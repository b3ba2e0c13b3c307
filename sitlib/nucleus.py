"""Top-p (nucleus) sampling on a GPU without sorting the vocabulary: Triton programs over segments of each row.

The pool's sampler sorted each row (or its top 256 first); on logits as flat as random weights give, every row
was sorted whole: 5.4 ms of a 27 ms decode step at 512 rows of a 128k vocabulary (8B shape, H200), in a dozen
kernels that each read or write the whole [rows, vocab] block. A nucleus needs no order, only its boundary: the
kept tokens are those whose value is at least a threshold k0, the smallest value with
    mass of the tokens strictly above k0  <=  top_p,
which is transformers' TopPLogitsWarper rule (a token is dropped when the mass before it exceeds top_p), except
that tokens tied with the boundary are all kept. The kernels find k0 by a C-way search over the values' sortable
integer keys (a pass testing C keys narrows it C-fold: 16-bit values need 16 / log2(C) passes), then draw by Gumbel-max
among the kept tokens in one more pass: each pass reads the row once, in one launch over (rows, segments)
programs. It takes the model's 16-bit logits too, but reads float32 faster.

    picks = nucleus.draw(scores, temperature, top_p, value_bits=16)   # scores: float32 [rows, vocab] on CUDA
"""
from __future__ import annotations

import functools
import math

import torch

from . import decode_attention

# vocabulary entries per loop step, warps per program, vocabulary entries per program, keys tested per search pass
# (bench_sampling.py times others). Each entry costs a compare, a select and an add per key tested: the search's
# arithmetic, not memory, bounds the kernels (64-bit keys and 16 per pass took 2.3-3.5 ms at 512 rows of
# 128k, 32-bit keys and 4 per pass 1.55 ms).
BLOCK, NUM_WARPS, SEGMENT, CANDIDATES = 512, 4, 8192, 4


def available(device: torch.device) -> bool:
    """Triton on a CUDA card of compute capability >= 8.0 (the cards the profiles' pools run on)."""
    return decode_attention.triton_card(device)


@functools.lru_cache(maxsize=None)
def _kernels():
    triton, tl = decode_attention._triton()

    @triton.jit
    def _key(x, SHIFT: tl.constexpr):
        """Sortable integer of a float32 (same order as the floats); low bits that 16-bit values leave at zero are
        shifted out, so the search covers fewer bits."""
        bits = (x + 0.0).to(tl.int32, bitcast=True)   # + 0.0: -0.0 becomes +0.0, one key for equal values
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> SHIFT

    @triton.jit
    def _range(Score, stride, V, seg):
        """(row, its scores, first and past-the-last vocabulary entry) of this program's segment."""
        r = tl.program_id(0).to(tl.int64)
        begin = tl.program_id(1) * seg
        return r, Score + r * stride, begin, tl.minimum(begin + seg, V)

    @triton.jit
    def stats(Score, Temp, M, Z, Lo, Hi, V, stride, seg, S: tl.constexpr, SHIFT: tl.constexpr,
              BLOCK: tl.constexpr):
        """Per (row, segment): largest value, softmax denominator relative to it, range of the finite keys.
        Every loop accumulates per lane and reduces once at its end."""
        r, row, begin, end = _range(Score, stride, V, seg)
        inv_t = 1.0 / tl.load(Temp + r)
        offs = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK], tl.float32)
        lo = tl.full([BLOCK], 2 ** 31 - 1, tl.int32)
        hi = tl.full([BLOCK], -(2 ** 31), tl.int32)
        for start in range(begin, end, BLOCK):
            inside = start + offs < end
            x = tl.load(row + start + offs, mask=inside, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            z = tl.where(m_new == float("-inf"), 0.0,
                         z * tl.exp((m - m_new) * inv_t) + tl.exp((x - m_new) * inv_t))
            m = m_new
            k = _key(x, SHIFT)
            lo = tl.minimum(lo, tl.where(x > float("-inf"), k, 2 ** 31 - 1))
            hi = tl.maximum(hi, tl.where(inside, k, -(2 ** 31)))
        top = tl.max(m, 0)
        out = r * S + tl.program_id(1)
        tl.store(M + out, top)
        tl.store(Z + out, tl.sum(tl.where(m == float("-inf"), 0.0, z * tl.exp((m - top) * inv_t)), 0))
        tl.store(Lo + out, tl.min(lo, 0))
        tl.store(Hi + out, tl.max(hi, 0))

    @triton.jit
    def _bounds(State, Above, Budget, r, p, rows, S: tl.constexpr, C: tl.constexpr):
        """The row's search range before pass p: pass 0's from State, later ones narrowed by the masses the
        previous pass left in Above (every program of the row computes the same, no extra launch)."""
        lo = tl.load(State + r * 2)   # int64: the candidates' arithmetic passes 2**31
        hi = tl.load(State + r * 2 + 1)
        j = tl.arange(0, C).to(tl.int64)
        seg = tl.arange(0, S)
        for q in range(0, p):
            cand = lo + ((hi - lo) * (j + 1)) // C
            mass = tl.load(Above + ((q * rows + r) * S + seg[:, None]) * C + j[None, :])
            # the last candidate is hi, which fits: taken as such, so a rounding of its test (or a NaN budget)
            # cannot empty the range
            fits = (tl.sum(mass, 0) <= tl.load(Budget + r)) | (j == C - 1)
            first = tl.min(tl.where(fits, j, C), 0)   # the first candidate that fits
            new_hi = tl.sum(tl.where(j == first, cand, 0), 0)
            lo = tl.sum(tl.where(j == first - 1, cand + 1, 0), 0) + tl.where(first == 0, lo, 0)
            hi = new_hi
        return lo, hi

    @triton.jit
    def search(Score, Temp, Top, Budget, State, Above, p, rows, V, stride, seg, S: tl.constexpr,
               SHIFT: tl.constexpr, BLOCK: tl.constexpr, C: tl.constexpr):
        """Pass p: per (row, segment), the mass strictly above each of C keys spread over the row's range."""
        r, row, begin, end = _range(Score, stride, V, seg)
        lo, hi = _bounds(State, Above, Budget, r, p, rows, S, C)
        j = tl.arange(0, C).to(tl.int64)
        cand = (lo + ((hi - lo) * (j + 1)) // C).to(tl.int32)
        inv_t = 1.0 / tl.load(Temp + r)
        top = tl.load(Top + r)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, C], tl.float32)
        for start in range(begin, end, BLOCK):
            x = tl.load(row + start + offs, mask=start + offs < end, other=float("-inf")).to(tl.float32)
            e = tl.exp((x - top) * inv_t)
            acc += tl.where(_key(x, SHIFT)[:, None] > cand[None, :], e[:, None], 0.0)
        tl.store(Above + ((p * rows + r) * S + tl.program_id(1)) * C + j, tl.sum(acc, 0))

    @triton.jit
    def draw(Score, Temp, Budget, State, Above, Seed, Best, Where, Threshold, passes, rows, V, stride, seg,
             S: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr, C: tl.constexpr):
        """Per (row, segment): Gumbel-max among the kept tokens (key >= k0): argmax of x / t + Gumbel noise."""
        r, row, begin, end = _range(Score, stride, V, seg)
        lo, k0 = _bounds(State, Above, Budget, r, passes, rows, S, C)
        inv_t = 1.0 / tl.load(Temp + r)
        seed = tl.load(Seed)
        base = (r * V).to(tl.int32)   # the row in the offset, not the seed: calls with nearby seeds share no noise
        offs = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        where = tl.zeros([BLOCK], tl.int32)
        for start in range(begin, end, BLOCK):
            inside = start + offs < end
            x = tl.load(row + start + offs, mask=inside, other=float("-inf")).to(tl.float32)
            # Exp(1) noise as -log(1 - u), through log1p's series for small u: the winners' noise is small, and
            # tl.rand resolves small u finely (steps of 2**-31) but 1 - u only in steps of 2**-24 (ties, which go
            # to the lowest id); half a step more keeps u off 0 (noise 0 would win whatever the token's value)
            u = tl.rand(seed, base + start + offs) + 2.3283064e-10
            noise = tl.where(u < 1e-4, u * (1.0 + 0.5 * u), -tl.log(1.0 - u))
            g = tl.where(inside & (_key(x, SHIFT) >= k0.to(tl.int32)), x * inv_t - tl.log(noise), float("-inf"))
            better = g > best
            best = tl.where(better, g, best)
            where = tl.where(better, start + offs, where)
        b = tl.max(best, 0)
        out = r * S + tl.program_id(1)
        tl.store(Best + out, b)
        tl.store(Where + out, tl.min(tl.where(best == b, where, V), 0).to(tl.int64))
        if tl.program_id(1) == 0:
            tl.store(Threshold + r, k0)

    return stats, search, draw


def _shift(scores: torch.Tensor, value_bits: int) -> int:
    """Low key bits that are zero: 16-bit values (given as such, or held in float32) leave 16 (bf16) or 13 (fp16)."""
    bits = {torch.bfloat16: 16, torch.float16: 11}.get(scores.dtype, value_bits)
    return {16: 16, 11: 13}.get(bits, 0)


def _launch(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, value_bits: int):
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16) or scores.stride(-1) != 1:
        raise ValueError(f"nucleus sampling takes float scores with a contiguous last dim, got {scores.dtype}, "
                         f"strides {scores.stride()}")
    rows, vocab = scores.shape
    dev, shift = scores.device, _shift(scores, value_bits)
    segments = min(32, 1 << max(0, math.ceil(vocab / SEGMENT) - 1).bit_length())   # programs per row, a power of 2
    seg = -(-vocab // segments)
    passes = math.ceil((32 - shift) / math.log2(CANDIDATES))   # each pass narrows the range C-fold
    temp = temperature.float().contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    i64 = dict(dtype=torch.long, device=dev)
    m, z = torch.empty(rows, segments, **f32), torch.empty(rows, segments, **f32)
    lo, hi = torch.empty(rows, segments, **i64), torch.empty(rows, segments, **i64)
    above = torch.empty(passes, rows, segments, CANDIDATES, **f32)
    best, where = torch.empty(rows, segments, **f32), torch.empty(rows, segments, **i64)
    thresholds = torch.empty(rows, **i64)
    # a seed drawn from torch's generator on the device: torch.manual_seed makes draws repeat, and no host sync
    seed = torch.randint(0, 2 ** 30, (1,), device=dev, dtype=torch.int32)
    stats, search, draw_ = _kernels()
    grid, common = (rows, segments), dict(BLOCK=BLOCK, num_warps=NUM_WARPS)
    with torch.cuda.device(dev):
        stats[grid](scores, temp, m, z, lo, hi, vocab, scores.stride(0), seg, S=segments, SHIFT=shift, **common)
        top = m.max(1).values
        budget = (top_p.float() * (z * torch.exp((m - top[:, None]) / temp[:, None])).sum(1)).contiguous()
        state = torch.stack([lo.min(1).values, hi.max(1).values], 1).contiguous()
        for p in range(passes):
            search[grid](scores, temp, top, budget, state, above, p, rows, vocab, scores.stride(0), seg,
                         S=segments, SHIFT=shift, C=CANDIDATES, **common)
        draw_[grid](scores, temp, budget, state, above, seed, best, where, thresholds, passes, rows, vocab,
                    scores.stride(0), seg, S=segments, SHIFT=shift, C=CANDIDATES, **common)
    picks = where.gather(1, best.argmax(1, keepdim=True)).squeeze(1)
    return picks, thresholds


def draw(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, value_bits: int = 32) -> torch.Tensor:
    """A token per row from softmax(scores / temperature) renormalised over the row's nucleus (top_p; 1 keeps
    every finite token). `scores`: float32, bfloat16 or float16 [rows, vocab]; `value_bits` 16 (or 11) when float32
    scores hold bfloat16 (float16) values: the search then skips the bits they leave at zero. Temperatures must be
    > 0 (greedy rows are the caller's)."""
    return _launch(scores, temperature, top_p, value_bits)[0]


def kept(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, value_bits: int = 32) -> torch.Tensor:
    """The nucleus the kernel keeps, as a bool mask [rows, vocab] (tests compare it with the sorted rule)."""
    thresholds = _launch(scores, temperature, top_p, value_bits)[1]
    bits = scores.float().view(torch.int32)
    keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> _shift(scores, value_bits)).long()
    return keys >= thresholds.unsqueeze(1)
