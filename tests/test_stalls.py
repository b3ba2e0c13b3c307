"""sitlib.stalls: the trainers without the bookkeeping waits keep the same numbers (tokens seen, FLOPs, losses) and
do not take the slow paths (the Trainer's own token count through the device, a parameter count per batch)."""
import gc
import pickle
import weakref
from types import SimpleNamespace

import pytest
import torch
import transformers
from peft import get_peft_model

from sitlib import stalls, training
from sitlib.artifacts import write_jsonl
from sitlib.models import load_model, load_tokenizer, lora_config

from test_training import _pairs_of_varied_length, _session

TRACK = transformers.Trainer._track_num_input_tokens   # the Trainer's own count (through the device)


def _run(S, tmp_path, tiny_model_dir, stage: str, monkeypatch):
    """3 optimizer steps of `stage` through sitlib's builders; (state, losses, calls of the slow paths)."""
    calls = {"track": 0, "num_parameters": 0}
    def counted_track(self, inputs):
        calls["track"] += 1
        return TRACK(self, inputs)

    monkeypatch.setattr(transformers.Trainer, "_track_num_input_tokens", counted_track)
    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_model_dir))
    base = load_model(str(tiny_model_dir), S.profile, for_training=True)
    if stage == "dpo":
        train, val = training.preference_split(S)
        policy = get_peft_model(base, lora_config(S.config.lora))
        args = training.dpo_args(S, tmp_path / f"ck-{stalls.UNSTALLED}")
        args.max_steps, args.eval_strategy, args.save_strategy = 3, "no", "no"
        trainer = training.dpo_trainer(policy, args, train, None, tok)
    else:
        train, val, _ = training.tokenized_sft_split(S, tok)
        args = training.sft_args(S, "sft", tmp_path / f"ck-{stalls.UNSTALLED}")
        args.max_steps, args.eval_strategy, args.save_strategy = 3, "no", "no"
        trainer = training.sft_trainer(base, args, train, None, tok, lora_config(S.config.lora))
    count = trainer.model.num_parameters

    def counted_count(*a, **kw):
        calls["num_parameters"] += 1
        return count(*a, **kw)

    trainer.model.num_parameters = counted_count
    forward = trainer.model.forward

    def checked_forward(*a, **kw):
        assert stalls.COUNT_KEY not in kw   # the count rides in the batch but never reaches the model
        return forward(*a, **kw)

    trainer.model.forward = checked_forward
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.state, losses, calls, trainer


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_unstalled_trainers_count_the_same_tokens_and_flops_without_the_slow_paths(tmp_path, tiny_model_dir,
                                                                                  monkeypatch, stage):
    S = _session(tmp_path, tiny_model_dir, **{"dpo.batch_size": 2, "dpo.gradient_accumulation": 2,
                                              "sft.gradient_accumulation": 2, "sft.batch_size": 2})
    write_jsonl(S.paths.data_preference / "dpo_train.jsonl", _pairs_of_varied_length()[:16])
    write_jsonl(S.paths.data_preference / "dpo_val.jsonl", _pairs_of_varied_length()[16:])
    fast_state, fast_losses, fast_calls, trainer = _run(S, tmp_path, tiny_model_dir, stage, monkeypatch)
    assert type(trainer).__mro__[1].__name__.startswith("Unstalled")
    assert not trainer.args.logging_nan_inf_filter and trainer._nan_filter   # applied on the GPU side instead
    monkeypatch.setattr(stalls, "UNSTALLED", False)
    slow_state, slow_losses, slow_calls, slow = _run(S, tmp_path, tiny_model_dir, stage, monkeypatch)
    assert slow.args.logging_nan_inf_filter and not any(c.__name__.startswith("Unstalled") for c in type(slow).__mro__)
    assert fast_state.num_input_tokens_seen == slow_state.num_input_tokens_seen > 0
    assert fast_state.total_flos == slow_state.total_flos > 0
    assert fast_losses == pytest.approx(slow_losses, rel=1e-5) and len(fast_losses) == 3
    # 3 steps of 2 micro-batches: the Trainer's own count ran for each one there, never here
    assert slow_calls == {"track": 6, "num_parameters": 6}
    assert fast_calls == {"track": 0, "num_parameters": 1}


def test_the_token_count_follows_the_trainers_rule_and_never_reaches_the_model():
    ids, mask = _batch([]).values()
    assert stalls.host_token_count({"input_ids": ids, "attention_mask": mask}, "non_padding", "input_ids", 0) == 5
    assert stalls.host_token_count({"input_ids": ids}, "non_padding", "input_ids", 0) == 4   # pad id 0, as the Trainer
    assert stalls.host_token_count({"input_ids": ids}, "non_padding", "input_ids", None) == 8
    assert stalls.host_token_count({"input_ids": ids, "attention_mask": mask}, "all", "input_ids", 0) == 8
    collate = stalls.CountingCollator(_batch, "non_padding", "input_ids", 0)
    assert collate([])[stalls.COUNT_KEY] == 5
    assert pickle.loads(pickle.dumps(collate))([])[stalls.COUNT_KEY] == 5   # DataLoader workers may pickle it
    assert stalls.CountingCollator(lambda feats: ["not a dict"], "all", "input_ids", 0)([]) == ["not a dict"]


def _batch(features):
    return {"input_ids": torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0],
                                                                                                   [1, 1, 0, 0]])}


def test_the_nan_filter_runs_on_the_gpu_side_as_transformers_runs_it():
    """A non-finite micro-batch loss counts as the average logged loss so far (transformers: _tr_loss / (1 + steps
    since the last log)), a finite one as itself; the Trainer's own filter, which reads every loss back, is off."""
    class Base:
        def __init__(self, args):
            self.args, self.accelerator = args, SimpleNamespace(unwrap_model=lambda m: m)
            self.state, self._globalstep_last_logged = SimpleNamespace(global_step=3), 1
            self._tr_loss = torch.tensor(9.0)   # summed since the last log, 2 steps ago: 9 / (1 + 2) = 3
            self.losses = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("-inf"))]

        def training_step(self, model, inputs, *a, **kw):
            return self.losses.pop(0)

    args = SimpleNamespace(logging_nan_inf_filter=True, world_size=1, include_num_input_tokens_seen="no")
    trainer = stalls.unstalled(Base)(args)
    assert not trainer.args.logging_nan_inf_filter
    assert [float(trainer.training_step(None, {})) for _ in range(3)] == [2.0, 3.0, 3.0]
    unfiltered = stalls.unstalled(Base)(SimpleNamespace(**{**vars(args), "logging_nan_inf_filter": False}))
    assert [float(unfiltered.training_step(None, {})) for _ in range(2)][1] != 3.0   # asked for no filter: NaN stays


def test_remembered_unwrap_answers_once_per_model_and_passes_calls_with_arguments():
    seen = []

    def unwrap(model, *args, **kwargs):   # one process, no wrapper: accelerate answers with the model itself
        seen.append((args, kwargs))
        return model

    cached = stalls.remembered_unwrap(unwrap)
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert cached(a) is cached(a) is a and cached(b) is b
    assert len(seen) == 2
    cached(a, keep_fp32_wrapper=False)
    cached(a, keep_fp32_wrapper=False)
    assert len(seen) == 4
    ref = weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None   # remembering a model does not keep it alive
