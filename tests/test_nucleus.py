"""sitlib.nucleus: the Triton top-p sampler keeps exactly the nucleus of the sorted rule and draws from it (GPU)."""
import pytest
import torch

from sitlib import generation as G
from sitlib import nucleus

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and nucleus.available(torch.device("cuda"))),
                         reason="the nucleus kernel runs on CUDA cards with Triton")


def strict_mass_above(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per token, the probability mass (float64) of the tokens with a strictly larger score."""
    out = torch.empty_like(scores, dtype=torch.float64)
    for r, row in enumerate(scores):
        p = torch.softmax(row.double() / temperature, 0)
        values, inverse = torch.unique(row, return_inverse=True)   # ascending
        mass = torch.zeros(len(values), dtype=torch.float64, device=row.device).index_add_(0, inverse, p)
        above = mass.flip(0).cumsum(0).flip(0) - mass   # of the values strictly greater
        out[r] = above[inverse]
    return out


@gpu
@pytest.mark.parametrize("vocab, scale, bits", [(128_256, 1.0, 32), (49_152, 6.0, 32), (128_256, 1.0, 16),
                                                (5_000, 0.05, 16), (49_152, 3.0, 16), (5_000, 0.05, "bf16"),
                                                (128_256, 1.0, "bf16")])
@pytest.mark.parametrize("top_p, temperature", [(0.95, 1.0), (0.5, 0.7), (1.0, 1.0), (1e-6, 1.0)])
def test_kept_tokens_are_the_nucleus(vocab, scale, bits, top_p, temperature):
    """A token is kept iff the mass strictly above it is <= top_p (transformers' rule; ties at the boundary all
    kept): float32 rows, and bf16 values (many ties) searched on 16 bits. Only tokens whose mass above lies within
    float32 summation error of top_p may differ."""
    g = torch.Generator(device="cuda").manual_seed(vocab + int(100 * top_p))
    scores = torch.randn(24, vocab, device="cuda", generator=g) * scale
    if bits == 16:   # bf16 values held in float32
        scores = scores.bfloat16().float()
    elif bits == "bf16":   # the model's own logits
        scores = scores.bfloat16()
    scores[:, :50] = float("-inf")   # banned tokens (the header block)
    t = torch.full((24,), temperature, device="cuda")
    kept = nucleus.kept(scores, t, torch.full((24,), top_p, device="cuda"), 32 if bits == "bf16" else bits)
    above = strict_mass_above(scores, temperature)
    expected = above <= top_p
    differs = kept != expected
    assert bool((above[differs] - top_p).abs().lt(1e-4).all()), int(differs.sum())
    assert bool(kept.any(1).all()) and (top_p == 1.0 or not bool(kept[:, :50].any()))
    if top_p < 1:   # the nucleus is a real cut, not the whole row
        assert int(kept.sum()) < int((scores > float("-inf")).sum())


@gpu
@pytest.mark.parametrize("top_p, temperature, expected", [
    (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]), (0.7, 1.0, [0.625, 0.375, 0.0, 0.0]),
    (0.9, 1.0, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
    (0.8, 0.5, [0.25 / 0.34, 0.09 / 0.34, 0.0, 0.0])])
def test_draws_follow_the_nucleus(top_p, temperature, expected):
    """Through the pool's `_choose` on CUDA: softmax(scores / T) renormalised over the nucleus, 20,000 rows, each
    row's vocabulary shuffled (the pick must be the right id), each frequency within 0.015."""
    n = 20_000
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    scores = base[perm].cuda()
    torch.manual_seed(1)
    cols = G._choose(scores, torch.full((n,), temperature, device="cuda"), torch.full((n,), top_p, device="cuda"),
                     torch.ones(n, dtype=torch.bool, device="cuda"))
    picks = perm.gather(1, cols.cpu().unsqueeze(1)).squeeze(1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor(expected), atol=0.015), freq.tolist()


@gpu
def test_draws_across_segments_with_settings_per_row():
    """A 40,000-entry vocabulary (8 programs per row) whose likely tokens lie in different segments, the likeliest
    in the last: the segments' draws combine into the right frequencies. Rows differ: top-p 0.85 at T = 1, top-p 1
    at T = 0.5, and greedy rows at temperature 0 (argmax)."""
    n, vocab = 4_000, 40_000
    ids = torch.tensor([39_990, 25_001, 12_345, 100, 30_000, 5])
    p = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.07, 0.03])
    scores = torch.full((n, vocab), -40.0)
    scores[:, ids] = p.log()
    kind = torch.arange(n) % 5   # 0, 2: top-p 0.85; 1, 3: top-p 1 at T 0.5; 4: greedy
    top_p = torch.where(kind % 2 == 1, 1.0, 0.85)
    temp = torch.where(kind == 4, 0.0, torch.where(kind % 2 == 1, 0.5, 1.0))
    torch.manual_seed(5)
    picks = G._choose(scores.cuda(), temp.cuda(), top_p.cuda(), (kind != 4).cuda()).cpu()
    freq = lambda rows: torch.stack([(picks[rows] == i).float().mean() for i in ids])
    nucleus_p = torch.cat([p[:4] / p[:4].sum(), torch.zeros(2)])
    sharp = p ** 2 / (p ** 2).sum()
    assert torch.allclose(freq((kind % 2 == 0) & (kind != 4)), nucleus_p, atol=0.03)
    assert torch.allclose(freq(kind % 2 == 1), sharp, atol=0.03)
    assert bool((picks[kind == 4] == ids[0]).all())


@gpu
def test_large_vocabulary_draws_cover_the_nucleus_and_repeat_under_a_seed():
    """Flat rows of 128k: draws spread over the nucleus (not one token per row), stay inside it, greedy rows stay
    argmax, and torch.manual_seed repeats the draws."""
    n, vocab = 512, 128_256
    g = torch.Generator(device="cuda").manual_seed(7)
    scores = torch.randn(1, vocab, device="cuda", generator=g).repeat(n, 1)
    sample = torch.ones(n, dtype=torch.bool, device="cuda")
    sample[::4] = False
    ones, top_p = torch.ones(n, device="cuda"), torch.full((n,), 0.5, device="cuda")
    torch.manual_seed(11)
    a = G._choose(scores, ones, top_p, sample)
    torch.manual_seed(11)
    b = G._choose(scores, ones, top_p, sample)
    assert torch.equal(a, b)
    assert torch.equal(a[~sample], scores[~sample].argmax(-1))
    nucleus_mask = strict_mass_above(scores[:1], 1.0)[0] <= 0.5
    drawn = a[sample]
    assert bool(nucleus_mask[drawn].all()) and len(set(drawn.tolist())) > 0.9 * len(drawn)


@gpu
def test_rejects_scores_it_cannot_read():
    """Integer scores, and rows whose vocabulary is strided, are one clear error, not a wrong draw."""
    ones = torch.ones(2, device="cuda")
    with pytest.raises(ValueError, match="float scores"):
        nucleus.draw(torch.zeros(2, 8, device="cuda", dtype=torch.long), ones, ones)
    with pytest.raises(ValueError, match="contiguous"):
        nucleus.draw(torch.zeros(8, 2, device="cuda").t(), ones, ones)


@gpu
def test_pool_draws_through_the_kernel_under_the_header_block(tiny_model_dir):
    """A bf16 model's pool samples top-p through the kernel, searching 16-bit keys (the header block only sets
    -inf): no sampled generation opens with a banned token (each prompt's 8 likeliest first tokens, all banned)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = "<|endoftext|>", "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator().manual_seed(12)
    inputs = [torch.randint(3, 300, (int(k),), generator=g).tolist() for k in torch.randint(2, 24, (64,), generator=g)]
    with torch.no_grad():
        first = [model(input_ids=torch.tensor([p], device="cuda")).logits[0, -1].float().topk(8).indices
                 for p in inputs]
    banned = sorted({int(i) for ids in first for i in ids})
    block = G.BlockFirstTokens(banned, torch.zeros(len(tok), dtype=torch.bool))
    seen: list = []
    real = nucleus.draw

    def spy(scores, temperature, top_p, bits):
        picks = real(scores, temperature, top_p, bits)
        seen.append(((scores.dtype, bits), picks.tolist()))
        return picks

    try:
        nucleus.draw = spy
        torch.manual_seed(0)   # one new token: every draw picks a generation's first token
        out = G.generate(model, tok, inputs, G.Sampling(1, temperature=1.5, top_p=0.95), 16,
                         logits_processors=[block])
    finally:
        nucleus.draw = real
    assert {how for how, _ in seen} == {(torch.float32, 16)} and all(c.n_tokens == 1 for c in out)
    picks = [i for _, ids in seen for i in ids]
    assert len(picks) == len(inputs) and not set(picks) & set(banned)
