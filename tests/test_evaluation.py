"""07/08/09: the suite, scoring, resume, tool-call parsing and tools, adapter freshness, 09's "not measured"."""
import json
from collections import Counter

import pytest

from sitlib import agent, benchmark, comparison, variants
from sitlib.artifacts import write_json
from sitlib.checks import ANSWER_TYPES, IFEVAL_TYPES, ifeval_instruction
from sitlib.errors import BadInputError, ConfigError, MissingInputError
from sitlib.session import setup

ITEMS = benchmark.load_suite()


def test_suite_size_and_coverage():
    assert len(ITEMS) >= 150 and len({i["id"] for i in ITEMS}) == len(ITEMS)
    follow = [i for i in ITEMS if i["checks"][0]["type"] not in ANSWER_TYPES]
    exact = [i for i in ITEMS if i["checks"][0]["type"] in ANSWER_TYPES]
    assert len(follow) >= 100 and len(exact) >= 50
    assert len({c["type"] for i in follow for c in i["checks"]}) >= 20
    assert any(len(i["checks"]) == 2 and i["checks"][0]["type"] == i["checks"][1]["type"] for i in follow)


def test_suite_prompts_carry_ifevals_own_instruction_text():
    for it in ITEMS:
        for c in it["checks"]:
            if c["type"] in IFEVAL_TYPES:
                assert ifeval_instruction(c["type"], c["kwargs"])[0] in it["prompt"], it["id"]


def test_cpu_subset_is_seeded_and_covers_every_category():
    sub = benchmark.load_suite(24, seed=42)
    assert len(sub) == 24 and sub == benchmark.load_suite(24, seed=42) and sub != benchmark.load_suite(24, seed=7)
    assert {i["category"] for i in sub} == {i["category"] for i in ITEMS}


def test_bad_suite_line_is_one_line_error(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"id": "a", "category": "c", "prompt": "p", "checks": [{"type": "rhymes"}]}\n')
    with pytest.raises(BadInputError, match=r"s.jsonl, line 1: each check needs a 'type'"):
        benchmark.load_suite(path=f)


def test_two_checks_of_one_type_are_both_scored():
    item = {"prompt": "Write about a river. Include keywords ['river'].", "checks": [
        {"type": "keywords:existence", "kwargs": {"keywords": ["river"]}},
        {"type": "keywords:existence", "kwargs": {"keywords": ["lantern"]}}]}
    s = benchmark.score_output(item, "The river runs.")
    assert [c["passed"] for c in s["checks"]] == [True, False] and s["passed"] is False
    row = {"category": "k", "stopped_on_eos": True, "output_tokens": 3, **s}
    summary = benchmark.summarise([row])
    assert summary["n_checks"] == 2 and summary["instruction_level_accuracy"] == 0.5


def test_fact_item_from_the_suite_is_not_passed_by_its_prompt():
    for it in (i for i in ITEMS if i["checks"][0]["type"] in ANSWER_TYPES):
        assert not benchmark.score_output(it, it["prompt"])["passed"], it["id"]


def test_accuracies_are_exact_means_of_rows():
    t, f = {"type": "x", "passed": True}, {"type": "y", "passed": False}
    rows = [{"category": "a", "checks": [t, f], "passed": False, "stopped_on_eos": True, "output_tokens": 4},
            {"category": "a", "checks": [t], "passed": True, "stopped_on_eos": False, "output_tokens": 8},
            {"category": "b", "checks": [t], "passed": True, "stopped_on_eos": True, "output_tokens": 3}]
    s = benchmark.summarise(rows)
    assert s["prompt_level_accuracy"] == round(2 / 3, 4) and s["instruction_level_accuracy"] == 0.75
    assert s["eos_stop_rate"] == round(2 / 3, 4) and s["mean_output_tokens"] == 5.0
    assert s["per_category"] == {"a": 0.5, "b": 1.0} and s["per_instruction"] == {"x": 1.0, "y": 0.0}


def _variant(passed: list[bool], cats: str, tokens: int) -> dict:
    rows = [{"prompt_id": f"i{k}", "category": c, "checks": [{"type": "x", "passed": p}], "passed": p,
             "stopped_on_eos": True, "output_tokens": tokens} for k, (p, c) in enumerate(zip(passed, cats))]
    return {"rows": rows, "summary": benchmark.summarise(rows)}


def test_a_variant_below_base_is_explained_by_paired_counts():
    assert benchmark.sign_test_p(0, 5) == 0.0625 and benchmark.sign_test_p(3, 3) == 1.0   # 2 · (1/2)^5
    assert abs(benchmark.sign_test_p(1, 9) - 2 * 11 / 1024) < 1e-12                       # 2 · (C(10,0) + C(10,1)) / 2^10
    T, F = True, False
    done = {"base": _variant([T, T, T, F, F, T], "aabbcc", 40),
            "sft": _variant([F, F, T, T, F, T], "aabbcc", 90),     # loses both a items, wins one b
            "dpo": _variant([T, T, T, T, T, T], "aabbcc", 40)}
    sft, dpo = benchmark.versus_base(done)
    assert (sft["variant"], sft["won"], sft["lost"], sft["points"]) == ("sft", 1, 2, -16.7)
    assert sft["sign_test_p"] == 1.0 and sft["lost_most"] == ["a (-2)"]
    assert sft["mean_output_tokens"] == (40.0, 90.0)
    assert (dpo["won"], dpo["lost"], dpo["points"]) == (2, 0, 33.3)
    (note,) = benchmark.below_base_notes([sft, dpo])     # only the variant below base gets a sentence
    assert note.startswith("sft: -16.7 points against base — 2 items lost, 1 won") and "p = 1.000: within what chance" in note
    assert "a (-2)" in note and "40 → 90 tokens" in note
    assert benchmark.versus_base({"sft": done["sft"]}) == []   # no base evaluated: nothing to compare
    vs = benchmark.dpo_versus_sft(done)   # DPO's target is counted from its SFT model, not from the base
    assert (vs["variant"], vs["won"], vs["lost"], vs["points"]) == ("dpo", 3, 0, 50.0)
    assert benchmark.dpo_versus_sft({"base": done["base"], "dpo": done["dpo"]}) is None
    counts = benchmark.paired_counts(done)   # what bench/ records keep: counts and the sign test only
    assert counts["dpo_versus_sft"] == {"variant": "dpo", "points": 50.0, "won": 3, "lost": 0,
                                        "sign_test_p": benchmark.sign_test_p(3, 0)}
    assert [set(c) for c in counts["versus_base"]] == [set(benchmark.PAIRED_KEYS)] * 2


def test_official_ifeval_scores_count_an_empty_answer_as_failed_instructions():
    from if_verifiable import IFEvalSample

    samples = [IFEvalSample(1, "Write.", ["punctuation:no_comma", "startend:quotation"], [{}, {}]),
               IFEvalSample(2, "Write.", ["punctuation:no_comma"], [{}])]
    s = benchmark.score_official(samples, ['"No commas here."', ""])
    assert s["prompt_level_strict"] == 0.5 and s["instruction_level_strict"] == round(2 / 3, 4)
    assert s["n_instructions"] == 3


def test_official_ifeval_is_skipped_in_words_offline(tmp_path, monkeypatch):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    S.config.evaluation.official_ifeval = False
    assert benchmark.official_prompts(S) == ([], "not requested (evaluation.official_ifeval is false)")
    S.config.evaluation.official_ifeval = True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples, status = benchmark.official_prompts(S)
    assert samples == [] and status.startswith("skipped: offline")


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
    assert agent.date_calc("days_between", "2023-01-15", other_date="2023-03-01") == "45"
    assert agent.date_calc("weekday", "2000-01-01") == "Saturday"
    for e in agent.EPISODES:   # every episode is solvable with its tool's real output
        assert e["tool"] in agent.TOOLS


def test_answer_correct():
    assert agent.answer_correct("45 days between 2023-01-15 and 2023-03-01", "45")
    assert agent.answer_correct("10063. I multiplied 347 by 29.", "10063")
    assert agent.answer_correct("347 * 29 = 10063", "10063") and not agent.answer_correct("347 * 29", "10063")
    assert agent.answer_correct("It is 8.047 km", "8.0467") and not agent.answer_correct("8.1", "8.0467")
    assert agent.answer_correct("2024-04-24.", "2024-04-24") and not agent.answer_correct("2024-04-25", "2024-04-24")
    assert agent.answer_correct("Ada Fenn runs it", "Ada Fenn") and not agent.answer_correct(None, "1")


def _transcript(success, answer, kinds):
    return {"episode_id": "e", "tool_expected": "calculator", "question": "q", "expected": "1", "answer": answer,
            "success": success, "n_turns": len(kinds), "turns": [{"kind": k, "output": "o"} for k in kinds]}


def test_a_variant_that_never_calls_a_tool_is_said_so():
    trs = [_transcript(True, "1", ["answer"]), _transcript(False, None, ["answer", "answer"])]
    s = agent.summarise(trs)
    assert s["tool_calls"] == 0 and s["valid_call_rate"] is None
    assert agent.tool_note(s) == ("never called a tool in 2 episodes: its 1 solved episode(s) were answered "
                                  "without any tool")
    s2 = agent.summarise([_transcript(True, "1", ["call", "answer"]), _transcript(False, "2", ["invalid_call"])])
    assert agent.tool_note(s2) == "1 of 2 tool calls valid"
    outcomes = agent.one_per_outcome([_transcript(True, "1", ["answer"]), _transcript(True, "1", ["call", "answer"])])
    assert set(outcomes) == {"solved, without a tool call", "solved, with a tool call"}


def test_episode_loop_executes_calls_and_scores(monkeypatch, tiny_model_dir):
    from sitlib.generation import Completion
    from sitlib.models import load_tokenizer

    script = iter([['{"tool": "calculator", "arguments": {"expression": "347 * 29"}}', '{"tool": "nope"}'],
                   ["ANSWER: 10063", "ANSWER: 3"]])
    monkeypatch.setattr(agent, "generate", lambda m, t, inputs, s, b: [Completion(x, 3, True) for x in next(script)])
    trs = agent.run_episodes(None, load_tokenizer(str(tiny_model_dir)), agent.EPISODES[:2], max_turns=3,
                             max_new_tokens=8, batch_size=2)
    assert trs[0]["success"] and trs[0]["turns"][0]["result"] == "10063" and trs[0]["n_turns"] == 2
    assert not trs[1]["success"] and trs[1]["turns"][0]["kind"] == "invalid_call"
    s = agent.summarise(trs)
    assert s["success_rate"] == 0.5 and s["valid_call_rate"] == 0.5 and s["mean_turns"] == 2.0


# ---------------------------------------------------------------- adapter freshness

def _adapter(S, name, inputs=None, **extra):
    final = variants.adapter_dir(S, name)
    final.mkdir(parents=True, exist_ok=True)
    (final / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "name": name}))
    (final / "adapter_model.safetensors").write_bytes(name.encode())
    write_json(final / "training_config.json", {"fingerprint": f"fp-{name}", **({"inputs": inputs} if inputs else {}),
                                                **extra})
    return final


def _data(S):
    for rel in ("data/filtered/sft_train.jsonl", "data/filtered/sft_val.jsonl", "data/preference/dpo_train.jsonl",
                "data/preference/dpo_val.jsonl"):
        (S.paths.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (S.paths.root / rel).write_text('{"row": 1}\n')


def test_check_fresh_follows_the_chain_from_data_to_sft_to_dpo(tmp_path):
    from sitlib.training import adapter_digest

    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    _data(S)
    sft = _adapter(S, "sft", variants.input_digests(S, "sft"))
    _adapter(S, "dpo", variants.input_digests(S, "dpo"), results={"sft_adapter_digest": adapter_digest(sft)})
    assert variants.check_fresh(S, "dpo")["notes"][-1] == "SFT adapter verified: the one it was trained on"
    assert variants.check_fresh(S, "sft")["fingerprint"] == "fp-sft"

    (sft / "adapter_model.safetensors").write_bytes(b"retrained")          # SFT retrained, DPO not
    with pytest.raises(MissingInputError, match="stale dpo adapter.*SFT adapter.*changed.*rerun 06_dpo_training"):
        variants.check_fresh(S, "dpo")
    (S.paths.root / "data/filtered/sft_train.jsonl").write_text('{"row": 2}\n')   # new data, SFT not retrained
    with pytest.raises(MissingInputError, match="stale sft adapter.*sft_train.jsonl changed.*rerun 05_sft_training"):
        variants.check_fresh(S, "sft")
    with pytest.raises(MissingInputError, match="stale sft adapter.*then rerun 06_dpo_training"):
        variants.check_fresh(S, "dpo")


def test_check_fresh_says_what_it_could_not_verify_and_refuses_unfinished(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    _data(S)
    _adapter(S, "prompt_tuning", data={"train_rows": 1, "val_rows": 1})   # no hashes: row counts still checked
    assert variants.check_fresh(S, "prompt_tuning")["notes"] == [
        "data row counts match (content not verified: its training_config.json records no input hashes)"]
    (S.paths.root / "data/filtered/sft_val.jsonl").write_text('{"row": 1}\n{"row": 2}\n')
    with pytest.raises(MissingInputError, match="trained on 1 rows of data/filtered/sft_val.jsonl, which now has 2"):
        variants.check_fresh(S, "prompt_tuning")
    (variants.adapter_dir(S, "prompt_tuning") / "training_config.json").unlink()
    with pytest.raises(MissingInputError, match="no training_config.json.*rerun 05b_prompt_tuning"):
        variants.check_fresh(S, "prompt_tuning")
    with pytest.raises(ConfigError, match="unknown variant 'large'"):
        variants.check_variants(S, ["base", "large"])
    with pytest.raises(MissingInputError, match="run 06_dpo_training first"):
        variants.check_variants(S, ["dpo"])


# ---------------------------------------------------------------- resume and the tiny model end to end

def test_variant_results_resume_only_with_the_same_key(tmp_path, tiny_model_dir):
    over = {"models.student": str(tiny_model_dir), "evaluation.variants": ["base"], "evaluation.max_new_tokens": 4}
    S = setup("cpu", str(tmp_path / "o"), overrides=over, verbose=False)
    items = benchmark.load_suite(6, S.config.seed)
    fresh = variants.check_variants(S, ["base"])
    key = benchmark.run_key(S, items, fresh["base"])
    (name, model, tok), = list(variants.iter_variants(S, ["base"]))
    done = benchmark.run_variant(S, name, model, tok, items, key)
    assert benchmark.finished(S, "base", key) == json.loads(json.dumps(done))
    assert done["summary"]["prompt_level_accuracy"] == round(sum(r["passed"] for r in done["rows"]) / 6, 4)
    S.config.evaluation.max_new_tokens = 5
    assert benchmark.finished(S, "base", benchmark.run_key(S, items, fresh["base"])) is None
    assert list(variants.iter_variants(S, [])) == []   # nothing left to run: the model is not even loaded
    res = benchmark.write_results(S, {"base": done}, items, {"status": "skipped: offline"}, {"status": "x"})
    assert res["models"]["base"]["n_prompts"] == 6
    assert (S.paths.evaluation_figures / "benchmark_by_category.png").exists()
    assert benchmark.category_table({"base": done}).loc["all (prompt level)", "items"] == 6


# ---------------------------------------------------------------- 09

def _measured(S, skip=()):
    m, r = S.paths.evaluation_metrics, S.paths.evaluation_results
    for k in ("sft", "prompt_tuning", "dpo"):
        if k not in skip:
            write_json(m / f"{k}_metrics.json", {"trainable_parameters": 10, "runtime_seconds": 1.5,
                                                  "peak_memory_gb": 1.0, "tokens_per_second": 100.0})
    models = {v: {"prompt_level_accuracy": 0.5, "instruction_level_accuracy": 0.6} for v in ("base", "sft")}
    write_json(r / "benchmark_results.json", {"models": models, "official_ifeval": {"status": "skipped: offline"}})


def test_compare_refuses_missing_inputs_naming_the_notebook(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    _measured(S, skip=("dpo",))
    with pytest.raises(MissingInputError, match=r"dpo_metrics.json \(run 06_dpo_training first\).*agent_results"):
        comparison.run_comparison(S)
    assert not (S.paths.evaluation_metrics / "comparison_summary.csv").exists()


def test_compare_marks_missing_values_not_measured_never_zero(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    _measured(S, skip=("dpo",))
    out = comparison.run_comparison(S, allow_missing=True)
    rows = {r["variant"]: r for r in out["rows"]}
    assert rows["dpo"]["runtime_seconds"] == "not measured" and rows["sft"]["runtime_seconds"] == 1.5
    assert rows["sft"]["eval_reward_accuracy"] == "n/a (DPO only)"
    assert rows["dpo"]["bench_prompt_level_accuracy"] == "not measured" and rows["base"]["agent_success_rate"] == \
        "not measured" and rows["base"]["runtime_seconds"] == "n/a (no training)"
    assert Counter(out["missing"]) == Counter(["dpo_metrics", "agent"])
    for f in ("quality", "efficiency", "tradeoff"):
        assert (S.paths.evaluation_figures / f"comparison_{f}.png").exists()


def test_missing_value_is_drawn_as_a_marked_gap_not_a_zero_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    comparison._bars(ax, [0, 1, 2], [0.5, "not measured", 0.0])
    filled = [p.get_height() for p in ax.patches if p.get_fill()]
    assert filled == [0.5, 0.0]                           # a measured 0 is a bar; the missing one is not
    assert [t.get_text() for t in ax.texts] == ["0.5", "not measured", "0"]
    plt.close(fig)


def test_lm_eval_is_skipped_with_a_note_never_faked(tmp_path, monkeypatch):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    assert benchmark.lm_eval_results(S)["status"].startswith("not requested")
    S.config.evaluation.lm_eval_tasks = ["ifeval"]
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    res = benchmark.lm_eval_results(S)
    assert res["status"].startswith("skipped: the lm-eval package is not installed") and "models" not in res


def test_adapters_attach_and_leave_the_base_unchanged(tmp_path, tiny_model_dir):
    # real LoRA and prompt-tuning adapters on the tiny model, evaluated the way 07 does it
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    over = {"models.student": str(tiny_model_dir), "evaluation.max_new_tokens": 4}
    S = setup("cpu", str(tmp_path / "o"), overrides=over, verbose=False)
    for name, cfg in (("sft", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
                      ("prompt_tuning", PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))):
        torch.manual_seed(1)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
        if name == "sft":   # LoRA starts as a no-op (B = 0): make it change the outputs
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(0, 1.0)
        peft_model.save_pretrained(variants.adapter_dir(S, name))
        write_json(variants.adapter_dir(S, name) / "training_config.json", {"fingerprint": f"fp-{name}"})
    items = benchmark.load_suite(3, S.config.seed)
    outs = {n: [r["output"] for r in benchmark.generate_rows(S, n, m, t, items)]
            for n, m, t in variants.iter_variants(S, ["base", "sft", "prompt_tuning"])}
    again = {n: [r["output"] for r in benchmark.generate_rows(S, n, m, t, items)]
             for n, m, t in variants.iter_variants(S, ["sft", "base"])}
    assert outs["sft"] != outs["base"] and again["sft"] == outs["sft"]
    assert again["base"] == outs["base"]   # the LoRA layers were removed, not merged
