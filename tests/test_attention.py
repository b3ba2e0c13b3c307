"""sit_varlen: packed rows never attend across row boundaries, and padding-free SFT matches the padded path."""
from __future__ import annotations

import pytest
import torch

from sitlib import attention


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    attention.register()
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sit_varlen").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return varlen, sdpa


def _rows():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g) for n in (7, 11, 5)]


def _packed(rows):
    ids = torch.cat(rows).unsqueeze(0)
    pos = torch.cat([torch.arange(len(r)) for r in rows]).unsqueeze(0)
    cu = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).to(torch.int32)
    m = max(len(r) for r in rows)
    return ids, pos, dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)


@torch.no_grad()
@pytest.mark.parametrize("with_cu", [True, False], ids=["collator-kwargs", "positions-only"])
def test_packed_row_equals_row_alone(models, with_cu):
    varlen, _ = models
    rows = _rows()
    ids, pos, kw = _packed(rows)
    packed = varlen(input_ids=ids, position_ids=pos, **(kw if with_cu else {})).logits[0]
    start = 0
    for r in rows:
        alone = varlen(input_ids=r.unsqueeze(0)).logits[0]
        torch.testing.assert_close(packed[start:start + len(r)], alone, rtol=1e-4, atol=1e-4)
        start += len(r)


@torch.no_grad()
def test_cross_row_attention_would_be_visible(models):
    """The check above can fail: one causal attention over the whole packed row changes row B's output."""
    _, sdpa = models
    rows = _rows()
    ids, _, _ = _packed(rows)
    leaky = sdpa(input_ids=ids).logits[0, len(rows[0]):len(rows[0]) + len(rows[1])]
    alone = sdpa(input_ids=rows[1].unsqueeze(0)).logits[0]
    assert (leaky - alone).abs().max() > 1e-3


@torch.no_grad()
def test_padded_batch_matches_sdpa(models):
    """Padded batches (generation, evaluation) keep SDPA's masked path."""
    varlen, sdpa = models
    rows = _rows()
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    a = varlen(input_ids=ids, attention_mask=mask).logits
    b = sdpa(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()])


def _sft_losses(model_dir, tmp_path, attn: str, padding_free: bool) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 300, (int(n),), generator=g).tolist()}
            for n in torch.randint(8, 40, (8,), generator=g)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    conf = SFTConfig(output_dir=str(tmp_path / f"{attn}-{padding_free}"), per_device_train_batch_size=4,
                     max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                     bf16=False, gradient_checkpointing=False, padding_free=padding_free,
                     max_length=None if padding_free else 64,
                     dataloader_num_workers=0, seed=0, use_cpu=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tr = SFTTrainer(model=model, args=conf, train_dataset=Dataset.from_list(rows), processing_class=tok,
                    peft_config=lora)
    tr.train()
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def test_padding_free_sft_step_matches_padded(tiny_model_dir, tmp_path, monkeypatch):
    attention.register()
    padded = _sft_losses(tiny_model_dir, tmp_path, "sdpa", padding_free=False)
    calls = []   # the packed path really ran (not a silent fall-back to one causal attention)
    real = attention._per_row_sdpa
    monkeypatch.setattr(attention, "_per_row_sdpa", lambda *a: calls.append(a[3].numel() - 1) or real(*a))
    packed = _sft_losses(tiny_model_dir, tmp_path, "sit_varlen", padding_free=True)
    assert calls and all(n == 4 for n in calls)   # 4 rows per packed batch
    assert len(padded) == len(packed) == 2
    assert packed == pytest.approx(padded, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="FlashAttention-2 varlen needs a CUDA card of compute capability >= 8.0")
def test_varlen_kernel_matches_per_row_sdpa_on_cuda():
    """The CUDA kernel path (GQA 24/8 heads as Llama-3.2-3B) equals SDPA run row by row, forward and backward."""
    assert attention.varlen_kernel_available(torch.device("cuda"), torch.bfloat16)
    torch.manual_seed(0)
    lens = [300, 17, 1024, 5, 611]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    T = int(cu[-1])
    q = torch.randn(1, 24, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    module = torch.nn.Module().eval()
    fast, _ = attention.sit_varlen_attention(module, q, k, v, None, scaling=128 ** -0.5, cu_seq_lens_q=cu,
                                             cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    ref = attention._per_row_sdpa(q, k, v, cu, 0.0, 128 ** -0.5)
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_packed_rows_reach_the_varlen_kernel_as_views_so_no_gradient_is_copied(monkeypatch):
    """The kernel takes [T, H, D]; the model gives [1, H, T, D] views of [1, T, H, D] storage (projections and
    RoPE). Taking them by index would make autograd write each gradient into a zeroed tensor (SelectBackward):
    a fill and a strided copy per tensor and layer. The kernel here is per-row SDPA, so the values can be checked."""
    def kernel(q, k, v, cu, max_len, scaling):
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()   # what the projections laid out
        return attention._per_row_sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), cu, 0.0,
                                       scaling).squeeze(0)

    monkeypatch.setattr(attention, "varlen_kernel_available", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_varlen_kernel", kernel)
    g = torch.Generator().manual_seed(0)
    T, cu = 11, torch.tensor([0, 4, 11], dtype=torch.int32)
    q, k, v = (torch.randn(1, T, h, 8, generator=g, requires_grad=True) for h in (4, 4, 4))
    module = torch.nn.Module().eval()
    out, _ = attention.sit_varlen_attention(module, *(t.transpose(1, 2) for t in (q, k, v)), None,
                                            cu_seq_lens_q=cu, max_length_q=7)
    seen, todo = {}, [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = fn
            todo += [f for f, _ in fn.next_functions]
    nodes = {type(fn).__name__ for fn in seen.values()}
    assert "SelectBackward0" not in nodes and "TransposeBackward0" in nodes
    out.square().sum().backward()
    want = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = attention._per_row_sdpa(*(t.transpose(1, 2) for t in want), cu, 0.0, None)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, w in zip((q, k, v), want):
        torch.testing.assert_close(got.grad, w.grad)


@pytest.mark.parametrize("params, repeated, flag", [
    ({"scale", "window_size"}, False, None),            # torch 2.11: K/V heads go to the kernel as they are
    ({"scale", "is_causal"}, True, None),               # torch 2.10: repeated
    ({"scale", "window_size", "enable_gqa"}, False, True),   # torch >= 2.12: the flag
])
def test_kv_heads_reach_the_kernel_as_each_torch_takes_them(monkeypatch, params, repeated, flag):
    import torch.nn.attention.varlen as varlen

    seen = {}

    def fake_varlen_attn(q, k, v, *args, **kw):
        seen.update(k_heads=k.shape[1], v_heads=v.shape[1], **kw)
        return q

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset(params))
    q, k = torch.randn(10, 6, 4), torch.randn(10, 2, 4)
    for repeat_kv in (False, True):
        monkeypatch.setattr(attention, "REPEAT_KV", repeat_kv)
        seen.clear()
        attention._varlen_kernel(q, k, k, torch.tensor([0, 10], dtype=torch.int32), 10, None)
        want = 6 if (repeated or (repeat_kv and flag is None)) else 2
        assert seen["k_heads"] == seen["v_heads"] == want
        assert seen.get("enable_gqa") == flag
