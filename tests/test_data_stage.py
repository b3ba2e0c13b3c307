"""02/03/04 on a tiny model: header blocking, dedup, pseudo-instructions, resume after a kill, bad rows."""
import json
import subprocess
import sys

import pytest
import torch

from sitlib import filtering, magpie, preference
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
    assert r.returncode == 2 and "line 2" in r.stderr and "(and 2 more)" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_filter_cli_skip_bad_rows_reports_them_and_keeps_fields(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Explain how rainbows form in the sky after rain."}],
            "completion": [{"role": "assistant", "content": "Sunlight bends inside raindrops and splits into "
                                                            "its colours, which we see as an arc."}], "source": "x"}
    r, out = _run_filter_cli(tmp_path, [json.dumps(good), "{not json"], "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in out.read_text().splitlines()] == [good]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["reasons"]["bad_row"] == 1 and "line 2" in stats["bad_rows"][0]


def _gen_cfg(n):
    return GenerationConfig(num_instructions=n, batch_size=4, chunk_size=2, instruction_max_new_tokens=6,
                            response_max_new_tokens=6)


def test_magpie_resume_after_kill_matches_uninterrupted_run(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    full = tmp_path / "full.jsonl"
    magpie.run_generation(model, tok, _gen_cfg(6), full, tmp_path / "m1.json", "tiny")

    resumed = tmp_path / "resumed.jsonl"
    real, calls = magpie.generate_chunk, {"n": 0}

    def dies_in_second_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("runtime disconnected mid-chunk")
        return real(*a, **k)
    monkeypatch.setattr(magpie, "generate_chunk", dies_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        magpie.run_generation(model, tok, _gen_cfg(6), resumed, tmp_path / "m2.json", "tiny")
    assert magpie.count_rows(resumed) == 2
    monkeypatch.setattr(magpie, "generate_chunk", real)
    magpie.run_generation(model, tok, _gen_cfg(6), resumed, tmp_path / "m2.json", "tiny")
    rows = [json.loads(x) for x in resumed.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6))
    assert resumed.read_text() == full.read_text()   # nothing lost, nothing duplicated, same rows


def test_preference_resume_after_kill(tiny_model_dir, tmp_path, monkeypatch):
    from sitlib.artifacts import write_jsonl

    S = setup("cpu", str(tmp_path / "o"), overrides={
        "models.student": str(tiny_model_dir), "preference.max_prompts": 6, "preference.chunk_size": 2,
        "preference.max_new_tokens": 6, "preference.min_margin": 0.0, "preference.temperatures": [0.7, 1.3]},
        verbose=False)
    sft = [{"id": i, "prompt": [{"role": "user", "content": f"Write sentence number {i} about the sea."}],
            "completion": [{"role": "assistant", "content": "ok"}]} for i in range(6)]
    write_jsonl(S.paths.data_filtered / "sft_train.jsonl", sft[:5])
    write_jsonl(S.paths.data_filtered / "sft_val.jsonl", sft[5:])
    real, calls = preference.sample_and_score, {"n": 0}

    def dies_in_second_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(preference, "sample_and_score", dies_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        preference.run_preference(S)
    monkeypatch.setattr(preference, "sample_and_score", real)
    metrics = preference.run_preference(S)
    cands = [json.loads(x) for x in (S.paths.data_preference / "candidates.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in cands) == list(range(6))
    assert metrics["prompts"] == 6 and metrics["prompts_sampled_this_run"] == 4
    pairs = [json.loads(x) for f in ("dpo_train", "dpo_val")
             for x in (S.paths.data_preference / f"{f}.jsonl").read_text().splitlines()]
    for p in pairs:
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
        assert p["score_chosen"] >= p["score_rejected"] and p["margin"] >= 0


def test_missing_raw_data_names_notebook(tmp_path):
    S = setup("cpu", str(tmp_path / "o"), verbose=False)
    with pytest.raises(FileNotFoundError, match="run 02_magpie_generation first"):
        filtering.run_filter(S)
    with pytest.raises(FileNotFoundError, match="run 03_quality_filtering first"):
        preference.run_preference(S)
