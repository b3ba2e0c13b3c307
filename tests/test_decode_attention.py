"""sitlib.decode_attention: the Triton decode kernel equals SDPA on left-padded, strided, grouped K/V (GPU), the
pool's static step uses it on half-precision GPU models, and the model's attention setting is always restored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sitlib import decode_attention as DA
from sitlib import generation as G

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a GPU")


class _Model(torch.nn.Module):
    def __init__(self, attn="sdpa"):
        super().__init__()
        self.w = torch.nn.Linear(2, 2)
        self.config = type("C", (), {"_attn_implementation": attn})()


def test_active_changes_nothing_where_the_kernel_cannot_run():
    model = _Model()   # float32 on the CPU
    with DA.active(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_active_restores_the_setting_after_an_error(monkeypatch):
    monkeypatch.setattr(DA, "available", lambda device, dtype: True)
    for attn in ("sdpa", "sit_varlen"):
        model = _Model(attn)
        with pytest.raises(KeyError):
            with DA.active(model):
                assert model.config._attn_implementation == DA.NAME
                raise KeyError("inside")
        assert model.config._attn_implementation == attn
    model = _Model("eager")   # eager attention is left alone (it is what a user asked for)
    with DA.active(model):
        assert model.config._attn_implementation == "eager"


def test_calls_the_kernel_cannot_take_go_to_sdpa(monkeypatch):
    """Only a one-token step with a per-row [B, 1, 1, W] float mask, one dtype and a tile-sized head dim goes to the
    kernel (here as if it could run on this machine); anything else keeps transformers' SDPA path, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def case(rows=2, heads=4, kv=2, steps=1, dim=64, width=5, mask="rows", dtype=torch.float32):
        q = torch.randn(rows, heads, steps, dim)
        k, v = torch.randn(rows, kv, width, dim), torch.randn(rows, kv, width, dim)
        bias = {"rows": torch.zeros(rows, 1, 1, width), "one": torch.zeros(1, 1, 1, width), "none": None,
                "bool": torch.ones(rows, 1, 1, width, dtype=torch.bool)}[mask]
        return q.to(dtype), k, v, bias

    monkeypatch.setattr(DA, "available", lambda device, dtype: True)
    assert DA.fits(*case())
    for bad in (dict(steps=2), dict(mask="none"), dict(mask="one"), dict(mask="bool"), dict(dim=48),
                dict(heads=3), dict(dtype=torch.float16)):
        assert not DA.fits(*case(**bad)), bad
    monkeypatch.setattr(DA, "available", lambda device, dtype: False)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v, bias = case()
    bias[0, ..., :2] = torch.finfo(torch.float32).min
    ours, _ = DA.sit_decode_attention(module, q, k, v, bias)
    ref, _ = sdpa_attention_forward(module, q, k, v, bias)
    assert torch.equal(ours, ref)


def _reference(q, k, v, bias, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=bias.float(), scale=scale)
    return out.transpose(1, 2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,heads,kv_heads,dim,width,cols", [(5, 9, 3, 64, 70, 96), (7, 32, 8, 128, 200, 257),
                                                                 (3, 4, 4, 64, 64, 64), (2, 8, 1, 128, 1, 9),
                                                                 (3, 32, 1, 32, 50, 64), (2, 16, 4, 256, 130, 130)])
def test_kernel_equals_sdpa(dtype, rows, heads, kv_heads, dim, width, cols):
    """Keys and values are column slices of larger buffers (as the pool's); each row sees its own window of
    columns (left padding, and the bucket's columns past the step masked on the right; one row sees only the last
    column, one a single column in the middle), so whole blocks are skipped; widths not a multiple of the block."""
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(rows, heads, 1, dim, device=dev, dtype=dtype)
    kbuf = torch.randn(rows, kv_heads, cols, dim, device=dev, dtype=dtype)
    vbuf = torch.randn(rows, kv_heads, cols, dim, device=dev, dtype=dtype)
    k, v = kbuf[:, :, :width], vbuf[:, :, :width]
    start = torch.randint(0, width, (rows,), device=dev)
    start[0] = width - 1
    stop = start + 1 + ((width - start) * torch.rand(rows, device=dev)).long().clamp(max=width - 1 - start)
    stop[-1] = start[-1] + 1   # one row sees a single column in the middle
    cols_idx = torch.arange(width, device=dev)[None, :]
    hidden = (cols_idx < start[:, None]) | (cols_idx >= stop[:, None])
    bias = torch.zeros(rows, 1, 1, width, device=dev, dtype=dtype).masked_fill(hidden[:, None, None, :],
                                                                               torch.finfo(dtype).min)
    scale = dim ** -0.5
    assert DA.fits(q, k, v, bias)
    out = DA.decode(q, k, v, bias, scale)
    assert out.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(out.float(), _reference(q, k, v, bias, scale), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_the_pools_static_step_runs_the_kernel(tiny_model_dir, monkeypatch, lora):
    """A half-precision model on the GPU, plain or with a LoRA adapter (07 evaluates adapters): the graph pool's
    decode goes through the kernel, and greedy rows equal the same pool with SDPA on nearly every prompt (half
    precision rounding may flip a near-tie)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = "<|endoftext|>", "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).cuda().eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    calls = []
    real = DA.decode
    monkeypatch.setattr(DA, "decode", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(2, 24, (16,), generator=g)]
    runs = {}
    for kernel in (True, False):
        monkeypatch.setattr(G, "DECODE_KERNEL", kernel)
        runs[kernel] = G.generate(model, tok, inputs, G.Sampling.greedy(24), batch_size=6)
    assert calls, "the static step did not use the decode kernel"
    assert model.config._attn_implementation == "sdpa"
    same = sum(a.text == b.text for a, b in zip(runs[True], runs[False]))
    assert same >= len(inputs) - 2, same


def test_the_pools_static_step_hands_the_kernel_its_inputs(tiny_model_dir, monkeypatch):
    """On the CPU, as if the kernel could run (a reference stands in for it): the pool's static decode step goes
    through `sit_decode_attention`, `fits` accepts what the step passes (its masks, cache slices and query), and
    greedy rows equal the pool's SDPA step; prefill and the config stay as they were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token, tok.padding_side = "<|endoftext|>", "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    monkeypatch.setattr(DA, "available", lambda device, dtype: True)
    calls = []

    def reference(q, k, v, bias, scale):
        calls.append(q.shape[0])
        return _reference(q, k, v, bias, scale).to(q.dtype)

    monkeypatch.setattr(DA, "decode", reference)
    monkeypatch.setattr(G, "STATIC_DECODE", True)
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(2, 24, (9,), generator=g)]
    runs = {}
    for kernel in (True, False):
        monkeypatch.setattr(G, "DECODE_KERNEL", kernel)
        runs[kernel] = [(c.text, c.n_tokens) for c in G.generate(model, tok, inputs, G.Sampling.greedy(12),
                                                                  batch_size=4)]
    assert calls and runs[True] == runs[False]
    assert model.config._attn_implementation == "sdpa"
