"""Stage 09: comparative analysis — reads only measured files, writes the summary CSV and three figures."""
from __future__ import annotations

from pathlib import Path

from .artifacts import MissingInputError, read_json, write_csv

NOT_MEASURED = "not measured"
TRAINING = {"sft": "05_sft_training", "prompt_tuning": "05b_prompt_tuning", "dpo": "06_dpo_training"}
TRAIN_FIELDS = ["trainable_parameters", "trainable_percent", "runtime_seconds", "peak_memory_gb",
                "tokens_per_second", "train_loss", "eval_loss", "compute_units"]
BENCH_FIELDS = ["prompt_level_accuracy", "instruction_level_accuracy", "eos_stop_rate", "mean_output_tokens"]
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


def summary_rows(data: dict) -> list[dict]:
    """One row per variant; every value is read from a file, else 'not measured'."""
    variants = ["base", *TRAINING]
    rows = []
    for v in variants:
        row = {"variant": v}
        train = data.get(f"{v}_metrics")
        for f in TRAIN_FIELDS:
            row[f] = (train or {}).get(f, NOT_MEASURED) if v != "base" else "n/a (no training)"
        for src, fields, prefix in (("benchmark", BENCH_FIELDS, "bench_"), ("agent", AGENT_FIELDS, "agent_")):
            model = ((data.get(src) or {}).get("models") or {}).get(v)
            for f in fields:
                value = model.get(f) if model else None
                row[prefix + f] = NOT_MEASURED if value is None and model is None else value
        rows.append(row)
    return rows


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def figures(rows: list[dict], fig_dir: Path) -> list[Path]:
    from .figures import grouped_bars, save_figure

    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["variant"] != "base"]
    eff = {r["variant"]: {k: _num(r[k]) or 0.0 for k in ("runtime_seconds", "peak_memory_gb", "tokens_per_second")}
           for r in trained}
    paths = [grouped_bars(eff, fig_dir / "comparison_efficiency.png", "Training efficiency (measured)", "value")]
    qual = {r["variant"]: {k: _num(r[k]) or 0.0 for k in ("bench_prompt_level_accuracy",
                                                           "bench_instruction_level_accuracy", "bench_eos_stop_rate",
                                                           "agent_success_rate")} for r in rows}
    paths.append(grouped_bars(qual, fig_dir / "comparison_quality.png", "Quality (measured)", "rate"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in trained:
        x, y = _num(r["trainable_parameters"]), _num(r["bench_prompt_level_accuracy"])
        if x is not None and y is not None:
            ax.scatter(x, y, s=60)
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 5))
    base = next(r for r in rows if r["variant"] == "base")
    if _num(base["bench_prompt_level_accuracy"]) is not None:
        ax.axhline(base["bench_prompt_level_accuracy"], ls="--", color="grey", label="base model")
        ax.legend()
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="benchmark prompt-level accuracy",
           title="Trade-off: parameters trained vs. quality")
    paths.append(save_figure(fig, fig_dir / "comparison_tradeoff.png"))
    return paths


def run_comparison(session, allow_missing: bool = False) -> dict:
    """09: nothing is written unless every input is there (or allow_missing)."""
    data = read_inputs(session, allow_missing)
    rows = summary_rows(data)
    write_csv(session.paths.evaluation_metrics / "comparison_summary.csv", rows)
    figs = figures(rows, session.paths.evaluation_figures)
    return {"rows": rows, "figures": [str(f) for f in figs],
            "missing": [k for k, v in data.items() if v is None]}
