"""Training blocks of 05/05b/06 on a tiny random Llama, called in the notebooks' order: label mask, loss
decreasing, kill-and-resume, reuse of a finished run, saved adapters, QLoRA on CPU, OOM, fingerprints."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import TrainerCallback

from sitlib import training
from sitlib.artifacts import write_jsonl
from sitlib.hardware import PROFILES
from sitlib.errors import BadInputError, ConfigError, OutOfMemoryError
from sitlib.models import load_model, load_tokenizer, lora_config, prompt_tuning_config, resolve_model
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


def test_show_label_mask_marks_exactly_the_answer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    shown = training.show_label_mask(tok, _sft_rows(1)[0])
    assert str(shown).endswith("⟦The answer is France.<|im_end|>⟧")
    assert str(shown).count("⟦") == 1 and shown.trained_tokens == sum(
        training.tokenize_sft(tok, _sft_rows(1)[0], 512)["completion_mask"])
    assert "background" in shown._repr_html_()


def _sft(S, stage="sft", callbacks=None):
    """Stage 05 / 05b through the blocks, in the notebooks' order."""
    tok = load_tokenizer(S.config.models.student)
    train, val, prompts = training.tokenized_sft_split(S, tok)
    peft_cfg = (lora_config(S.config.lora) if stage == "sft" else
                prompt_tuning_config(S.config.prompt_tuning, resolve_model(S.config.models.student)))
    tree = S.paths.models_sft if stage == "sft" else S.paths.models_prompt_tuning
    fp = training.sft_fingerprint(S, stage, train, val, peft_cfg)
    resume = training.prepare_checkpoints(tree / "checkpoints", fp, S.profile.weights_key)
    model = load_model(S.config.models.student, S.profile, for_training=True)
    trainer = training.sft_trainer(model, training.sft_args(S, stage, tree / "checkpoints"), train, val, tok,
                                   peft_cfg, callbacks)
    before = training.sample_answers(trainer.model, tok, prompts[:2], 8)
    result = training.reuse_finished(trainer, tree / "final", fp) or training.run_trainer(trainer, resume, S, stage)
    after = training.sample_answers(trainer.model, tok, prompts[:2], 8)
    assert len(before) == len(after) == 2
    ev = training.evaluate(trainer, S, stage)
    return training.finish_training(S, stage, trainer, tok, result, ev, fp, tree / "final",
                                    {"train_rows": len(train), "val_rows": len(val)}, peft_cfg, {"method": stage})


def _dpo(S):
    tok = load_tokenizer(S.config.models.student)
    train, val = training.preference_split(S)
    sft_final = training.sft_adapter(S)
    fp = training.dpo_fingerprint(S, train, val, sft_final)
    ckpt = S.paths.models_dpo / "checkpoints"
    resume = training.prepare_checkpoints(ckpt, fp, S.profile.weights_key)
    policy = training.dpo_policy(S, sft_final)
    trainer = training.dpo_trainer(policy, training.dpo_args(S, ckpt), train, val, tok)
    result = training.reuse_finished(trainer, S.paths.models_dpo / "final", fp) or \
        training.run_trainer(trainer, resume, S, "dpo")
    ev = training.evaluate(trainer, S, "dpo")
    return training.finish_training(S, "dpo", trainer, tok, result, ev, fp, S.paths.models_dpo / "final",
                                    {"train_pairs": len(train)}, policy.peft_config["default"], {"method": "dpo"},
                                    curve_extra="rewards/accuracies")


class KillAfterSave(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("runtime disconnected")


def test_sft_loss_decreases_resume_after_kill_and_adapter_loads_offline(tmp_path, tiny_model_dir, capsys):
    S = _session(tmp_path, tiny_model_dir, **{"sft.epochs": 3.0, "sft.learning_rate": 3e-2, "sft.warmup_ratio": 0.0})
    with pytest.raises(KeyboardInterrupt):
        _sft(S, callbacks=[KillAfterSave(4)])
    assert (S.paths.models_sft / "checkpoints" / "checkpoint-4").is_dir()
    assert not (S.paths.models_sft / "final" / "training_config.json").exists()
    m = _sft(S)
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
    again = _sft(S)           # finished with the same config + data: the saved adapter is reused, not retrained
    assert again["timestamp"] == m["timestamp"]
    assert "already trained with this config and data" in capsys.readouterr().out


def test_prompt_tuning_and_dpo(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="run 04_preference_generation first"):
        _dpo(S)
    pairs = [{"id": i, "prompt": r["prompt"], "chosen": r["completion"],
              "rejected": [{"role": "assistant", "content": "no"}]} for i, r in enumerate(_sft_rows(8))]
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[:6])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[6:])
    with pytest.raises(FileNotFoundError, match="run 05_sft_training first"):
        _dpo(S)
    pt = _sft(S, "prompt_tuning")
    assert pt["trainable_parameters"] == 4 * 64    # 4 virtual tokens × hidden size 64
    _sft(S)
    d = _dpo(S)
    assert d["steps"] == 3 and 0.0 <= d["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in d
    assert "ref" not in [p.name for p in (S.paths.models_dpo / "final").iterdir()]
    from peft import AutoPeftModelForCausalLM
    AutoPeftModelForCausalLM.from_pretrained(str(S.paths.models_dpo / "final"))
    AutoPeftModelForCausalLM.from_pretrained(str(S.paths.models_prompt_tuning / "final"))
    shown = training.show_preference_pair(load_tokenizer(str(tiny_model_dir)), pairs[0])
    assert shown["prompt as the model sees it"].endswith("<|im_start|>assistant\n") and shown["rejected"] == "no"


def test_qlora_4bit_path_trains_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    q = replace(PROFILES["cpu"], load_in_4bit=True)
    monkeypatch.setitem(PROFILES, "cpu", q)
    S = _session(tmp_path, tiny_model_dir, **{"sft.max_steps": 2})
    assert S.profile.load_in_4bit
    m = _sft(S, callbacks=[AdapterDtypes(seen := [])])
    assert m["steps"] == 2
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
    monkeypatch.setitem(PROFILES, "cpu", replace(PROFILES["cpu"], padding_free=True))
    S = _session(tmp_path, tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    train, val, _ = training.tokenized_sft_split(S, tok)
    args = training.sft_args(S, "sft", tmp_path / "ck")
    trainer = training.sft_trainer(load_model(str(tiny_model_dir), S.profile), args, train, val, tok,
                                   lora_config(S.config.lora))
    assert trainer.args.padding_free and trainer.args.max_length is None
    assert not training.sft_args(S, "prompt_tuning", tmp_path / "ck").padding_free   # virtual tokens prefix rows


def test_packed_sft_keeps_whole_rows_apart_in_sequences_of_pack_tokens(tmp_path, tiny_model_dir, monkeypatch):
    """sft.pack_tokens: TRL packs whole rows (best-fit decreasing) into sequences of at most that many tokens, and
    sit_varlen still attends within each row only (it gets every row's boundary)."""
    from sitlib import attention

    attention.register()
    monkeypatch.setitem(PROFILES, "cpu", replace(PROFILES["cpu"], padding_free=True, attn_implementation="sit_varlen"))
    monkeypatch.setattr(attention, "best_implementation", lambda device, dtype: attention.NAME)   # its exact fallback
    S = _session(tmp_path, tiny_model_dir, **{"sft.pack_tokens": 80, "sft.batch_size": 1, "sft.max_steps": 2})
    args = training.sft_args(S, "sft", tmp_path / "ck")
    assert args.packing and args.packing_strategy == "bfd" and args.max_length == 80
    seen = []   # (rows, tokens) of every packed sequence the attention saw
    real = attention._per_row_sdpa
    monkeypatch.setattr(attention, "_per_row_sdpa",
                        lambda *a: seen.append((a[3].numel() - 1, int(a[3][-1]))) or real(*a))
    assert _sft(S)["steps"] == 2
    assert seen and all(1 < rows and tokens <= 80 for rows, tokens in seen)


@pytest.mark.parametrize("world,accumulation,per_process_tokens,per_process_accumulation",
                         [("1", 1, 2048, 1), ("2", 1, 1024, 1), ("4", 4, 2048, 1)])
def test_packed_sequences_split_over_processes(tmp_path, tiny_model_dir, monkeypatch, world, accumulation,
                                               per_process_tokens, per_process_accumulation):
    """On W processes one sequence of pack_tokens becomes W of pack_tokens / W (the tokens per optimizer step stay);
    where that would cut rows of models.max_seq_length, accumulation splits as before (here 4 over 4 processes)."""
    from sitlib.distributed import for_world

    S = _session(tmp_path, tiny_model_dir, **{"sft.pack_tokens": 2048, "sft.batch_size": 1,
                                              "sft.gradient_accumulation": accumulation})
    monkeypatch.setenv("WORLD_SIZE", world)
    sec, tokens = training.packed_for_world(S.config.sft, 1024)
    kw = for_world({"per_device_train_batch_size": sec.batch_size,
                    "gradient_accumulation_steps": sec.gradient_accumulation})
    assert (tokens, kw["gradient_accumulation_steps"]) == (per_process_tokens, per_process_accumulation)
    assert S.config.sft.gradient_accumulation == accumulation   # the configured values stay (fingerprint, resume)


def test_pack_tokens_needs_a_padding_free_profile(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir, **{"sft.pack_tokens": 80})
    with pytest.raises(ConfigError, match=r"'sft.pack_tokens' \(80\) needs a padding-free profile; 'cpu'"):
        training.sft_args(S, "sft", tmp_path / "ck")


@pytest.mark.parametrize("liger,installed", [(True, True), (True, False), (False, True)])
def test_liger_only_where_the_profile_asks_and_it_is_installed(tmp_path, tiny_model_dir, monkeypatch, liger,
                                                               installed):
    monkeypatch.setitem(PROFILES, "cpu", replace(PROFILES["cpu"], liger=liger))
    monkeypatch.setattr(training, "liger_available", lambda: installed)
    S = _session(tmp_path, tiny_model_dir)
    for section in ("sft", "prompt_tuning"):
        assert training.sft_args(S, section, tmp_path / "ck").use_liger_kernel == (liger and installed)
    assert training.dpo_args(S, tmp_path / "ck").use_liger_kernel == (liger and installed)


def test_padded_batches_round_up_to_64_tokens_on_a_gpu_only(tmp_path, tiny_model_dir, monkeypatch):
    """DPO and prompt tuning pad each batch to a multiple of 64 on a GPU profile (measured faster there), and DPO's
    collator honours it; on the CPU they pad to the batch's longest row."""
    from peft import get_peft_model

    S = _session(tmp_path, tiny_model_dir)
    assert training.dpo_args(S, tmp_path / "ck").pad_to_multiple_of is None
    assert training.sft_args(S, "prompt_tuning", tmp_path / "ck").pad_to_multiple_of is None
    S = _session(tmp_path, tiny_model_dir, **{"dpo.batch_size": 2})
    monkeypatch.setattr(S, "profile", replace(S.profile, device="cuda"))
    assert training.sft_args(S, "prompt_tuning", tmp_path / "ck").pad_to_multiple_of == training.GPU_PAD_MULTIPLE
    args = training.dpo_args(S, tmp_path / "ck")
    assert args.pad_to_multiple_of == training.GPU_PAD_MULTIPLE == 64
    args.use_cpu = True   # this machine has no GPU; the collator is the same
    pairs = [{"prompt": [{"role": "user", "content": f"Say {i}."}], "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no " * (i + 1)}]} for i in range(4)]
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs)
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[:2])
    train, val = training.preference_split(S)
    policy = get_peft_model(load_model(str(tiny_model_dir), PROFILES["cpu"], for_training=True),
                            lora_config(S.config.lora))
    trainer = training.dpo_trainer(policy, args, train, val, load_tokenizer(str(tiny_model_dir)))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == 64 and batch["attention_mask"].sum() < batch["attention_mask"].numel()


def _pairs_of_varied_length() -> list[dict]:
    """20 preference pairs whose answers run from one to ten words."""
    words = "one two three four five six seven eight nine ten".split()
    return [{"prompt": [{"role": "user", "content": f"Say {w}."}],
             "chosen": [{"role": "assistant", "content": " ".join(words[:1 + i % 10])}],
             "rejected": [{"role": "assistant", "content": " ".join(words[:1 + (3 * i) % 10])}]}
            for i, w in enumerate(words * 2)]


def test_dpo_batches_group_pairs_by_their_padded_length(tmp_path, tiny_model_dir):
    """transformers' length grouping needs an input_ids column, which tokenized DPO pairs lack: the sampler must
    measure each pair as prompt + longer answer, and one epoch must still visit every pair once."""
    from peft import get_peft_model

    S = _session(tmp_path, tiny_model_dir, **{"dpo.batch_size": 2, "dpo.gradient_accumulation": 2})
    pairs = _pairs_of_varied_length()
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[:16])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[16:])
    tok = load_tokenizer(str(tiny_model_dir))
    train, val = training.preference_split(S)
    policy = get_peft_model(load_model(str(tiny_model_dir), S.profile, for_training=True), lora_config(S.config.lora))
    trainer = training.dpo_trainer(policy, training.dpo_args(S, tmp_path / "ck"), train, val, tok)
    ds = trainer.train_dataset
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, training.EpochSeededLengthGroupedSampler)
    want = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    assert sampler.lengths == want and len(set(want)) > 3
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    assert want[order[0]] == max(want)   # transformers' grouping puts the longest row first
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4   # chosen and rejected of 2 pairs
    assert next(iter(trainer.get_eval_dataloader()))["input_ids"].shape[0] == 4
    # the order follows seed + epoch, not the global RNG: a resumed run replays the epoch it stopped in
    orders = []
    for epoch, noise in ((1, 0), (1, 99), (2, 0)):
        torch.manual_seed(noise)
        again = trainer._get_train_sampler()
        again.set_epoch(epoch)
        orders.append(list(again))
    assert orders[0] == orders[1] != orders[2]


@pytest.mark.parametrize("bf16_adapters", [True, False])
def test_bf16_adapters_on_a_bf16_base(tmp_path, tiny_model_dir, bf16_adapters):
    """PEFT keeps LoRA weights in fp32 on a bf16 base; bf16_adapters makes them (and a frozen copy) bf16."""
    from types import SimpleNamespace

    from peft import get_peft_model

    S = _session(tmp_path, tiny_model_dir)
    prof = replace(PROFILES["cpu"], dtype="bfloat16", bf16_adapters=bf16_adapters)
    base = load_model(str(tiny_model_dir), S.profile).to(torch.bfloat16)
    model = get_peft_model(base, lora_config(S.config.lora))
    model.add_adapter("ref", lora_config(S.config.lora))   # DPO's frozen reference copy
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    training.match_adapter_dtype(SimpleNamespace(model=model), prof)
    want = torch.bfloat16 if bf16_adapters else torch.float32
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {want}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_args_come_from_the_resolved_settings(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir, **{"sft.learning_rate": 1.5e-4, "dpo.beta": 0.25})
    table = training.args_table(training.sft_args(S, "sft", tmp_path / "ck"))
    assert table.loc["learning_rate", "value"] == "0.00015" and "completion_only_loss" in table.index
    d = training.dpo_args(S, tmp_path / "ck")
    assert d.beta == 0.25 and d.learning_rate == S.config.dpo.learning_rate and not d.bf16


def _first_dpo_loss(S, tmp_path, tok, train, val, name):
    from peft import get_peft_model

    torch.manual_seed(0)
    policy = get_peft_model(load_model(S.config.models.student, S.profile, for_training=True),
                            lora_config(S.config.lora))
    trainer = training.dpo_trainer(policy, training.dpo_args(S, tmp_path / name), train, val, tok)
    trainer.args.max_steps = 1
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


def test_dpo_sft_weight_adds_the_chosen_answers_nll_and_ld_alpha_reaches_trl(tmp_path, tiny_model_dir):
    """dpo.sft_weight > 0 is RPO: TRL's "sft" loss (the chosen answers' NLL, large on a random model) is added with
    that weight; dpo.ld_alpha goes to TRL as LD-DPO's α; out of range is a config error naming the key."""
    plain = _session(tmp_path / "a", tiny_model_dir)
    d = training.dpo_args(plain, tmp_path / "ck")
    assert d.loss_type == ["sigmoid"] and d.ld_alpha is None
    rpo = _session(tmp_path / "b", tiny_model_dir, **{"dpo.sft_weight": 0.5, "dpo.ld_alpha": 0.3})
    d = training.dpo_args(rpo, tmp_path / "ck")
    assert d.loss_type == ["sigmoid", "sft"] and d.loss_weights == [1.0, 0.5] and d.ld_alpha == 0.3
    with pytest.raises(ConfigError, match="dpo.ld_alpha"):
        _session(tmp_path / "c", tiny_model_dir, **{"dpo.ld_alpha": 1.5})
    with pytest.raises(ConfigError, match="dpo.sft_weight"):
        _session(tmp_path / "d", tiny_model_dir, **{"dpo.sft_weight": -1})
    pairs = _pairs_of_varied_length()
    write_jsonl(plain.paths.data_preference / "dpo_train.jsonl", pairs[:8])
    write_jsonl(plain.paths.data_preference / "dpo_val.jsonl", pairs[8:10])
    train, val = training.preference_split(plain)
    tok = load_tokenizer(str(tiny_model_dir))
    rpo_sft_only = _session(tmp_path / "e", tiny_model_dir, **{"dpo.sft_weight": 0.5})
    losses = {name: _first_dpo_loss(S, tmp_path, tok, train, val, name)
              for name, S in (("plain", plain), ("rpo", rpo_sft_only))}
    # step 1: policy == reference, so the DPO term is log 2 for both; RPO adds 0.5 × NLL (≈ ln vocab on random weights)
    assert losses["plain"] == pytest.approx(0.6931, abs=1e-3)
    assert losses["rpo"] - losses["plain"] > 0.5 * 3


class OomAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_gpu_oom_in_a_training_step_is_one_line_and_writes_no_result(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir)
    with pytest.raises(OutOfMemoryError) as e:
        _sft(S, callbacks=[OomAtStep()])
    msg = str(e.value)
    assert "\n" not in msg and "sft.batch_size (now 4)" in msg and "sft.gradient_accumulation" in msg
    assert "models.max_seq_length (now 96)" in msg
    assert not (S.paths.models_sft / "final").exists()
    assert not (S.paths.evaluation_metrics / "sft_metrics.json").exists()


def test_fingerprints_ignore_the_profile_name_and_dpo_follows_adapter_content(tmp_path, tiny_model_dir):
    S = _session(tmp_path, tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    train, val, _ = training.tokenized_sft_split(S, tok)
    peft_cfg = lora_config(S.config.lora)
    fp = training.sft_fingerprint(S, "sft", train, val, peft_cfg)
    other = replace(S, profile=replace(S.profile, name="a100"))
    assert training.sft_fingerprint(other, "sft", train, val, peft_cfg) == fp
    S.config.sft.learning_rate *= 2
    assert training.sft_fingerprint(S, "sft", train, val, peft_cfg) != fp

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-1")
    before = training.adapter_digest(adapter)
    import os
    os.utime(adapter / "adapter_model.safetensors", (1, 1))      # only the modification time changes
    assert training.adapter_digest(adapter) == before
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-2")
    assert training.adapter_digest(adapter) != before


def _forward_greedy(model, ids, n):
    """Ground truth: greedy decoding by full forward passes (no cache, no generate)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1:].argmax(-1)], 1)
    return x[0, len(ids):].tolist()


def test_prompt_tuned_answers_match_full_forward_decoding(tiny_model_dir):
    """Batched, KV-cached decoding of a prompt-tuned model (the base model fed the soft prompt's embeddings) gives
    what full forwards through the PEFT model give, one token at a time."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from sitlib.generation import chat_input_ids

    tok = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(tiny_model_dir), PROFILES["cpu"]), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=PromptTuningInit.RANDOM)).eval()
    with torch.no_grad():   # a soft prompt far from zero, as after training
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    # lengths far apart: the batch is left-padded, so a shifted position or a leaked pad would change the answers
    prompts = ["Write a short poem about the sea.", "Hi",
               "Explain photosynthesis in simple words for a child, with two short examples and one list."]
    got = training.sample_answers(model, tok, prompts, 12)
    assert len({len(chat_input_ids(tok, [[{"role": "user", "content": p}]])[0]) for p in prompts}) == 3
    for p, g in zip(prompts, got):
        want = _forward_greedy(model, chat_input_ids(tok, [[{"role": "user", "content": p}]])[0], 12)
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id)]
        assert g["answer"] == tok.decode(want, skip_special_tokens=True).strip()
    model.train()   # the chat cell follows training: it answers greedily in eval mode, then gives the mode back
    assert training.chat(model, tok, prompts[2], max_new_tokens=12) == got[2]["answer"] and model.training


def test_sft_fingerprint_is_the_same_in_every_process(tmp_path, tiny_model_dir):
    """PEFT keeps target_modules as a set, whose order follows the process's string hash seed."""
    import subprocess
    import sys
    code = ("from sitlib import training; from sitlib.models import lora_config; from sitlib.config import LoraConfig;"
            "print(training._jsonable(lora_config(LoraConfig()))['target_modules'])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1 and "q_proj" in outs.pop()


def test_row_and_pair_selection_keep_only_checked_data(tmp_path, tiny_model_dir):
    rows = _sft_rows(20)
    for r in rows[::4]:   # every 4th row: a constrained instruction whose answer passed its check
        r["constraints"] = [{"id": "punctuation:no_comma", "kwargs": {}}]
    S = _session(tmp_path, tiny_model_dir, **{"sft.rows": "constrained"})
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:16])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[16:])
    train, val = training.sft_rows(S)
    assert [r["id"] for r in train] == [0, 4, 8, 12] and [r["id"] for r in val] == [16]
    assert len(training.sft_rows(S, "prompt_tuning")[0]) == 16        # prompt_tuning.rows stays "all"
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[17:])   # no constrained row held out
    with pytest.raises(BadInputError, match=r"sft_val\.jsonl: sft\.rows = 'constrained' leaves no row"):
        training.sft_rows(S)

    # sft.answers_per_row: a training row's other checked answers (03's passed_answers) become rows of their own
    for r in rows[::4]:
        r["passed_answers"] = []
    rows[0]["passed_answers"], rows[16]["passed_answers"] = ["b", "c", "d"], ["v"]
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:16])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[16:])
    S.config.sft.answers_per_row = 3
    train, val = training.sft_rows(S)
    assert [(r["id"], r["completion"][0]["content"]) for r in train[:4]] == [
        (0, rows[0]["completion"][0]["content"]), (0, "b"), (0, "c"), (4, rows[4]["completion"][0]["content"])]
    assert len(train) == 6 and len(val) == 1 and train[1]["prompt"] == rows[0]["prompt"]   # held-out rows: one each
    assert [bool(r.get("further_answer")) for r in train[:4]] == [False, True, True, False]
    assert not any("passed_answers" in r for r in train)
    assert len(training.sft_rows(S, "prompt_tuning")[0]) == 16        # prompt tuning keeps one answer per row
    for r in rows:
        r.pop("passed_answers", None)
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:16])   # written before 03 kept them
    with pytest.raises(BadInputError, match=r"sft_train\.jsonl: its constrained rows have no passed_answers.*rer"):
        training.sft_rows(S)
    plain = [{k: v for k, v in r.items() if k != "constraints"} for r in rows[:16]]
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", plain)   # no constrained row at all
    S.config.sft.rows = "all"
    with pytest.raises(BadInputError, match=r"no constrained row with a passing sample.*constraint_share"):
        training.sft_rows(S)
    repaired = [{**r, "repaired": True} for r in rows[:16]]   # constrained rows, each answer edited by code
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", repaired)
    with pytest.raises(BadInputError, match=r"all 4 constrained rows were repaired by code.*constraint_samples"):
        training.sft_rows(S)
    S.config.sft.answers_per_row, S.config.sft.rows = 1, "constrained"

    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "no"}],
              "pair_rule": "constraint_check" if "constraints" in r else "score"} for r in rows]
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", pairs[:16])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", pairs[16:])
    assert [len(d) for d in training.preference_split(S)] == [16, 4]
    S.config.dpo.pairs = "constraint_check"
    assert [len(d) for d in training.preference_split(S)] == [4, 1]
