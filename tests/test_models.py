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


def test_loader_fuses_layers_where_the_profile_asks(tiny_model_dir, monkeypatch):
    """load_model hands every model of a Liger profile to fuse_layers (which itself acts only on 16-bit CUDA
    weights), and no other."""
    from dataclasses import replace

    seen = []
    monkeypatch.setattr(models, "fuse_layers", lambda m: seen.append(m) or False)
    model = models.load_model(str(tiny_model_dir), replace(PROFILES["cpu"], liger=True))
    assert seen == [model]
    models.load_model(str(tiny_model_dir), PROFILES["cpu"])
    assert seen == [model]


def test_fuse_layers_leaves_cpu_and_32_bit_models_alone(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(models, "liger_available", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    forward = model.model.norm.forward
    assert models.fuse_layers(model) is False and model.model.norm.forward == forward


def test_fused_rope_dispatches_by_device():
    """Liger's RoPE replaces the architecture's function for every instance: CPU tensors keep the stock one, and
    a second fusing wraps the stock function again, not the previous wrapper."""
    import torch

    calls = []
    stock = lambda q, *a, **k: calls.append("stock")   # noqa: E731
    fused = lambda q, *a, **k: calls.append("fused")   # noqa: E731
    dispatch = models._on_cuda(fused, stock)
    dispatch(torch.zeros(1), 1, x=2)
    assert calls == ["stock"]
    again = models._on_cuda(fused, dispatch)
    assert again.original is stock
    again(torch.zeros(1))
    assert calls == ["stock", "stock"]


def _liger_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and models.liger_available()


@pytest.mark.skipif(not _liger_gpu(), reason="Liger's kernels need a CUDA GPU and liger_kernel")
def test_fused_layers_on_gpu(tiny_model_dir, recwarn):
    """On a GPU: the fused model's logits equal the stock model's within bf16 rounding; the pool's CUDA graphs
    replay the fused kernels as launching them one by one does (greedy, rows leaving and joining); and a CPU model
    of the same architecture built afterwards is stock and runs as before."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    from sitlib import generation as G

    stock_norm = modeling_llama.LlamaRMSNorm
    cpu = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_before = cpu(ids).logits
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    fused = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    assert models.fuse_layers(fused)
    assert fused.model.norm.forward.__func__ is not plain.model.norm.forward.__func__
    with torch.no_grad():
        want, got = plain(ids.cuda()).logits.float(), fused(ids.cuda()).logits.float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max(), float((got - want).abs().max())

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = "<|endoftext|>"
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randint(3, 300, (int(k),), generator=g).tolist() for k in torch.randint(2, 24, (14,), generator=g)]
    settings = [G.Sampling.greedy(3 + (5 * i) % 17) for i in range(len(inputs))]
    graphs = G.generate(fused, tok, inputs, settings, batch_size=6)
    assert not [w for w in recwarn if "graph capture failed" in str(w.message)]
    capture = G._Pool._capture
    try:
        G._Pool._capture = lambda self, rows, width: (_ for _ in ()).throw(RuntimeError("no graphs in this run"))
        with pytest.warns(UserWarning, match="decoding without graphs"):
            eager = G.generate(fused, tok, inputs, settings, batch_size=6)
    finally:
        G._Pool._capture = capture
    assert [(c.text, c.n_tokens) for c in graphs] == [(c.text, c.n_tokens) for c in eager]

    assert modeling_llama.LlamaRMSNorm is stock_norm
    again = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert type(again.model.norm) is stock_norm
    with torch.no_grad():
        assert torch.equal(again(ids).logits, cpu_before)
