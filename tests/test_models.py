"""Tokenizer preparation, PEFT config builders, parameter counts, and the embedded model (slow)."""
import pytest

from sitlib import models
from sitlib.config import LoraConfig, PromptTuningConfig
from sitlib.hardware import PROFILES


def test_pad_is_made_distinct_from_eos(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_fallback_chat_template_ends_turns_with_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok = models.prepare_tokenizer(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text.count(tok.eos_token) == 2


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
