"""Writes sitlib/data/benchmark.jsonl, the built-in verifiable suite: `python -m sitlib.data.make_suite`.

Instruction-following items are a task written here plus one or two IFEval instructions in IFEval's own wording
(`checks.ifeval_instruction`), with kwargs drawn from ranges a short answer can meet. Exact-answer items are built
from templates whose answers are computed here, never typed in. Seeded: the same file every run.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from sitlib.checks import IFEVAL_TYPES, ifeval_instruction

OUT = Path(__file__).parent / "benchmark.jsonl"
SEED = 20240611

TASKS = [
    "Describe a quiet morning in a small fishing village.", "Explain how a bicycle stays upright.",
    "Write a short note to a neighbour asking them to water your plants.", "Give advice to someone starting to run.",
    "Describe the taste of a fresh orange.", "Explain why the sky looks blue.",
    "Write a short story about a lost umbrella.", "Explain what a library card is for.",
    "Describe a busy train station at rush hour.", "Give tips for keeping a kitchen tidy.",
    "Explain how bees make honey.", "Write a thank-you message to a teacher.",
    "Describe a thunderstorm from inside a tent.", "Explain what a budget is and why it helps.",
    "Write a product description for a wooden chess set.", "Explain how to plant a tomato seedling.",
    "Describe your ideal weekend.", "Explain what recycling means to a child.",
    "Write an invitation to a picnic in the park.", "Give reasons to learn a second language.",
    "Describe the smell of a bakery in the early morning.", "Explain how a compass works.",
    "Write a short review of an imaginary cafe.", "Explain why people keep diaries.",
    "Describe a walk through a pine forest.", "Give advice for a first day at a new job.",
    "Explain what a volcano is.", "Write a short poem about the moon.",
    "Describe a market stall that sells spices.", "Explain how to make a cup of tea.",
    "Write a message welcoming a new member to a chess club.", "Explain why sleep matters.",
    "Describe an old lighthouse on a cliff.", "Give tips for saving water at home.",
    "Explain how a rainbow forms.", "Write a short speech for a school sports day.",
    "Describe a snowy street at night.", "Explain what a map legend is.",
    "Write a postcard from a seaside holiday.", "Give advice on caring for a houseplant.",
]
YES_NO = ["Is a tomato a fruit?", "Can penguins fly?", "Is the sun a star?", "Do plants need light to grow?",
          "Is ice lighter than liquid water?", "Is Mount Everest the tallest mountain above sea level?"]
KEYWORDS = ["river", "lantern", "garden", "window", "morning", "bridge", "paper", "silver", "friend", "music",
            "winter", "candle", "market", "ocean", "stone", "kitchen"]
LANGUAGES = ["fr", "es", "de", "it"]

# kwargs a short answer (up to a few hundred tokens) can meet; None = IFEval takes no kwargs
FILLERS = ["very", "really", "good", "thing", "nice", "stuff"]
ENDINGS = ["Any other questions?", "Is there anything else I can help with?"]


def _either(r: random.Random, a: dict, b: dict) -> dict:
    return r.choice([a, b])


KWARGS = {
    "keywords:existence": lambda r: {"keywords": r.sample(KEYWORDS, 2)},
    "keywords:frequency": lambda r: {"keyword": r.choice(KEYWORDS), "frequency": r.randint(2, 3),
                                     "relation": "at least"},
    "keywords:forbidden_words": lambda r: {"forbidden_words": r.sample(FILLERS, 2)},
    "keywords:letter_frequency": lambda r: _either(
        r, {"letter": r.choice("zqxj"), "let_frequency": 2, "let_relation": "less than"},
        {"letter": r.choice("aeo"), "let_frequency": r.randint(3, 6), "let_relation": "at least"}),
    "language:response_language": lambda r: {"language": r.choice(LANGUAGES)},
    "length_constraints:number_sentences": lambda r: _either(
        r, {"num_sentences": r.randint(2, 4), "relation": "less than"},
        {"num_sentences": r.randint(2, 4), "relation": "at least"}),
    "length_constraints:number_paragraphs": lambda r: {"num_paragraphs": r.randint(2, 3)},
    "length_constraints:number_words": lambda r: _either(
        r, {"num_words": r.choice([30, 40, 50, 80]), "relation": "less than"},
        {"num_words": r.choice([20, 30, 40]), "relation": "at least"}),
    "length_constraints:nth_paragraph_first_word": lambda r: {
        "num_paragraphs": 2, "nth_paragraph": 2, "first_word": r.choice(["also", "finally", "however", "then"])},
    "detectable_content:number_placeholders": lambda r: {"num_placeholders": r.randint(1, 2)},
    "detectable_content:postscript": lambda r: {"postscript_marker": r.choice(["P.S.", "P.P.S"])},
    "detectable_format:number_bullet_lists": lambda r: {"num_bullets": r.randint(2, 4)},
    "detectable_format:constrained_response": lambda r: None,
    "detectable_format:number_highlighted_sections": lambda r: {"num_highlights": r.randint(1, 3)},
    "detectable_format:multiple_sections": lambda r: {"section_spliter": r.choice(["Section", "SECTION"]),
                                                      "num_sections": 2},
    "detectable_format:json_format": lambda r: None,
    "detectable_format:title": lambda r: None,
    "combination:two_responses": lambda r: None,
    "startend:end_checker": lambda r: {"end_phrase": r.choice(ENDINGS)},
    "change_case:capital_word_frequency": lambda r: _either(
        r, {"capital_frequency": 2, "capital_relation": "less than"},
        {"capital_frequency": r.randint(2, 3), "capital_relation": "at least"}),
    "change_case:english_capital": lambda r: None,
    "change_case:english_lowercase": lambda r: None,
    "punctuation:no_comma": lambda r: None,
    "startend:quotation": lambda r: None,
}
# two checks of one type in one item (each is scored): compatible pairs only
SAME_TYPE_TWICE = ["keywords:existence", "keywords:forbidden_words", "keywords:frequency", "keywords:letter_frequency"]


def _check(iid: str, r: random.Random, task: str) -> tuple[str, dict]:
    kwargs = {"prompt_to_repeat": task} if iid == "combination:repeat_prompt" else KWARGS[iid](r)
    text, used = ifeval_instruction(iid, kwargs or {})
    return text, {"type": iid, "kwargs": used}


def _if_item(r: random.Random, iids: list[str], n: int) -> dict:
    constrained = "detectable_format:constrained_response" in iids
    task = r.choice(YES_NO if constrained else TASKS)
    parts = [_check(i, r, task) for i in iids]
    texts = [t for t, _ in parts]
    prompt = (texts[0] + "\n" + task) if iids[0] == "combination:repeat_prompt" else " ".join([task, *texts])
    cat = iids[0].split(":")[0] if len(iids) == 1 else "combined"
    return {"id": f"{cat}-{n:03d}", "category": cat, "prompt": prompt, "checks": [c for _, c in parts]}


def instruction_items(r: random.Random) -> list[dict]:
    types = [*IFEVAL_TYPES, "combination:repeat_prompt"]
    plan = [[t] for t in types for _ in range(4)]
    singles = [t for t in types if t not in ("detectable_format:constrained_response", "combination:repeat_prompt",
                                             "language:response_language", "combination:two_responses")]
    for _ in range(16):                 # two different instructions in one prompt
        a, b = r.sample(singles, 2)
        while {a.split(":")[0], b.split(":")[0]} == {"change_case"} or {a, b} <= {"change_case:english_capital",
                                                                                "change_case:english_lowercase"}:
            a, b = r.sample(singles, 2)
        plan.append([a, b])
    plan += [[t, t] for t in SAME_TYPE_TWICE]
    return [_if_item(r, iids, n) for n, iids in enumerate(plan, 1)]


NAMES = ["Ana", "Ben", "Cleo", "Dev", "Edda", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nia"]
PLACES = ["Veloria", "Marrin", "Ostavia", "Quellen", "Tarsk", "Umbra", "Zelica", "Brenmoor"]
CITIES = ["Amberton", "Colfax", "Dunmere", "Esk", "Fallow", "Greyport", "Hollin", "Ivel"]
THINGS = [("cat", "Pebble"), ("dog", "Biscuit"), ("boat", "Swift"), ("horse", "Clover"), ("robot", "Tock")]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
UNITS = [("metres", "centimetres", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("kilometres", "metres", 1000),
         ("centimetres", "millimetres", 10), ("litres", "millilitres", 1000), ("dozens", "items", 12)]
LAST = "Give the number as the last thing in your answer."


def _num(cat: str, prompt: str, value) -> dict:
    return {"category": cat, "prompt": prompt, "checks": [{"type": "answer_number", "value": value}]}


def _text(cat: str, prompt: str, text: str, choices=None) -> dict:
    check = {"type": "answer_text", "text": text, **({"choices": choices} if choices else {})}
    return {"category": cat, "prompt": prompt, "checks": [check]}


def arithmetic(r: random.Random) -> list[dict]:
    out = []
    for _ in range(4):
        a, b = r.randint(11, 89), r.randint(11, 89)
        out.append(_num("arithmetic", f"What is {a} + {b}? {LAST}", a + b))
        a, b = r.randint(50, 150), r.randint(10, 49)
        out.append(_num("arithmetic", f"What is {a} - {b}? {LAST}", a - b))
        a, b = r.randint(3, 12), r.randint(3, 12)
        out.append(_num("arithmetic", f"What is {a} times {b}? {LAST}", a * b))
    for _ in range(3):
        b, q = r.randint(3, 12), r.randint(3, 12)
        out.append(_num("arithmetic", f"What is {b * q} divided by {b}? {LAST}", q))
    return out


def units(r: random.Random) -> list[dict]:
    return [_num("units", f"How many {small} are in {n} {big}? {LAST}", n * k)
            for (big, small, k), n in zip(UNITS, [r.randint(2, 9) for _ in UNITS])]


def facts(r: random.Random) -> list[dict]:
    out = []
    for place, city in zip(PLACES, r.sample(CITIES, len(PLACES))):
        out.append(_text("facts", f"The capital of {place} is {city}. What is the capital of {place}? "
                                  "Answer briefly.", city))
    for (animal, pet), owner in zip(THINGS, r.sample(NAMES, len(THINGS))):
        out.append(_text("facts", f"{owner}'s {animal} is named {pet}. What is the name of {owner}'s {animal}? "
                                  "Answer briefly.", pet))
    for _ in range(3):
        d1, d2 = r.sample(DAYS, 2)
        out.append(_text("facts", f"The meeting moved from {d1} to {d2}. On which day is the meeting now? "
                                  "Answer with the day only.", d2, [d1, d2]))
    return out


def reasoning(r: random.Random) -> list[dict]:
    out = []
    for _ in range(5):
        a, b, c = r.sample(NAMES, 3)
        out.append(_text("reasoning", f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest? "
                                      "Answer with one name.", c, [a, b, c]))
    for _ in range(5):
        a, b = r.sample(NAMES, 2)
        x, y = r.randint(3, 9), r.randint(2, 8)
        out.append(_num("reasoning", f"{a} has {x} apples and {b} gives {a} {y} more. How many apples does {a} "
                                     f"have now? {LAST}", x + y))
    for _ in range(4):
        c1, c2 = r.sample(COLOURS, 2)
        out.append(_text("reasoning", f"A box holds only {c1} balls and {c2} blocks. What colour is a ball taken "
                                      "from the box? Answer with the colour only.", c1, [c1, c2]))
    return out


def sequences(r: random.Random) -> list[dict]:
    out = []
    for _ in range(4):
        start, step = r.randint(1, 20), r.randint(2, 9)
        seq = [start + i * step for i in range(4)]
        out.append(_num("sequences", f"What number comes next: {', '.join(map(str, seq))}? {LAST}", start + 4 * step))
    for _ in range(3):
        i = r.randrange(7)
        out.append(_text("sequences", f"Which day of the week comes after {DAYS[i]}? Answer with the day only.",
                         DAYS[(i + 1) % 7], [DAYS[i], DAYS[(i + 1) % 7]]))
    return out


def answer_items(r: random.Random) -> list[dict]:
    items = arithmetic(r) + units(r) + facts(r) + reasoning(r) + sequences(r)
    count: dict = {}
    for it in items:
        count[it["category"]] = count.get(it["category"], 0) + 1
        it["id"] = f"{it['category']}-{count[it['category']]:03d}"
    return [{"id": it["id"], **{k: v for k, v in it.items() if k != "id"}} for it in items]


def build() -> list[dict]:
    r = random.Random(SEED)
    return instruction_items(r) + answer_items(r)


if __name__ == "__main__":
    items = build()
    OUT.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    print(f"wrote {len(items)} items to {OUT}")
