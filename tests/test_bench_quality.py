"""bench/bench_quality.py reads the files the stages' own writers produce (the GPU run is the only other check)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from sitlib import benchmark, filtering
from sitlib.artifacts import write_json, write_metrics
from sitlib.config import Config
from sitlib.errors import MissingInputError
from sitlib.runtime import output_tree

ROOT = Path(__file__).resolve().parent.parent


def load_bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(variant: str, passed: list[bool]) -> list[dict]:
    return [{"model": variant, "prompt_id": f"p{i}", "category": "format", "prompt": "p", "output": "o",
             "output_tokens": 5, "stopped_on_eos": True, "checks": [{"type": "x", "passed": p}], "passed": p}
            for i, p in enumerate(passed)]


@pytest.fixture
def run_tree(tmp_path):
    """A finished run's tree: 03's and 07's files from their writers, the rest with the keys their writers use."""
    tree = output_tree(tmp_path)
    cfg = Config()
    cfg.models.student = cfg.models.teacher = "embedded"
    cfg.models.scorer = "offline"
    session = SimpleNamespace(paths=tree, config=cfg, profile=SimpleNamespace(name="h100"))
    write_metrics(tree.evaluation_metrics / "setup.json", {"device": "NVIDIA H200", "student": "embedded"}, cfg)
    write_json(tree.evaluation_metrics / "generation_metrics.json", {"rows_total": 1500, "constrained_rows": 450,
                                                                         "constrained_rows_repaired": 12})
    filtering.write_splits(session, [{"id": i} for i in range(9)], [{"id": 9}], [{"id": 10}],
                           {"input_rows": 11, "kept": 10, "rejected": 1, "reasons": {"refusal": 1}})
    write_json(tree.evaluation_metrics / "preference_metrics.json",
               {"prompts": 600, "pairs": 500, "dpo_train": 450, "dpo_val": 50})
    for stage, steps in (("sft", 113), ("prompt_tuning", 113), ("dpo", 29)):
        extra = {"eval_reward_accuracy": 0.75, "train_pairs": 440} if stage == "dpo" else {"train_rows": 9}
        write_json(tree.evaluation_metrics / f"{stage}_metrics.json", {"steps": steps, "profile": "h100", **extra})
    done = {v: benchmark.save_variant(session, v, {}, rows(v, [True, i % 2 == 0, False]))
            for i, v in enumerate(("base", "sft", "prompt_tuning", "dpo"))}
    benchmark.write_results(session, done, [{"id": f"p{i}"} for i in range(3)], {}, {})
    return tree.root


def test_quality_reads_the_writers_files(run_tree):
    q = load_bench_quality().quality(run_tree, {"01": 1.0})
    assert q["device"] == "NVIDIA H200" and q["profile"] == "h100" and q["stage_seconds"] == {"01": 1.0}
    assert q["model"].startswith("student SmolLM2-135M-Instruct (embedded)") and q["model"].endswith("offline")
    assert q["models"]["base"] == {"prompt_level_accuracy": 0.6667, "instruction_level_accuracy": 0.6667,
                                   "n_prompts": 3}
    assert q["models"]["sft"]["prompt_level_accuracy"] == 0.3333
    assert q["counts"] == {"instructions_generated": 1500, "constrained_instructions": 450, "constrained_repaired": 12,
                           "kept_after_filter": 10,
                           "constrained_kept": 0,
                           "sft_train_rows": 9, "sft_val_rows": 1, "sft_trained_rows": 9, "dpo_trained_pairs": 440,
                           "preference_prompts": 600,
                           "preference_pairs": 500, "dpo_train_pairs": 450, "dpo_val_pairs": 50, "sft_steps": 113,
                           "prompt_tuning_steps": 113, "dpo_steps": 29, "benchmark_items": 3}
    assert q["dpo_eval_reward_accuracy"] == 0.75
    # base passes p0, p1; sft passes p0 only (one item lost); prompt_tuning as base; dpo as sft
    assert [(c["variant"], c["won"], c["lost"], c["points"]) for c in q["versus_base"]] == [
        ("sft", 0, 1, -33.3), ("prompt_tuning", 0, 0, 0.0), ("dpo", 0, 1, -33.3)]
    assert q["dpo_versus_sft"] == {"variant": "dpo", "points": 0.0, "won": 0, "lost": 0, "sign_test_p": 1.0}


def test_missing_file_names_the_notebook(run_tree):
    (run_tree / "evaluation" / "results" / "benchmark_results.json").unlink()
    with pytest.raises(MissingInputError, match="07_benchmark_evaluation"):
        load_bench_quality().quality(run_tree)


def test_a_series_in_parts_keeps_every_stage_seconds(tmp_path):
    """01-04 in one call and 05-09 in the next on the same tree: the record holds both parts' seconds."""
    bench_quality = load_bench_quality()
    assert bench_quality.merged_seconds(tmp_path, {"01": 39.0, "02": 75.1}) == {"01": 39.0, "02": 75.1}
    assert bench_quality.merged_seconds(tmp_path, {"02": 70.0, "05": 48.1}) == {"01": 39.0, "02": 70.0, "05": 48.1}


def test_keep_copies_the_files_the_record_came_from(run_tree, tmp_path):
    from sitlib.artifacts import read_json, write_jsonl

    bench_quality = load_bench_quality()
    tree = output_tree(run_tree)
    write_jsonl(tree.data_preference / "dpo_train.jsonl", [{"id": 1}])
    record = bench_quality.quality(run_tree)
    written = write_json(tmp_path / "quality_NVIDIA_H200.json", record)
    kept = bench_quality.keep_files(run_tree, tmp_path / "kept", written)
    names = {p.relative_to(tmp_path / "kept").as_posix() for p in kept}
    assert {"setup.json", "setup.config.json", "generation_metrics.json", "dpo_metrics.json", "filter_stats.json",
            "dpo_train.jsonl", "benchmark_results.json", "benchmark/base.json", "benchmark/dpo.json",
            "quality_NVIDIA_H200.json", "answer_habits.json"} <= names
    assert "dpo_val.jsonl" not in names   # a file the run did not write is not invented
    assert read_json(tmp_path / "kept" / "quality_NVIDIA_H200.json") == record
    habits = read_json(tmp_path / "kept" / "answer_habits.json")
    assert habits["sft"] == {"items": 3, "opens_with_quote": 0}
    against = habits["dpo"]["against_sft"]
    assert {k: against[k] for k in ("items", "answer_differs", "outcome_differs")} == {
        "items": 3, "answer_differs": 0, "outcome_differs": 0}
    assert against["by_category"]["format"]["items"] == 3
