"""Shared fixtures: a tiny random Llama and a byte-level BPE tokenizer with a chat template, built in seconds."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["Write a short poem about the sea.", "The answer is 42.", "## Step 1: add the numbers",
          "Explain photosynthesis in simple words.", "What is the capital of France? Paris is the capital.",
          "# Title\n## Section", "Sure, here is a list:\n- one\n- two", "hello world " * 3]


def pytest_configure(config):
    # The notebook tests (nbval) run the series into one temporary tree, in order, shared across notebooks.
    if "SIT_TEST_OUTPUT_DIR" not in os.environ:
        os.environ["SIT_TEST_OUTPUT_DIR"] = tempfile.mkdtemp(prefix="sit-nbval-")
    os.environ["SIT_OUTPUT_DIR"] = os.environ["SIT_TEST_OUTPUT_DIR"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)


def build_tiny_tokenizer(path: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML   # pad = EOS on purpose, like SmolLM2: sitlib must fix it
    tok.save_pretrained(path)
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def output_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SIT_OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path / "out"
