"""Checks: IFEval's checkers offline (the shipped punkt model), seeded instructions, exact-answer checks that a copy
of the prompt cannot pass, numbers that are dates or ranges."""
import random

import pytest

from sitlib import checks
from sitlib.errors import BadInputError


def test_ifeval_types_build_offline_and_are_many():
    assert len(checks.IFEVAL_TYPES) >= 20 and "combination:repeat_prompt" not in checks.IFEVAL_TYPES
    for iid in checks.IFEVAL_TYPES:
        text, kwargs = checks.ifeval_instruction(iid, rng=random.Random(0))
        assert text.strip()
        assert checks.ifeval_instruction(iid, kwargs)[0] == text   # the kwargs rebuild the same text


def test_ifeval_instruction_is_seeded_and_leaves_global_random_alone():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    a = checks.ifeval_instruction("length_constraints:number_words", rng=random.Random(3))
    assert random.random() == expected
    assert a == checks.ifeval_instruction("length_constraints:number_words", rng=random.Random(3))
    draws = {checks.ifeval_instruction("keywords:existence", rng=random.Random(s))[1]["keywords"][0] for s in range(8)}
    assert len(draws) > 1


def test_sentence_counter_needs_no_download():
    # IFEval counts sentences with NLTK's punkt model; it resolves to the copy shipped in sitlib
    import nltk

    assert nltk.data.find("tokenizers/punkt_tab/english/").path.startswith(str(checks.NLTK_DATA))
    lt3 = {"num_sentences": 3, "relation": "less than"}
    assert checks.ifeval_check("length_constraints:number_sentences", lt3, "Dr. Smith came. He left.")
    assert not checks.ifeval_check("length_constraints:number_sentences", lt3, "One. Two! Three? Four.")
    caps = {"capital_frequency": 2, "capital_relation": "at least"}
    assert checks.ifeval_check("change_case:capital_word_frequency", caps, "THIS IS loud. ok.")


def test_empty_answer_never_passes_a_length_item():
    short = {"num_words": 50, "relation": "less than"}
    assert checks.ifeval_check("length_constraints:number_words", short, "A short answer.")
    for empty in ("", "   \n"):
        assert not checks.ifeval_check("length_constraints:number_words", short, empty)
        assert not checks.run_check({"type": "length_constraints:number_words", "kwargs": short}, empty)


@pytest.mark.parametrize("iid,kwargs,good,bad", [
    ("punctuation:no_comma", None, "No commas here.", "One, two."),
    ("startend:quotation", None, '"Be kind."', "Be kind."),
    ("detectable_format:title", None, "<<Winter>>\nSnow.", "Winter"),
    ("keywords:forbidden_words", {"forbidden_words": ["hot"]}, "The sun is bright.", "The sun is hot."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a"),
    ("startend:end_checker", {"end_phrase": "Good luck!"}, "Prepare. Good luck!", "Good luck! Prepare."),
])
def test_ifeval_checks_pass_and_fail(iid, kwargs, good, bad):
    assert checks.ifeval_check(iid, kwargs, good) and not checks.ifeval_check(iid, kwargs, bad)


def test_unknown_ids_are_one_line_errors():
    with pytest.raises(BadInputError, match="unknown IFEval instruction id 'rhymes'"):
        checks.ifeval_check("rhymes", {}, "x")
    with pytest.raises(BadInputError, match="unknown check type 'rhymes'"):
        checks.run_check({"type": "rhymes"}, "x")
    with pytest.raises(BadInputError, match="bad kwargs"):
        checks.ifeval_instruction("length_constraints:number_words", {"colour": "red"})


FACT = "The capital of Veloria is Amberton. What is the capital of Veloria? Answer briefly."
SUM = "What is 81 divided by 9? Give the number as the last thing in your answer."


def test_echoing_the_prompt_does_not_pass_an_exact_answer_item():
    assert not checks.answer_text(FACT, "Amberton", prompt=FACT)
    assert not checks.answer_text(FACT.upper().replace(".", ""), "Amberton", prompt=FACT)
    assert not checks.answer_number(SUM, 9, prompt=SUM)
    assert not checks.answer_number("what is 81 divided by 9", 9, prompt=SUM)


def test_real_answers_pass_exact_answer_items():
    assert checks.answer_text("Amberton.", "Amberton", prompt=FACT)
    assert checks.answer_text("The capital of Veloria is Amberton.", "Amberton", prompt=FACT)
    assert checks.answer_text("What is the capital of Veloria? It is Amberton.", "Amberton", prompt=FACT)
    assert not checks.answer_text("Ambertonville", "Amberton", prompt=FACT)
    assert checks.answer_number("81 / 9 = 9", 9, prompt=SUM) and not checks.answer_number("81 / 9 = 8", 9, SUM)
    two = "Tom is older than Ann, and Ann is older than Ben. Who is the youngest?"
    assert checks.answer_text("Ben", "Ben", ["Tom", "Ann", "Ben"], two)
    assert not checks.answer_text("Tom, Ann or Ben", "Ben", ["Tom", "Ann", "Ben"], two)


def test_dates_and_ranges_are_not_negative_numbers():
    assert checks.last_number("45 days between 2023-01-15 and 2023-03-01") == 45
    assert checks.numbers("10-20 items at -5 degrees, 1,000.5 m") == [10, 20, -5, 1000.5]
    assert checks.last_number("no number") is None


def test_drawn_instructions_are_checkable_as_written():
    # IFEval can draw "Paragraph 2 must start with …" for a one-paragraph answer (and redraws it when rebuilt)
    for seed in range(40):
        text, kw = checks.ifeval_instruction("length_constraints:nth_paragraph_first_word", rng=random.Random(seed))
        assert kw["nth_paragraph"] <= kw["num_paragraphs"]
        assert checks.ifeval_instruction("length_constraints:nth_paragraph_first_word", kw)[0] == text
    with pytest.raises(BadInputError, match="kwargs not usable as given"):
        checks.ifeval_instruction("length_constraints:nth_paragraph_first_word",
                                  {"num_paragraphs": 1, "nth_paragraph": 2, "first_word": "so"})
    assert checks.ifeval_instruction("keywords:existence", {"keywords": ["b", "a"]})[1] == {"keywords": ["a", "b"]}
