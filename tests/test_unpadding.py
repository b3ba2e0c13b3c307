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
    """PEFT prefixes virtual tokens through inputs_embeds: each row keeps its own copy, positions from 0."""
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
        real = int(mask.sum()) + 5 * len(ids)   # each row's own virtual tokens
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
    positions, cu, longest, filler = unpadding.packed_layout(mask, 8)
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]
    assert cu.tolist() == [0, 3, 5, 9, 16] and longest == 7 and filler == 7
    assert unpadding.packed_layout(mask, None)[1].tolist() == [0, 3, 5, 9]


def test_dpo_loss_and_rewards_match_the_padded_path(tmp_path, tiny_model_dir, monkeypatch):
    """training.dpo_trainer unpads the policy's and the reference's forwards (TRL's fused LM head reads the padded
    hidden states back): one batch's loss, rewards and gradient equal those of the padded SDPA path."""
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
        want = {"multiple": 64} if attn == "sit_varlen" else None
        assert unpadding.settings(trainer.model) == want
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["attention_mask"].sum() < batch["attention_mask"].numel()   # padded pairs
        seen = _layer_inputs(trainer.model.get_base_model())
        loss = trainer.compute_loss(trainer.model, batch)
        packed = (1, -(-int(batch["attention_mask"].sum()) // 64) * 64)
        assert seen == ([packed] * 2 if attn == "sit_varlen" else [tuple(batch["input_ids"].shape)] * 2)
        loss.backward()
        grad = next(p.grad for n, p in trainer.model.named_parameters() if "lora_B" in n and p.grad is not None)
        results.append((loss.detach(), grad.clone(), trainer._metrics["train"]["rewards/chosen"][-1]))
    (loss_a, grad_a, chosen_a), (loss_b, grad_b, chosen_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)
    assert chosen_b == pytest.approx(chosen_a, rel=1e-4, abs=1e-6) and grad_a.abs().sum() > 0



def test_generation_steps_and_plain_evaluation_keep_the_padded_batch(tiny_model_dir):
    """A call with a KV cache (either name), an eval-mode call that does not turn the cache off, and a call asking
    for per-layer outputs all run the batch as it is."""
    from transformers import DynamicCache

    ids, mask = _batch()
    model = _model(tiny_model_dir, "sit_varlen").train()
    unpadding.unpad(model)
    seen = _layer_inputs(model)
    model.model(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config), use_cache=None)
    model.model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config))
    model.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    model.eval()
    model.model(input_ids=ids, attention_mask=mask)
    assert seen == [tuple(ids.shape)] * 4
    model.model(input_ids=ids, attention_mask=mask, use_cache=False)   # evaluation of a loss packs
    assert seen[-1] == (1, int(mask.sum()))


def test_the_callers_positions_are_kept(tiny_model_dir):
    ids, mask = _batch()
    positions = (torch.arange(ids.shape[1]) * 2).expand_as(ids)   # every other position (RoPE is relative)
    ref = _model(tiny_model_dir, "sdpa").train()
    fast = _model(tiny_model_dir, "sit_varlen").train()
    unpadding.unpad(fast)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    want, got = ref(**kw).logits[mask.bool()], fast(**kw).logits[mask.bool()]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (fast(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()] - got).abs().max() > 1e-3


def test_prompt_tuning_trainer_is_unpadded_with_the_padded_loss(tmp_path, tiny_model_dir, monkeypatch):
    """training.sft_trainer for 05b (TRL's fused LM head over PEFT's virtual tokens): one batch's loss equals the
    padded SDPA path's."""
    from dataclasses import replace

    from sitlib import training
    from sitlib.models import load_tokenizer, prompt_tuning_config, resolve_model
    from test_training import _session   # tests/ is on sys.path (pytest's prepend import mode)

    S = _session(tmp_path, tiny_model_dir)
    monkeypatch.setattr(S, "profile", replace(S.profile, device="cuda"))   # the GPU arguments: pad to 64
    tok = load_tokenizer(str(tiny_model_dir))
    train, val, _ = training.tokenized_sft_split(S, tok, "prompt_tuning")
    losses = []
    for attn in ("sdpa", "sit_varlen"):
        args = training.sft_args(S, "prompt_tuning", tmp_path / attn)
        args.use_cpu = True
        torch.manual_seed(4)
        peft_cfg = prompt_tuning_config(S.config.prompt_tuning, resolve_model(str(tiny_model_dir)))
        trainer = training.sft_trainer(_model(tiny_model_dir, attn), args, train, val, tok, peft_cfg)
        want = {"multiple": 64} if attn == "sit_varlen" else None
        assert unpadding.settings(trainer.model) == want
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["attention_mask"].sum() < batch["attention_mask"].numel()   # padded rows
        seen = _layer_inputs(trainer.model.get_base_model())
        losses.append(trainer.compute_loss(trainer.model, batch).detach())
        assert len(seen) == 1 and (seen[0][0] == 1) == (attn == "sit_varlen")
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
