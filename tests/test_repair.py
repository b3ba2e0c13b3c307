"""Answers repaired by code: each edit makes IFEval's own checker pass, and nothing else is ever called repaired."""
import random

import pytest

from sitlib import constraints, magpie, repair
from sitlib.checks import ifeval_instruction
from sitlib.generation import Completion

ANSWER = ("Tides rise and fall twice a day, because the moon pulls on the oceans. The sun adds a smaller pull, "
          "so the highest tides come when both line up.")
TASK = "Explain why the sea has tides"


OTHER = "The moon's gravity pulls the water toward it, and the earth turns under that bulge of water."


def _cons(*ids, seed=0):
    rng = random.Random(seed)
    out = []
    for i in ids:
        text, kwargs = ifeval_instruction(i, {"prompt_to_repeat": TASK} if i == constraints.REPEAT else None, rng=rng)
        out.append({"id": i, "kwargs": kwargs, "text": text})
    return out


@pytest.mark.parametrize("cid", sorted(repair.EDITS))
def test_each_edit_turns_a_failing_answer_into_one_the_checker_passes(cid):
    cons = _cons(cid)
    assert not constraints.passes(cons, ANSWER, TASK)
    fixed = repair.repair(cons, ANSWER, TASK, [OTHER])
    assert fixed is not None and constraints.passes(cons, fixed, TASK)


def test_two_responses_join_two_different_samples_of_the_row():
    cons = _cons("combination:two_responses")
    assert repair.repair(cons, ANSWER, TASK, [OTHER]) == f"{ANSWER}\n******\n{OTHER}"
    assert repair.repair(cons, ANSWER, TASK) is None                   # no second sample
    assert repair.repair(cons, ANSWER, TASK, [ANSWER, "  "]) is None   # only the same answer, or a blank one
    longer = OTHER + " " + OTHER
    assert repair.repair(cons, ANSWER, TASK, [longer, OTHER]).endswith("******\n" + OTHER)   # the shortest


def test_finish_row_joins_two_finished_samples_never_a_cut_off_one():
    cons = _cons("combination:two_responses")
    row = {"id": 1, "instruction": TASK, "base_instruction": TASK, "constraints": cons}
    cut = "The moon pulls the water and"
    out = magpie.finish_row(row, [Completion(ANSWER, 40, True), Completion(cut, 12, False),
                                  Completion(OTHER, 30, True)], repair=True)
    assert out["repaired"] and out["response"] == f"{ANSWER}\n******\n{OTHER}" and cut not in out["response"]
    alone = magpie.finish_row(row, [Completion(ANSWER, 40, True), Completion(cut, 12, False)], repair=True)
    assert not alone["repaired"] and not alone["constraint_pass"]   # one finished sample: nothing to join


def test_repeat_prompt_asks_first_and_repeats_the_whole_rest_of_the_prompt():
    picked = _cons("combination:repeat_prompt", "keywords:existence", seed=1)
    prompt, bound = constraints.attach(TASK + ".", picked)
    rest = f"{TASK}. {picked[1]['text'].strip()}"
    assert prompt == f"{picked[0]['text'].strip()}\n{rest}"
    assert bound[0]["kwargs"] == {"prompt_to_repeat": rest} and bound[1] == picked[1]
    words = " ".join(picked[1]["kwargs"]["keywords"])
    fixed = repair.repair(bound, f"{ANSWER} {words}", TASK)
    assert fixed.startswith(rest + "\n\n") and constraints.passes(bound, fixed, TASK)
    assert not constraints.passes(bound, f"Sure. {fixed}", TASK)   # anything before the request fails


def test_edits_combine_in_one_answer():
    cons = _cons("detectable_format:title", "change_case:english_lowercase", "punctuation:no_comma")
    fixed = repair.repair(cons, ANSWER, TASK)
    assert fixed.startswith("<<explain why the sea has>>") and "," not in fixed and fixed == fixed.lower()
    assert all(constraints.check(cons, fixed, TASK))


def test_no_repair_where_no_edit_can_fix_or_nothing_failed():
    failing_words = next(c for c in (_cons("length_constraints:number_words", seed=s) for s in range(50))
                         if not constraints.passes(c, ANSWER, TASK))
    assert repair.repair(failing_words, ANSWER, TASK) is None            # a word count: no edit for it
    both = failing_words + _cons("change_case:english_capital")
    assert repair.repair(both, ANSWER, TASK) is None                     # one unfixable failure: no repair
    upper = _cons("change_case:english_capital")
    assert repair.repair(upper, ANSWER.upper(), TASK) is None            # already passes: nothing to edit
    assert repair.repair(upper, "   ", TASK) is None


def test_an_edit_that_breaks_another_check_is_not_kept():
    # uppercase breaks "at most N capital words": the edited answer fails, so there is no repair
    cap = next(c for c in (_cons("change_case:capital_word_frequency", seed=s) for s in range(200))
               if c[0]["kwargs"]["capital_relation"] == "less than")
    cons = cap + _cons("change_case:english_capital")
    assert constraints.check(cap, ANSWER, TASK) == [True]
    assert repair.repair(cons, ANSWER, TASK) is None


def test_finish_row_keeps_the_repair_and_the_samples_as_written():
    row = {"id": 3, "instruction": TASK + " Wrap your entire response with double quotation marks.",
           "base_instruction": TASK, "constraints": _cons("startend:quotation")}
    samples = [Completion(ANSWER + " And then", 512, False), Completion(ANSWER, 40, True)]
    plain = magpie.finish_row(row, samples)
    assert not plain["constraint_pass"] and not plain["repaired"]
    done = magpie.finish_row(row, samples, repair=True)
    assert done["constraint_pass"] and done["repaired"] and done["passing_samples"] == 0
    assert done["response"] == f'"{ANSWER}"' and done["response_complete"]      # the finished sample, not the cut one
    assert [s["text"] for s in done["samples"]] == [ANSWER + " And then", ANSWER]
    assert not any(s["pass"] for s in done["samples"])                          # 03 keeps them as failed answers
    passing = magpie.finish_row(row, [Completion(f'"{ANSWER}"', 40, True)], repair=True)
    assert passing["passing_samples"] == 1 and not passing["repaired"]


def test_case_is_kept_on_text_another_edit_adds():
    # lowercase already holds; the end phrase and the title an edit adds must be lowercase as well
    cons = _cons("change_case:english_lowercase", "startend:end_checker", "detectable_format:title")
    low = ANSWER.lower()
    assert constraints.check(cons, low, TASK)[0] and not constraints.passes(cons, low, TASK)
    fixed = repair.repair(cons, low, TASK)
    assert fixed is not None and fixed == fixed.lower() and constraints.passes(cons, fixed, TASK)


def test_comma_edit_keeps_lines_and_numbers():
    cons = _cons("punctuation:no_comma")
    text = "Here are three tips,\n- Save $1,000 a year, then more.\n- Sleep well."
    assert repair.repair(cons, text, TASK) == "Here are three tips\n- Save $1000 a year then more.\n- Sleep well."


def test_an_edit_without_its_kwargs_repairs_nothing():
    cons = [{"id": "startend:end_checker", "kwargs": {}, "text": "Finish your response with this exact phrase."}]
    assert repair.repair(cons, ANSWER, TASK) is None


def test_answer_rows_repair_only_when_configured(monkeypatch):
    from sitlib.config import GenerationConfig

    def finished(model, tok, inputs, sampling, batch_size=None, *a, **k):
        return [Completion(ANSWER, 40, True) for _ in inputs]

    monkeypatch.setattr(magpie, "generate", finished)
    monkeypatch.setattr(magpie, "chat_input_ids", lambda tok, convs: [[1, 2]] * len(convs))
    row = {"id": 0, "instruction": TASK + " Wrap your entire response with double quotation marks.",
           "base_instruction": TASK, "system_prompt": None, "constraints": _cons("startend:quotation"),
           "instruction_complete": True, "instruction_trimmed": False}
    for flag in (False, True):
        cfg = GenerationConfig(batch_size=4, chunk_size=2, constraint_samples=2, constraint_repair=flag)
        done = [r for batch in magpie.answer_rows(None, None, cfg, [dict(row)], 0) for r in batch]
        assert [r["repaired"] for r in done] == [flag] and done[0]["constraint_pass"] == flag
        m = magpie.generation_metrics(done, 1, 80, 1.0, "t", cfg)
        assert (m["constrained_rows_repaired"], m["constrained_rows_with_a_passing_answer"]) == (int(flag), 0)


def test_sft_rows_say_which_answer_code_edited():
    from sitlib.filtering import to_sft

    base = {"id": 1, "instruction": TASK + " Wrap it in quotes.", "response": f'"{ANSWER}"', "quality_score": 0.9,
            "base_instruction": TASK, "constraints": _cons("startend:quotation"),
            "samples": [{"text": ANSWER, "pass": False}]}
    assert to_sft({**base, "repaired": True})["repaired"] and "repaired" not in to_sft(base)
    assert to_sft(base)["failed_answers"] == [ANSWER]
