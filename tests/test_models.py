"""Tokenizer preparation, PEFT config builders, parameter counts, and the embedded model (slow)."""
import pytest

from sitlib import models
from sitlib.config import LoraConfig, PromptTuningConfig
from sitlib.hardware import PROFILES


def test_pad_is_made_distinct_from_eos(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def _base_tokenizer(tiny_model_dir):
    """The tiny tokenizer as a base checkpoint ships it: no chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    return models.prepare_tokenizer(tok)


def test_fallback_chat_template_ends_turns_with_eos(tiny_model_dir):
    tok = _base_tokenizer(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text.count(tok.eos_token) == 2


def test_fallback_chat_template_starts_with_one_bos_in_every_path(tiny_model_dir):
    """SFT rows, DPO rows (TRL's own rendering), generation and evaluation prompts: BOS first, exactly once."""
    from trl.data_utils import apply_chat_template

    from sitlib.generation import chat_input_ids
    from sitlib.training import tokenize_sft

    tok = _base_tokenizer(tiny_model_dir)
    bos = tok.bos_token_id
    user = [{"role": "user", "content": "Write a short poem about the sea."}]
    answer = [{"role": "assistant", "content": "The answer is 42."}]
    gen = chat_input_ids(tok, [user])[0]                       # 02/04 generation, 07/08 evaluation prompts
    sft = tokenize_sft(tok, {"prompt": user, "completion": answer}, 256)["input_ids"]   # 05 / 05b
    dpo = apply_chat_template({"prompt": user, "chosen": answer, "rejected": answer}, tok)  # 06, as TRL renders it
    dpo_ids = tok(dpo["prompt"], add_special_tokens=False)["input_ids"] + \
        tok(dpo["chosen"], add_special_tokens=False)["input_ids"]
    for ids in (gen, sft, dpo_ids):
        assert ids[0] == bos and ids.count(bos) == 1
    assert sft[: len(gen)] == gen and sft[-1] == tok.eos_token_id   # the prompt as generation sees it, then EOS


def test_fallback_template_without_bos_token(tiny_model_dir):
    tok = _base_tokenizer(tiny_model_dir)
    tok.bos_token = None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|start|>user") and text.endswith("<|start|>assistant\n")


def test_model_loads_with_the_profile_attention(tiny_model_dir):
    from dataclasses import replace

    model = models.load_model(str(tiny_model_dir), replace(PROFILES["cpu"], attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    assert models.load_model(str(tiny_model_dir), PROFILES["cpu"]).config._attn_implementation == "sdpa"


def test_sit_attention_is_registered_first_or_named_clearly(monkeypatch):
    import sys
    import types
    from dataclasses import replace

    from sitlib.errors import ProfileError

    prof = replace(PROFILES["cpu"], attn_implementation="sit_varlen")
    calls = []
    fake = types.SimpleNamespace(register=lambda: calls.append(1), best_implementation=lambda d, t: "sit_varlen")
    monkeypatch.setitem(sys.modules, "sitlib.attention", fake)
    assert models.attention_implementation(prof, for_training=True) == "sit_varlen" and calls == [1]
    assert models.attention_implementation(prof) == "sdpa"   # generation keeps SDPA (padded batches)
    monkeypatch.setitem(sys.modules, "sitlib.attention", None)   # absent: import fails
    with pytest.raises(ProfileError, match="sit_varlen"):
        models.attention_implementation(prof, for_training=True)


def test_sit_varlen_falls_back_to_sdpa_where_the_kernel_cannot_run():
    from dataclasses import replace

    prof = replace(PROFILES["cpu"], attn_implementation="sit_varlen")
    assert models.attention_implementation(prof, for_training=True) == "sdpa"   # no varlen kernel on a CPU


def test_teacher_role_follows_teacher_4bit():
    from dataclasses import replace

    l4 = PROFILES["l4"]
    assert models.quantization_config(l4, "student") is None
    assert models.quantization_config(l4, "teacher").load_in_4bit
    t4 = PROFILES["t4"]
    assert models.quantization_config(t4, "student").load_in_4bit and models.quantization_config(t4, "teacher")
    assert models.quantization_config(replace(t4, teacher_4bit=False), "teacher") is None


def test_missing_local_model_folder_is_one_clear_error(tmp_path):
    from sitlib.errors import MissingInputError

    for name in (str(tmp_path / "no-such-folder"), "./no-such-folder"):
        with pytest.raises(MissingInputError, match="no-such-folder does not exist"):
            models.load_tokenizer(name)


def test_lora_and_prompt_tuning_configs():
    lc = models.lora_config(LoraConfig())
    assert lc.r == 8 and lc.lora_alpha == 16 and set(lc.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    pc = models.prompt_tuning_config(PromptTuningConfig(init="random"))
    assert pc.num_virtual_tokens == 20
    with pytest.raises(ValueError, match="prompt_tuning.init"):
        models.prompt_tuning_config(PromptTuningConfig(init="zeros"))


def test_count_parameters_lora(tiny_model_dir):
    from peft import get_peft_model

    model = models.load_model(str(tiny_model_dir), PROFILES["cpu"])
    base = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, models.lora_config(LoraConfig(r=2, alpha=4)))
    counts = models.count_parameters(peft_model)
    assert counts["total_parameters"] == base + counts["trainable_parameters"]
    assert 0 < counts["trainable_parameters"] < base


def test_4bit_parameter_count_is_logical_not_packed(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from dataclasses import replace

    dense = models.load_model(str(tiny_model_dir), PROFILES["cpu"])
    q4 = models.load_model(str(tiny_model_dir), replace(PROFILES["cpu"], load_in_4bit=True))
    assert any(p.__class__.__name__ == "Params4bit" for p in q4.parameters())
    assert models.count_parameters(q4)["total_parameters"] == models.count_parameters(dense)["total_parameters"]


@pytest.mark.slow
def test_embedded_model_loads_fast_after_conversion():
    import time

    models.embedded_model_dir()            # converts once (~30 s) when the cache is cold
    t = time.perf_counter()
    tok = models.load_tokenizer("embedded")
    model = models.load_model("embedded", PROFILES["cpu"])
    assert time.perf_counter() - t < 15
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.vocab_size == 49152


def test_fused_layers_leave_cpu_models_alone(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(models, "liger_available", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    forward = model.model.norm.forward
    with models.fused_layers(model) as on:
        assert on is False and model.model.norm.forward == forward


def test_fused_layers_snapshot_and_restore(tiny_model_dir):
    """What Liger binds on a Llama (every norm, every MLP) is snapshotted, and put back exactly: a bound forward
    and an added setting go, a changed value returns, the module's names too."""
    import types

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    patched = models._liger_patched(model)
    layers = model.config.num_hidden_layers
    assert len(patched) == 1 + 3 * layers and model.model.layers[0].mlp in patched and model.model.norm in patched
    module = types.ModuleType("arch")
    module.apply_rotary_pos_emb = stock = object()
    saved = dict(vars(module)), [(m, dict(vars(m))) for m in patched]
    norm = model.model.norm
    norm.__dict__["forward"] = lambda x: x
    norm.casting_mode, norm.variance_epsilon = "llama", 1.0
    module.apply_rotary_pos_emb, module.added = object(), 1
    models._restore(module, *saved)
    assert "forward" not in vars(norm) and not hasattr(norm, "casting_mode") and norm.variance_epsilon != 1.0
    assert module.apply_rotary_pos_emb is stock and not hasattr(module, "added")


def test_a_liger_that_cannot_apply_is_said_once(tiny_model_dir, monkeypatch):
    import sys
    import types

    from transformers import AutoModelForCausalLM

    broken = types.ModuleType("liger_kernel.transformers")   # no _apply_liger_kernel_to_instance: ImportError
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", broken)
    monkeypatch.setattr(models, "_fuse_warned", False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.warns(UserWarning, match="transformers' layers"):
        assert models._apply_liger(model) is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models._apply_liger(model) is False


def _liger_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and models.liger_available()


@pytest.mark.skipif(not _liger_gpu(), reason="Liger's kernels need a CUDA GPU and liger_kernel")
def test_fused_layers_on_gpu(tiny_model_dir):
    """On a GPU: inside the block the model's logits equal the stock model's within bf16 rounding, through Liger's
    forwards (a nested block changes nothing); after it the model (same logits, bit for bit) and its
    architecture's module are stock again, so a CPU model of the same architecture built afterwards is stock and
    runs."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    stock = dict(vars(modeling_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(3, 300, (3, 17), generator=torch.Generator().manual_seed(0)).cuda()
    norm_forward = model.model.norm.forward.__func__
    with torch.no_grad():
        before = model(ids).logits
        with models.fused_layers(model) as on:
            assert on and model.model.norm.forward.__func__ is not norm_forward
            assert modeling_llama.apply_rotary_pos_emb is not stock["apply_rotary_pos_emb"]
            with models.fused_layers(model) as inner:   # nested: the outer block keeps them on
                assert inner
            assert model.model.norm.forward.__func__ is not norm_forward
            fused = model(ids).logits
        after = model(ids).logits
    assert (fused.float() - before.float()).abs().max() <= 0.05 * before.float().abs().max()   # bf16 rounding
    assert torch.equal(after, before) and model.model.norm.forward.__func__ is norm_forward
    assert all(vars(modeling_llama)[k] is v for k, v in stock.items()) and set(vars(modeling_llama)) == set(stock)
    cpu = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert type(cpu.model.norm) is stock["LlamaRMSNorm"]
    with torch.no_grad():
        assert torch.isfinite(cpu(ids.cpu()).logits).all()
