"""Generation stages over several devices (generation.devices): on 2 CPU processes, 02, 04, 07 and 08 give the
rows of one process, and a run killed part-way resumes from its finished chunks with the same rows."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sitlib import agent, benchmark, magpie, preference, sharding
from sitlib.config import GenerationConfig, load_config
from sitlib.distributed import chunks
from sitlib.errors import ConfigError
from sitlib.hardware import PROFILES
from sitlib.models import load_model, load_tokenizer
from sitlib.session import setup

TWO = ["cpu", "cpu"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir), PROFILES["cpu"], role="teacher")


def _session(tiny_model_dir, tmp_path, devices, **over):
    return setup("cpu", str(tmp_path), overrides={
        "models.teacher": str(tiny_model_dir), "models.student": str(tiny_model_dir), "generation.devices": devices,
        **over}, verbose=False)


# ---------------------------------------------------------------- the setting

def test_devices_setting_resolves_and_names_the_key_when_wrong():
    r = sharding.resolve_devices
    assert r(1, "cuda", visible=4) == ["cuda:0"] and r(1, "cpu", visible=0) == ["cpu"]
    assert r("auto", "cuda", visible=1) == ["cuda:0"] and r("auto", "cpu", visible=0) == ["cpu"]
    assert r("auto", "cuda", visible=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert r(2, "cuda", visible=4) == ["cuda:0", "cuda:1"] and r(2, "cpu", visible=0) == TWO
    assert r(["cuda:1", "cuda:3"], "cuda", visible=4) == ["cuda:1", "cuda:3"]
    for value, profile, message in [(3, "cuda", "3 GPUs asked for, 2 visible"), (["cuda:2"], "cuda", "not visible"),
                                    (["cuda:0", "cuda:0"], "cuda", "names a GPU twice"),
                                    (["cuda:1"], "cuda", "one GPU is the notebook's own, cuda:0"),
                                    (["cuda:0"], "cpu", "not a device of the cpu profile"),
                                    (["gpu0"], "cuda", "not a device of the cuda profile"), ("all", "cuda", "allowed")]:
        with pytest.raises(ConfigError, match=f"config key 'generation.devices': .*{message}"):
            r(value, profile, visible=2)
    for bad in ("two", 0, [], True, [0, 1]):
        with pytest.raises(ConfigError, match="config key 'generation.devices'"):
            load_config(overrides={"generation.devices": bad})
    assert load_config().generation.devices == 1                    # the default: this process, as before


def test_one_device_keeps_the_stage_in_this_process(tiny_model_dir, tmp_path):
    for devices in (1, "auto"):   # "auto" without GPUs is one device
        S = _session(tiny_model_dir, tmp_path, devices)
        assert preference.candidate_shards(S) is None and sharding.for_variant(S, "base") is None
    assert magpie.teacher_shards(_session(tiny_model_dir, tmp_path, 1)) is None
    # 02 samples by chunks under any other setting, on one device too (its rows must not depend on the GPU count)
    assert magpie.teacher_shards(_session(tiny_model_dir, tmp_path, "auto")).devices == ("cpu",)
    S = _session(tiny_model_dir, tmp_path, TWO)
    assert magpie.teacher_shards(S).devices == ("cpu", "cpu") and sharding.for_variant(S, "base").adapter is None


def _times_ten(tok, model):
    return lambda item: [i * 10 for i in item["ids"]]


def test_finished_chunks_are_reused_only_for_the_same_key(tiny, tmp_path):
    tok, model = tiny
    shards, folder = sharding.Shards(tuple(TWO), "unused", PROFILES["cpu"]), tmp_path / "shards"
    work = chunks([0, 1, 2], 3)   # one chunk: served in this process, nothing spawned
    threads = torch.get_num_threads()
    assert sharding.run(shards, model, tok, _times_ten, work, {"seed": 1}, folder) == [[0, 10, 20]]
    assert torch.get_num_threads() == threads       # this process gave its cores back to the caller
    (shard_file,) = folder.glob("shard-*.jsonl")
    shard_file.write_text(json.dumps({"id": 0, "result": ["kept"]}) + "\n")
    assert sharding.run(shards, model, tok, _times_ten, work, {"seed": 1}, folder) == [["kept"]]   # resumed
    assert sharding.run(shards, model, tok, _times_ten, work, {"seed": 2}, folder) == [[0, 10, 20]]  # other key


# ---------------------------------------------------------------- 02 Magpie

def _one_process_magpie(model, tok, cfg, seed, teacher):
    """The single-process functions, one call per chunk of the data-parallel run (same chunking, same seeds)."""
    rows = []
    for c in magpie.work_chunks(list(range(cfg.num_instructions)), cfg):
        drafts = magpie.draft_instructions(model, tok, cfg, c["ids"], seed, magpie.header_processors(tok, cfg),
                                           teacher)
        rows += [r for done in magpie.answer_rows(model, tok, cfg, magpie.add_constraints(drafts, cfg, seed), seed)
                 for r in done]
    return sorted(rows, key=lambda r: r["id"])


def _rows(path):
    return sorted((json.loads(x) for x in path.read_text().splitlines()), key=lambda r: r["id"])


def test_magpie_on_two_devices_gives_the_rows_of_one_and_resumes(tiny, tiny_model_dir, tmp_path):
    tok, model = tiny
    cfg = replace(GenerationConfig(), num_instructions=8, batch_size=4, chunk_size=2, instruction_max_new_tokens=8,
                  response_max_new_tokens=6, constraint_share=1.0, constraint_samples=2, devices=TWO)
    want = _one_process_magpie(model, tok, cfg, 7, str(tiny_model_dir))
    assert [r["id"] for r in want] == list(range(8)) and len({r["response"] for r in want}) > 1
    out, metrics = tmp_path / "instructions.jsonl", tmp_path / "metrics.json"
    one = sharding.Shards(("cpu",), str(tiny_model_dir), PROFILES["cpu"], "teacher", folder=tmp_path / "one")
    magpie.run_generation(model, tok, cfg, out, metrics, str(tiny_model_dir), seed=7, shards=one)
    assert _rows(out) == want   # one device, chunked in this process ("auto" on one GPU)
    out.unlink()
    folder = tmp_path / "shards"
    shards = sharding.Shards(tuple(TWO), str(tiny_model_dir), PROFILES["cpu"], "teacher", folder=folder)
    magpie.run_generation(model, tok, cfg, out, metrics, str(tiny_model_dir), seed=7, shards=shards)
    assert _rows(out) == want
    # killed before the rows reached the file, and before the second device finished its answers
    drafts = {p.name: p.read_text() for p in (folder / "drafts").glob("shard-*")}
    out.unlink()
    (folder / "answers" / "shard-001-of-002.jsonl").unlink()
    magpie.run_generation(model, tok, cfg, out, metrics, str(tiny_model_dir), seed=7, shards=shards)
    assert _rows(out) == want
    assert {p.name: p.read_text() for p in (folder / "drafts").glob("shard-*")} == drafts   # nothing redrafted
    assert len((folder / "answers" / "shard-000-of-002.jsonl").read_text().splitlines()) == 2   # one chunk redone


# ---------------------------------------------------------------- 04 preference candidates

class LengthScorer:
    name = "length"

    def score(self, prompts, texts, ended):
        return [len(t) % 7 / 7 for t in texts]


def _candidates(S, tok, model, items):
    preference.sample_all(S, tok, model, LengthScorer(), items, "teacher")
    return (S.paths.data_preference / "candidates.jsonl").read_text().splitlines()


def test_preference_on_two_devices_gives_the_candidates_of_one_and_resumes(tiny, tiny_model_dir, tmp_path):
    tok, model = tiny
    over = {"preference.temperatures": [0.7, 1.3], "preference.max_new_tokens": 6, "preference.batch_size": 4,
            "preference.chunk_size": 2}
    items = [{"id": 10 + i, "prompt": f"Write sentence number {i} about the sea."} for i in range(6)]
    one = _candidates(_session(tiny_model_dir, tmp_path / "one", 1, **over), tok, model, items)
    S = _session(tiny_model_dir, tmp_path / "two", TWO, **over)
    assert _candidates(S, tok, model, items) == one                       # 3 waves, in the same order
    assert len({json.loads(x)["candidates"][0]["text"] for x in one}) > 1
    (S.paths.data_preference / "candidates.jsonl").unlink()             # killed before the records were written
    (S.paths.data_preference / ".candidates.shards" / "shard-001-of-002.jsonl").unlink()
    assert _candidates(S, tok, model, items) == one


def test_retrained_sft_adapter_does_not_reuse_finished_waves(tiny, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    tok, model = tiny
    S = _session(tiny_model_dir, tmp_path, TWO, **{"preference.temperatures": [0.7], "preference.max_new_tokens": 4})
    adapter = tmp_path / "sft"
    lora = get_peft_model(load_model(str(tiny_model_dir), PROFILES["cpu"]), LoraConfig(r=2, target_modules="all-linear"))
    lora.save_pretrained(adapter)
    shards = sharding.Shards(tuple(TWO), str(tiny_model_dir), PROFILES["cpu"], "student", str(adapter),
                             tmp_path / "waves")
    waves = [[{"id": 0, "prompt": "Name a colour."}]]   # one wave: served in this process, nothing spawned
    preference._sample_sharded(S, tok, model, waves, "sft", shards)
    stamp = (tmp_path / "waves" / "key.txt").read_text()
    preference._sample_sharded(S, tok, model, waves, "sft", shards)
    assert (tmp_path / "waves" / "key.txt").read_text() == stamp           # same adapter: resumed
    with torch.no_grad():                                                  # retrained: same path, new weights
        next(p for n, p in lora.named_parameters() if "lora_B" in n).add_(1.0)
    lora.save_pretrained(adapter)
    preference._sample_sharded(S, tok, model, waves, "sft", shards)
    assert (tmp_path / "waves" / "key.txt").read_text() != stamp


# ---------------------------------------------------------------- 07 benchmark, 08 agent (greedy)

def test_benchmark_on_two_devices_gives_the_rows_of_one(tiny, tiny_model_dir, tmp_path):
    tok, model = tiny
    over = {"evaluation.max_new_tokens": 8, "evaluation.batch_size": 4}
    items = benchmark.load_suite(6, seed=3)
    one = benchmark.generate_rows(_session(tiny_model_dir, tmp_path / "one", 1, **over), "base", model, tok, items)
    two = benchmark.generate_rows(_session(tiny_model_dir, tmp_path / "two", TWO, **over), "base", model, tok, items)
    assert two == one and len({r["output"] for r in one}) > 1


def test_agent_on_two_devices_gives_the_transcripts_of_one(tiny, tiny_model_dir, tmp_path):
    tok, model = tiny
    over = {"evaluation.agent_max_turns": 2, "evaluation.agent_max_new_tokens": 8, "evaluation.batch_size": 4}
    episodes = agent.EPISODES[:4]
    one = agent.transcripts(_session(tiny_model_dir, tmp_path / "one", 1, **over), "base", model, tok, episodes)
    two = agent.transcripts(_session(tiny_model_dir, tmp_path / "two", TWO, **over), "base", model, tok, episodes)
    assert two == one and [t["episode_id"] for t in two] == [e["id"] for e in episodes]
    assert len({t["turns"][0]["output"] for t in one}) > 1


def test_greedy_split_refuses_sampling(tiny):
    tok, model = tiny
    shards = sharding.Shards(tuple(TWO), "unused", PROFILES["cpu"])
    with pytest.raises(ValueError, match="sampled rows would depend"):
        sharding.generate_greedy(shards, model, tok, [[1, 2]], magpie.Sampling(4, 1.0, 1.0), 2)
    assert sharding.split(list(range(5)), 2) == [[0, 1], [2, 3, 4]] and sharding.split([1], 3) == [[1]]


def test_chunks_stay_small_enough_to_spread_over_the_devices():
    """Pools capped at 1,024 rows (80 GB profiles) must not make chunks that large: 1,500 ids still give 6 chunks
    of at most 256, each at least a chunk_size."""
    cfg = replace(GenerationConfig(), batch_size=1024, chunk_size=64)
    work = magpie.work_chunks(list(range(1500)), cfg)
    assert [len(c["ids"]) for c in work] == [256] * 5 + [220]
    small = replace(GenerationConfig(), batch_size=8, chunk_size=64)
    assert {len(c["ids"]) for c in magpie.work_chunks(list(range(128)), small)} == {64}
