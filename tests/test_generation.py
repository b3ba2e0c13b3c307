"""sitlib.generation's pool: greedy outputs equal transformers' generate, the header block applies, a row that
stops leaves the pool (and changes no other row), per-row sampling settings, memory sizing."""
from __future__ import annotations

import pytest
import torch

from sitlib import generation as G, models


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = "<|endoftext|>", "left"   # pad distinct from EOS, as sitlib.models does
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tok


def _prompts(n=10, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(2, 24, (n,), generator=g)]


@pytest.fixture(params=[False, True], ids=["eager", "static"])
def decode(request, monkeypatch):
    """Both decode steps of the pool: the live window eagerly, and the static shapes (rows and columns rounded
    up to buckets, a 4-D mask, K/V written at a device-side column) that CUDA graphs replay on a GPU."""
    monkeypatch.setattr(G, "STATIC_DECODE", request.param)
    return request.param


class _Quiet:
    def update(self, n):
        pass


def test_pool_is_used_for_plain_decoders(lm):
    assert G.pool_supported(lm[0])


@pytest.mark.parametrize("rows", [3, 10])
def test_greedy_equals_transformers_generate(decode, lm, rows):
    model, tok = lm
    inputs = _prompts()
    s = G.Sampling.greedy(20)
    ours = G.generate(model, tok, inputs, s, batch_size=rows)
    ref = G._generate_hf_batches(model, tok, inputs, [s] * len(inputs), 4, None, _Quiet())
    assert [(c.text, c.n_tokens, c.ended) for c in ours] == [(c.text, c.n_tokens, c.ended) for c in ref]
    with torch.no_grad():   # and against plain model.generate on each prompt alone, token by token
        for p, c in zip(inputs[:4], ours):
            out = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=G.eos_ids(model, tok))[0, len(p):]
            toks = out.tolist()
            n = next((j for j, t in enumerate(toks) if t in G.eos_ids(model, tok)), len(toks))
            assert c.n_tokens == n and c.text == tok.decode(toks[:n], skip_special_tokens=True).strip()


class _StopAfter:
    """Forces EOS once a row has `n` generated tokens, for rows whose prompt starts with `marker`."""

    def __init__(self, eos: int, n: int, marker: int):
        self.eos, self.n, self.marker, self.prompt_len = eos, n, marker, 0

    def __call__(self, input_ids, scores):
        pl = self.prompt_len
        pl = pl if isinstance(pl, torch.Tensor) else torch.full((len(input_ids),), pl)
        gen = input_ids.shape[1] - pl
        first = input_ids.gather(1, ((input_ids != 0).long().argmax(1)).unsqueeze(1)).squeeze(1)
        hit = (gen >= self.n) & (first == self.marker)
        scores[hit] = float("-inf")
        scores[hit, self.eos] = 0.0
        return scores


def test_rows_that_stop_leave_the_pool(lm, monkeypatch):
    model, tok = lm
    inputs = _prompts(8)
    for p in inputs[:4]:
        p[0] = 7                      # these four stop after 3 tokens
    for p in inputs[4:]:
        p[0] = 9
    batch_sizes = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: batch_sizes.append(k["input_ids"].shape[0])
                        or real_forward(*a, **k))
    stop = _StopAfter(tok.eos_token_id, 3, marker=7)
    out = G.generate(model, tok, inputs, G.Sampling.greedy(16), batch_size=8, logits_processors=[stop])
    assert [c.n_tokens for c in out[:4]] == [3] * 4 and all(c.ended for c in out[:4])
    assert batch_sizes[0] == 8 and 4 in batch_sizes     # the four short rows left after their EOS
    assert len([b for b in batch_sizes if b == 8]) == 4  # prefill + 3 steps (the 4th pick is their EOS)
    monkeypatch.undo()
    for p, c in zip(inputs[4:], out[4:]):               # the long rows are what they are alone
        alone = G.generate(model, tok, [p], G.Sampling.greedy(16), batch_size=1, logits_processors=[stop])[0]
        assert (alone.text, alone.n_tokens) == (c.text, c.n_tokens)


def test_refill_keeps_outputs(decode, lm):
    """With 2 slots for 9 prompts, finished rows hand their slot to waiting prompts: outputs are unchanged."""
    model, tok = lm
    inputs = _prompts(9, seed=3)
    s = G.Sampling.greedy(12)
    small = G.generate(model, tok, inputs, s, batch_size=2)
    whole = G.generate(model, tok, inputs, s, batch_size=9)
    assert [(c.text, c.n_tokens) for c in small] == [(c.text, c.n_tokens) for c in whole]


def test_header_block_applied(decode, lm):
    """Banned tokens never open a generation: with every prompt's greedy first token banned, the pool picks the
    best allowed one (one token, so the check is exact)."""
    model, tok = lm
    inputs = _prompts(6, seed=5)
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([p])).logits[0, -1] for p in inputs]
    banned = sorted({int(x.argmax()) for x in logits})
    blank = torch.zeros(len(tok), dtype=torch.bool)
    block = G.BlockFirstTokens(banned, blank)
    out = G.generate(model, tok, inputs, G.Sampling.greedy(1), batch_size=3, logits_processors=[block])
    for x, c in zip(logits, out):
        x = x.clone()
        x[banned] = float("-inf")
        assert c.text == tok.decode([int(x.argmax())], skip_special_tokens=True).strip()


def test_markdown_header_block_on_sampling(lm):
    model, tok = lm
    block = G.BlockFirstTokens.markdown_headers(tok)
    torch.manual_seed(0)
    out = G.generate(model, tok, _prompts(12, seed=2), G.Sampling(6, temperature=2.0, top_p=1.0), 4,
                     logits_processors=[block])
    assert all(not c.text.lstrip().startswith("#") for c in out)


def test_per_row_sampling_settings(decode, lm):
    """One call with several settings: greedy rows equal a greedy-only call; each row keeps its own limit."""
    model, tok = lm
    inputs = _prompts(6, seed=7)
    settings = [G.Sampling.greedy(5), G.Sampling(9, temperature=1.2, top_p=0.9)] * 3
    torch.manual_seed(0)
    mixed = G.generate(model, tok, inputs, settings, batch_size=4)
    greedy = G.generate(model, tok, inputs[0::2], G.Sampling.greedy(5), batch_size=4)
    assert [(c.text, c.n_tokens) for c in mixed[0::2]] == [(c.text, c.n_tokens) for c in greedy]
    assert all(c.n_tokens <= 9 for c in mixed[1::2]) and all(c.n_tokens <= 5 for c in mixed[0::2])


def test_top_p_keeps_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    picks = {int(G._choose(scores, torch.tensor([1.0]), torch.tensor([0.7]), torch.tensor([True])))
             for _ in range(200)}
    assert picks == {0, 1}


def test_rows_that_fit_scales_with_kv_size(lm):
    model, _ = lm
    cfg = model.config
    assert G.kv_bytes_per_token(model) == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * \
        (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert G.rows_that_fit(model, 100, limit=37) == 37   # no GPU: the caller's limit


def test_prompt_tuning_falls_back_to_generate(lm):
    from peft import PromptTuningConfig, get_peft_model

    model, tok = lm
    pt = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not G.pool_supported(pt)
    out = G.generate(pt, tok, _prompts(3), G.Sampling.greedy(5), batch_size=2)
    assert len(out) == 3 and all(c.n_tokens <= 5 for c in out)
    pt.unload() if hasattr(pt, "unload") else None


def test_prefix_tuning_is_refused_in_one_line(lm):
    from peft import PrefixTuningConfig, get_peft_model

    from sitlib.errors import ConfigError

    model, tok = lm
    pt = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    try:
        with pytest.raises(ConfigError, match="PREFIX_TUNING model is not supported"):
            G.generate(pt, tok, _prompts(2), G.Sampling.greedy(3), batch_size=2)
    finally:
        pt.unload() if hasattr(pt, "unload") else None


def test_window_shift_keeps_outputs(decode, lm, monkeypatch):
    """Rows with different limits finish at different steps, so waiting prompts join mid-flight and the live
    window slides right; with buffers only as wide as the longest row it is moved back to the left edge many
    times. Every row's output is what it is with all rows in flight at once."""
    model, tok = lm
    inputs = _prompts(12, seed=4)
    settings = [G.Sampling.greedy(n) for n in (3, 12, 7, 5, 11, 2, 9, 4, 12, 6, 8, 10)]
    whole = G.generate(model, tok, inputs, settings, batch_size=12)
    shifts = []
    real_shift = G._Pool._shift
    monkeypatch.setattr(G, "pool_columns", lambda i, p: max(map(len, i)) + max(x.max_new_tokens for x in p) + 1)
    monkeypatch.setattr(G._Pool, "_shift", lambda self: shifts.append(self.start) or real_shift(self))
    tight = G.generate(model, tok, inputs, settings, batch_size=4)   # refills once 2 of 4 rows are free
    assert any(start > 0 for start in shifts)
    assert [(c.text, c.n_tokens) for c in tight] == [(c.text, c.n_tokens) for c in whole]


def test_static_step_buckets_rows_and_columns(lm, monkeypatch):
    """The static step runs at bucketed shapes (rows past the live ones are idle slots, columns past the live
    window are masked); a row's output is what it is alone, while rows of other lengths and limits come and go."""
    model, tok = lm
    monkeypatch.setattr(G, "STATIC_DECODE", True)
    inputs = _prompts(20, seed=7)
    settings = [G.Sampling.greedy(2 + (7 * i) % 13) for i in range(len(inputs))]
    shapes = []
    real = G._Pool._static_forward
    monkeypatch.setattr(G._Pool, "_static_forward",
                        lambda self, rows, width: shapes.append((self.size, rows, width)) or real(self, rows, width))
    pooled = G.generate(model, tok, inputs, settings, batch_size=16)
    assert any(rows > size for size, rows, _ in shapes)          # idle slots ran with the live rows
    assert len({width for _, _, width in shapes}) > 1             # the attended columns grew by buckets
    monkeypatch.setattr(G, "STATIC_DECODE", False)
    for p, s, c in zip(inputs, settings, pooled):
        alone = G.generate(model, tok, [p], s, batch_size=1)[0]
        assert (alone.text, alone.n_tokens, alone.ended) == (c.text, c.n_tokens, c.ended)


@pytest.mark.parametrize("key_dtype, top_k_first", [(None, 0), (torch.bfloat16, 0), (None, 2), (None, 3)])
@pytest.mark.parametrize("top_p, expected", [(1.0, [0.5, 0.3, 0.15, 0.05]), (0.7, [0.625, 0.375, 0.0, 0.0]),
                                             (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])])
def test_sampling_follows_the_distribution(top_p, expected, key_dtype, top_k_first):
    """Draws follow softmax(scores) renormalised over the nucleus: 20,000 rows at once, each frequency within
    0.015 of its probability (about 4.5 standard errors at p = 0.5); the vocabulary shuffled per row, so the
    sorted order must map back to the right ids; with 16-bit sort keys (the model's dtype), and with the nucleus
    looked for in the top k first (rows whose nucleus reaches further fall back to the full sort)."""
    n = 20_000
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    scores = base[perm]   # column j of row r scores as probability index perm[r, j]
    torch.manual_seed(1)
    cols = G._choose(scores, torch.ones(n), torch.full((n,), top_p), torch.ones(n, dtype=torch.bool),
                     key_dtype=key_dtype, top_k_first=top_k_first)   # top 2 holds 0.8, top 3 0.95: both paths
    picks = perm.gather(1, cols.unsqueeze(1)).squeeze(1)   # which probability each drawn column had
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor(expected), atol=0.015), freq.tolist()


def test_temperature_sharpens_the_distribution():
    n = 20_000
    scores = torch.log(torch.tensor([[0.6, 0.4]])).repeat(n, 1)
    torch.manual_seed(2)
    picks = G._choose(scores, torch.full((n,), 0.5), torch.ones(n), torch.ones(n, dtype=torch.bool))
    share = float((picks == 0).float().mean())   # 0.6^2 / (0.6^2 + 0.4^2) = 0.692
    assert abs(share - 0.36 / 0.52) < 0.015, share


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_cuda_graphs_equal_the_eager_window(lm, lora):
    """On a GPU the pool replays captured graphs at bucketed shapes: greedy rows (rows leaving, prompts joining)
    equal the eager live-window step, for a plain model and a LoRA adapter (random B, so the adapter matters)."""
    import copy

    model, tok = lm
    gpu = copy.deepcopy(model).cuda()
    if lora:
        from peft import LoraConfig, get_peft_model

        gpu = get_peft_model(gpu, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False)).eval()
    inputs = _prompts(14, seed=8)
    settings = [G.Sampling.greedy(3 + (5 * i) % 17) for i in range(len(inputs))]
    runs = {}
    for static in (True, False):
        G.STATIC_DECODE = static
        try:
            runs[static] = G.generate(gpu, tok, inputs, settings, batch_size=6)
        finally:
            G.STATIC_DECODE = None
    assert [(c.text, c.n_tokens) for c in runs[True]] == [(c.text, c.n_tokens) for c in runs[False]]


def test_quantized_models_keep_the_eager_step(lm, monkeypatch):
    """bitsandbytes-quantized weights were never measured under CUDA graphs: on CUDA they keep the eager step,
    other models get the static (graph) step; on CPU every model decodes eagerly unless forced."""
    model, tok = lm
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert G.static_by_default(model, cuda) and not G.static_by_default(model, cpu)
    monkeypatch.setattr(model.config, "quantization_config", {"load_in_4bit": True}, raising=False)
    assert G.quantized(model) and not G.static_by_default(model, cuda)
    monkeypatch.setattr(G, "STATIC_DECODE", True)   # forcing it still works
    assert G._Pool(model, tok, [tok.eos_token_id], 2, 8, None).static is True


def test_static_step_with_eager_attention(tiny_model_dir, monkeypatch):
    """The static step's 4-D mask is additive, so eager attention (which adds the mask to the scores) masks the
    padding as SDPA does: outputs equal the eager live window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = "<|endoftext|>", "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    inputs = _prompts(8, seed=9)
    settings = [G.Sampling.greedy(4 + i) for i in range(len(inputs))]
    runs = {}
    for static in (True, False):
        monkeypatch.setattr(G, "STATIC_DECODE", static)
        runs[static] = G.generate(model, tok, inputs, settings, batch_size=5)
    assert [(c.text, c.n_tokens) for c in runs[True]] == [(c.text, c.n_tokens) for c in runs[False]]


def test_static_default_needs_an_additive_mask(lm, monkeypatch):
    model, _ = lm
    cuda = torch.device("cuda")
    for attn, expected in (("sdpa", True), ("eager", True), ("sit_varlen", True), ("flash_attention_2", False),
                           ("flex_attention", False)):
        monkeypatch.setattr(model.config, "_attn_implementation", attn)
        assert G.static_by_default(model, cuda) is expected, attn


def test_top_p_with_temperature():
    """The nucleus is taken after temperature, as transformers does: at T = 0.5, probabilities (0.5, 0.3, 0.15,
    0.05) become (0.67, 0.24, 0.06, 0.007), so top-p 0.8 keeps two tokens, drawn 0.74 / 0.26."""
    n = 20_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = torch.log(p).repeat(n, 1)
    torch.manual_seed(4)
    picks = G._choose(scores, torch.full((n,), 0.5), torch.full((n,), 0.8), torch.ones(n, dtype=torch.bool))
    sharp = p ** 2 / (p ** 2).sum()
    kept = sharp[:2] / sharp[:2].sum()
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, torch.cat([kept, torch.zeros(2)]), atol=0.015), freq.tolist()


def test_sixteen_bit_keys_keep_the_order_of_16_bit_scores():
    """Scores that are bf16 values (what a bf16 model gives) sort the same with bf16 keys: with a nucleus of one
    token, every row draws its argmax, over a vocabulary of 5,000 with near-ties at bf16 resolution."""
    g = torch.Generator().manual_seed(5)
    scores = (torch.randn(256, 5000, generator=g) * 0.05).to(torch.bfloat16).float()
    rows = [r for r in range(256) if (scores[r] == scores[r].max()).sum() == 1]   # rows without a tie at the top
    scores = scores[rows]
    n = len(scores)
    picks = G._choose(scores, torch.ones(n), torch.full((n,), 1e-6), torch.ones(n, dtype=torch.bool),
                      key_dtype=torch.bfloat16)
    assert n > 100 and torch.equal(picks, scores.argmax(-1))


def test_top_k_first_mixes_rows_that_fit_and_rows_that_do_not():
    """One call, rows of two kinds: a peaked row whose nucleus lies in the top 2, and a flat row whose nucleus
    needs the whole vocabulary (its fallback); greedy rows stay greedy. Each kind keeps its own distribution."""
    n = 12_000
    peaked = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    flat = torch.log(torch.tensor([0.3, 0.25, 0.25, 0.2]))
    scores = torch.stack([peaked, flat, peaked]).repeat(n, 1)
    sample = torch.tensor([True, True, False]).repeat(n)
    torch.manual_seed(6)
    picks = G._choose(scores, torch.ones(3 * n), torch.full((3 * n,), 0.85), sample, top_k_first=2)
    freq = lambda x: (torch.bincount(x, minlength=4).float() / len(x))
    assert torch.allclose(freq(picks[0::3]), torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.015)
    assert torch.allclose(freq(picks[1::3]), torch.tensor([0.3, 0.25, 0.25, 0.2]) / 1.0, atol=0.015)
    assert torch.equal(picks[2::3], torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("steps,keeps_top_k", [(["peaked"] * 3, True), (["flat"] * 3, False),
                                               (["flat", "flat", "peaked", "flat", "flat"], True)])
def test_the_pool_sorts_whole_after_a_run_of_flat_steps(lm, steps, keeps_top_k):
    """Looking among the top k first pays only where nuclei are small: after `sort_whole_after` steps in a row in
    which most sampled rows reach past the top k (flat logits), the call sorts whole; peaked logits, or flat steps
    broken by a peaked one, keep the top-k path. Picks stay inside a peaked row's nucleus either way."""
    model, tok = lm
    s = G.Sampling(4, 1.0, 0.9)
    inputs = _prompts(6, seed=2)
    with torch.inference_mode():
        pool = G._Pool(model, tok, G.eos_ids(model, tok), 6, G.pool_columns(inputs, [s]), [], [s] * 6)
        pool.admit([(i, p, s) for i, p in enumerate(sorted(inputs, key=len, reverse=True))])
        pool.top_k_first, pool.sort_whole_after = 4, 3   # of the tiny model's vocabulary
        ids = pool.ids[:6, pool.start:pool.end]
        for kind in steps:
            logits = torch.zeros(6, model.config.vocab_size)
            if kind == "peaked":
                logits[:, :3] = 20.0
            picks = pool._pick(logits, ids, slice(0, 6))
            assert kind == "flat" or bool((picks < 3).all())
    assert (pool.top_k_first == 4) is keeps_top_k


def test_the_pool_keeps_the_top_k_path_on_a_cpu(lm):
    model, tok = lm
    s = G.Sampling(4, 1.0, 0.9)
    pool = G._Pool(model, tok, G.eos_ids(model, tok), 2, 40, [], [s] * 2)
    assert pool.top_k_first == 256 and pool.sort_whole_after is None


def test_the_padded_batch_fallback_is_capped_by_memory_too(lm, monkeypatch):
    """Models the pool cannot drive (prompt tuning) decode in padded batches of at most what fits, whatever
    batch_size says."""
    model, tok = lm
    seen = []
    monkeypatch.setattr(G, "pool_supported", lambda m: False)
    monkeypatch.setattr(G, "rows_that_fit", lambda m, row_tokens, limit=1024, memory_fraction=0.7: 3)
    real = G._generate_hf_batches
    monkeypatch.setattr(G, "_generate_hf_batches",
                        lambda m, t, i, p, batch, *a: seen.append(batch) or real(m, t, i, p, batch, *a))
    out = G.generate(model, tok, _prompts(5), G.Sampling.greedy(3), batch_size=256)
    assert seen == [3] and len(out) == 5


@pytest.mark.parametrize("per_row", [False, True], ids=["int", "per-row"])
def test_repetition_penalty_counts_only_generated_tokens(per_row):
    """Scores of tokens the row generated are divided (positive) or multiplied (negative) by the penalty, once
    however often they occur; a token seen only in the prompt keeps its score (a keyword the instruction asks for)."""
    ids = torch.tensor([[1, 2, 3, 3, 4], [2, 2, 1, 1, 1]])
    prompt_len = torch.tensor([2, 2]) if per_row else 2
    scores = torch.tensor([[2.0, -2.0, 4.0, -1.0, 3.0, 5.0], [2.0, -2.0, 4.0, -1.0, 3.0, 5.0]])
    out = G.RepetitionPenalty(2.0, prompt_len)(ids, scores.clone())
    assert out[0].tolist() == [2.0, -2.0, 4.0, -2.0, 1.5, 5.0]   # 3 and 4 generated; 1, 2 only in the prompt
    assert out[1].tolist() == [2.0, -4.0, 4.0, -1.0, 3.0, 5.0]   # 1 generated three times: penalised once


def test_repetition_penalty_per_row_prompt_lengths():
    ids = torch.tensor([[1, 2, 3], [1, 2, 3]])
    out = G.RepetitionPenalty(2.0, torch.tensor([1, 3]))(ids, torch.ones(2, 4))
    assert out.tolist() == [[1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]]


def _greedy_with_penalty(model, prompt, n, penalty, eos):
    """Reference: one prompt alone, no cache, the penalty applied by hand to the tokens generated so far."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for t in set(new):
                x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
            t = int(x.argmax())
            if t in eos:
                break
            new.append(t)
            ids.append(t)
    return new


def test_repetition_penalty_in_both_generation_paths(decode, lm):
    """The pool and transformers' generate (prompt tuning's path) apply the same penalty, equal to a by-hand
    greedy loop, and it changes what the tiny model repeats."""
    model, tok = lm
    inputs = _prompts(6, seed=11)
    s = G.Sampling.greedy(16)
    pen = G.penalty_processors(1.8)
    ours = G.generate(model, tok, inputs, s, batch_size=3, logits_processors=pen)
    ref = G._generate_hf_batches(model, tok, inputs, [s] * len(inputs), 4, pen, _Quiet())
    assert [(c.text, c.n_tokens) for c in ours] == [(c.text, c.n_tokens) for c in ref]
    eos = set(G.eos_ids(model, tok))
    for p, c in zip(inputs[:3], ours):
        assert c.text == tok.decode(_greedy_with_penalty(model, p, 16, 1.8, eos), skip_special_tokens=True).strip()
    plain = G.generate(model, tok, inputs, s, batch_size=3)
    assert [c.text for c in plain] != [c.text for c in ours]
    assert G.penalty_processors(1.0) == [] and G.penalty_processors(None) == []


def test_pool_fuses_layers_only_where_it_captures_graphs(lm, monkeypatch):
    """Liger's layer kernels go into the pool's prefills and captured steps only: static CUDA pools whose graphs
    are on, with FUSED_LAYERS set; eager steps (CPU, the eager window, graphs off after a failed capture) stay stock."""
    model, tok = lm
    monkeypatch.setattr(G, "fused_layers", lambda m: "fused")
    pool = G._Pool(model, tok, [2], 4, 32, [], [])
    pool.static = True
    assert pool._fused() != "fused"            # a CPU pool
    pool.device = torch.device("cuda")
    assert pool._fused() == "fused"
    pool.graphs = None
    assert pool._fused() != "fused"
    pool.graphs, pool.static = {}, False
    assert pool._fused() != "fused"
    pool.static = True
    monkeypatch.setattr(G, "FUSED_LAYERS", False)
    assert pool._fused() != "fused"


@pytest.mark.skipif(not (torch.cuda.is_available() and models.liger_available()),
                    reason="Liger's kernels need a CUDA GPU and liger_kernel")
def test_captured_steps_replay_the_fused_layers(lm):
    """The pool's prefill and its first step at a shape (warm-up and capture) run inside fused_layers; the graph
    replays what the static step computes with Liger's layer kernels on, bit for bit; and the model is stock again
    outside them."""
    import copy

    model, tok = lm
    gpu = copy.deepcopy(model).to(torch.bfloat16).cuda()
    inputs = _prompts(6, seed=4)
    s = G.Sampling.greedy(8)
    entered = []

    def spy(m):
        entered.append(m)
        return models.fused_layers(m)

    with torch.inference_mode():
        pool = G._Pool(gpu, tok, G.eos_ids(gpu, tok), 8, G.pool_columns(inputs, [s]), [], [s])
        G.fused_layers = spy
        try:
            pool.admit([(i, p, s) for i, p in enumerate(inputs)])
            assert entered == [gpu]
            col = pool.end
            pool.step()   # the first step at its shape: warm-up and capture
            assert entered == [gpu, gpu]
            pool.step()   # a replay, if the bucket holds
        finally:
            G.fused_layers = models.fused_layers
        assert "forward" not in vars(gpu.model.norm) and "forward" not in vars(gpu.model.layers[0].mlp)
        rows, width = pool._bucket(col)
        assert pool.graphs and (rows, width) in pool.graphs
        pool.col.fill_(col)
        pool.graphs[(rows, width)].replay()
        replayed = pool.logits[:rows].clone()
        with models.fused_layers(gpu) as on:
            assert on
            fused = pool._static_forward(rows, width)
        stock = pool._static_forward(rows, width)
    assert torch.equal(replayed, fused) and not torch.equal(stock, fused)
    assert (stock.float() - fused.float()).abs().max() <= 0.05 * fused.float().abs().max()   # bf16 rounding
