"""Stage 09's building blocks: read only measured files, one summary row per variant, figures in which a value
that was not measured is marked so (never drawn as 0)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .artifacts import MissingInputError, read_json, save_figure, write_csv

NOT_MEASURED = "not measured"
NO_TRAINING = "n/a (no training)"
TRAINING = {"sft": "05_sft_training", "prompt_tuning": "05b_prompt_tuning", "dpo": "06_dpo_training"}
VARIANTS = ["base", *TRAINING]
TRAIN_FIELDS = ["trainable_parameters", "trainable_percent", "runtime_seconds", "peak_memory_gb",
                "tokens_per_second", "train_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin",
                "compute_units"]
BENCH_FIELDS = ["prompt_level_accuracy", "instruction_level_accuracy", "eos_stop_rate", "mean_output_tokens"]
OFFICIAL_FIELDS = ["prompt_level_strict", "instruction_level_strict"]
AGENT_FIELDS = ["success_rate", "valid_call_rate", "tool_use_rate", "mean_turns"]


def inputs(session) -> dict[str, tuple[Path, str]]:
    m, r = session.paths.evaluation_metrics, session.paths.evaluation_results
    files = {f"{k}_metrics": (m / f"{k}_metrics.json", nb) for k, nb in TRAINING.items()}
    files["benchmark"] = (r / "benchmark_results.json", "07_benchmark_evaluation")
    files["agent"] = (r / "agent_results.json", "08_agent_evaluation")
    return files


def read_inputs(session, allow_missing: bool) -> dict:
    """Every input file's JSON; a missing one is an error naming it, or None when allow_missing."""
    out, missing = {}, []
    for key, (path, nb) in inputs(session).items():
        if path.exists():
            out[key] = read_json(path)
        else:
            missing.append(f"{path} (run {nb} first)")
            out[key] = None
    if missing and not allow_missing:
        raise MissingInputError("missing input: " + "; ".join(missing) +
                                " — or set ALLOW_MISSING=True to show them as 'not measured'")
    return out


def _value(source: Optional[dict], field: str):
    """A measured value, or NOT_MEASURED when the file, the variant or the field is absent; a recorded null (e.g.
    the valid-call rate of a variant that made no call) is "n/a", not a number."""
    if source is None or field not in source:
        return NOT_MEASURED
    return "n/a (nothing to rate)" if source[field] is None else source[field]


def summary_rows(data: dict) -> list[dict]:
    """One row per variant; every value is read from a file, else 'not measured'."""
    rows = []
    for v in VARIANTS:
        row = {"variant": v}
        train = data.get(f"{v}_metrics")
        for f in TRAIN_FIELDS:
            row[f] = NO_TRAINING if v == "base" else (
                "n/a (DPO only)" if f.startswith("eval_reward") and v != "dpo" else _value(train, f))
        bench = data.get("benchmark") or {}
        official = (bench.get("official_ifeval") or {}).get("models") or {}
        for src, fields, prefix in (((bench.get("models") or {}).get(v), BENCH_FIELDS, "bench_"),
                                    (official.get(v), OFFICIAL_FIELDS, "ifeval_"),
                                    (((data.get("agent") or {}).get("models") or {}).get(v), AGENT_FIELDS, "agent_")):
            for f in fields:
                row[prefix + f] = _value(src, f)
        rows.append(row)
    return rows


def summary_table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows).set_index("variant").T


def number(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


# ---------------------------------------------------------------- figures

def _top(values) -> float:
    measured = [number(v) for v in values if number(v) is not None]
    return max(measured + [0.0]) or 1.0


def _bars(ax, xs: list[float], values: list, colour=None, width: float = 0.8, top: Optional[float] = None,
          gap_label: str = NOT_MEASURED) -> None:
    """A bar with its value written on it for each measured value (so a measured 0 reads "0"); for a missing
    value a full-height dashed, hatched band with the words `gap_label` — it has no height to misread."""
    top = top or _top(values)
    for x, v in zip(xs, values):
        if number(v) is None:
            ax.bar(x, top * 1.1, width, fill=False, hatch="//", edgecolor="lightgrey", linestyle="--")
            ax.text(x, top * 0.55, gap_label, rotation=90, ha="center", va="center", fontsize=7, color="grey")
        else:
            ax.bar(x, number(v), width, color=colour)
            ax.text(x, number(v), f"{number(v):.2g}", ha="center", va="bottom", fontsize=6)
    if all(number(v) is None for v in values):
        ax.set_yticks([])   # nothing measured: no scale to read


def grouped_bars_marked(groups: dict[str, dict], path: Path, title: str, ylabel: str,
                        gap_label: str = NOT_MEASURED) -> Path:
    """groups: variant → {metric: value or None}; one colour per variant, missing values marked `gap_label`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(groups)
    metrics = list(dict.fromkeys(m for g in groups.values() for m in g))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(metrics) * max(1, len(variants))), 4.5))
    width = 0.8 / max(1, len(variants))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = _top([v for g in groups.values() for v in g.values()])
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(metrics))]
        _bars(ax, xs, [groups[v].get(m) for m in metrics], colours[i % len(colours)], width, top, gap_label)
        ax.bar(0, 0, 0, color=colours[i % len(colours)], label=v)   # legend entry
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(metrics))], metrics, rotation=30,
                  ha="right")
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_efficiency(rows: list[dict], path: Path) -> Path:
    """Training cost per trained variant, one panel per measure (their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["variant"] in TRAINING]
    fields = [("runtime_seconds", "seconds"), ("peak_memory_gb", "GB"), ("tokens_per_second", "tokens / s")]
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.8))
    for ax, (f, unit) in zip(axes, fields):
        _bars(ax, list(range(len(trained))), [r[f] for r in trained], "#4C72B0")
        ax.set_xticks(range(len(trained)), [r["variant"] for r in trained], rotation=15)
        ax.set(title=f, ylabel=unit)
    fig.suptitle("Training cost (measured)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_tradeoff(rows: list[dict], path: Path) -> Path:
    """Trainable parameters against prompt-level accuracy; variants without both values are named, not placed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    missing = []
    for r in rows:
        x, y = number(r["trainable_parameters"]), number(r["bench_prompt_level_accuracy"])
        if r["variant"] == "base":
            if y is not None:
                ax.axhline(y, ls="--", color="grey", label="base model")
            else:
                missing.append("base")
        elif x is not None and y is not None:
            ax.scatter(x, y, s=60)
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 5))
        else:
            missing.append(r["variant"])
    if missing:
        ax.text(0.02, 0.02, "not measured: " + ", ".join(missing), transform=ax.transAxes, color="grey")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="built-in suite, prompt-level accuracy",
           title="Parameters trained vs. quality")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def write_summary(session, rows: list[dict]) -> dict:
    """comparison_summary.csv and the three figures; returns their paths."""
    m, f = session.paths.evaluation_metrics, session.paths.evaluation_figures
    keys = ["bench_prompt_level_accuracy", "bench_instruction_level_accuracy", "agent_success_rate"]
    if any(number(r["ifeval_prompt_level_strict"]) is not None for r in rows):
        keys.insert(2, "ifeval_prompt_level_strict")   # IFEval's own prompts: only when 07 could fetch them
    quality = {r["variant"]: {k: number(r[k]) for k in keys} for r in rows}
    return {"csv": write_csv(m / "comparison_summary.csv", rows),
            "quality": grouped_bars_marked(quality, f / "comparison_quality.png", "Quality (measured)", "rate"),
            "efficiency": plot_efficiency(rows, f / "comparison_efficiency.png"),
            "tradeoff": plot_tradeoff(rows, f / "comparison_tradeoff.png")}


def run_comparison(session, allow_missing: bool = False) -> dict:
    """09 in one call: nothing is written unless every input is there (or allow_missing)."""
    data = read_inputs(session, allow_missing)
    rows = summary_rows(data)
    return {"rows": rows, "files": {k: str(v) for k, v in write_summary(session, rows).items()},
            "missing": [k for k, v in data.items() if v is None]}
