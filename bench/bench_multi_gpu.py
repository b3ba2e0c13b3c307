"""Scaling on 2 GPUs of one host: LoRA SFT of the Llama-3.2-3B shape on 1 GPU vs 2 GPUs (DDP through
`accelerate launch` and accelerate_configs/ddp.yaml, the effective batch kept by sitlib.distributed.for_world),
and data-parallel generation (sitlib.distributed.generate_data_parallel) on 1 vs 2 GPUs.

Random weights of the real shape and a small BPE tokenizer built here (nothing is downloaded); the rows are
synthetic text, so only speed and the loss agreement mean anything:
    python bench/bench_multi_gpu.py [--steps 20] [--out bench/results]      # a host with ≥ 2 GPUs, ≤ 6 min on H200s
    python bench/bench_multi_gpu.py --tiny                                  # the same code path on 2 CPU processes
Writes <out>/<date>_<device>_multi.json: {"device", "multi_gpu": {...}, "generation": {...}}. --tiny writes to a
temporary folder unless --out is given (its numbers are a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("the sea poem capital answer numbers photosynthesis list write short explain simple words what is "
         "title section sure here one two hello world step add").split()
SHAPE_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)


# ---------------------------------------------------------------- model and data

def build_model(path: Path, tiny: bool) -> None:
    import torch
    from conftest import build_tiny_tokenizer   # a byte-level BPE tokenizer with a ChatML template
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    tok = build_tiny_tokenizer(path)
    shape = SHAPE_TINY | {"vocab_size": len(tok)} if tiny else SHAPE_3B
    cfg = LlamaConfig(**shape, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cpu" if tiny else "cuda"):
        m = LlamaForCausalLM(cfg).to(torch.float32 if tiny else torch.bfloat16)
    m.save_pretrained(path)


def text(rng, lo, hi) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi))) + "."


def sft_rows(n: int, tiny: bool) -> list[dict]:
    rng = random.Random(0)
    lo, hi = (3, 12) if tiny else (60, 220)
    return [{"prompt": [{"role": "user", "content": text(rng, lo // 3 + 1, hi // 3)}],
             "completion": [{"role": "assistant", "content": text(rng, lo, hi)}]} for _ in range(n)]


# ---------------------------------------------------------------- SFT worker (every launched process runs it)

def sft_worker(a) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sitlib import distributed as dist
    from sitlib.artifacts import write_json

    cuda = torch.cuda.is_available() and not a.tiny
    if os.environ.get("SIT_BENCH_RANDOM_FINGERPRINTS"):
        # where datasets cannot pickle pyarrow's MonthDayNano while hashing a new Dataset (DESIGN.md): the hash
        # only names cache files, so a random one changes nothing measured
        import secrets

        import datasets.arrow_dataset as ad

        ad.generate_fingerprint = lambda dataset: secrets.token_hex(8)

    class Clock(TrainerCallback):
        """Time and global non-padding tokens at the end of each optimizer step (GPU work finished)."""
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.pad_token = "<|endoftext|>"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa",
                                                 device_map=dist.device_map_for_load() if cuda else None)
    # configured: batch × accumulation on one GPU; for_world keeps that effective batch on the launched world
    kw = dist.for_world({"per_device_train_batch_size": a.batch, "gradient_accumulation_steps": a.accumulation})
    args = SFTConfig(output_dir=a.out + "/ckpt", max_steps=a.steps, learning_rate=2e-4, lr_scheduler_type="constant",
                     logging_steps=1, save_strategy="no", use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False,
                     report_to="none", seed=0, dataloader_num_workers=0, max_length=a.max_length,
                     completion_only_loss=True, include_num_input_tokens_seen="non_padding", **kw)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows(a.rows, a.tiny)),
                         processing_class=tok, peft_config=lora, callbacks=[clock])
    trainer.train()
    (s0, t0, n0), (s1, t1, n1) = clock.marks[a.warmup - 1], clock.marks[-1]
    result = {"processes": dist.world().size, "accumulation_per_process": args.gradient_accumulation_steps,
              "steps": trainer.state.global_step, "timed_steps": s1 - s0, "timed_seconds": round(t1 - t0, 3),
              "timed_tokens": n1 - n0, "tok_per_s": round((n1 - n0) / (t1 - t0), 1),
              "losses": [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h],
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    dist.main_process_only(write_json)(Path(a.out) / "sft.json", result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(a, processes: int, out: Path) -> dict:
    worker = [str(Path(__file__)), "--worker", "--model", a.model, "--out", str(out), "--steps", str(a.steps),
              "--warmup", str(a.warmup), "--batch", str(a.batch), "--accumulation", str(a.accumulation),
              "--rows", str(a.rows), "--max-length", str(a.max_length)] + (["--tiny"] if a.tiny else [])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if a.tiny:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if processes == 1:
        if not a.tiny:
            env["CUDA_VISIBLE_DEVICES"] = _visible()[0]
        cmd = [sys.executable] + worker
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(_free_port())] + worker
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    res = json.loads((out / "sft.json").read_text())
    res["wall_seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps({f"sft_{processes}": res}), flush=True)
    return res


def _visible() -> list[str]:
    import torch

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env.split(",") if env else [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------- generation (one model per device)

def gen_process(new_tokens: int, batch: int, tok, model):
    """make_process: sampled answers for a chunk of prompt ids, seeded by the chunk id, timed per chunk
    (after one warm-up call: the first call at a new shape runs several times slower)."""
    import torch

    from sitlib.generation import Sampling, chat_input_ids, generate

    def convs(ids):
        return [[{"role": "user", "content": f"{WORDS[i % len(WORDS)]} {text(random.Random(i), 10, 40)}"}]
                for i in ids]

    generate(model, tok, chat_input_ids(tok, convs(range(batch))), Sampling(new_tokens), batch)

    def run(item):
        torch.manual_seed(item["id"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = generate(model, tok, chat_input_ids(tok, convs(item["ids"])), Sampling(new_tokens), batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {"pid": os.getpid(), "seconds": time.perf_counter() - t, "tokens": sum(o.n_tokens for o in outs),
                "texts": [o.text for o in outs]}
    return run


def run_generation(a, devices: list[str]) -> dict:
    import functools

    from sitlib import distributed as dist
    from sitlib.hardware import PROFILES

    profile = PROFILES["cpu" if a.tiny else "h100"]
    worker = dist.ModelWorker(a.model, profile, functools.partial(gen_process, a.new_tokens, a.gen_batch))
    t = time.perf_counter()
    results = dist.generate_data_parallel(worker, dist.chunks(range(a.prompts), a.gen_batch), devices)
    wall = time.perf_counter() - t
    busy: dict[int, float] = {}
    for r in results:
        busy[r["pid"]] = busy.get(r["pid"], 0.0) + r["seconds"]
    tokens = sum(r["tokens"] for r in results)
    # the slowest worker's generation time: the others idle after their share
    out = {"devices": len(devices), "tokens": tokens, "generate_seconds": round(max(busy.values()), 3),
           "tok_per_s": round(tokens / max(busy.values()), 1), "wall_seconds_with_load": round(wall, 1),
           "texts": [x for r in results for x in r["texts"]]}
    print(json.dumps({f"generation_{len(devices)}": {k: v for k, v in out.items() if k != "texts"}}), flush=True)
    return out


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama on 2 CPU processes (a dry run)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per SFT run (default 20; tiny 6)")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 8; tiny 2)")
    ap.add_argument("--accumulation", type=int, default=2, help="on 1 GPU; 2 GPUs use accumulation / 2")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=None, help="generation prompts (default 1024; tiny 16)")
    ap.add_argument("--gen-batch", type=int, default=None, help="prompts per chunk and call (default 128; tiny 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128; tiny 8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for k, big, small in (("steps", 20, 6), ("batch", 8, 2), ("rows", 1000, 64), ("prompts", 1024, 16),
                          ("gen_batch", 128, 4), ("new_tokens", 128, 8)):
        if getattr(a, k) is None:
            setattr(a, k, small if a.tiny else big)
    if a.worker:
        return sft_worker(a)

    import torch

    if not a.tiny and len(_visible()) < 2:
        sys.exit("needs a host with at least 2 GPUs (or --tiny for the CPU dry run)")
    a.model = a.model or str(Path(tempfile.gettempdir()) / ("bench_llama_tiny_multi" if a.tiny else "bench_llama_3b_tinytok"))
    build_model(Path(a.model), a.tiny)
    device = "cpu (tiny dry run)" if a.tiny else torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="sit-bench-multi-"))
    one, two = run_sft(a, 1, work / "one"), run_sft(a, 2, work / "two")
    rel = [abs(x - y) / abs(x) for x, y in zip(one["losses"], two["losses"])]
    gen_devices = ["cpu", "cpu"] if a.tiny else [f"cuda:{i}" for i in range(2)]
    g1, g2 = run_generation(a, gen_devices[:1]), run_generation(a, gen_devices)
    res = {
        "device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "shape": "tiny Llama (random weights)" if a.tiny else "Llama-3.2-3B (random weights)",
        "multi_gpu": {
            "gpus": 2, "single_gpu_tok_per_s": one["tok_per_s"], "multi_gpu_tok_per_s": two["tok_per_s"],
            "scaling_efficiency": round(two["tok_per_s"] / (2 * one["tok_per_s"]), 3),
            "losses_single": one["losses"], "losses_multi": two["losses"],
            "max_relative_loss_difference": round(max(rel), 4) if rel else None,
            "settings": {"steps": a.steps, "timed_steps": one["timed_steps"], "per_gpu_batch": a.batch,
                         "accumulation_single": one["accumulation_per_process"],
                         "accumulation_multi": two["accumulation_per_process"],
                         "effective_batch": a.batch * a.accumulation, "max_length": a.max_length,
                         "lora": "r=16 alpha=32 all-linear dropout 0", "dtype": "float32" if a.tiny else "bfloat16",
                         "launcher": "accelerate launch --config_file accelerate_configs/ddp.yaml"},
            "single": {k: v for k, v in one.items() if k != "losses"},
            "multi": {k: v for k, v in two.items() if k != "losses"},
        },
        "generation": {
            "gpus": 2, "single_gpu_tok_per_s": g1["tok_per_s"], "multi_gpu_tok_per_s": g2["tok_per_s"],
            "speedup": round(g2["tok_per_s"] / g1["tok_per_s"], 3),
            "wall_seconds_with_load_single": g1["wall_seconds_with_load"],
            "wall_seconds_with_load_multi": g2["wall_seconds_with_load"],
            "same_rows": g1["texts"] == g2["texts"],
            "settings": {"prompts": a.prompts, "prompts_per_call": a.gen_batch, "new_tokens": a.new_tokens,
                         "sampling": "temperature 1.0, top_p 1.0", "profile": "cpu" if a.tiny else "h100"},
        },
    }
    name = "".join(c if c.isalnum() else "_" for c in ("cpu_tiny" if a.tiny else device)).strip("_")
    out_dir = Path(a.out or (tempfile.mkdtemp(prefix="sit-bench-tiny-") if a.tiny else ROOT / "bench" / "results"))
    body = json.dumps(res, indent=2) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{res['date']}_{name}_multi.json"
    path.write_text(body)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / path.name).write_text(body)
    print(body)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
