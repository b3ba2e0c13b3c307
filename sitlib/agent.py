"""Stage 08: tool-use episodes against simulated tools — calls parsed, executed, scored; transcripts kept."""
from __future__ import annotations

import ast
import datetime as dt
import functools
import json
import operator
import random
import re
from dataclasses import dataclass, field
from typing import Optional

from .checks import numbers
from .generation import Sampling, generate

# ---------------------------------------------------------------- simulated tools

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculator(expression: str) -> float:
    """Arithmetic on numbers with + - * / // % ** and parentheses (parsed, never eval'd)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / // % ** ( ) are allowed")
    try:
        tree = ast.parse(str(expression).replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse expression {expression!r}") from None
    value = ev(tree)
    return round(value, 6) if isinstance(value, float) else value


# factor to the base unit of each dimension; temperatures are handled apart (offsets)
_UNITS = {"m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
          "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254),
          "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
          "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784)}
_ALIASES = {"meter": "m", "metre": "m", "kilometer": "km", "kilometre": "km", "mile": "mi", "foot": "ft", "feet": "ft",
            "inch": "in", "kilogram": "kg", "gram": "g", "pound": "lb", "lbs": "lb", "ounce": "oz", "liter": "l",
            "litre": "l", "gallon": "gal", "celsius": "c", "fahrenheit": "f", "kelvin": "k", "centimeter": "cm",
            "centimetre": "cm", "millimeter": "mm", "millimetre": "mm", "milliliter": "ml", "millilitre": "ml"}


def _unit(u: str) -> str:
    u = str(u).strip().lower().rstrip(".")
    u = _ALIASES.get(u, _ALIASES.get(u.rstrip("s"), u))
    return u.replace("°", "")


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    v, a, b = float(value), _unit(from_unit), _unit(to_unit)
    temps = {"c": (1.0, 0.0), "f": (5 / 9, -32.0), "k": (1.0, -273.15)}
    if a in temps and b in temps:
        celsius = (v + temps[a][1]) * temps[a][0]
        return round(celsius / temps[b][0] - temps[b][1], 4)
    if a not in _UNITS or b not in _UNITS:
        raise ValueError(f"unknown unit {from_unit if a not in _UNITS else to_unit!r}")
    if _UNITS[a][0] != _UNITS[b][0]:
        raise ValueError(f"cannot convert {_UNITS[a][0]} to {_UNITS[b][0]}")
    return round(v * _UNITS[a][1] / _UNITS[b][1], 4)


# A fictional world, so the answers cannot come from what the model memorised.
LOOKUP_TABLE = {"mount keld height": "2417 m", "brannock founding year": "1742",
                "ostwick library head librarian": "Ada Fenn", "river tarn length": "318 km",
                "veloria capital": "Amberton", "zint team that starts": "blue"}


def lookup(key: str) -> str:
    k = re.sub(r"[^a-z0-9 ]", "", str(key).lower()).strip()
    for name, value in LOOKUP_TABLE.items():
        if k == name or (k and set(k.split()) >= set(name.split())) or (k and set(name.split()) >= set(k.split()) and
                                                                       len(k.split()) >= 2):
            return value
    raise ValueError(f"no entry for {key!r} (entries: {', '.join(LOOKUP_TABLE)})")


def date_calc(operation: str, date: str, days: Optional[int] = None, other_date: Optional[str] = None) -> str:
    d = dt.date.fromisoformat(str(date))
    if operation == "add_days":
        return (d + dt.timedelta(days=int(days))).isoformat()
    if operation == "days_between":
        return str(abs((dt.date.fromisoformat(str(other_date)) - d).days))
    if operation == "weekday":
        return d.strftime("%A")
    raise ValueError(f"unknown operation {operation!r} (add_days, days_between, weekday)")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict          # name → (json type, required)
    fn: object

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": {
            "type": "object", "properties": {k: {"type": t} for k, (t, _) in self.parameters.items()},
            "required": [k for k, (_, req) in self.parameters.items() if req]}}}


TOOLS = {t.name: t for t in [
    Tool("calculator", "Evaluate an arithmetic expression.", {"expression": ("string", True)}, calculator),
    Tool("convert_units", "Convert a value between units (m, km, cm, mm, mi, ft, in, kg, g, lb, oz, l, ml, gal, "
         "c, f, k).", {"value": ("number", True), "from_unit": ("string", True), "to_unit": ("string", True)},
         convert_units),
    Tool("lookup", "Look up a fact in the reference table by key, e.g. 'mount keld height'.",
         {"key": ("string", True)}, lookup),
    Tool("date_calc", "Date arithmetic on YYYY-MM-DD dates: operation add_days (date, days), days_between "
         "(date, other_date) or weekday (date).", {"operation": ("string", True), "date": ("string", True),
                                                    "days": ("integer", False), "other_date": ("string", False)},
         date_calc),
]}

PROTOCOL = ("You can use tools. To call a tool, reply with only one JSON object on one line, for example:\n"
            '{"tool": "calculator", "arguments": {"expression": "2 + 2"}}\n'
            "The result comes back in a message that starts with 'TOOL RESULT:'. "
            "When you know the answer, reply with: ANSWER: <the answer>\n\nTools:\n")


def system_prompt() -> str:
    lines = [f"- {t.name}({', '.join(k for k in t.parameters)}): {t.description}" for t in TOOLS.values()]
    return PROTOCOL + "\n".join(lines)


# ---------------------------------------------------------------- parsing the model's reply

@dataclass
class Reply:
    kind: str                      # "call" | "invalid_call" | "answer"
    tool: Optional[str] = None
    arguments: dict = field(default_factory=dict)
    answer: Optional[str] = None
    error: Optional[str] = None


def _first_json_object(text: str):
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text[m.start():])
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            continue
    return None


def parse_reply(text: str) -> Reply:
    """A tool call ({"tool"|"name": ..., "arguments"|"parameters": {...}}), a final answer, or a malformed call."""
    m = re.search(r"ANSWER:\s*(.*)", text, re.S | re.I)
    if m and "{" not in text[: m.start()]:
        return Reply("answer", answer=m.group(1).strip())
    if "{" not in text:
        return Reply("answer", answer=text.strip())   # a plain answer without the protocol's prefix
    obj = _first_json_object(text)
    if obj is None:
        return Reply("invalid_call", error="malformed JSON")
    name = obj.get("tool", obj.get("name"))
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return Reply("invalid_call", tool=name, error="arguments are not a JSON object")
    if not isinstance(name, str) or name not in TOOLS:
        return Reply("invalid_call", tool=str(name), error=f"unknown tool {name!r} (tools: {', '.join(TOOLS)})")
    if not isinstance(args, dict):
        return Reply("invalid_call", tool=name, error="arguments are not a JSON object")
    spec = TOOLS[name].parameters
    missing = [k for k, (_, req) in spec.items() if req and k not in args]
    extra = [k for k in args if k not in spec]
    if missing or extra:
        why = f"missing argument(s) {missing}" if missing else f"unknown argument(s) {extra}"
        return Reply("invalid_call", tool=name, arguments=args, error=why)
    return Reply("call", tool=name, arguments=args)


def execute(reply: Reply) -> str:
    try:
        return str(TOOLS[reply.tool].fn(**reply.arguments))
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"


# ---------------------------------------------------------------- episodes

EPISODES = [
    {"id": "calc-1", "tool": "calculator", "question": "What is 347 * 29?", "expected": "10063"},
    {"id": "calc-2", "tool": "calculator", "question": "What is (125 + 375) / 4?", "expected": "125"},
    {"id": "calc-3", "tool": "calculator", "question": "What is 2 to the power of 12?", "expected": "4096"},
    {"id": "units-1", "tool": "convert_units", "question": "Convert 5 miles to kilometres.", "expected": "8.0467"},
    {"id": "units-2", "tool": "convert_units", "question": "What is 100 degrees Fahrenheit in Celsius?",
     "expected": "37.7778"},
    {"id": "units-3", "tool": "convert_units", "question": "How many pounds is 20 kilograms?", "expected": "44.0925"},
    {"id": "lookup-1", "tool": "lookup", "question": "How tall is Mount Keld?", "expected": "2417"},
    {"id": "lookup-2", "tool": "lookup", "question": "In which year was Brannock founded?", "expected": "1742"},
    {"id": "lookup-3", "tool": "lookup", "question": "Who is the head librarian of Ostwick library?",
     "expected": "Ada Fenn"},
    {"id": "date-1", "tool": "date_calc", "question": "What date is 45 days after 2024-03-10?",
     "expected": "2024-04-24"},
    {"id": "date-2", "tool": "date_calc", "question": "How many days are there between 2023-01-15 and 2023-03-01?",
     "expected": "45"},
    {"id": "date-3", "tool": "date_calc", "question": "What day of the week was 2000-01-01?", "expected": "Saturday"},
]


def answer_correct(answer: Optional[str], expected: str) -> bool:
    """Numbers within 0.1% (or 0.01), dates and names as whole, case-insensitive matches.

    A numeric answer is the first number of the reply ("ANSWER: 45 days between 2023-01-15 and 2023-03-01") or its
    last ("347 * 29 = 10063"); dates and ranges are not read as negative numbers."""
    if not answer:
        return False
    if re.fullmatch(r"-?\d+(?:\.\d+)?", expected):
        found, want = numbers(answer), float(expected)
        return any(abs(got - want) <= max(0.01, abs(want) * 1e-3) for got in found[:1] + found[-1:])
    return re.search(rf"(?<![\w-]){re.escape(expected)}(?![\w-])", answer, re.I) is not None


def select_episodes(n: int, seed: int) -> list[dict]:
    """All episodes, or n of them spread over the tools (seeded)."""
    if not n or n >= len(EPISODES):
        return list(EPISODES)
    rng = random.Random(seed)
    by_tool: dict[str, list] = {}
    for e in EPISODES:
        by_tool.setdefault(e["tool"], []).append(e)
    picked = []
    while len(picked) < n:
        for tool in sorted(by_tool):
            if by_tool[tool] and len(picked) < n:
                picked.append(by_tool[tool].pop(rng.randrange(len(by_tool[tool]))))
    return picked


def uses_template_tools(tok) -> bool:
    return bool(tok.chat_template) and "tools" in tok.chat_template


def render(tok, messages: list[dict]) -> list[int]:
    """Token ids for the next assistant turn: through the template's own tool support when it has one."""
    if uses_template_tools(tok):
        text = tok.apply_chat_template(messages, tools=[t.schema() for t in TOOLS.values()], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def run_episodes(model, tok, episodes: list[dict], max_turns: int, max_new_tokens: int, batch_size: int) -> list[dict]:
    """All episodes in lockstep: each turn, one batched generation for every episode still going."""
    native = uses_template_tools(tok)
    states = []
    for e in episodes:
        msgs = ([] if native else [{"role": "system", "content": system_prompt()}]) + \
            [{"role": "user", "content": e["question"]}]
        states.append({"episode": e, "messages": msgs, "turns": [], "answer": None, "done": False})
    for _ in range(max_turns):
        active = [s for s in states if not s["done"]]
        if not active:
            break
        outs = generate(model, tok, [render(tok, s["messages"]) for s in active], Sampling.greedy(max_new_tokens),
                        batch_size)
        for s, out in zip(active, outs):
            reply = parse_reply(out.text)
            turn = {"output": out.text, "kind": reply.kind, "tool": reply.tool, "arguments": reply.arguments,
                    "error": reply.error}
            s["messages"].append({"role": "assistant", "content": out.text})
            if reply.kind == "answer":
                s["answer"], s["done"] = reply.answer, True
            else:
                result = execute(reply) if reply.kind == "call" else f"error: {reply.error}"
                turn["result"] = result
                s["messages"].append({"role": "tool", "content": result} if native else
                                     {"role": "user", "content": f"TOOL RESULT: {result}"})
            s["turns"].append(turn)
    return [{"episode_id": s["episode"]["id"], "tool_expected": s["episode"]["tool"],
             "question": s["episode"]["question"], "expected": s["episode"]["expected"], "answer": s["answer"],
             "success": answer_correct(s["answer"], s["episode"]["expected"]), "turns": s["turns"],
             "n_turns": len(s["turns"])} for s in states]


def summarise(transcripts: list[dict]) -> dict:
    n = len(transcripts)
    calls = [t for tr in transcripts for t in tr["turns"] if t["kind"] in ("call", "invalid_call")]
    valid = sum(t["kind"] == "call" for t in calls)
    return {"success_rate": round(sum(t["success"] for t in transcripts) / n, 4),
            "valid_call_rate": round(valid / len(calls), 4) if calls else None,
            "tool_calls": len(calls), "valid_tool_calls": valid,
            "tool_use_rate": round(sum(any(t["kind"] == "call" for t in tr["turns"]) for tr in transcripts) / n, 4),
            "answered_rate": round(sum(tr["answer"] is not None for tr in transcripts) / n, 4),
            "mean_turns": round(sum(tr["n_turns"] for tr in transcripts) / n, 3), "n_episodes": n}


def tool_note(summary: dict) -> str:
    """The words 08 prints next to a variant's score: a success rate means little when no tool was ever called."""
    if summary["tool_calls"] == 0:
        solved = round(summary["success_rate"] * summary["n_episodes"])
        return f"never called a tool in {summary['n_episodes']} episodes" + (
            f": its {solved} solved episode(s) were answered without any tool" if solved else "")
    if summary["valid_tool_calls"] == 0:
        return f"tried {summary['tool_calls']} tool calls, none valid: no tool ever ran"
    return f"{summary['valid_tool_calls']} of {summary['tool_calls']} tool calls valid"


def outcome(transcript: dict) -> str:
    """solved | wrong answer | no answer (turns ran out) — with or without a valid tool call."""
    used = any(t["kind"] == "call" for t in transcript["turns"])
    kind = "solved" if transcript["success"] else ("wrong answer" if transcript["answer"] is not None else "no answer")
    return f"{kind}, {'with' if used else 'without'} a tool call"


def one_per_outcome(rows: list[dict]) -> dict[str, dict]:
    """The first transcript of each outcome over all variants, for reading."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(outcome(r), r)
    return out


def format_transcript(tr: dict) -> str:
    lines = [f"[{tr.get('model', '?')}] {tr['episode_id']}: {tr['question']}  (expected {tr['expected']}, "
             f"tool {tr['tool_expected']})"]
    for i, t in enumerate(tr["turns"], 1):
        lines.append(f"  turn {i} model: {t['output'].strip()[:300]}")
        if t["kind"] != "answer":
            lines.append(f"  turn {i} {t['kind']}: " + (t.get("error") or "") + f" → {t.get('result', '')}")
    lines.append(f"  answer: {tr['answer']!r} → {'correct' if tr['success'] else 'not correct'}")
    return "\n".join(lines)


def protocol_of(tok) -> str:
    return "chat template tools" if uses_template_tools(tok) else "JSON protocol (docs/evaluation.md)"


# ---------------------------------------------------------------- 08's per-variant results

def run_key(session, episodes: list[dict], fresh: dict) -> dict:
    """What a variant's transcripts depend on: a rerun reuses them only when all of it is the same."""
    ev = session.config.evaluation
    return {"episodes": [e["id"] for e in episodes], "max_turns": ev.agent_max_turns,
            "max_new_tokens": ev.agent_max_new_tokens, "student": session.config.models.student,
            "adapter_fingerprint": fresh.get("fingerprint")}


def _episodes_process(max_turns: int, max_new_tokens: int, batch_size: int, tok, model):
    return lambda item: run_episodes(model, tok, item["episodes"], max_turns, max_new_tokens, batch_size)


def transcripts(session, name: str, model, tok, episodes: list[dict]) -> list[dict]:
    """Every episode played by variant `name`: in this process, or the episodes split over the devices that
    generation.devices names (greedy turns, so the split changes no transcript, up to floating-point kernels that
    depend on the batch: a near tie can go either way)."""
    from .sharding import for_variant, run, split

    ev = session.config.evaluation
    args = (ev.agent_max_turns, ev.agent_max_new_tokens, ev.batch_size)
    shards = for_variant(session, name)
    if shards is None:
        return run_episodes(model, tok, episodes, *args)
    work = [{"id": k, "episodes": part} for k, part in enumerate(split(episodes, len(shards.devices)))]
    return [t for part in run(shards, model, tok, functools.partial(_episodes_process, *args), work) for t in part]


def play(session, name: str, model, tok, episodes: list[dict], key: dict) -> dict:
    """One variant's episodes, saved atomically (evaluation/results/agent/<variant>.json) so a rerun skips it."""
    from .benchmark import save_variant

    trs = transcripts(session, name, model, tok, episodes)
    rows = [{"model": name, **t} for t in trs]
    return save_variant(session, name, key, rows, "agent", {**summarise(trs), "protocol": protocol_of(tok)})


def write_results(session, done: dict[str, dict], episodes: list[dict]) -> dict:
    """evaluation/results/agent_results.json (read by 09) with each variant's note, and the figure."""
    from .artifacts import write_json
    from .comparison import grouped_bars_marked

    ev, p = session.config.evaluation, session.paths
    models = {n: {**d["summary"], "note": tool_note(d["summary"])} for n, d in done.items()}
    results = {"models": models, "episodes": [e["id"] for e in episodes], "max_turns": ev.agent_max_turns,
               "protocol": next(iter(models.values())).get("protocol")}
    write_json(p.evaluation_results / "agent_results.json", results)
    grouped_bars_marked({n: {k: m[k] for k in ("success_rate", "valid_call_rate", "tool_use_rate")}
                         for n, m in models.items()}, p.evaluation_figures / "agent_results.png",
                        f"Agent episodes ({len(episodes)})", "rate", gap_label="no tool call to rate")
    return results


def score_table(results: dict):
    """Variants × (success, tool use, valid calls, note): the note says in words when no tool was used."""
    import pandas as pd

    cols = ["success_rate", "tool_use_rate", "valid_call_rate", "tool_calls", "mean_turns", "note"]
    return pd.DataFrame({n: {c: m[c] for c in cols} for n, m in results["models"].items()}).T
