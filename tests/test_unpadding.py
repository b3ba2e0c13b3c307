"""unpadding: padded training batches run padding-free with the outputs, losses and gradients of the padded path."""
from __future__ import annotations

import pytest
import torch

from sitlib import attention, unpadding


def _model(model_dir, attn: str):
    from transformers import AutoModelForCausalLM

    attention.register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)


def _batch(left: bool = False):
    g = torch.Generator().manual_seed(0)
    lens = [7, 12, 3, 9]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        span = slice(max(lens) - n, None) if left else slice(0, n)
        ids[i, span], mask[i, span] = torch.randint(3, 300, (n,), generator=g), 1
    return ids, mask


def _layer_inputs(model) -> list:
    """Shapes of the hidden states entering the first decoder layer, call by call."""
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args, kw: seen.append(tuple(
        (args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    return seen


@pytest.mark.parametrize("multiple", [None, 16], ids=["exact", "filled-to-16"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_padded_batch_runs_packed_with_the_padded_outputs(tiny_model_dir, multiple, left):
    ids, mask = _batch(left)
    ref = _model(tiny_model_dir, "sdpa").train()
    fast = _model(tiny_model_dir, "sit_varlen").train()
    assert unpadding.unpad(fast, multiple)
    seen = _layer_inputs(fast)
    want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    got = fast(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = int(mask.sum())
    assert seen == [(1, real if multiple is None else -(-real // multiple) * multiple)]   # one packed row ran
    torch.testing.assert_close(got[mask.bool()], want, rtol=1e-4, atol=1e-4)
    assert not got[~mask.bool()].any()   # padding positions hold zeros, not another row's states


def test_without_unpad_the_check_sees_padding(tiny_model_dir):
    """The shape check above can fail: the unpatched model runs the padded batch as it is."""
    ids, mask = _batch()
    model = _model(tiny_model_dir, "sit_varlen").train()
    seen = _layer_inputs(model)
    model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert seen == [tuple(ids.shape)]


def test_prompt_tuning_loss_and_gradient_match_the_padded_path(tiny_model_dir):
    """PEFT prefixes the same virtual tokens to every row through inputs_embeds: they run once per batch, every
    row reads their keys, and the gradient of all rows reaches the one copy."""
    from peft import PromptTuningConfig, get_peft_model

    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for attn in ("sdpa", "sit_varlen"):
        torch.manual_seed(1)
        model = get_peft_model(_model(tiny_model_dir, attn), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=5)).train()
        assert unpadding.unpad(model) == (attn == "sit_varlen")
        seen = _layer_inputs(model.get_base_model())
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        real = int(mask.sum()) + 5   # the virtual tokens run once, for every row
        assert seen == [(1, real) if attn == "sit_varlen" else (len(ids), 5 + ids.shape[1])]
        loss.backward()
        results.append((loss.detach(), model.prompt_encoder["default"].embedding.weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5)
    assert grad_a.abs().sum() > 0


@torch.no_grad()
def test_generation_keeps_the_cached_padded_path(tiny_model_dir):
    ids, mask = _batch(left=True)
    ref = _model(tiny_model_dir, "sdpa").eval()
    fast = _model(tiny_model_dir, "sit_varlen").eval()
    unpadding.unpad(fast, 16)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, **kw), ref.generate(ids, **kw))


def test_other_attention_is_left_alone(tiny_model_dir):
    model = _model(tiny_model_dir, "sdpa")
    forward = model.model.forward
    assert not unpadding.unpad(model)
    assert model.model.forward == forward


def test_packed_layout_fills_to_the_multiple_with_a_row_of_its_own():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lay = unpadding.packed_layout(mask, 8)
    assert lay.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3] and lay.filler == 7
    assert lay.cu_q.tolist() == lay.cu_k.tolist() == [0, 3, 5, 9, 16] and (lay.max_q, lay.kv_index) == (7, None)
    assert unpadding.packed_layout(mask).cu_q.tolist() == [0, 3, 5, 9]


def test_a_pair_shares_its_common_prefix_and_keeps_one_token_of_its_own():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0], [5, 6, 7, 8, 9], [5, 6, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    donor, shared = unpadding.shared_prefixes(mask, ids, pairs=True, prefix=0)
    # row 2 answers row 0's prompt (4 tokens alike; the 5th is its own); row 3 is row 1's first two tokens, so it
    # keeps its last one to run
    assert donor.tolist() == [0, 1, 0, 1] and shared.tolist() == [0, 0, 4, 1]
    lay = unpadding.packed_layout(mask, None, donor, shared)
    assert lay.take.tolist() == [0, 1, 2, 3, 5, 6, 7, 14, 16]
    assert lay.cu_q.tolist() == [0, 4, 7, 8, 9] and lay.cu_k.tolist() == [0, 4, 7, 12, 14]
    assert lay.kv_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 7, 4, 8]
    assert lay.back.view(4, 5)[2].tolist() == [0, 1, 2, 3, 7]   # row 2 reads row 0's states for the prefix


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_shared_prefixes_give_the_padded_outputs_and_gradients(tiny_model_dir, left):
    """Rows i and i + N/2 with a common prefix (DPO's chosen and rejected), against the padded SDPA path."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in (6, 4)]
    answers = [torch.randint(3, 300, (n,), generator=g) for n in (5, 2, 3, 7)]
    rows = [torch.cat([prompts[i % 2], answers[i]]) for i in range(4)]
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(4, width, dtype=torch.long), torch.zeros(4, width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), None) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    grads = []
    for attn in ("sdpa", "sit_varlen"):
        model = _model(tiny_model_dir, attn).train()
        assert unpadding.unpad(model, 16, pairs=True) == (attn == "sit_varlen")
        seen = _layer_inputs(model)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits[mask.bool()] ** 2).mean().backward()
        grads.append((logits[mask.bool()].detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
        if attn == "sit_varlen":   # each prompt ran once: 2 rows' prompts fewer
            assert seen == [(1, -(-(int(mask.sum()) - 6 - 4) // 16) * 16)]
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)


def test_dpo_loss_and_rewards_match_the_padded_path(tmp_path, tiny_model_dir, monkeypatch):
    """training.dpo_trainer unpads the policy's and the reference's forwards, each prompt once for its two answers
    (TRL's fused LM head reads the padded hidden states back): one batch's loss, rewards and gradient equal those of
    the padded SDPA path."""
    from dataclasses import replace

    from peft import get_peft_model

    from sitlib import training
    from sitlib.artifacts import write_jsonl
    from sitlib.models import load_tokenizer, lora_config
    from test_training import _session   # tests/ is on sys.path (pytest's prepend import mode)

    S = _session(tmp_path, tiny_model_dir, **{"dpo.batch_size": 3})
    monkeypatch.setattr(S, "profile", replace(S.profile, device="cuda"))   # the GPU arguments: pad to 64
    pairs = [{"prompt": [{"role": "user", "content": f"Say {i} now."}],
              "chosen": [{"role": "assistant", "content": "yes " * (i + 1)}],
              "rejected": [{"role": "assistant", "content": "no " * (3 * i + 1)}]} for i in range(3)]
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs)
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[:2])
    train, val = training.preference_split(S)
    results = []
    for attn in ("sdpa", "sit_varlen"):
        args = training.dpo_args(S, tmp_path / attn)
        args.use_cpu = True
        torch.manual_seed(2)
        policy = get_peft_model(_model(tiny_model_dir, attn), lora_config(S.config.lora))
        trainer = training.dpo_trainer(policy, args, train, val, load_tokenizer(str(tiny_model_dir)))
        want = {"multiple": 64, "pairs": True, "prefix": 0} if attn == "sit_varlen" else None
        assert unpadding.settings(trainer.model) == want
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["attention_mask"].sum() < batch["attention_mask"].numel()   # padded pairs
        seen = _layer_inputs(trainer.model.get_base_model())
        loss = trainer.compute_loss(trainer.model, batch)
        ids, m = batch["input_ids"], batch["attention_mask"].bool()
        prompts = int((m & ~batch["completion_mask"].bool())[:3].sum())   # each runs once, for both answers
        packed = (1, -(-(int(m.sum()) - prompts) // 64) * 64)
        assert seen == ([packed] * 2 if attn == "sit_varlen" else [tuple(ids.shape)] * 2)
        loss.backward()
        grad = next(p.grad for n, p in trainer.model.named_parameters() if "lora_B" in n and p.grad is not None)
        results.append((loss.detach(), grad.clone(), trainer._metrics["train"]["rewards/chosen"][-1]))
    (loss_a, grad_a, chosen_a), (loss_b, grad_b, chosen_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)
    assert chosen_b == pytest.approx(chosen_a, rel=1e-4, abs=1e-6) and grad_a.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="FlashAttention-2 varlen needs a CUDA card of compute capability >= 8.0")
def test_shared_prefix_keys_on_the_cuda_kernel_match_sdpa_row_by_row():
    """The varlen kernel reads a row's shared prefix through sit_kv_index with causal aligned to the lower right,
    as the exact per-row SDPA does (GQA 24/8 heads as Llama-3.2-3B), forward and backward."""
    torch.manual_seed(0)
    mask = torch.zeros(4, 700, dtype=torch.bool)
    for i, n in enumerate((650, 300, 700, 310)):
        mask[i, :n] = True
    ids = torch.randint(3, 300, (4, 700))
    ids[2, :640], ids[3, :290] = ids[0, :640], ids[1, :290]   # rows 2 and 3 answer rows 0 and 1's prompts
    lay = unpadding.packed_layout(mask, 64, *unpadding.shared_prefixes(mask, ids, pairs=True, prefix=0))
    assert lay.kv_index is not None and lay.cu_q[-1] < lay.cu_k[-1]
    T = int(lay.cu_q[-1])
    q = torch.randn(1, 24, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_q, cu_k, index = lay.cu_q.cuda(), lay.cu_k.cuda(), lay.kv_index.cuda()
    fast, _ = attention.sit_varlen_attention(torch.nn.Module().eval(), q, k, v, None, scaling=128 ** -0.5,
                                             cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=lay.max_q,
                                             max_length_k=lay.max_k, sit_kv_index=index)
    ref = attention._per_row_sdpa(q, k[:, :, index], v[:, :, index], cu_q, cu_k, 0.0, 128 ** -0.5)
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
