"""05/05b/06 on a tiny random Llama: label mask, loss decreasing, kill-and-resume, saved adapters, QLoRA on CPU."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import TrainerCallback

from sitlib import training
from sitlib.artifacts import write_jsonl
from sitlib.hardware import PROFILES
from sitlib.models import load_tokenizer
from sitlib.session import setup

WORDS = ["sea", "poem", "capital", "France", "answer", "numbers", "photosynthesis", "list"]


def _sft_rows(n):
    return [{"id": i, "prompt": [{"role": "user", "content": f"Write a short poem about the {WORDS[i % 8]}."}],
             "completion": [{"role": "assistant", "content": f"The answer is {WORDS[(i + 3) % 8]}."}]}
            for i in range(n)]


def _session(tmp_path, tiny_model_dir, **over):
    base = {"models.student": str(tiny_model_dir), "models.max_seq_length": 96,
            "sft.epochs": 1.0, "sft.batch_size": 4, "sft.gradient_accumulation": 1, "sft.save_steps": 2,
            "sft.eval_steps": 100, "sft.logging_steps": 1, "sft.sample_prompts": 2,
            "prompt_tuning.epochs": 1.0, "prompt_tuning.batch_size": 4, "prompt_tuning.gradient_accumulation": 1,
            "prompt_tuning.save_steps": 2, "prompt_tuning.eval_steps": 100, "prompt_tuning.init": "random",
            "prompt_tuning.num_virtual_tokens": 4,
            "dpo.batch_size": 2, "dpo.gradient_accumulation": 1, "dpo.save_steps": 2, "dpo.eval_steps": 100,
            "dpo.logging_steps": 1}
    base.update(over)
    S = setup("cpu", str(tmp_path / "out"), overrides=base, verbose=False)
    rows = _sft_rows(20)
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:16])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[16:])
    return S


def test_label_mask_is_answer_plus_eos_only(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    row = _sft_rows(1)[0]
    ex = training.tokenize_sft(tok, row, 512)
    labelled = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if m]
    assert tok.decode(labelled) == "The answer is France.<|im_end|>"
    assert labelled[-1] == tok.eos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    prompt = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if not m]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and tok.decode(prompt).count("<|im_start|>") == 2


def test_trainer_batches_mask_prompt_and_padding_but_train_eos(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sitlib.models import load_model

    tok = load_tokenizer(str(tiny_model_dir))
    rows = _sft_rows(4)
    rows[1]["completion"][0]["content"] = "A much longer answer, so that this row needs no padding at all."
    ds = Dataset.from_list([training.tokenize_sft(tok, r, 512) for r in rows])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     completion_only_loss=True, report_to="none", gradient_checkpointing=False)
    trainer = SFTTrainer(model=load_model(str(tiny_model_dir), PROFILES["cpu"]), args=args, train_dataset=ds,
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[mask == 0] == -100).all()                   # padding never in the loss
    answers = sorted(tok.decode(row[row != -100]) for row in labels)
    assert answers == sorted(r["completion"][0]["content"] + "<|im_end|>" for r in rows)   # answer + EOS only


class KillAfterSave(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("runtime disconnected")


def test_sft_loss_decreases_resume_after_kill_and_adapter_loads_offline(tmp_path, tiny_model_dir, capsys):
    S = _session(tmp_path, tiny_model_dir, **{"sft.epochs": 3.0, "sft.learning_rate": 3e-2, "sft.warmup_ratio": 0.0})
    with pytest.raises(KeyboardInterrupt):
        training.train_sft(S, callbacks=[KillAfterSave(4)])
    assert (S.paths.models_sft / "checkpoints" / "checkpoint-4").is_dir()
    m = training.train_sft(S)
    assert "resuming from checkpoint-4" in capsys.readouterr().out
    assert m["steps"] == 12
    history = json.loads((S.paths.models_sft / "final" / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.6      # loss decreased
    assert m["trainable_parameters"] > 0 and m["tokens_this_run"] > 0 and m["eval_loss"] > 0
    for f in ("sft_metrics.json", "sft_metrics.config.json"):
        assert (S.paths.evaluation_metrics / f).exists()
    assert (S.paths.evaluation_figures / "sft_training_curves.png").stat().st_size > 1000
    tc = json.loads((S.paths.models_sft / "final" / "training_config.json").read_text())
    assert tc["base_model"] == str(tiny_model_dir) and tc["peft"]["r"] == 8 and tc["results"]["steps"] == 12

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer
    model = AutoPeftModelForCausalLM.from_pretrained(str(S.paths.models_sft / "final"))
    tok = AutoTokenizer.from_pretrained(str(S.paths.models_sft / "final"))
    assert tok.pad_token_id != tok.eos_token_id and model.peft_config["default"].r == 8
    again = training.train_sft(S)           # finished with the same config + data: not retrained
    assert again["timestamp"] == m["timestamp"]


def test_prompt_tuning_and_dpo(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="run 04_preference_generation first"):
        training.train_dpo(S)
    pairs = [{"id": i, "prompt": r["prompt"], "chosen": r["completion"],
              "rejected": [{"role": "assistant", "content": "no"}]} for i, r in enumerate(_sft_rows(8))]
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[:6])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[6:])
    with pytest.raises(FileNotFoundError, match="run 05_sft_training first"):
        training.train_dpo(S)
    pt = training.train_prompt_tuning(S)
    assert pt["trainable_parameters"] == 4 * 64    # 4 virtual tokens × hidden size 64
    training.train_sft(S)
    d = training.train_dpo(S)
    assert d["steps"] == 3 and 0.0 <= d["eval_reward_accuracy"] <= 1.0
    assert "ref" not in [p.name for p in (S.paths.models_dpo / "final").iterdir()]
    from peft import AutoPeftModelForCausalLM
    AutoPeftModelForCausalLM.from_pretrained(str(S.paths.models_dpo / "final"))
    AutoPeftModelForCausalLM.from_pretrained(str(S.paths.models_prompt_tuning / "final"))


def test_qlora_4bit_path_trains_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import sitlib.session as session_mod
    q = replace(PROFILES["cpu"], load_in_4bit=True)
    monkeypatch.setitem(PROFILES, "cpu", q)
    S = _session(tmp_path, tiny_model_dir, **{"sft.max_steps": 2})
    assert S.profile.load_in_4bit
    m = training.train_sft(S, callbacks=[AdapterDtypes(seen := [])])
    assert m["method"] == "qlora_4bit" and m["steps"] == 2
    assert m["total_parameters"] > m["trainable_parameters"] > 0
    # TRL makes a 4-bit model's adapter bf16; without bf16 (a T4's fp16 AMP) it must train in fp32
    assert seen and set(seen) == {torch.float32}


class AdapterDtypes(TrainerCallback):
    def __init__(self, seen):
        self.seen = seen

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.seen += [p.dtype for p in model.parameters() if p.requires_grad]


def test_padding_free_profiles_build_a_trainer(tmp_path, tiny_model_dir, monkeypatch):
    """TRL refuses max_length with padding-free; the GPU profiles use padding-free, so this must construct."""
    from trl import SFTConfig, SFTTrainer

    S = _session(tmp_path, tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    train, val, _ = training.tokenized_sft_split(S, tok)
    args = SFTConfig(**training.common_args(S.config.sft, S, tmp_path / "ck", padding_free=True),
                     completion_only_loss=True)
    from sitlib.models import load_model
    trainer = SFTTrainer(model=load_model(str(tiny_model_dir), PROFILES["cpu"]), args=args, train_dataset=train,
                         eval_dataset=val, processing_class=tok)
    assert trainer.args.padding_free and trainer.args.max_length is None


def test_gpu_oom_names_the_values_to_lower(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir)

    class Boom:
        state = None

        def train(self, resume_from_checkpoint=None):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        model = torch.nn.Linear(1, 1)
    with pytest.raises(RuntimeError, match=r"lower sft\.batch_size \(now 4\).*sft\.gradient_accumulation"):
        training.run_trainer(Boom(), None, S, "sft")
