"""02/03/04 on a tiny model: header blocking, dedup, pseudo-instructions, resume after a kill, bad rows."""
import json
import re
import subprocess
import sys

import pytest
import torch

from sitlib import constraints, filtering, magpie, preference
from sitlib.config import FilterConfig, GenerationConfig, REPO_ROOT
from sitlib.generation import BlockFirstTokens, Sampling, generate, markdown_header_tokens
from sitlib.models import load_model, load_tokenizer
from sitlib.hardware import PROFILES
from sitlib.session import setup


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir), PROFILES["cpu"])


class LovesHeaders:
    """A teacher that strongly prefers markdown headers (what the original's solutions-as-instructions came from)."""

    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def __call__(self, input_ids, scores):
        scores[:, self.ids] += 50.0
        return scores


def _first_texts(tok, model, processors):
    torch.manual_seed(0)
    inputs = [tok(magpie.pre_query_text(tok, None), add_special_tokens=False)["input_ids"]] * 12
    return [c.text for c in generate(model, tok, inputs, Sampling(8, 1.0, 1.0), 6, processors)]


def test_block_first_tokens_no_instruction_starts_with_header(tiny):
    tok, model = tiny
    headers = markdown_header_tokens(tok)
    assert headers and all(tok.decode([t]).lstrip().startswith("#") for t in headers)
    unblocked = _first_texts(tok, model, [LovesHeaders(headers)])
    assert sum(t.startswith("#") for t in unblocked) >= 10          # the bias works without the block...
    blocked = _first_texts(tok, model, [LovesHeaders(headers), BlockFirstTokens.markdown_headers(tok)])
    assert not any(t.lstrip().startswith("#") for t in blocked)      # ...and the block removes every one
    assert any("#" in t for t in blocked)                             # headers stay allowed later in the text


def test_pre_query_text_is_template_up_to_user_turn(tiny):
    tok, _ = tiny
    assert magpie.pre_query_text(tok, None) == "<|im_start|>user\n"
    assert magpie.pre_query_text(tok, "Be brief.") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_trim_instruction():
    assert magpie.trim_instruction("Write a poem about rain. Make it short. Then the model rambl") == \
        "Write a poem about rain. Make it short."
    assert magpie.trim_instruction("What is 2+2?\n\nJunk after the request") == "What is 2+2?"
    assert magpie.trim_instruction("no sentence end here at all") is None


@pytest.mark.parametrize("text", [
    "## Step 1: Identify the variables\nLet x be the number of apples.",
    "# Problem\nA train leaves at 3pm.\n## Step 1: compute the speed",
    "Step 1: Add 3 and 4 to get 7.",
    "We subtract 5 from both sides, therefore x = 3, thus the final answer is 3.",
    "Substituting y = 2 we get 4x = 8, hence x = 2 and therefore we have the result.",
    "Solution: the area is 12 square metres.",
])
def test_pseudo_instruction_detected(text):
    assert filtering.pseudo_instruction(text)


@pytest.mark.parametrize("text", [
    "Write a short poem about the sea.", "How do I solve 2x + 3 = 7? Show the steps.",
    "Explain why the sky is blue in two sentences.", "Give me three tips for a job interview.",
])
def test_real_requests_pass_the_detector(text):
    assert filtering.pseudo_instruction(text) is None


def _row(i, inst, resp="Here is a clear and complete answer to your request, with enough words to pass.", **kw):
    return {"id": i, "instruction": inst, "response": resp, **kw}


def test_exact_and_near_duplicates_removed_best_kept():
    rows = [_row(0, "Write a short poem about the sea and the waves at night."),
            _row(1, "write a short poem about the sea and the waves at night!"),           # exact after normalising
            _row(2, "Write a short poem about the sea and the waves at night, please."),  # near duplicate
            _row(3, "Explain how photosynthesis turns sunlight into chemical energy.")]
    kept, rejected, stats = filtering.filter_rows(rows, FilterConfig(min_score=0.0))
    assert sorted(r["id"] for r in kept) == [0, 3] or sorted(r["id"] for r in kept) == [1, 3] or \
        sorted(r["id"] for r in kept) == [2, 3]
    assert stats["reasons"].get("duplicate", 0) + stats["reasons"].get("near_duplicate", 0) == 2
    assert stats["reasons"].get("near_duplicate") == 1


def test_rules_record_every_reason():
    rows = [_row(0, "Write a poem about cats please.", "I'm sorry, but I can't help with that request today.",
                 response_complete=True),
            _row(1, "Explain gravity to a child please.", "Gravity pulls things down toward the", response_complete=False),
            _row(2, "## Step 1: compute the area of the square", "The area is 16 square units in total here.")]
    _, rejected, stats = filtering.filter_rows(rows, FilterConfig(min_score=0.0))
    reasons = {r["id"]: r["reasons"] for r in rejected}
    assert "refusal" in reasons[0] and "truncated_response" in reasons[1] and "pseudo_instruction" in reasons[2]
    assert stats["kept"] == 0 and stats["reasons"]["refusal"] == 1


def test_two_responses_are_each_measured_for_repetition_alone():
    one = ("Tides rise and fall twice a day because the moon pulls on the oceans and the sun adds a smaller pull "
           "so the highest tides come when both line up.")
    other = one.replace("twice a day", "two times daily")
    cfg = FilterConfig(min_score=0.0)
    two = [{"id": "combination:two_responses", "kwargs": {}}]
    assert filtering.repeated_ngram_ratio(f"{one} {other}") > cfg.max_repeated_ngram_ratio
    split = f"{one}\n******\n{other}"
    assert "repetitive" not in filtering.rule_reasons(_row(0, "Explain the tides.", split, constraints=two), cfg)
    # without that constraint, or in three parts, the response is measured whole: a loop cannot hide behind ******
    assert "repetitive" in filtering.rule_reasons(_row(1, "Explain the tides.", split), cfg)
    three = f"{one}\n******\n{other}\n******\n{one}"
    assert "repetitive" in filtering.rule_reasons(_row(2, "Explain the tides.", three, constraints=two), cfg)


def test_repeat_rows_are_scored_and_deduped_on_their_request():
    from sitlib import constraints
    from sitlib.checks import ifeval_instruction

    text, kwargs = ifeval_instruction(constraints.REPEAT, {"prompt_to_repeat": "?"})
    rep = [{"id": constraints.REPEAT, "kwargs": kwargs, "text": text}]
    rows = []
    for i, task in enumerate(["Describe rain.", "Name a bird.", "Explain tides to a child.", "List three fruits."]):
        prompt, bound = constraints.attach(task, rep)
        rows.append(_row(i, prompt, f"{task[:-1]} is answered here with enough plain words to pass the rules.",
                         constraints=bound, constraint_pass=True, base_instruction=task))
    kept, rejected, _ = filtering.filter_rows(rows, FilterConfig(min_score=0.0), bench=[])
    assert len(kept) == 4, [r["reasons"] for r in rejected]   # the shared 37-word sentence makes no duplicates
    assert filtering.request(rows[3], rows[3]["instruction"]) == "List three fruits."


def _run_filter_cli(tmp_path, lines, *extra):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "kept.jsonl"
    r = subprocess.run([sys.executable, "-m", "sitlib", "filter", "--input", str(inp), "--output", str(out),
                        "--stats", str(tmp_path / "stats.json"), *extra], capture_output=True, text=True,
                       cwd=REPO_ROOT)
    return r, out


def test_filter_cli_bad_rows_fail_naming_line_and_write_nothing(tmp_path):
    good = json.dumps(_row(0, "Explain how rainbows form in the sky after rain."))
    r, out = _run_filter_cli(tmp_path, [good, "{not json", json.dumps({"instruction": "x"}),
                                        json.dumps({"instruction": 3, "response": "y"})])
    assert r.returncode == 2 and "in.jsonl:2:" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_filter_cli_skip_bad_rows_reports_them_and_keeps_fields(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Explain how rainbows form in the sky after rain."}],
            "completion": [{"role": "assistant", "content": "Sunlight bends inside raindrops and splits into "
                                                            "its colours, which we see as an arc."}], "source": "x"}
    r, out = _run_filter_cli(tmp_path, [json.dumps(good), "{not json"], "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == [good]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["reasons"]["bad_row"] == 1 and "in.jsonl:2:" in stats["bad_rows"][0]


def _gen_cfg(n, **kw):
    return GenerationConfig(num_instructions=n, batch_size=4, chunk_size=2, instruction_max_new_tokens=6,
                            response_max_new_tokens=6, **kw)


def _dies_on_call(real, n):
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("runtime disconnected mid-run")
        return real(*a, **k)
    return wrapper


def test_magpie_resume_after_kill_completes_every_id_once(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    out = tmp_path / "resumed.jsonl"
    real = magpie.append_jsonl
    monkeypatch.setattr(magpie, "append_jsonl", _dies_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        magpie.run_generation(model, tok, _gen_cfg(6, constraint_share=0.0), out, tmp_path / "m.json", "tiny")
    before = out.read_text()
    assert magpie.count_rows(out) == 2
    monkeypatch.setattr(magpie, "append_jsonl", real)
    metrics = magpie.run_generation(model, tok, _gen_cfg(6, constraint_share=0.0), out, tmp_path / "m.json", "tiny")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(6))            # nothing lost, nothing duplicated
    assert out.read_text().startswith(before)                         # rows written before the kill untouched
    assert metrics["rows_this_run"] == 4 and metrics["rows_per_second"] > 0


def test_magpie_checkpoint_chunk_independent_of_generate_batch(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    sizes, appended = [], []
    real_gen, real_append = magpie.generate, magpie.append_jsonl
    monkeypatch.setattr(magpie, "generate", lambda m, t, inputs, *a, **k: sizes.append(len(inputs)) or
                        real_gen(m, t, inputs, *a, **k))
    monkeypatch.setattr(magpie, "append_jsonl", lambda p, rows: appended.append(len(rows)) or real_append(p, rows))
    cfg = GenerationConfig(num_instructions=10, batch_size=8, chunk_size=3, instruction_max_new_tokens=4,
                           response_max_new_tokens=4, constraint_share=0.0)
    magpie.run_generation(model, tok, cfg, tmp_path / "r.jsonl", tmp_path / "m.json", "tiny")
    assert sizes[0] == 10                       # pass 1: every pending row in one call
    assert sizes[1] == 10                       # pass 2: all answers (≤ 4 batches' worth) in one call
    assert appended == [3, 3, 3, 1]             # checkpoints every chunk_size rows


def test_magpie_constrained_rows_are_checked_by_code(tiny, tmp_path):
    tok, model = tiny
    cfg = _gen_cfg(4, constraint_share=1.0, max_constraints=2, constraint_samples=3)
    cfg.instruction_max_new_tokens = 12
    rows = magpie.draft_instructions(model, tok, cfg, [0, 1, 2, 3], 0, [])
    for r in rows:                              # a tiny model rarely ends on EOS: mark them complete to constrain
        r["instruction_complete"] = True
    rows = magpie.add_constraints(rows, cfg, 0)
    done = [r for batch in magpie.answer_rows(model, tok, cfg, rows, 0) for r in batch]
    assert len(done) == 4
    for r in done:
        assert 1 <= len(r["constraints"]) <= 2 and len(r["samples"]) == 3
        assert r["instruction"].startswith(r["base_instruction"]) and r["constraints"][0]["text"] in r["instruction"]
        for s in r["samples"]:
            assert s["passed"] == constraints.check(r["constraints"], s["text"], r["base_instruction"])
        assert r["constraint_pass"] == any(s["pass"] and s["ended"] for s in r["samples"])


def _finishing_generate(model, tok, inputs, sampling, batch_size=None, *a, **k):
    """A stand-in teacher that always ends on EOS (a random tiny model never does), varied per row and
    temperature so best and worst differ."""
    from sitlib.generation import Completion

    g = torch.Generator().manual_seed(len(inputs))
    per_row = sampling if isinstance(sampling, list) else [sampling] * len(inputs)
    return [Completion(f"Answer {len(x)} at {s.temperature}: " +
                       " ".join(str(int(v)) for v in torch.randint(0, 99, (4,), generator=g)), 9, True)
            for x, s in zip(inputs, per_row)]


def _pref_session(tiny_model_dir, tmp_path, **over):
    from sitlib.artifacts import write_jsonl

    S = setup("cpu", str(tmp_path / "o"), overrides={
        "models.teacher": str(tiny_model_dir), "models.student": str(tiny_model_dir), "preference.max_prompts": 6,
        "preference.chunk_size": 2, "preference.batch_size": 2, "preference.max_new_tokens": 6,
        "preference.min_margin": 0.0, "preference.temperatures": [0.7, 1.3], **over}, verbose=False)
    sft = [{"id": i, "prompt": [{"role": "user", "content": f"Write sentence number {i} about the sea."}],
            "completion": [{"role": "assistant", "content": "ok"}]} for i in range(6)]
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", sft[:5])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", sft[5:])
    return S


def test_preference_resume_after_kill(tiny_model_dir, tmp_path, monkeypatch):
    S = _pref_session(tiny_model_dir, tmp_path)
    monkeypatch.setattr(preference, "generate", _finishing_generate)
    real = preference.sample_candidates
    monkeypatch.setattr(preference, "sample_candidates", _dies_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        preference.run_preference(S)
    monkeypatch.setattr(preference, "sample_candidates", real)
    metrics = preference.run_preference(S)
    cands = [json.loads(x) for x in (S.paths.data_preference / "candidates.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in cands) == list(range(6))
    assert metrics["prompts"] == 6 and metrics["prompts_sampled_this_run"] == 4
    assert metrics["candidate_source"] == "teacher" and all(c["candidate_source"] == "teacher" for c in cands)
    pairs = [json.loads(x) for f in ("dpo_train", "dpo_val")
             for x in (S.paths.data_preference / f"{f}.jsonl").read_text().splitlines()]
    for p in pairs:
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"] and p["candidate_source"] == "teacher"
        assert p["score_chosen"] >= p["score_rejected"] and p["margin"] >= 0


def test_preference_all_temperatures_in_one_call(tiny_model_dir, tmp_path, monkeypatch):
    S = _pref_session(tiny_model_dir, tmp_path, **{"preference.batch_size": 12, "preference.chunk_size": 2})
    calls = []
    monkeypatch.setattr(preference, "generate", lambda m, t, inputs, sampling, *a, **k: calls.append(
        (len(inputs), sorted({s.temperature for s in sampling}))) or _finishing_generate(m, t, inputs, sampling))
    preference.run_preference(S)
    # 6 prompts × 2 temperatures in one call (one Sampling per row), not one call per temperature on 2-prompt chunks
    assert calls == [(12, [0.7, 1.3])]


def test_preference_sft_source_needs_the_sft_adapter(tiny_model_dir, tmp_path):
    from sitlib.errors import ConfigError, MissingInputError

    S = _pref_session(tiny_model_dir, tmp_path, **{"preference.candidate_source": "sft"})
    with pytest.raises(MissingInputError, match="run 05_sft_training first"):
        preference.run_preference(S)
    with pytest.raises(ConfigError, match="preference.candidate_source"):
        _pref_session(tiny_model_dir, tmp_path, **{"preference.candidate_source": "student"})


def _cand(text, score, ended=True, passed=None):
    c = {"source": "teacher@0.7", "temperature": 0.7, "text": text, "ended": ended, "score": score}
    if passed is not None:
        c.update(passed=[passed], **{"pass": passed})
    return c


def test_cut_off_answer_is_never_chosen():
    rec = {"id": 0, "prompt": "Tell me about rivers.", "candidate_source": "teacher", "scorer": "offline",
           "candidates": [_cand("A long answer that was cut off at the tok", 9.0, ended=False),
                          _cand("Rivers carry water to the sea.", 1.0), _cand("Rivers.", 0.2)]}
    pair = preference.to_pair(rec, 0.1)
    assert pair["chosen"][0]["content"] == "Rivers carry water to the sea."
    rec["candidates"] = [rec["candidates"][0], _cand("b", 0.0, ended=False)]
    assert preference.to_pair(rec, 0.0) is None        # nothing finished: no pair at all


def test_constrained_pairs_pass_is_chosen_fail_is_rejected_whatever_the_scores():
    rec = {"id": 1, "prompt": "Describe rain. Do not use any commas.", "candidate_source": "teacher",
           "scorer": "offline", "constraints": [{"id": "punctuation:no_comma", "kwargs": {}}],
           "candidates": [_cand("Rain falls, and it is wet, and cold.", 5.0, passed=False),
                          _cand("Rain falls from clouds.", 0.1, passed=True),
                          _cand("Rain is water that falls from the sky.", 0.3, ended=False, passed=True)]}
    pair = preference.to_pair(rec, min_margin=10.0)    # the margin rule is for score pairs only
    assert pair["chosen"][0]["content"] == "Rain falls from clouds." and pair["pair_rule"] == "constraint_check"
    assert "," in pair["rejected"][0]["content"]


def test_preference_checks_constrained_candidates_by_code(tiny_model_dir, tmp_path):
    from sitlib.artifacts import write_jsonl

    S = _pref_session(tiny_model_dir, tmp_path)
    rows = [{"id": i, "prompt": [{"role": "user", "content": f"Describe rain number {i}. Do not use any commas."}],
             "completion": [{"role": "assistant", "content": "Rain falls from the clouds."}],
             "constraints": [{"id": "punctuation:no_comma", "kwargs": {}}], "base_instruction": f"Describe rain {i}.",
             "failed_answers": ["Rain, they say, is wet."]} for i in range(4)]
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", rows[:3])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", rows[3:])
    preference.run_preference(S)
    pairs = [json.loads(x) for f in ("dpo_train", "dpo_val")
             for x in (S.paths.data_preference / f"{f}.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and all(p["pair_rule"] == "constraint_check" for p in pairs)
    assert all("," not in p["chosen"][0]["content"] and "," in p["rejected"][0]["content"] for p in pairs)
    metrics = json.loads((S.paths.evaluation_metrics / "preference_metrics.json").read_text())
    assert sum(metrics["chosen_from"].values()) == sum(metrics["rejected_from"].values()) == 4
    assert set(metrics["chosen_from"]) | set(metrics["rejected_from"]) <= {"teacher", "02 teacher"}


def test_a_code_edited_answer_never_enters_a_preference_pair(tiny_model_dir, tmp_path):
    """Repair keeps a sample edited by code; next to the sample it came from it would make a pair that differs
    only by the edit. 04 offers the failed samples as candidates, not the edited one."""
    from sitlib.artifacts import write_jsonl

    S = _pref_session(tiny_model_dir, tmp_path)
    row = {"prompt": [{"role": "user", "content": "Describe rain. Wrap your entire response in double quotes."}],
           "completion": [{"role": "assistant", "content": '"Rain falls."'}],
           "constraints": [{"id": "startend:quotation", "kwargs": {}}], "base_instruction": "Describe rain.",
           "failed_answers": ["Rain falls."]}
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", [{**row, "id": 0, "repaired": True}, {**row, "id": 1}])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", [])
    edited, sampled = preference.prompts_from_sft(S)
    assert edited["answers_02"] == ["Rain falls."]
    assert sampled["answers_02"] == ['"Rain falls."', "Rain falls."]
    S.config.preference.teacher_answers = False   # only the run's own candidates
    assert [it["answers_02"] for it in preference.prompts_from_sft(S)] == [[], []]


def test_missing_raw_data_names_notebook(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    with pytest.raises(FileNotFoundError, match="run 02_magpie_generation first"):
        filtering.run_filter(S)
    with pytest.raises(FileNotFoundError, match="run 03_quality_filtering first"):
        preference.run_preference(S)


# ---------------------------------------------------------------- the filter's rules and score

@pytest.mark.parametrize("inst,resp", [
    ("Which oils are used for frying?", "Rapeseed oil, sunflower oil and olive oil are common choices for frying."),
    ("What makes a sofa safe?", "Many sofas are treated with a flame retardant so they do not catch fire quickly."),
    ("Why did the Nazi party rise to power in Germany?", "The Nazi party gained votes during the economic crisis "
                                                          "of the early 1930s and exploited public fear."),
    ("What is the Latin name of the beech tree?", "The European beech is Fagus sylvatica, a large deciduous tree."),
    ("How do I get rid of aphids on my roses?", "Spray them with soapy water; it will kill them without harming "
                                                "the plant, and ladybirds eat them too."),
    ("What does a career in machine learning look like?", "You could work as an AI engineer, building and "
                                                          "deploying models for products used every day."),
])
def test_ordinary_text_is_not_toxic_or_refusal(inst, resp):
    reasons = filtering.rule_reasons({"instruction": inst, "response": resp}, FilterConfig(min_score=0.0))
    assert "toxic" not in reasons and "refusal" not in reasons, reasons


@pytest.mark.parametrize("resp,reason", [
    ("You should just go and kill yourself, nobody cares about this question.", "toxic"),
    ("As an AI language model, I cannot browse the internet to find that for you.", "refusal"),
    ("I'm sorry, but I can't help with that request because it is not allowed.", "refusal"),
])
def test_real_toxic_and_refusal_text_is_still_caught(resp, reason):
    assert reason in filtering.rule_reasons({"instruction": "Tell me something useful today.", "response": resp},
                                            FilterConfig(min_score=0.0))


LONG_ANSWER = (
    "Bread rises because yeast feeds on the sugars in flour and releases carbon dioxide. The gas is trapped by "
    "gluten, a stretchy network of proteins that forms when wheat flour is mixed with water and kneaded. Warmth "
    "speeds the yeast up, which is why dough is often left near a heater or in a sunny kitchen. Salt slows "
    "fermentation slightly but strengthens the dough and improves flavour. During baking the trapped bubbles "
    "expand in the heat of the oven, the yeast dies once the crumb passes about sixty degrees, and the starches "
    "set into the soft open structure we recognise. A longer, cooler rise gives a deeper taste because enzymes "
    "have more time to break starch into simple sugars, while bacteria add gentle acidity. Sourdough relies on "
    "wild yeasts and lactic bacteria instead of a packet of dried commercial yeast, so it ferments more slowly. "
    "Bakers judge readiness by pressing the dough lightly: if the dent springs back slowly, it is ready for the "
    "oven. Steam in the first minutes keeps the crust supple so the loaf can expand fully before it hardens.")


def test_quality_score_does_not_prefer_short_answers_by_construction():
    inst = "Explain why bread rises when you bake it."
    words = LONG_ANSWER.split()
    short = " ".join(words[:45]).rstrip(",") + "."
    w_long, w_short = (re.findall(r"[\w']+", t.lower()) for t in (LONG_ANSWER, short))
    # plain type-token ratio falls with length; the moving-window ratio does not
    assert len(set(w_long)) / len(w_long) < len(set(w_short)) / len(w_short) - 0.1
    assert abs(filtering.mattr(w_long) - filtering.mattr(w_short)) < 0.05
    assert filtering.quality_score(inst, LONG_ANSWER) >= filtering.quality_score(inst, short) - 0.02


def test_mattr_sees_repetition():
    varied = LONG_ANSWER.lower().split()
    looped = (varied[:20] * 10)
    assert filtering.mattr(looped) < filtering.mattr(varied) - 0.1


# ---------------------------------------------------------------- no benchmark prompt in the training data

def test_benchmark_prompts_and_near_copies_are_rejected():
    from sitlib.benchmark import load_suite

    suite = load_suite(0)
    prompts = [it["prompt"] for it in suite]
    exact, other = prompts[0], prompts[len(prompts) // 2]
    words = other.split()
    near = " ".join(words[:-1] + ["please" if words[-1] != "please" else "now"]).lower()   # last word changed
    appended = exact + " Your answer must contain a title, wrapped in double angular brackets."
    rows = [_row(0, exact), _row(1, near), _row(2, appended),
            _row(3, "Explain how photosynthesis turns sunlight into chemical energy.")]
    kept, rejected, stats = filtering.filter_rows(rows, FilterConfig(min_score=0.0))
    flagged = {r["id"] for r in rejected if "benchmark_overlap" in r["reasons"]}
    assert flagged == {0, 1, 2} and [r["id"] for r in kept] == [3]
    bench = filtering.benchmark_shingles()
    assert all(filtering.overlaps_benchmark(p, bench) for p in prompts)   # every item of the whole suite


def test_shared_constraint_wording_with_another_task_is_not_overlap():
    from sitlib.benchmark import load_suite
    from sitlib.checks import ifeval_instruction

    item = next(it for it in load_suite(0) if it["checks"][0]["type"] == "detectable_format:json_format")
    wording, _ = ifeval_instruction("detectable_format:json_format", {})
    assert wording in item["prompt"]
    base = "Explain how volcanoes erupt and why some eruptions are explosive."
    row = _row(0, f"{base} {wording}", '{"answer": "Magma rises until the pressure of its gas breaks the rock."}',
               base_instruction=base)
    _, rejected, _ = filtering.filter_rows([row], FilterConfig(min_score=0.0))
    assert not any("benchmark_overlap" in r["reasons"] for r in rejected)


# ---------------------------------------------------------------- rejection sampling into SFT

def test_constrained_row_without_a_passing_answer_is_rejected_and_passing_one_keeps_its_failures():
    cons = [{"id": "punctuation:no_comma", "kwargs": {}, "text": "Do not use any commas."}]
    ok_samples = [{"text": "Rain, wet.", "ended": True, "pass": False, "passed": [False], "n_tokens": 3},
                  {"text": "Rain falls from clouds as water.", "ended": True, "pass": True, "passed": [True],
                   "n_tokens": 6}]
    rows = [_row(0, "Describe rain in a few words please. Do not use any commas.",
                 "Rain falls from clouds as water and keeps the rivers full.", constraints=cons,
                 constraint_pass=True, samples=ok_samples, base_instruction="Describe rain in a few words please."),
            _row(1, "Describe snow in a few words please. Do not use any commas.",
                 "Snow, cold, white, soft and lovely in the winter months here.", constraints=cons,
                 constraint_pass=False, samples=[ok_samples[0]])]
    kept, rejected, _ = filtering.filter_rows(rows, FilterConfig(min_score=0.0))
    assert [r["id"] for r in kept] == [0] and rejected[0]["reasons"] == ["constraint_failed"]
    sft = filtering.to_sft(kept[0])
    assert sft["constraints"] == [{"id": "punctuation:no_comma", "kwargs": {}}]
    assert sft["failed_answers"] == ["Rain, wet."]


def test_a_kept_row_carries_its_other_passing_answers_that_03_would_keep():
    """sft.answers_per_row trains on these: passing, ended, distinct from the kept answer and each other, and clean
    under 03's rules (a refusal or a cut-off sample is left out even where it passed the constraint)."""
    cons = [{"id": "punctuation:no_comma", "kwargs": {}, "text": "Do not use any commas."}]

    def sample(text, passed=True, ended=True):
        return {"text": text, "ended": ended, "pass": passed, "passed": [passed], "n_tokens": 6}

    kept_answer = "Rain falls from clouds as water and keeps the rivers full."
    samples = [sample("Rain, wet.", passed=False), sample(kept_answer),
               sample("Rain falls from clouds as water and keeps the rivers full!"),   # the same text, normalised
               sample("Drops of water fall from grey clouds and soak the ground."),
               sample("Drops of water fall from grey clouds and soak the ground."),    # twice: kept once
               sample("Wet."),                                                         # too short for 03
               sample("I'm sorry, but I cannot help with that request today."),       # refusal
               sample("Water falls from the sky in drops and fills the streams", ended=False),
               sample("Cold drops come down from the sky and wash the streets clean.")]
    row = _row(0, "Describe rain in a few words please. Do not use any commas.", kept_answer, constraints=cons,
               constraint_pass=True, samples=samples, base_instruction="Describe rain in a few words please.")
    kept, _, _ = filtering.filter_rows([row], FilterConfig(min_score=0.0))
    assert filtering.to_sft(kept[0], FilterConfig(min_score=0.0))["passed_answers"] == [
        "Drops of water fall from grey clouds and soak the ground.",
        "Cold drops come down from the sky and wash the streets clean."]
    assert "passed_answers" not in filtering.to_sft(kept[0])                   # without 03's rules: not judged
    assert "passed_answers" not in filtering.to_sft({**kept[0], "repaired": True}, FilterConfig(min_score=0.0))


def test_a_checked_row_whose_first_passing_answer_breaks_a_rule_keeps_a_later_clean_one():
    """02 keeps the first passing, finished sample before 03's rules run; a refusal there must not cost the row its
    other, clean passing answer. Where the instruction itself breaks a rule, no other sample is clean, the answer
    was edited by code or the row has no constraint, the row goes as it was."""
    cons = [{"id": "punctuation:no_comma", "kwargs": {}, "text": "Do not use any commas."}]

    def sample(text, passed=True, ended=True):
        return {"text": text, "ended": ended, "pass": passed, "passed": [passed], "n_tokens": len(text.split())}

    refusal = "I'm sorry, but I cannot help with that request today."
    clean = "Drops of water fall from grey clouds and soak the ground."
    samples = [sample(refusal), sample("Water falls from the sky in drops and fills", ended=False),
               sample("Rain, wet.", passed=False), sample(clean),
               sample("Cold drops come down from the sky and wash the streets clean.")]
    none_clean = samples[:3] + [sample("As an AI language model, I cannot describe the weather for you.")]
    checked = dict(constraints=cons, constraint_pass=True, samples=samples, base_instruction="Describe rain.")
    inst = "Describe {} in a few words please. Do not use any commas."
    rows = [_row(0, inst.format("rain"), refusal, **checked),
            _row(1, inst.format("snow"), refusal, **{**checked, "samples": none_clean, "base_instruction": "Snow."}),
            _row(2, "Hi. Do not use any commas.", refusal, **{**checked, "base_instruction": "Hi."}),   # too short
            _row(3, inst.format("hail"), refusal, **{**checked, "repaired": True, "base_instruction": "Hail."}),
            _row(4, inst.format("fog"), refusal, samples=samples, constraint_pass=True),   # no constraint
            {"id": 5, "prompt": [{"role": "user", "content": inst.format("mist")}],   # a TRL row (the CLI's input)
             "completion": [{"role": "assistant", "content": refusal}], **{**checked, "base_instruction": "Mist."}}]
    kept, rejected, stats = filtering.filter_rows(rows, FilterConfig(min_score=0.0, min_instruction_words=8))
    assert [(r["id"], filtering.row_texts(r)[1], r["answer_replaced"]) for r in kept] == [(0, clean, True),
                                                                                        (5, clean, True)]
    assert "response" not in kept[1] and kept[0]["response_tokens"] == len(clean.split())
    assert stats["answers_replaced"] == 2
    assert {r["id"]: (r["reasons"], r["response"]) for r in rejected} == {
        1: (["refusal"], refusal), 2: (["instruction_too_short", "refusal"], refusal), 3: (["refusal"], refusal),
        4: (["refusal"], refusal)}
    assert filtering.to_sft(kept[0], FilterConfig(min_score=0.0))["passed_answers"] == [
        "Cold drops come down from the sky and wash the streets clean."]   # the new answer is not repeated


def test_filter_stats_count_the_further_answers_of_the_training_rows_only(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    train = [{"id": 0, "passed_answers": ["a", "b"]}, {"id": 1, "passed_answers": []}, {"id": 2}]
    val = [{"id": 3, "passed_answers": ["c"]}]   # held out: 05 never expands it
    stats = filtering.write_splits(S, train, val, [], {"input_rows": 4, "kept": 4, "rejected": 0, "reasons": {}})
    assert stats["passed_answers_train"] == 2
    assert json.loads((S.paths.data_filtered / "filter_stats.json").read_text())["passed_answers_train"] == 2


def _checked(i, passing, failing):
    return {"id": i, "prompt": f"Describe rain {i}. Do not use any commas.", "candidate_source": "sft",
            "scorer": "offline", "constraints": [{"id": "punctuation:no_comma", "kwargs": {}}],
            "candidates": [_cand(f"pass {i} {k}", s, passed=True) for k, s in enumerate(passing)]
            + [_cand(f"fail, {i} {k}", s, passed=False) for k, s in enumerate(failing)]
            + [_cand(f"cut off {i}", 9.0, ended=False, passed=True)]}


def test_several_pairs_per_checked_prompt_pair_best_passes_with_worst_fails_once_each():
    rec = _checked(0, passing=[0.5, 0.9, 0.1], failing=[0.4, 0.0])
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in preference.to_pairs(rec, 0.0, 1)] \
        == [("pass 0 1", "fail, 0 1")]
    assert preference.to_pair(rec, 0.0)["chosen"][0]["content"] == "pass 0 1"
    pairs = preference.to_pairs(rec, 0.0, 3)   # two failing answers: two pairs, each answer in one
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] \
        == [("pass 0 1", "fail, 0 1"), ("pass 0 0", "fail, 0 0")]
    scored = {"id": 1, "prompt": "p", "candidate_source": "sft", "scorer": "offline",
              "candidates": [_cand("good", 1.0), _cand("middle", 0.5), _cand("bad", 0.0)]}
    assert len(preference.to_pairs(scored, 0.0, 3)) == 1   # a scored prompt: its best against its worst


def test_a_failing_greedy_answer_is_rejected_first():
    rec = _checked(0, passing=[0.5, 0.9], failing=[0.4, 0.0, 0.7])
    greedy = rec["candidates"][2]   # "fail, 0 0" (score 0.4): not the worst by score
    greedy.update(temperature=0, source="sft@greedy")
    pairs = preference.to_pairs(rec, 0.0, 2)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] \
        == [("pass 0 1", "fail, 0 0"), ("pass 0 0", "fail, 0 1")]
    assert pairs[0]["rejected_from"] == "sft@greedy"


def test_temperature_zero_is_the_greedy_answer_without_the_penalty(tiny_model_dir, tmp_path, monkeypatch):
    from sitlib import scoring
    from sitlib.generation import chat_input_ids

    S = _pref_session(tiny_model_dir, tmp_path, **{"preference.temperatures": [0, 1.3],
                                                   "preference.repetition_penalty": 1.3})
    calls = []
    real = preference.generate

    def spy(m, t, inputs, sampling, batch_size=None, logits_processors=None, **k):
        many = sampling if isinstance(sampling, list) else [sampling] * len(inputs)
        calls.append(([s.do_sample for s in many], bool(logits_processors)))
        return real(m, t, inputs, sampling, batch_size, logits_processors, **k)
    monkeypatch.setattr(preference, "generate", spy)
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir), S.profile)
    items = [{"id": 0, "prompt": "Name a colour."}, {"id": 1, "prompt": "Count to three."}]
    comps = preference.sample_candidates(model, tok, items, S.config.preference, seed=1)
    # the sampled rows with 04's penalty, then the greedy rows as 07 decodes them: no penalty
    assert calls == [([True, True], True), ([False, False], False)]
    want = generate(model, tok, chat_input_ids(tok, [[{"role": "user", "content": it["prompt"]}] for it in items]),
                    Sampling.greedy(S.config.preference.max_new_tokens))
    assert [c[0].text for c in comps] == [w.text for w in want]
    records = preference.candidate_records(items, comps, S.config.preference, "sft", scoring.OfflineScorer(model, tok))
    assert [c["source"] for c in records[0]["candidates"]] == ["sft@greedy", "sft@1.3"]


def test_preference_metrics_say_which_decoding_wrote_each_side(tiny_model_dir, tmp_path, monkeypatch):
    S = _pref_session(tiny_model_dir, tmp_path, **{"preference.temperatures": [0, 1.3]})
    monkeypatch.setattr(preference, "generate", _finishing_generate)
    m = preference.run_preference(S)
    assert set(m["chosen_decoding"]) | set(m["rejected_decoding"]) <= {"greedy", "1.3"}
    # two candidates per prompt, one greedy: every pair has the greedy answer on exactly one side
    assert m["chosen_decoding"].get("greedy", 0) + m["rejected_decoding"].get("greedy", 0) == m["pairs"] > 0
    assert sum(m["rejected_decoding"].values()) == m["pairs"]


def test_a_prompts_pairs_stay_on_one_side_of_the_split(tiny_model_dir, tmp_path):
    S = _pref_session(tiny_model_dir, tmp_path, **{"preference.pairs_per_prompt": 2, "preference.val_fraction": 0.3})
    recs = [_checked(i, passing=[0.9, 0.5], failing=[0.0, 0.3]) for i in range(10)]
    pairs = preference.make_pairs(S, recs)
    assert len(pairs) == 20
    metrics = preference.write_pairs(S, pairs, recs, {})
    sides = {f: [json.loads(x)["id"] for x in (S.paths.data_preference / f"{f}.jsonl").read_text().splitlines()]
             for f in ("dpo_train", "dpo_val")}
    assert not set(sides["dpo_train"]) & set(sides["dpo_val"]) and len(sides["dpo_val"]) == 6
    assert metrics["pairs_per_prompt"] == 2 and metrics["dpo_train"] == 14


def test_one_pair_per_prompt_splits_as_a_seeded_shuffle_of_the_pairs(tiny_model_dir, tmp_path):
    import random

    S = _pref_session(tiny_model_dir, tmp_path, **{"preference.val_fraction": 0.2})
    recs = [_checked(i, passing=[0.9], failing=[0.0]) for i in range(11)]
    pairs = preference.make_pairs(S, recs)
    preference.write_pairs(S, pairs, recs, {})
    want = [x["id"] for x in pairs]
    random.Random(S.config.seed).shuffle(want)
    val = [json.loads(x)["id"] for x in (S.paths.data_preference / "dpo_val.jsonl").read_text().splitlines()]
    assert val == want[:2]


def test_notebook_views_of_the_filter():
    rows = [_row(0, "Write a poem about cats please.", "I'm sorry, but I can't help with that request today."),
            _row(1, "## Step 1: compute the area of the square", "The area is 16 square units in total here."),
            _row(2, "Explain how photosynthesis turns sunlight into chemical energy.")]
    kept, rejected, stats = filtering.filter_rows(rows, FilterConfig(min_score=0.0))
    examples = filtering.example_per_reason(rejected)
    assert {e["reason"] for e in examples} == {r for x in rejected for r in x["reasons"]}
    assert len(examples) == len({e["reason"] for e in examples})          # one row per reason
    steps = {s["step"]: s["rows"] for s in filtering.funnel(stats)}
    assert steps["generated"] == 3 and steps["kept"] == 1 and steps["rejected: refusal"] == 1
    assert filtering.show_rows(kept)[0]["id"] == 2


def test_margins_are_those_of_the_pairs_before_the_cut():
    recs = [{"id": i, "prompt": "p", "candidate_source": "teacher", "scorer": "offline",
             "candidates": [_cand("good answer", s), _cand("bad answer", 0.0)]} for i, s in enumerate([0.2, 1.0])]
    assert preference.margins(recs) == [0.2, 1.0]
    assert [p["id"] for p in (preference.to_pair(r, 0.5) for r in recs) if p] == [1]
