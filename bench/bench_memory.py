"""Peak GPU memory of every stage under every GPU profile, each on an emulated card of its size.

Each profile runs on one large GPU under SIT_EMULATE_GPU_GB = its card's memory (15, 22.5, 40, 80 GB): sitlib's
set-up then caps the CUDA allocator at that share of the real card (torch.cuda.set_per_process_memory_fraction)
and reports that card's free memory to code that sizes batches by it. Every stage runs its real sitlib code
path on random weights of the real shapes, saved once to a temporary folder and loaded with
sitlib.models.load_model (so 4-bit loading is the real path too):
  generate       02's answer pass: the Llama-3.1-8B-shaped teacher, generation.batch_size rows whose instructions
                 are generation.instruction_max_new_tokens long, generation.response_max_new_tokens new tokens
  preference     04: the teacher samples preference.batch_size answers (preference.max_new_tokens) and the
                 DeBERTa-v3-large-shaped reward model scores them, both loaded at once as in 04
  sft            05: LoRA/QLoRA SFT on the Llama-3.2-3B shape, rows of models.max_seq_length tokens, a few
                 optimizer steps, then the evaluation pass
  prompt_tuning  05b: the same with prompt tuning
  dpo            06: DPO on the SFT adapter, chosen and rejected rows of models.max_seq_length tokens
  benchmark      07: greedy answers of the 3B shape with a LoRA adapter, evaluation.batch_size rows,
                 prompt + evaluation.max_new_tokens = models.max_seq_length
A stage's peak is the most the allocator reserved while it ran (model load included), and it is ok when it ran
without running out of memory and peaked at <= 90% of the card. Text is random words of a word-level tokenizer
with the real vocabulary size (one word = one token, so row lengths are exact); random weights rarely emit EOS,
so every generated row runs to its full length (the worst case).

    python bench/bench_memory.py                                   # every GPU profile, every stage
    python bench/bench_memory.py --profiles t4,l4 --stages sft,dpo  # a part (results merge into the same file)
    python bench/bench_memory.py --tiny                            # CPU dry run: tiny models, same code paths
Writes bench/results/memory_<device>.json (and a copy under $OUT when set):
    {"device", "profiles": {"t4": {"card_gb": 15, "settings": {...}, "stages": {"generate": {"peak_gb", "ok",
     ...}, ...}}, ...}}
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sitlib import hardware, models, training  # noqa: E402
from sitlib.artifacts import write_json, write_jsonl  # noqa: E402
from sitlib.errors import OutOfMemoryError  # noqa: E402
from sitlib.generation import Sampling, chat_input_ids, generate  # noqa: E402

STAGES = ("generate", "preference", "sft", "prompt_tuning", "dpo", "benchmark")
GPU_PROFILES = tuple(hardware.GPU_CARDS_GB)
VOCAB = 128256          # Llama 3's vocabulary (the reward model shares it: DeBERTa-v3's is 128100)
SHAPES = {              # Llama-3.1-8B-Instruct (teacher), Llama-3.2-3B (student), DeBERTa-v3-large (reward model)
    "teacher": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, tie_word_embeddings=False),
    "student": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, tie_word_embeddings=True),
    "reward": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
TINY = {"teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False),
        "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True),
        "reward": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
TINY_VOCAB = 512
# --tiny: lengths small enough for two CPU cores; everything else (batch sizes, 4-bit, code paths) as profiled
TINY_OVERRIDES = {"models.max_seq_length": 64, "generation.instruction_max_new_tokens": 8,
                  "generation.response_max_new_tokens": 8, "preference.max_new_tokens": 8,
                  "evaluation.max_new_tokens": 8}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---------------------------------------------------------------- random models of the real shapes

def build_tokenizer(path: Path, vocab: int):
    """A word-level tokenizer over `vocab` ids: words w3..w{vocab-1}, so n random words are exactly n tokens."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    core = Tokenizer(tm.WordLevel(words, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


def build_models(root: Path, tiny: bool) -> dict[str, Path]:
    """Random weights of each role's shape, saved once as HF folders (reused by later runs on the machine)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

    shapes, vocab = (TINY, TINY_VOCAB) if tiny else (SHAPES, VOCAB)
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    out = {}
    for role, shape in shapes.items():
        path = root / f"{role}{'-tiny' if tiny else ''}"
        out[role] = path
        if (path / "config.json").exists():
            continue
        tmp = path.with_name(path.name + ".tmp")
        tok = build_tokenizer(tmp, vocab)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if role == "reward":
            cfg = DebertaV2Config(vocab_size=vocab, max_position_embeddings=512, relative_attention=True,
                                  position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                                  pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                                  num_labels=1, **ids, **shape)
            cls = DebertaV2ForSequenceClassification
        else:
            cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=131072, rope_theta=500000.0, **ids, **shape)
            cls = LlamaForCausalLM
        t = time.perf_counter()
        with torch.device(device):
            model = cls(cfg).to(dtype)
        model.save_pretrained(tmp)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        os.replace(tmp, path)
        print(f"built random {role} ({sum(1 for _ in path.iterdir())} files) in {time.perf_counter() - t:.0f} s",
              flush=True)
    return out


# ---------------------------------------------------------------- synthetic rows at full length

def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(len(SPECIALS), vocab)}" for _ in range(n))


def conversation_rows(rng, n: int, prompt_words: int, answer_words: int, vocab: int, dpo: bool = False):
    rows = []
    for i in range(n):
        row = {"id": i, "prompt": [{"role": "user", "content": words(rng, prompt_words, vocab)}]}
        answer = [{"role": "assistant", "content": words(rng, answer_words, vocab)}]
        if dpo:
            row.update(chosen=answer, rejected=[{"role": "assistant", "content": words(rng, answer_words, vocab)}])
        else:
            row["completion"] = answer
        rows.append(row)
    return rows


def write_training_data(S, vocab: int, steps: int) -> None:
    """SFT and DPO rows longer than models.max_seq_length (cut to it by the stages' own truncation): enough rows
    for `steps` optimizer steps of the larger of the SFT and prompt-tuning batches, and one full eval batch."""
    cfg, n = S.config, S.config.models.max_seq_length
    rng = random.Random(0)
    rows_per_sequence = max(1, cfg.sft.pack_tokens // n)   # packed SFT: whole rows fill each sequence
    per_step = max(cfg.sft.batch_size * cfg.sft.gradient_accumulation * rows_per_sequence,
                   cfg.prompt_tuning.batch_size * cfg.prompt_tuning.gradient_accumulation)
    rows = conversation_rows(rng, per_step * steps + max(cfg.sft.batch_size * rows_per_sequence,
                                                         cfg.prompt_tuning.batch_size),
                             n // 4, n, vocab)
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[: per_step * steps])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[per_step * steps:])
    d = cfg.dpo
    pairs = conversation_rows(rng, d.batch_size * d.gradient_accumulation * steps + d.batch_size, n // 4, n, vocab,
                              dpo=True)
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[: -d.batch_size])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[-d.batch_size:])


# ---------------------------------------------------------------- the stages, each on its real code path

_TEACHER: dict = {}   # the teacher stays loaded from 02 to 04 within a profile (its load is in 02's peak)


def teacher(S):
    """(tokenizer, model) of the teacher as the profile loads it (4-bit where the profile says so)."""
    if S.profile.name not in _TEACHER:
        drop_teacher()
        _TEACHER[S.profile.name] = (models.load_tokenizer(S.config.models.teacher),
                                    models.load_model(S.config.models.teacher, S.profile, role="teacher"))
    return _TEACHER[S.profile.name]


def drop_teacher() -> None:
    _TEACHER.clear()
    free_memory()


def stage_generate(S, work: Path, vocab: int) -> dict:
    from sitlib import magpie

    cfg = S.config.generation
    tok, model = teacher(S)
    rng = random.Random(1)
    rows = [{"id": i, "instruction": words(rng, cfg.instruction_max_new_tokens, vocab), "system_prompt": None,
             "instruction_tokens": cfg.instruction_max_new_tokens, "instruction_complete": True}
            for i in range(cfg.batch_size)]
    done = [r for batch in magpie.answer_rows(model, tok, replace(cfg, constraint_share=0.0), rows, S.config.seed)
            for r in batch]
    return {"rows": len(done), "new_tokens": max(r["response_tokens"] for r in done),
            "teacher_4bit": S.profile.teacher_in_4bit}


def stage_preference(S, work: Path, vocab: int) -> dict:
    from sitlib import preference, scoring

    cfg = S.config.preference
    tok, model = teacher(S)
    scorer = scoring.build_scorer(S, (tok, model))     # the reward model, resident beside the teacher as in 04
    rng = random.Random(2)
    n_prompt = S.config.generation.instruction_max_new_tokens
    items = [{"id": i, "prompt": words(rng, n_prompt, vocab)} for i in range(cfg.batch_size)]
    # one temperature: every temperature is a separate generate call of the same size
    comps = preference.sample_candidates(model, tok, items, replace(cfg, temperatures=[1.0]), S.config.seed)
    scores = scorer.score([it["prompt"] for it in items], [c[0].text for c in comps], [c[0].ended for c in comps])
    return {"rows": len(scores), "new_tokens": max(c[0].n_tokens for c in comps), "scorer": scorer.name,
            "teacher_4bit": S.profile.teacher_in_4bit}


def _train_sft_like(S, work: Path, section: str) -> tuple:
    tok = models.load_tokenizer(S.config.models.student)
    train, val, _ = training.tokenized_sft_split(S, tok)
    model = models.load_model(S.config.models.student, S.profile, for_training=True)
    peft_cfg = (models.lora_config(S.config.lora) if section == "sft" else
                models.prompt_tuning_config(S.config.prompt_tuning, models.resolve_model(S.config.models.student)))
    args = training.sft_args(S, section, work / f"{section}_checkpoints")
    trainer = training.sft_trainer(model, args, train, val, tok, peft_cfg)
    result = training.run_trainer(trainer, None, S, section)
    training.evaluate(trainer, S, section)
    return trainer, result


def stage_sft(S, work: Path, vocab: int) -> dict:
    trainer, result = _train_sft_like(S, work, "sft")
    trainer.model.save_pretrained(str(work / "sft_adapter"))      # what 06 and 07 load
    return {"steps": trainer.state.global_step, "tokens": result.tokens}


def stage_prompt_tuning(S, work: Path, vocab: int) -> dict:
    trainer, result = _train_sft_like(S, work, "prompt_tuning")
    return {"steps": trainer.state.global_step, "tokens": result.tokens}


def ensure_adapter(S, work: Path) -> Path:
    """An SFT LoRA adapter for 06/07 when the sft stage did not run in this profile (built outside the measure)."""
    path = work / "sft_adapter"
    if not (path / "adapter_config.json").exists():
        from peft import get_peft_model

        base = models.load_model(S.config.models.student, replace(S.profile, load_in_4bit=False))
        get_peft_model(base, models.lora_config(S.config.lora)).save_pretrained(str(path))
        del base
        free_memory()
    return path


def stage_dpo(S, work: Path, vocab: int) -> dict:
    tok = models.load_tokenizer(S.config.models.student)
    train, val = training.preference_split(S)
    policy = training.dpo_policy(S, work / "sft_adapter")
    trainer = training.dpo_trainer(policy, training.dpo_args(S, work / "dpo_checkpoints"), train, val, tok)
    result = training.run_trainer(trainer, None, S, "dpo")
    training.evaluate(trainer, S, "dpo")
    return {"steps": trainer.state.global_step, "tokens": result.tokens}


def stage_benchmark(S, work: Path, vocab: int) -> dict:
    from peft import PeftModel

    ev, n = S.config.evaluation, S.config.models.max_seq_length
    tok = models.load_tokenizer(S.config.models.student)
    base = models.load_model(S.config.models.student, S.profile)
    model = PeftModel.from_pretrained(base, str(work / "sft_adapter")).eval()
    rng = random.Random(3)
    # the chat template adds a few tokens: the prompt fills the rest of models.max_seq_length
    convs = [[{"role": "user", "content": words(rng, max(1, n - ev.max_new_tokens - 8), vocab)}]
             for _ in range(ev.batch_size)]
    outs = generate(model, tok, chat_input_ids(tok, convs), Sampling.greedy(ev.max_new_tokens), ev.batch_size)
    return {"rows": len(outs), "new_tokens": max(o.n_tokens for o in outs)}


RUNNERS = {"generate": stage_generate, "preference": stage_preference, "sft": stage_sft,
           "prompt_tuning": stage_prompt_tuning, "dpo": stage_dpo, "benchmark": stage_benchmark}


# ---------------------------------------------------------------- measuring

class PeakTracker:
    """The most the CUDA allocator reserved since start(), across the resets sitlib's trainer does itself."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self.allocated = cuda, 0, 0
        self._reset = torch.cuda.reset_peak_memory_stats

    def start(self) -> None:
        self.peak = self.allocated = 0
        if self.cuda:
            self._reset()
            torch.cuda.reset_peak_memory_stats = self._keep_then_reset

    def _keep_then_reset(self, device=None) -> None:
        self.peak = max(self.peak, torch.cuda.max_memory_reserved())
        self.allocated = max(self.allocated, torch.cuda.max_memory_allocated())
        self._reset(device)

    def stop(self) -> tuple[float | None, float | None]:
        """(peak reserved, peak allocated) in GiB."""
        if not self.cuda:
            return None, None
        torch.cuda.reset_peak_memory_stats = self._reset
        return (max(self.peak, torch.cuda.max_memory_reserved()) / 2**30,
                max(self.allocated, torch.cuda.max_memory_allocated()) / 2**30)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def settings(S) -> dict:
    c, p = S.config, S.profile
    return {"dtype": p.dtype, "student_4bit": p.load_in_4bit, "teacher_4bit": p.teacher_in_4bit,
            "gradient_checkpointing": p.gradient_checkpointing, "padding_free": p.padding_free,
            "attn_implementation": p.attn_implementation, "max_seq_length": c.models.max_seq_length,
            "generation_batch": c.generation.batch_size, "preference_batch": c.preference.batch_size,
            "evaluation_batch": c.evaluation.batch_size,
            "sft": f"{c.sft.batch_size}x{c.sft.gradient_accumulation}",
            "prompt_tuning": f"{c.prompt_tuning.batch_size}x{c.prompt_tuning.gradient_accumulation}",
            "dpo": f"{c.dpo.batch_size}x{c.dpo.gradient_accumulation}", "sft_optimizer": c.sft.optimizer,
            "sft_pack_tokens": c.sft.pack_tokens, "liger": p.liger, "bf16_adapters": p.bf16_adapters}


def session_for(profile: str, paths: dict[str, Path], work: Path, steps: int, tiny: bool):
    """sitlib.setup under the emulated card (GPU), or a CPU copy of the profile with short rows (--tiny)."""
    from sitlib import session as sess

    over = {"models.student": str(paths["student"]), "models.teacher": str(paths["teacher"]),
            "models.reward": str(paths["reward"]), "models.scorer": "reward_model"}
    for section in ("sft", "prompt_tuning", "dpo"):
        over.update({f"{section}.max_steps": steps, f"{section}.save_steps": 10**6, f"{section}.eval_steps": 10**6,
                     f"{section}.logging_steps": 1, f"{section}.warmup_ratio": 0.0})
    if not tiny:
        os.environ[hardware.EMULATE_ENV] = str(hardware.GPU_CARDS_GB[profile])
        return sess.setup(profile, str(work / "out"), overrides=over, verbose=False)
    from sitlib.config import load_config
    from sitlib.runtime import output_tree

    prof = replace(hardware.PROFILES[profile], device="cpu", dtype="float32", tf32=False)
    cfg = load_config(None, prof.overrides, {**over, **TINY_OVERRIDES})
    det = hardware.Detection("cpu (tiny dry run)", None, 0.0, "cpu", "--tiny")
    return sess.Session(cfg, prof, det, output_tree(work / "out"))


def run_stage(S, stage: str, work: Path, vocab: int, card_gb: float | None, tracker: PeakTracker) -> dict:
    free_memory()
    tracker.start()
    t = time.perf_counter()
    entry: dict = {}
    try:
        entry["result"] = RUNNERS[stage](S, work, vocab)
        error = None
    except (torch.cuda.OutOfMemoryError, OutOfMemoryError) as e:
        error = "out of memory: " + str(e).splitlines()[0][:300]
    except Exception as e:   # noqa: BLE001  (record any failure of one stage and go on with the others)
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
    seconds = time.perf_counter() - t
    peak, allocated = tracker.stop()
    free_memory()
    entry = {"peak_gb": None if peak is None else round(peak, 2),
             "allocated_gb": None if allocated is None else round(allocated, 2),
             "ok": error is None and (peak is None or peak <= 0.9 * card_gb),
             "share_of_card": None if peak is None else round(peak / card_gb, 3),
             "seconds": round(seconds, 1), **entry}
    if error:
        entry["error"] = error
    return entry


def device_name(tiny: bool) -> str:
    return "cpu-tiny" if tiny else torch.cuda.get_device_name(0)


def write_results(out_dir: Path, res: dict) -> Path:
    """Merge into memory_<device>.json, so runs split by --profiles add up to one file."""
    name = "".join(c if c.isalnum() else "_" for c in res["device"]).strip("_")
    path = out_dir / f"memory_{name}.json"
    if path.exists():
        old = json.loads(path.read_text())
        for prof, entry in res["profiles"].items():
            merged = old.get("profiles", {}).get(prof, {})
            entry = {**merged, **entry, "stages": {**merged.get("stages", {}), **entry["stages"]}}
            old.setdefault("profiles", {})[prof] = entry
        res = {**old, **{k: v for k, v in res.items() if k != "profiles"}, "profiles": old["profiles"]}
    write_json(path, res)
    if os.environ.get("OUT"):
        write_json(Path(os.environ["OUT"]) / path.name, res)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default=",".join(GPU_PROFILES), help="comma-separated, of " + ", ".join(GPU_PROFILES))
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ", ".join(STAGES))
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per training stage")
    ap.add_argument("--build-only", action="store_true", help="only save the random models (for parallel runs)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with tiny models (no memory measured)")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "sit-bench-models"))
    ap.add_argument("--out", default=None, help="default bench/results (a temporary folder with --tiny)")
    a = ap.parse_args(argv)
    a.out = a.out or (tempfile.mkdtemp(prefix="sit-bench-tiny-") if a.tiny else str(ROOT / "bench" / "results"))
    a.profiles, a.stages = a.profiles.split(","), a.stages.split(",")
    for kind, given, known in (("profile", a.profiles, GPU_PROFILES), ("stage", a.stages, STAGES)):
        if bad := [x for x in given if x not in known]:
            ap.error(f"unknown {kind} {', '.join(bad)} (known: {', '.join(known)})")
    if not a.tiny and not torch.cuda.is_available():
        ap.error("no CUDA GPU: run on a GPU larger than the biggest card measured, or use --tiny for a dry run")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if os.environ.get("SIT_BENCH_RANDOM_FINGERPRINTS"):
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_training import random_fingerprints

        random_fingerprints()
    paths = build_models(Path(a.models_dir), a.tiny)
    if a.build_only:
        return {}
    vocab = TINY_VOCAB if a.tiny else VOCAB
    res = {"device": device_name(a.tiny), "torch": torch.__version__,
           "device_memory_gb": None if a.tiny else round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
           "shapes": {"teacher": "Llama-3.1-8B", "student": "Llama-3.2-3B", "reward": "DeBERTa-v3-large"}
           if not a.tiny else "tiny", "training_steps": a.steps, "profiles": {}}
    tracker = PeakTracker(cuda=not a.tiny)
    for profile in a.profiles:
        work = Path(tempfile.mkdtemp(prefix=f"sit-bench-memory-{profile}-"))
        S = session_for(profile, paths, work, a.steps, a.tiny)
        write_training_data(S, vocab, a.steps)
        card = None if a.tiny else hardware.GPU_CARDS_GB[profile]
        entry = {"card_gb": card, "settings": settings(S), "stages": {}}
        res["profiles"][profile] = entry
        for stage in a.stages:
            if stage not in ("generate", "preference"):
                drop_teacher()      # the student stages run without the teacher resident, as in 05-07
            if stage in ("dpo", "benchmark"):
                ensure_adapter(S, work)
            entry["stages"][stage] = run_stage(S, stage, work, vocab, card, tracker)
            print(json.dumps({profile: {stage: entry["stages"][stage]}}), flush=True)
            path = write_results(Path(a.out), res)     # after every stage: a run cut short keeps what it measured
        drop_teacher()
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
