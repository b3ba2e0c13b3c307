"""Training throughput, side by side in one process on random weights of the student's shape (Llama-3.2-3B):
the original series' recipe, the best stock TRL variant, and sitlib's own path (the blocks notebooks 05/05b/06
use, under a GPU profile). Same rows for every variant; each warms up (its first steps are not timed).

    python bench/bench_training.py [--sections sft,dpo,prompt_tuning] [--steps 20] [--warm 5] [--rows 900]
                                   [--sitlib-attn sit_varlen] [--set lora.dropout=0.0] [--out bench/results]

SFT variants: seed_recipe (4-bit NF4, checkpointing, dropout 0.05, padded, paged AdamW; needs bitsandbytes),
stock_best (TRL bf16 + padding-free + Liger when importable, dropout 0), sitlib (profile h100 with
--sitlib-attn), sitlib_plain (the same profile with SDPA: padded rows, or the same packed sequences where the
profile packs SFT rows; the loss reference for the faster attention). --trl KEY=VALUE sets SFTConfig fields of the
sitlib variants (and DPOConfig fields of sitlib's DPO: levers measured before a profile ships them).
DPO: seed_recipe (policy and reference as two 4-bit models) vs sitlib (one bf16 base, the reference is a frozen
copy of the adapter). Prompt tuning: seed_recipe (every batch padded to 2,048 tokens) vs sitlib.
Merges {"sft": ..., "dpo": ..., "prompt_tuning": ...} into bench/results/<date>_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
import trace_gaps  # noqa: E402
from common import mfu, param_count, record, save_random_model, sync  # noqa: E402
from conftest import build_tiny_tokenizer  # noqa: E402  (a byte-level BPE tokenizer with a ChatML template)

WORDS = ("the sea poem capital answer numbers photosynthesis list write short explain simple words what is "
         "title section sure here one two hello world step add").split()
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_fingerprints() -> None:
    """On a machine where datasets cannot pickle pyarrow's MonthDayNano while hashing a new Dataset; the hash
    only names cache files, so a random one changes nothing measured (SIT_BENCH_RANDOM_FINGERPRINTS=1)."""
    import secrets

    import datasets.arrow_dataset as ad

    ad.generate_fingerprint = lambda dataset: secrets.token_hex(8)


# ---------------------------------------------------------------- data and model

def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def write_data(S, n_rows: int) -> None:
    """Chat rows of ~300 tokens (lognormal, capped at 1,024), a quarter of them prompt; pairs for DPO."""
    from sitlib.artifacts import write_jsonl

    rng = random.Random(0)
    rows = []
    for i in range(n_rows):
        n = int(min(700, max(24, rng.lognormvariate(math.log(200), 0.6))))   # words; ~1.5 tokens each
        rows.append({"id": i, "prompt": [{"role": "user", "content": _text(rng, max(4, n // 4))}],
                     "completion": [{"role": "assistant", "content": _text(rng, n - n // 4)}]})
    cut = n_rows - max(8, n_rows // 100)
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:cut])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[cut:])
    pairs = [{"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
              "rejected": [{"role": "assistant", "content": _text(rng, len(r["completion"][0]["content"].split()))}]}
             for r in rows[:600]]   # the original's 540/60 pairs
    cut = len(pairs) - max(2, len(pairs) // 10)
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[:cut])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[cut:])


def model_dir(shape: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"sit_bench_llama_{shape}"
    if not (path / "tokenizer_config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        build_tiny_tokenizer(path)
    torch.manual_seed(0)
    return save_random_model(shape, path)


# ---------------------------------------------------------------- measuring

def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: one more per kernel compiled (a fresh cache: set TRITON_CACHE_DIR)."""
    d = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for _ in d.iterdir()) if d.is_dir() else 0


class Clock:
    """A TrainerCallback (built lazily: transformers is imported late) that stamps the end of every step. On a GPU
    the stamp is a CUDA event recorded in the stream, not a synchronize: a wait at every step would leave the GPU
    idle while the host prepares the next one, which a run outside the benchmark does not do. The times are read
    once, after the run. The per-step garbage-collection and allocator counts (`step_events`) are taken on the
    host, which may run ahead of the GPU: they belong to the step the host was preparing."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.marks = []
                # TRL's running count of real tokens (what it logs as num_tokens) at each step's end, read from the
                # trainer (measure sets it) so that steps need not be logged: a log reads the loss back from the GPU
                self.trainer, self.tokens = None, []
                # per step, what could stall it: Python's garbage collector (seconds it ran) and the CUDA
                # allocator (cudaMalloc calls, and retries after freeing its cache because no block fit)
                self.events, self.gc_s, self._gc_t0 = [], 0.0, None
                self.shapes: list = []   # input shapes of the forwards in this step (attach)
                gc.callbacks.append(self._gc)

            @property
            def t(self) -> list[float]:
                """Seconds at the end of each step (from the first stamp on a GPU)."""
                if not self.marks or isinstance(self.marks[0], float):
                    return list(self.marks)
                sync()
                return [self.marks[0].elapsed_time(m) / 1e3 for m in self.marks]

            def attach(self, model) -> None:
                """Note the input shape of every forward of `model` (a new shape can mean new kernels)."""
                model.get_input_embeddings().register_forward_pre_hook(
                    lambda mod, inp: self.shapes.append(list(inp[0].shape)))

            def _gc(self, phase, info):
                if phase == "start":
                    self._gc_t0 = time.perf_counter()
                elif self._gc_t0 is not None:
                    self.gc_s += time.perf_counter() - self._gc_t0

            def _alloc(self) -> dict:
                if not torch.cuda.is_available():
                    return {}
                m = torch.cuda.memory_stats()
                return {k: m.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}

            def on_step_begin(self, args, state, control, **kw):
                self._start = (self.gc_s, self._alloc(), triton_cache_entries())
                self.shapes = []

            def on_step_end(self, args, state, control, **kw):
                self.tokens.append(getattr(self.trainer, "_total_train_tokens", None))
                if torch.cuda.is_available():
                    self.marks.append(torch.cuda.Event(enable_timing=True))
                    self.marks[-1].record()
                else:
                    self.marks.append(time.perf_counter())
                gc0, a0, k0 = self._start
                a1 = self._alloc()
                self.events.append({"gc_s": round(self.gc_s - gc0, 3), **{k: a1[k] - a0[k] for k in a1},
                                    "triton_compiles": triton_cache_entries() - k0,
                                    "shapes": sorted({tuple(s) for s in self.shapes})})

            def on_train_end(self, args, state, control, **kw):
                if self._gc in gc.callbacks:
                    gc.callbacks.remove(self._gc)

        return _Clock()


class StepProfile:
    """A TrainerCallback that runs torch.profiler over `n` optimizer steps after `warm` and writes its top ops
    (by self CPU and by device time) to `path`: where a step's time goes when it is far above its FLOPs. With
    `gaps` it also records Python stacks and adds where the device sat idle waiting for the host (trace_gaps)."""

    def __new__(cls, warm: int, n: int, path: Path, gaps: bool = False):
        from transformers import TrainerCallback

        class _StepProfile(TrainerCallback):
            prof = None

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warm and self.prof is None:
                    acts = [torch.profiler.ProfilerActivity.CPU] + \
                        ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                    self.prof = torch.profiler.profile(activities=acts, with_stack=gaps)
                    self.prof.__enter__()
                    self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if self.prof is not None and state.global_step == warm + n:
                    sync()
                    wall = time.perf_counter() - self.t
                    self.prof.__exit__(None, None, None)
                    ka = self.prof.key_averages()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    dev = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                    text = (f"{n} optimizer steps after {warm}: {wall:.3f} s wall"
                            f"{' (Python stacks recorded: host ops slower)' if gaps else ''}\n\n"
                            f"by self CPU time:\n{ka.table(sort_by='self_cpu_time_total', row_limit=30)}\n"
                            f"by {dev}:\n{ka.table(sort_by=dev, row_limit=30)}\n")
                    if gaps:
                        with tempfile.TemporaryDirectory() as tmp:
                            trace = Path(tmp) / "trace.json"
                            self.prof.export_chrome_trace(str(trace))
                            text += ("\nwhere the device waited for the host:\n"
                                     + trace_gaps.summary(trace, kernels=ARGS.gap_kernels))
                    path.write_text(text)
                    print(f"profile of {n} steps written to {path}", flush=True)
                    self.prof = None

        return _StepProfile()


def profiled(args, steps: int, section: str) -> list:
    """With --torch-profile N: N more steps after the timed ones run under the profiler (not timed; the schedule
    then spans steps + N, so the losses differ a little from a run without it); the callback to add, else none."""
    if not ARGS.torch_profile:
        return []
    args.max_steps = steps + ARGS.torch_profile
    return [StepProfile(steps, ARGS.torch_profile, Path(ARGS.out) / f"profile_{section}_{ARGS.shape}_"
                        f"{common.device_name().replace(' ', '_')}.txt", gaps=ARGS.gaps)]


def measure(trainer, clock, warm: int, n_params: int, tokens_key: str = "num_tokens",
            timed: Optional[int] = None) -> dict:
    """Real (non-padding) tokens/s over the steps after `warm` (up to step `timed`), peak memory, MFU, losses."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    err = None
    clock.trainer = trainer
    try:
        trainer.train()
    except Exception as e:   # noqa: BLE001  (one variant's failure is a result, not the end of the run)
        err = repr(e)[:400]
    hist = trainer.state.log_history
    if tokens_key == "num_tokens" and clock.tokens and None not in clock.tokens:
        ntok = clock.tokens[:timed]
    else:
        ntok = [h[tokens_key] for h in hist if tokens_key in h][:timed]
    t = clock.t[:timed]
    out = {"peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "losses": [round(h["loss"], 4) for h in hist if "loss" in h][:min(20, timed or 20)]}
    if err:
        out["error"] = err
    if len(t) > warm + 1 and len(ntok) == len(t):
        tps = (ntok[-1] - ntok[warm - 1]) / (t[-1] - t[warm - 1])
        # LoRA on frozen weights: forward 2N + input gradients 2N FLOPs per token (recomputation not counted)
        out.update(real_tok_per_s=round(tps), step_s=round((t[-1] - t[warm - 1]) / (len(t) - warm), 3),
                   mfu=mfu(4 * n_params * tps), timed_steps=len(t) - warm)
        # single steps can take seconds more than their neighbours: the median step's rate and the slowest step
        # show whether the window's rate rests on one of them
        steps = [(ntok[i] - ntok[i - 1], t[i] - t[i - 1]) for i in range(warm, len(t))]
        out.update(median_step_tok_per_s=round(statistics.median(n / s for n, s in steps)),
                   slowest_step_s=round(max(s for _, s in steps), 3), seconds_per_step=[round(s, 3) for _, s in steps])
        if len(clock.events) >= len(t):   # the same steps' garbage collection and allocator calls
            out["step_events"] = clock.events[warm:len(t)]
    return out


def free() -> None:
    """Release what the last variant left (its locals are gone once it returns)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load(path: Path, four_bit: bool = False, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    kw = {"quantization_config": bnb_config()} if four_bit else {}
    cuda = torch.cuda.is_available()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                device_map={"": 0} if cuda else None, attn_implementation=attn, **kw)


def trl_args(cls, name: str, steps: int, **kw):
    """A TRL config for the non-sitlib variants: log every --log-steps steps, save and evaluate nothing; `kw` wins."""
    base = dict(output_dir=os.path.join(tempfile.gettempdir(), f"sit-bench-{name}"), max_steps=steps,
                learning_rate=2e-4, logging_steps=ARGS.log_steps, save_strategy="no", eval_strategy="no", report_to=[],
                bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                seed=0)
    return cls(**{**base, **kw})


# ---------------------------------------------------------------- sitlib's session

def session(profile: str, attn: str, padding_free: bool, sets: dict, steps: int):
    """sitlib.setup under `profile` with its attention / padding-free replaced (what the profile would ship)."""
    from sitlib import hardware
    from sitlib.session import setup

    base = hardware.PROFILES[profile]
    hardware.PROFILES[profile] = dataclasses.replace(base, attn_implementation=attn, padding_free=padding_free)
    log = ARGS.log_steps
    over = {"sft.max_steps": steps, "sft.save_steps": 10_000, "sft.eval_steps": 10_000, "sft.logging_steps": log,
            "prompt_tuning.max_steps": steps, "prompt_tuning.save_steps": 10_000,
            "prompt_tuning.eval_steps": 10_000, "prompt_tuning.logging_steps": log,
            "dpo.max_steps": steps, "dpo.save_steps": 10_000, "dpo.eval_steps": 10_000, "dpo.logging_steps": log,
            "models.max_seq_length": 1024, **sets}
    try:
        S = setup(profile, tempfile.mkdtemp(prefix="sit-bench-"), overrides=over, verbose=False)
    finally:
        hardware.PROFILES[profile] = base
    S = dataclasses.replace(S, profile=dataclasses.replace(base, attn_implementation=attn,
                                                           padding_free=padding_free))
    return S


# ---------------------------------------------------------------- SFT

def sft_seed_recipe(path, tok, train, steps, n_params, warm):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    model = prepare_model_for_kbit_training(load(path, four_bit=True), use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_MODULES,
                                             task_type="CAUSAL_LM"))
    args = trl_args(SFTConfig, "seed", steps, per_device_train_batch_size=12, gradient_accumulation_steps=2,
                    optim="paged_adamw_32bit", lr_scheduler_type="cosine", max_length=1024,
                    completion_only_loss=False, gradient_checkpointing=True)
    clock = Clock()
    tr = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=[clock])
    res = measure(tr, clock, warm, n_params)
    return {**res, "how": "4-bit NF4 + double quant, checkpointing, LoRA dropout 0.05, padded, batch 12x2, "
                          "paged_adamw_32bit, loss on the whole sequence"}


def sft_stock_best(path, tok, train, steps, n_params, warm):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    liger = have("liger_kernel")
    args = trl_args(SFTConfig, "stock", steps, per_device_train_batch_size=12, gradient_accumulation_steps=2,
                    padding_free=True, max_length=None, use_liger_kernel=liger, completion_only_loss=True,
                    gradient_checkpointing=False)
    clock = Clock()
    tr = SFTTrainer(model=load(path), args=args, train_dataset=train, processing_class=tok, callbacks=[clock],
                    peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_MODULES,
                                           task_type="CAUSAL_LM"))
    res = measure(tr, clock, warm, n_params)
    return {**res, "how": f"bf16, SDPA, padding-free, Liger {'on' if liger else 'not importable'}, "
                          "LoRA dropout 0, batch 12x2"}


def sft_sitlib(S, steps, n_params, warm, section: str = "sft", profile: bool = False):
    """Notebook 05's (or 05b's) blocks: tokenized split, load_model, the config's LoRA/prompt tuning, sft_args."""
    from peft import LoraConfig, PromptTuningConfig
    from sitlib import lora, training, unpadding
    from sitlib.models import load_model, load_tokenizer

    write_data(S, ARGS.rows)
    tok = load_tokenizer(S.config.models.student)
    train, val, _ = training.tokenized_sft_split(S, tok, section)
    model = load_model(S.config.models.student, S.profile, for_training=True)
    L = S.config.lora
    peft_cfg = LoraConfig(r=L.r, lora_alpha=L.alpha, lora_dropout=L.dropout, target_modules=list(L.target_modules),
                          bias="none", task_type="CAUSAL_LM") if section == "sft" else \
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=S.config.prompt_tuning.num_virtual_tokens)
    args = training.sft_args(S, section, S.paths.models_sft / "bench")
    args.eval_strategy, args.save_strategy = "no", "no"
    set_trl(args)
    clock = Clock()
    extra = profiled(args, steps, section) if profile else []
    # 05b's builder (batches of like length, padded rows padding-free), LoRA fused on a GPU as 05 fuses it
    tr = training.sft_trainer(model, args, train, None, tok, peft_cfg, callbacks=[clock, *extra])
    unpadded = unpadding.settings(tr.model)
    clock.attach(tr.model)
    training.match_adapter_dtype(tr, S.profile)   # as run_trainer does
    res = measure(tr, clock, warm, n_params, timed=steps)
    sec = getattr(S.config, section)
    res["how"] = (f"profile {S.profile.name}: {S.profile.dtype}, attention {S.profile.attn_implementation}, "
                  f"padding-free {args.padding_free}, batch {sec.batch_size}x{sec.gradient_accumulation}"
                  + (f", LoRA dropout {L.dropout}" if section == "sft" else "")
                  + (f", packed into {sec.pack_tokens} tokens" if getattr(sec, "pack_tokens", 0) else "")
                  + (f", padded batches run padding-free {unpadded}" if unpadded else "")
                  + (f", LoRA fused in {lora.fused(tr.model)} layers" if section == "sft" else "")
                  + f", Liger {'on' if args.use_liger_kernel else 'off'}"
                  + f", adapters {'bf16' if S.profile.adapters_bf16 else 'fp32'}"
                  + "".join(f", {k}={v}" for k, v in parse_sets(ARGS.trl).items()))
    return res


# ---------------------------------------------------------------- DPO

def dpo_seed_recipe(path, S, steps, n_params, warm):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import DPOConfig, DPOTrainer

    from sitlib import training
    from sitlib.models import load_tokenizer

    tok = load_tokenizer(S.config.models.student)
    train, _ = training.preference_split(S)
    policy = get_peft_model(prepare_model_for_kbit_training(load(path, four_bit=True)),
                            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_MODULES,
                                       task_type="CAUSAL_LM"))
    ref = load(path, four_bit=True)
    d = S.config.dpo
    args = trl_args(DPOConfig, "dpo-seed", steps, per_device_train_batch_size=d.batch_size,
                    gradient_accumulation_steps=d.gradient_accumulation, gradient_checkpointing=True,
                    learning_rate=5e-5, max_length=1024)
    clock = Clock()
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=train, processing_class=tok,
                    callbacks=[clock])
    res = measure(tr, clock, warm, n_params)
    return {**res, "how": f"policy and reference as two 4-bit models, checkpointing, batch "
                          f"{d.batch_size}x{d.gradient_accumulation}"}


def dpo_sitlib(S, steps, n_params, warm, profile: bool = False):
    """Notebook 06's blocks: a fresh LoRA adapter stands in for the SFT one (weights do not change speed)."""
    from peft import LoraConfig, get_peft_model

    from sitlib import lora, training, unpadding
    from sitlib.models import load_model, load_tokenizer

    tok = load_tokenizer(S.config.models.student)
    L = S.config.lora
    sft_final = S.paths.models_sft / "final"
    base = load_model(S.config.models.student, S.profile)
    get_peft_model(base, LoraConfig(r=L.r, lora_alpha=L.alpha, lora_dropout=L.dropout,
                                    target_modules=list(L.target_modules), task_type="CAUSAL_LM")
                   ).save_pretrained(sft_final)
    del base
    free()
    train, val = training.preference_split(S)
    policy = training.dpo_policy(S, sft_final)
    args = training.dpo_args(S, S.paths.models_dpo / "bench")
    args.eval_strategy, args.save_strategy = "no", "no"
    set_trl(args)
    clock = Clock()
    extra = profiled(args, steps, "dpo") if profile else []
    tr = training.dpo_trainer(policy, args, train, None, tok, callbacks=[clock, *extra])
    unpadded = unpadding.settings(tr.model)   # what dpo_trainer set (a "sit_varlen" model only)
    clock.attach(tr.model)
    training.match_adapter_dtype(tr, S.profile)   # as run_trainer does
    res = measure(tr, clock, warm, n_params, timed=steps)
    d = S.config.dpo
    return {**res, "how": f"profile {S.profile.name}: one bf16 base, reference = frozen adapter copy, batch "
                          f"{d.batch_size}x{d.gradient_accumulation}, sampler {args.train_sampling_strategy}"
                          f", Liger {'on' if args.use_liger_kernel else 'off'}"
                          f", adapters {'bf16' if S.profile.adapters_bf16 else 'fp32'}"
                          + (f", padded batches run padding-free {unpadded}" if unpadded else "")
                          + f", LoRA fused in {lora.fused(tr.model)} layers"
                          + "".join(f", {k}={v}" for k, v in parse_sets(ARGS.trl).items())}


# ---------------------------------------------------------------- prompt tuning

def pt_seed_recipe(path, S, steps, n_params, warm):
    from peft import PromptTuningConfig
    from trl import SFTConfig, SFTTrainer

    from sitlib import training
    from sitlib.models import load_tokenizer

    tok = load_tokenizer(S.config.models.student)
    train, _, _ = training.tokenized_sft_split(S, tok)
    p = S.config.prompt_tuning
    args = trl_args(SFTConfig, "pt-seed", steps, per_device_train_batch_size=p.batch_size,
                    gradient_accumulation_steps=p.gradient_accumulation, learning_rate=3e-4, max_length=2048,
                    pad_to_multiple_of=2048, completion_only_loss=False, gradient_checkpointing=False)
    clock = Clock()
    tr = SFTTrainer(model=load(path), args=args, train_dataset=train, processing_class=tok, callbacks=[clock],
                    peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens))
    res = measure(tr, clock, warm, n_params)
    return {**res, "how": f"every batch padded to 2,048 tokens, batch {p.batch_size}x{p.gradient_accumulation}, "
                          "bf16 weights"}


# ---------------------------------------------------------------- main

def flagged(module: str, flag: str, value):
    """A variant maker: `run` with sitlib.<module>.<flag> set to `value`, restored afterwards."""
    def wrap(run):
        def go():
            mod = importlib.import_module(f"sitlib.{module}")
            before = getattr(mod, flag)
            setattr(mod, flag, value)
            try:
                return run()
            finally:
                setattr(mod, flag, before)
        return go
    return wrap


peft_lora = flagged("lora", "FUSED", False)             # PEFT's own LoRA forward: what fusing gives
stalled = flagged("stalls", "UNSTALLED", False)         # the Trainer's bookkeeping waits left in
repeat_kv = flagged("attention", "REPEAT_KV", True)     # K/V heads repeated before the varlen kernel


def guarded(run) -> dict:
    """A variant that fails to build is a result (its error), not the end of the run."""
    try:
        return run()
    except Exception as e:   # noqa: BLE001
        import traceback

        traceback.print_exc()
        return {"error": repr(e)[:400]}
    finally:
        free()


def set_trl(args) -> None:
    """--trl KEY=VALUE onto a built SFTConfig / DPOConfig: levers measured here before a profile ships them. A key
    the config class lacks stops the run (a typo must not time the default)."""
    for key, value in parse_sets(ARGS.trl).items():
        if not hasattr(args, key):
            raise SystemExit(f"--trl {key}: not a field of {type(args).__name__}")
        setattr(args, key, value)


def save(section: str, res: dict) -> None:
    """record() a section's results with the log interval they were timed at."""
    record(section, {**res, "log_steps": ARGS.log_steps}, ARGS.out)


def ratio_over(res: dict, name: str) -> None:
    """res["sitlib_over_<name>"]: sitlib's real tok/s over variant `name`'s, where both ran."""
    if res.get(name, {}).get("real_tok_per_s") and res.get("sitlib", {}).get("real_tok_per_s"):
        res[f"sitlib_over_{name}"] = round(res["sitlib"]["real_tok_per_s"] / res[name]["real_tok_per_s"], 2)


def parse_sets(items) -> dict:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "0123456789-[{tf" and value not in ("true", "false") \
            else {"true": True, "false": False}.get(value, value)
    return out


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="sft,dpo,prompt_tuning")
    ap.add_argument("--sft-variants", default="sitlib,stock_best,sitlib_plain,seed_recipe",
                    help="also sitlib_peft_lora: sitlib with PEFT's own LoRA forward instead of sitlib.lora's fused "
                    "one; sitlib_stalled: with the Trainer's bookkeeping stalls left in (sitlib.stalls)")
    ap.add_argument("--variants", default="sitlib,seed_recipe", help="DPO and prompt tuning: which to run (a lever "
                    "measured against an earlier sitlib run can skip the original recipe); also sitlib_stalled "
                    "(the Trainer's bookkeeping stalls left in, sitlib.stalls), sitlib_repeat_kv (K/V heads repeated "
                    "before the varlen kernel) and, for DPO, sitlib_peft_lora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--rows", type=int, default=900)
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--shape", default="3b", help="3b (the student); 135m (the embedded model); tiny with "
                    "--profile cpu: a smoke run")
    ap.add_argument("--sitlib-attn", default="sit_varlen")
    ap.add_argument("--set", action="append", help="extra sitlib config KEY=VALUE for the sitlib variants")
    ap.add_argument("--trl", action="append", help="extra SFTConfig KEY=VALUE for the sitlib variants "
                    "(e.g. use_liger_kernel=true)")
    ap.add_argument("--torch-profile", type=int, default=0, help="N: profile N steps of each section's sitlib variant "
                    "after its timed ones (profile_<section>_<shape>_<device>.txt in --out)")
    ap.add_argument("--log-steps", type=int, default=1, help="log every N steps, every variant (each log reads the "
                    "loss back from the GPU; the notebooks log every 5 to 25). Speed is clocked per step either way; "
                    "the losses shown are the logged ones")
    ap.add_argument("--gaps", action="store_true", help="with --torch-profile: record Python stacks and add where the "
                    "device sat idle waiting for the host (bench/trace_gaps.py)")
    ap.add_argument("--gap-kernels", default="elementwise|reduce|copy",
                    help="with --gaps: kernels (a regex of names) whose device time is also shown by launch site")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ARGS = a = ap.parse_args()
    if a.warm < 1:
        ap.error("--warm must be at least 1 (the timed window starts after a finished step)")
    if os.environ.get("SIT_BENCH_RANDOM_FINGERPRINTS"):
        random_fingerprints()
    torch.backends.cuda.matmul.allow_tf32 = True
    sets = {"lora.dropout": 0.0, **parse_sets(a.set)}
    path = model_dir(a.shape)
    over = {"models.student": str(path), **sets}
    n_params = param_count(a.shape)
    steps = a.steps + a.warm
    fast = session(a.profile, a.sitlib_attn, True, over, steps)
    write_data(fast, a.rows)
    sections = a.sections.split(",")

    if "sft" in sections:
        from datasets import Dataset

        from sitlib import training
        from sitlib.models import load_tokenizer

        tok = load_tokenizer(str(path))
        rows, _ = training.sft_rows(fast)
        train = Dataset.from_list([training.tokenize_sft(tok, r, 1024) for r in rows])
        res = {"rows": len(rows), "mean_tokens_per_row": round(sum(map(len, train["input_ids"])) / len(rows), 1),
               "timed_steps_after_warmup": a.steps}
        runs = {"seed_recipe": lambda: sft_seed_recipe(path, tok, train, steps, n_params, a.warm),
                "stock_best": lambda: sft_stock_best(path, tok, train, steps, n_params, a.warm),
                "sitlib": lambda: sft_sitlib(fast, steps, n_params, a.warm, profile=True),
                "sitlib_peft_lora": peft_lora(lambda: sft_sitlib(fast, steps, n_params, a.warm)),
                "sitlib_stalled": stalled(lambda: sft_sitlib(fast, steps, n_params, a.warm)),
                # packed sequences stay packed (SDPA with a block-diagonal mask: the same batches); else padded
                "sitlib_plain": lambda: sft_sitlib(session(a.profile, "sdpa", bool(fast.config.sft.pack_tokens),
                                                           over, steps), steps, n_params, a.warm)}
        for v in a.sft_variants.split(","):
            if v == "seed_recipe" and not have("bitsandbytes"):
                res[v] = {"skipped": "bitsandbytes not importable"}
            else:
                res[v] = guarded(runs[v])
            print(v, json.dumps(res[v]), flush=True)
            # after every variant: a run cut short keeps what it measured
            save("sft", res)
        if "sitlib" in res and "sitlib_plain" in res and res["sitlib"].get("losses"):
            pairs = list(zip(res["sitlib"]["losses"], res["sitlib_plain"]["losses"]))
            res["sitlib_loss_max_rel_diff_vs_plain"] = round(max(abs(x - y) / abs(y) for x, y in pairs), 4)
        for k in ("stock_best", "seed_recipe", "sitlib_peft_lora", "sitlib_stalled"):
            ratio_over(res, k)
        save("sft", res)

    if "dpo" in sections:
        res = {"sitlib": guarded(lambda: dpo_sitlib(fast, steps, n_params, a.warm, profile=True))}
        print("dpo sitlib", json.dumps(res["sitlib"]), flush=True)
        for name, wrap in (("sitlib_peft_lora", peft_lora), ("sitlib_stalled", stalled),
                           ("sitlib_repeat_kv", repeat_kv)):
            if name in a.variants.split(","):
                res[name] = guarded(wrap(lambda: dpo_sitlib(fast, steps, n_params, a.warm)))
                ratio_over(res, name)
        if "seed_recipe" in a.variants.split(","):
            res["seed_recipe"] = guarded(lambda: dpo_seed_recipe(path, fast, steps, n_params, a.warm)) \
                if have("bitsandbytes") else {"skipped": "bitsandbytes not importable"}
        else:
            res["seed_recipe"] = {"skipped": "not in --variants"}
        ratio_over(res, "seed_recipe")
        save("dpo", res)

    if "prompt_tuning" in sections:
        res = {"sitlib": guarded(lambda: sft_sitlib(fast, steps, n_params, a.warm, section="prompt_tuning",
                                                         profile=True)),
               **{name: guarded(wrap(lambda: sft_sitlib(fast, steps, n_params, a.warm, section="prompt_tuning")))
                  for name, wrap in (("sitlib_stalled", stalled), ("sitlib_repeat_kv", repeat_kv))
                  if name in a.variants.split(",")},
               "seed_recipe": guarded(lambda: pt_seed_recipe(path, fast, steps, n_params, a.warm))
               if "seed_recipe" in a.variants.split(",") else {"skipped": "not in --variants"}}
        for name in ("seed_recipe", "sitlib_stalled", "sitlib_repeat_kv"):
            ratio_over(res, name)
        save("prompt_tuning", res)


ARGS = None

if __name__ == "__main__":
    main()
