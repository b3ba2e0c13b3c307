"""Figures written into evaluation/figures (matplotlib, Agg backend, atomic PNG writes)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .artifacts import save_figure  # noqa: E402


def filter_funnel(stats: dict, path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [("generated", stats["input_rows"]), ("kept", stats["kept"]),
             ("sft_train", stats.get("sft_train", 0)), ("sft_val", stats.get("sft_val", 0))]
    a.bar([s for s, _ in steps], [n for _, n in steps], color="#4C72B0")
    a.set_title("Filtering funnel (rows)")
    reasons = sorted(stats["reasons"].items(), key=lambda kv: kv[1])
    b.barh([r for r, _ in reasons] or ["(none)"], [n for _, n in reasons] or [0], color="#DD8452")
    b.set_title("Rejections by reason (a row can have several)")
    return save_figure(fig, path)


def histogram(values: list[float], path: Path, title: str, xlabel: str, threshold: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=min(30, max(5, len(values))), color="#55A868")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold}")
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    return save_figure(fig, path)


def training_curves(log_history: list[dict], path: Path, title: str, extra_key: str | None = None) -> Path:
    """Train and eval loss against step (and one extra logged series, e.g. DPO reward accuracy)."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    n = 2 if extra_key else 1
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.legend()
    if extra_key:
        pts = [(h["step"], h[extra_key]) for h in log_history if extra_key in h]
        if pts:
            axes[0][1].plot(*zip(*pts), marker="o", color="#C44E52")
        axes[0][1].set(title=extra_key, xlabel="step")
    return save_figure(fig, path)


def grouped_bars(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str) -> Path:
    """groups: variant → {metric: value}; bars per metric, one colour per variant."""
    variants = list(groups)
    metrics = list(dict.fromkeys(m for g in groups.values() for m in g))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) * max(1, len(variants)) / 2), 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [groups[v].get(m, 0) or 0 for m in metrics], width, label=v)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(metrics))], metrics, rotation=15)
    ax.set(title=title, ylabel=ylabel)
    ax.legend()
    return save_figure(fig, path)


def show(path: Path):
    """Display a written figure inline in a notebook (returns the IPython Image)."""
    from IPython.display import Image

    return Image(filename=str(path))
