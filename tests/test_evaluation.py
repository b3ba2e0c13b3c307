"""07/08/09: constraint checkers, tool-call parsing and tools, accuracies as exact means, compare's refusals."""
import csv
import json
import subprocess
import sys

import pytest

from sitlib import agent, benchmark, comparison
from sitlib.artifacts import write_json
from sitlib.checks import CHECKS, run_check
from sitlib.config import REPO_ROOT
from sitlib.session import setup

CASES = {  # check → (arguments, passing output, failing output)
    "max_words": ({"n": 5}, "One two three four five.", "One two three four five six."),
    "min_words": ({"n": 4}, "a b c d", "a b c"),
    "max_sentences": ({"n": 1}, "Rain is water falling from clouds.", "Rain falls. It is wet."),
    "exact_sentences": ({"n": 2}, "Cats purr. They sleep a lot!", "Cats purr."),
    "include_words": ({"words": ["golden", "leaf"]}, "A golden leaf fell.", "A golden tree."),
    "exclude_words": ({"words": ["hot"]}, "The sun is bright and shotgun-free.", "The sun is hot."),
    "exclude_chars": ({"chars": "zZ"}, "Dogs are loyal.", "Dogs are lazy."),
    "word_frequency": ({"word": "morning", "min": 2}, "Morning coffee, every morning.", "Coffee in the morning."),
    "all_lowercase": ({}, "hello there, friend.", "Hello there."),
    "all_uppercase": ({}, "DANGER: KEEP OUT!", "DANGER: keep out"),
    "json_object": ({}, '```json\n{"name": "Ann", "age": 3}\n```', 'Here: {"name": "Ann"}'),
    "json_keys": ({"keys": ["name", "age"]}, '{"name": "Ann", "age": 3}', '{"name": "Ann"}'),
    "exact_bullets": ({"n": 3}, "- apple\n- pear\n* plum", "- apple\n- pear"),
    "min_numbered": ({"n": 3}, "1. cat\n2. dog\n3) owl", "1. cat\n2. dog"),
    "exact_paragraphs": ({"n": 2}, "First part.\n\nSecond part.", "Only one paragraph.\nStill one."),
    "no_commas": ({}, "The sky is blue today.", "The sky, today, is blue."),
    "quoted": ({}, '"Be kind to yourself."', 'Be kind to yourself.'),
    "title_brackets": ({}, "<<Winter Light>>\nSnow falls.", "Winter Light"),
    "starts_with": ({"text": "Yes,"}, "yes, water is wet.", "Water is wet. Yes, it is."),
    "ends_with": ({"text": "Good luck!"}, "Prepare well. Good luck!", "Good luck! Prepare well."),
    "final_number": ({"value": 42}, "15 + 27 = 42", "The answer is 42, not 41."),
    "contains_answer": ({"text": "Ben"}, "The youngest is Ben.", "The youngest is Benjamin."),
}


def test_every_checker_has_cases():
    assert set(CASES) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checker_pass_and_fail(name):
    args, good, bad = CASES[name]
    assert run_check({"type": name, **args}, good) is True
    assert run_check({"type": name, **args}, bad) is False


def test_unknown_check_is_an_error():
    with pytest.raises(ValueError, match="unknown check type 'rhymes'"):
        run_check({"type": "rhymes"}, "x")


def test_suite_is_valid_and_large_enough():
    items = benchmark.load_suite()
    assert len(items) >= 60 and len({i["id"] for i in items}) == len(items)
    for it in items:
        assert it["checks"] and all(c["type"] in CHECKS for c in it["checks"])
    sub = benchmark.load_suite(12, seed=1)
    assert len(sub) == 12 and sub == benchmark.load_suite(12, seed=1)
    assert len({i["category"] for i in sub}) == len({i["category"] for i in items})


def test_accuracies_are_exact_means_of_rows():
    rows = [{"category": "a", "checks": {"x": True, "y": False}, "passed": False, "stopped_on_eos": True, "output_tokens": 4},
            {"category": "a", "checks": {"x": True}, "passed": True, "stopped_on_eos": False, "output_tokens": 8},
            {"category": "b", "checks": {"z": True}, "passed": True, "stopped_on_eos": True, "output_tokens": 3}]
    s = benchmark.summarise(rows)
    assert s["prompt_level_accuracy"] == round(2 / 3, 4) and s["instruction_level_accuracy"] == 0.75
    assert s["eos_stop_rate"] == round(2 / 3, 4) and s["mean_output_tokens"] == 5.0
    assert s["per_category"] == {"a": 0.5, "b": 1.0}


@pytest.mark.parametrize("text,kind,error", [
    ('{"tool": "calculator", "arguments": {"expression": "2+2"}}', "call", None),
    ('Sure! {"name": "lookup", "parameters": {"key": "mount keld height"}}', "call", None),
    ('{"tool": "calculator", "arguments": "{\\"expression\\": \\"3*3\\"}"}', "call", None),
    ('{"tool": "calculator", "arguments": {"expression": "2+2"', "invalid_call", "malformed JSON"),
    ('{"tool": "weather", "arguments": {}}', "invalid_call", "unknown tool"),
    ('{"tool": "calculator", "arguments": {}}', "invalid_call", "missing argument"),
    ('{"tool": "calculator", "arguments": {"expression": "1", "mode": "x"}}', "invalid_call", "unknown argument"),
    ('{"tool": "calculator", "arguments": [1, 2]}', "invalid_call", "not a JSON object"),
    ('{"tool": "calculator", "arguments": "not json"}', "invalid_call", "not a JSON object"),
    ("ANSWER: 4096", "answer", None),
    ("The answer is 12.", "answer", None),
])
def test_parse_reply(text, kind, error):
    r = agent.parse_reply(text)
    assert r.kind == kind
    assert (error is None and r.error is None) or (error and error in r.error)


def test_tools():
    assert agent.calculator("347 * 29") == 10063 and agent.calculator("2^12") == 4096
    with pytest.raises(ValueError):
        agent.calculator("__import__('os')")
    assert agent.convert_units(5, "miles", "km") == pytest.approx(8.0467, abs=1e-4)
    assert agent.convert_units(100, "F", "C") == pytest.approx(37.7778, abs=1e-4)
    with pytest.raises(ValueError, match="cannot convert"):
        agent.convert_units(1, "kg", "m")
    assert agent.lookup("Mount Keld height") == "2417 m"
    with pytest.raises(ValueError, match="no entry"):
        agent.lookup("moon")
    assert agent.date_calc("add_days", "2024-03-10", days=45) == "2024-04-24"
    assert agent.date_calc("days_between", "2023-01-15", other_date="2023-03-01") == "45"
    assert agent.date_calc("weekday", "2000-01-01") == "Saturday"
    for e in agent.EPISODES:   # every episode is solvable with its tool's real output
        assert e["tool"] in agent.TOOLS


def test_answer_correct():
    assert agent.answer_correct("It is 8.047 km", "8.0467") and not agent.answer_correct("8.1", "8.0467")
    assert agent.answer_correct("2024-04-24.", "2024-04-24") and not agent.answer_correct("2024-04-25", "2024-04-24")
    assert agent.answer_correct("Ada Fenn runs it", "Ada Fenn") and not agent.answer_correct(None, "1")


def test_episode_loop_executes_calls_and_scores(monkeypatch, tiny_model_dir):
    from sitlib.generation import Completion
    from sitlib.models import load_tokenizer

    script = iter([['{"tool": "calculator", "arguments": {"expression": "347 * 29"}}', '{"tool": "nope"}'],
                   ["ANSWER: 10063", "ANSWER: 3"]])
    monkeypatch.setattr(agent, "generate", lambda m, t, inputs, s, b: [Completion(x, 3, True) for x in next(script)])
    eps = [agent.EPISODES[0], agent.EPISODES[1]]
    trs = agent.run_episodes(None, load_tokenizer(str(tiny_model_dir)), eps, max_turns=3, max_new_tokens=8,
                             batch_size=2)
    assert trs[0]["success"] and trs[0]["turns"][0]["result"] == "10063" and trs[0]["n_turns"] == 2
    assert not trs[1]["success"] and trs[1]["turns"][0]["kind"] == "invalid_call"
    s = agent.summarise(trs)
    assert s["success_rate"] == 0.5 and s["valid_call_rate"] == 0.5 and s["mean_turns"] == 2.0


def _measured_tree(S):
    m, r = S.paths.evaluation_metrics, S.paths.evaluation_results
    for k in ("sft", "prompt_tuning", "dpo"):
        write_json(m / f"{k}_metrics.json", {"trainable_parameters": 10, "runtime_seconds": 1.5, "peak_memory_gb": 1.0,
                                              "tokens_per_second": 100.0, "train_loss": 1.0, "eval_loss": 1.1})
    models = {v: {"prompt_level_accuracy": 0.5, "instruction_level_accuracy": 0.6, "eos_stop_rate": 1.0,
                  "mean_output_tokens": 9} for v in ("base", "sft", "prompt_tuning", "dpo")}
    write_json(r / "benchmark_results.json", {"models": models})
    write_json(r / "agent_results.json", {"models": {v: {"success_rate": 0.25, "valid_call_rate": None,
                                                         "tool_use_rate": 0.0, "mean_turns": 1.0} for v in models}})


def _compare_cli(out, *extra):
    return subprocess.run([sys.executable, "-m", "sitlib", "compare", "--profile", "cpu", "--output-dir", str(out),
                           *extra], capture_output=True, text=True, cwd=REPO_ROOT)


def test_compare_refuses_missing_metrics_and_writes_nothing(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    _measured_tree(S)
    (S.paths.evaluation_metrics / "dpo_metrics.json").unlink()
    r = _compare_cli(tmp_path / "o")
    assert r.returncode != 0 and "dpo_metrics.json" in r.stderr and "06_dpo_training" in r.stderr
    assert not (S.paths.evaluation_metrics / "comparison_summary.csv").exists()
    assert not list(S.paths.evaluation_figures.iterdir())

    r = _compare_cli(tmp_path / "o", "-p", "ALLOW_MISSING=True")
    assert r.returncode == 0, r.stderr
    rows = {row["variant"]: row for row in csv.DictReader(open(S.paths.evaluation_metrics / "comparison_summary.csv"))}
    assert rows["dpo"]["runtime_seconds"] == "not measured" and rows["sft"]["runtime_seconds"] == "1.5"
    assert rows["base"]["bench_prompt_level_accuracy"] == "0.5"


def test_benchmark_and_agent_on_tiny_model(tmp_path, tiny_model_dir):
    over = {"models.student": str(tiny_model_dir), "evaluation.variants": ["base", "sft"],
            "evaluation.benchmark_items": 8, "evaluation.max_new_tokens": 6, "evaluation.agent_episodes": 4,
            "evaluation.agent_max_turns": 2, "evaluation.agent_max_new_tokens": 6}
    S = setup("cpu", str(tmp_path / "o"), overrides=over, verbose=False)
    with pytest.raises(FileNotFoundError, match="run 05_sft_training first"):
        benchmark.run_benchmark(S)
    S.config.evaluation.variants = ["base"]
    res = benchmark.run_benchmark(S)
    rows = [json.loads(x) for x in (S.paths.evaluation_results / "benchmark_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and res["models"]["base"]["n_prompts"] == 8
    assert res["models"]["base"]["prompt_level_accuracy"] == round(sum(r["passed"] for r in rows) / 8, 4)
    a = agent.run_agent_eval(S)
    assert a["models"]["base"]["n_episodes"] == 4
    assert (S.paths.evaluation_results / "agent_transcripts.jsonl").exists()


def test_lm_eval_is_skipped_with_a_note_never_faked(tmp_path, monkeypatch):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    assert benchmark.lm_eval_results(S)["status"].startswith("not requested")
    S.config.evaluation.lm_eval_tasks = ["ifeval"]
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    res = benchmark.lm_eval_results(S)
    assert res["status"].startswith("skipped: the lm-eval package is not installed") and "models" not in res
