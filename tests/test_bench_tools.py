"""The small bench helpers that read a run: recipe arguments (bench_recipes.py), per-cell seconds (cell_seconds.py),
answer habits (answer_habits.py), several quality runs side by side (quality_runs.py) and the device's idle gaps in
a profiler trace (trace_gaps.py)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipes_parse_values_and_refuse_bad_names():
    rec = load("bench_recipes")
    got = rec.parse_recipes([["now"], ["c6", "sft.rows=constrained", "sft.epochs=6", "dpo.learning_rate=5e-5"]])
    assert got["now"] == rec.EMBEDDED
    assert got["c6"] == {**rec.EMBEDDED, "sft.rows": "constrained", "sft.epochs": 6, "dpo.learning_rate": 5e-5}
    for groups, why in (([["base"]], "reserved"), ([["a"], ["a"]], "named twice"), ([["a", "sft.epochs"]], "KEY=VALUE")):
        with pytest.raises(SystemExit, match=why):
            rec.parse_recipes(groups)


def test_cell_seconds_reads_papermill_durations_slowest_first(tmp_path):
    def cell(src, seconds):
        return {"cell_type": "code", "source": [src], "metadata": {"papermill": {"duration": seconds}}}

    nb = {"cells": [cell("a = 1\nb = 2", 0.25), {"cell_type": "markdown", "source": ["# x"], "metadata": {}},
                    cell("train()", 41.04), cell("plot()", None)]}
    (tmp_path / "05_sft_training.ipynb").write_text(json.dumps(nb))
    got = load("cell_seconds").cell_seconds(tmp_path, 0)
    assert got == {"05_sft_training": {"total_seconds": 41.3, "cells": [
        {"seconds": 41.0, "cell": "train()"}, {"seconds": 0.2, "cell": "a = 1"}, {"seconds": 0.0, "cell": "plot()"}]}}
    assert load("cell_seconds").cell_seconds(tmp_path, 1)["05_sft_training"]["cells"] == [
        {"seconds": 41.0, "cell": "train()"}]
    with pytest.raises(SystemExit, match="no executed notebook"):
        load("cell_seconds").cell_seconds(tmp_path / "empty", 0)


def test_answer_habits_count_quote_openings_only_where_no_quotes_were_asked(tmp_path):
    habits = load("answer_habits")
    rows = [{"output": ' "Tides rise."', "checks": [{"type": "startend:quotation", "passed": True}]},
            {"output": '"The moon pulls."', "checks": [{"type": "punctuation:no_comma", "passed": True}]},
            {"output": 'Tides "rise".', "checks": []}]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"rows": rows}))
    assert habits.habits(path) == {"items": 2, "opens_with_quote": 1}


def test_answer_habits_say_where_dpo_differs_from_sft_in_answer_and_in_outcome(tmp_path):
    habits = load("answer_habits")
    sft = [{"prompt_id": "a", "output": "x", "passed": True, "checks": [], "category": "length"},
           {"prompt_id": "b", "output": "y", "passed": False, "checks": [], "category": "length"},
           {"prompt_id": "c", "output": "z", "passed": False, "checks": [], "category": "math"}]
    dpo = [dict(sft[0], output="x2"), dict(sft[1], output="y2", passed=True), sft[2]]
    for name, rows in (("sft", sft), ("dpo", dpo)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows}))
    body = habits.summary(tmp_path)
    assert body["dpo"]["against_sft"] == {"items": 3, "answer_differs": 2, "outcome_differs": 1, "by_category": {
        "length": {"items": 2, "passed": 2, "reference_passed": 1}, "math": {"items": 1, "passed": 0,
                                                                          "reference_passed": 0}}}
    assert "against_sft" not in body["sft"]


def test_trace_gaps_sum_idle_time_by_the_python_frames_the_host_was_in(tmp_path):
    def x(cat, ts, dur, name="k", tid=1):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name, "tid": tid}

    events = [x("kernel", 0, 10), x("kernel", 5, 15), x("gpu_memset", 30, 10), x("kernel", 100, 10),
              x("kernel", 112, 2),   # a 2 us gap: below the threshold
              x("python_function", 0, 200, "/s/site-packages/sitlib/training.py(1): step"),
              x("python_function", 40, 50, "/s/site-packages/trl/trainer/dpo_trainer.py(9): metrics"),
              x("python_function", 45, 10, "/s/python3.12/threading.py(3): wait"),
              x("python_function", 0, 500, "/s/other.py(1): worker", tid=2)]   # not the main thread
    tg = load("trace_gaps")
    busy = tg.busy_intervals(events)
    assert busy == [(0, 20), (30, 40), (100, 110), (112, 114)]
    assert tg.idle_gaps(busy, 5) == [(20, 10), (40, 60)]
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    text = tg.summary(tmp_path / "t.json", min_us=5)
    assert "idle in 2 gaps of >= 5 us: 0.1 ms" in text
    rows = text.splitlines()[2:]
    # the 60 us gap's middle (70) lies inside metrics, called from step; the 10 us one (25) inside step alone
    assert rows[0].split()[:2] == ["0.1", "1"] and rows[0].endswith(
        "trl/trainer/dpo_trainer.py(9): metrics <- sitlib/training.py(1): step")
    assert rows[1].endswith("  1  sitlib/training.py(1): step")


def test_trace_gaps_sum_matching_kernels_by_the_frames_that_launched_them(tmp_path):
    def x(cat, ts, dur, name, corr=None, tid=1):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name, "tid": tid,
                "args": {} if corr is None else {"correlation": corr}}

    events = [x("python_function", 0, 100, "/s/sitlib/attention.py(5): attend"),
              x("python_function", 200, 100, "/s/liger_kernel/ops/rope.py(9): rope"),
              x("cuda_runtime", 10, 2, "cudaLaunchKernel", 1), x("kernel", 20, 30, "elementwise_kernel<copy>", 1),
              x("cuda_runtime", 210, 2, "cudaLaunchKernel", 2), x("kernel", 220, 50, "elementwise_kernel<copy>", 2),
              x("cuda_runtime", 220, 2, "cudaLaunchKernel", 3), x("kernel", 280, 70, "elementwise_kernel<add>", 3),
              x("cuda_runtime", 230, 2, "cudaLaunchKernel", 4), x("kernel", 360, 90, "nvjet_gemm", 4)]
    tg = load("trace_gaps")
    rows = tg.kernel_sites(events, tg.frames_by_thread(events), "elementwise", 10)
    assert [(r.split()[:3]) for r in rows] == [["0.1", "1", "elementwise_kernel<add>"],
                                               ["0.1", "1", "elementwise_kernel<copy>"],
                                               ["0.0", "1", "elementwise_kernel<copy>"]]   # 70, 50, 30 us
    assert rows[0].endswith("@ liger_kernel/ops/rope.py(9): rope") and rows[2].endswith("attention.py(5): attend")
    (tmp_path / "t.json").write_text(json.dumps(events))
    assert "kernels matching 'elementwise'" in tg.summary(tmp_path / "t.json", kernels="elementwise")


def test_trace_gaps_follow_the_thread_that_launched_the_work(tmp_path):
    """A backward's kernels come from autograd's thread while the main thread waits in backward(): the gap before
    such a kernel, and the kernel itself, belong to the launching thread's frames."""
    def x(cat, ts, dur, name, tid, corr=None):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name, "tid": tid,
                "args": {} if corr is None else {"correlation": corr}}

    events = [x("python_function", 0, 1000, "/s/accelerate/accelerator.py(1): backward", 1),
              x("python_function", 0, 1000, "/s/other.py(2): spin", 1),
              x("python_function", 0, 400, "/s/liger_kernel/ops/rope.py(3): rope_backward", 2),
              x("python_function", 0, 5, "/s/tiny.py(4): t", 1),   # tid 1 keeps the most frames: the main thread
              x("cuda_runtime", 10, 2, "cudaLaunchKernel", 2, 7), x("kernel", 20, 10, "copy_kernel", 2, 7),
              x("cuda_runtime", 300, 2, "cudaLaunchKernel", 2, 8), x("kernel", 330, 10, "copy_kernel", 2, 8)]
    tg = load("trace_gaps")
    threads = tg.frames_by_thread(events)
    assert tg.kernel_sites(events, threads, "copy", 5)[0].split()[1] == "2" and \
        tg.kernel_sites(events, threads, "copy", 5)[0].endswith("@ liger_kernel/ops/rope.py(3): rope_backward")
    (tmp_path / "t.json").write_text(json.dumps(events))
    rows = tg.summary(tmp_path / "t.json", min_us=5).splitlines()[2:]
    assert rows == ["    0.3      1  liger_kernel/ops/rope.py(3): rope_backward"]   # 30 -> 330, not "backward"


def test_answer_habits_sum_dpos_gains_per_category_across_runs(tmp_path):
    habits = load("answer_habits")
    files = []
    for i, (p, r) in enumerate(((2, 1), (1, 1), (3, 1))):
        f = tmp_path / f"run{i}.json"
        f.write_text(json.dumps({"dpo": {"against_sft": {"by_category": {
            "startend": {"items": 8, "passed": p, "reference_passed": r},
            "length": {"items": 4, "passed": 0, "reference_passed": 1}}}}}))
        files.append(f)
    got = habits.across(files)["by_category"]
    assert list(got) == ["length", "startend"]   # the largest loss first
    assert got["startend"] == {"items": 24, "passed": 6, "reference_passed": 3, "gain_per_run": [1, 0, 2]}
    assert got["length"]["gain_per_run"] == [-1, -1, -1]
    (tmp_path / "old.json").write_text(json.dumps({"dpo": {"against_sft": {"items": 3}}}))
    with pytest.raises(SystemExit, match="old.json has no dpo.against_sft.by_category"):
        habits.across([tmp_path / "old.json"])


def _quality_run(folder: Path, seed: int, passed: dict, profile: str = "h100") -> Path:
    """A bench_quality.py --keep folder: its record and 07's answers (two items: one fact, one constrained)."""
    (folder / "benchmark").mkdir(parents=True)
    checks = {"fact": [{"type": "answer_number"}], "if": [{"type": "answer_number"}, {"type": "keywords:existence"}]}
    for v, ok in passed.items():
        rows = [{"prompt_id": k, "category": "arithmetic" if k == "fact" else "keywords", "checks": checks[k],
                 "passed": ok[i]} for i, k in enumerate(("fact", "if"))]
        (folder / "benchmark" / f"{v}.json").write_text(json.dumps({"rows": rows}))
    gain = lambda v, pts: {"variant": v, "points": pts, "won": 1, "lost": 0, "sign_test_p": 1.0}   # noqa: E731
    points = {v: 5.0 * (sum(ok) - sum(passed["base"])) for v, ok in passed.items()}   # the targets' edges
    record = {"device": "GPU", "profile": profile, "recipe": ["sft.epochs=8", f"seed={seed}"],
              "counts": {"benchmark_items": 2},
              "models": {v: {"prompt_level_accuracy": sum(ok) / 2} for v, ok in passed.items()},
              "versus_base": [gain(v, points[v]) for v in ("sft", "dpo")],
              "dpo_versus_sft": gain("dpo", points["dpo"] - points["sft"]), "dpo_eval_reward_accuracy": 0.7}
    (folder / "quality_GPU.json").write_text(json.dumps(record))
    return folder


def test_quality_runs_count_the_targets_per_run_and_split_exact_answers_from_instructions(tmp_path):
    qr = load("quality_runs")
    a = _quality_run(tmp_path / "a", 1, {"base": [1, 0], "sft": [0, 1], "dpo": [1, 1]})   # SFT +0, DPO +50 over SFT
    b = _quality_run(tmp_path / "b", 2, {"base": [1, 0], "sft": [1, 1], "dpo": [1, 1]})   # SFT +50, DPO +0 over SFT
    got = qr.summarize([a, b])
    assert got["recipe"] == ["sft.epochs=8"] and [r["seed"] for r in got["runs"].values()] == [1, 2]
    assert got["targets"] == {"sft_vs_base >= 5": 1, "dpo_vs_sft >= 3": 1, "both": 0, "runs": 2}
    assert got["range"] == {"sft_vs_base": [0.0, 5.0], "dpo_vs_base": [5.0, 5.0], "dpo_vs_sft": [0.0, 5.0]}
    assert got["runs"][str(a)]["accuracy"] == {"base": 0.5, "sft": 0.5, "dpo": 1.0}
    assert got["by_kind"]["exact_answer"] == {"items": 1, "base": [1, 1], "sft": [0, 1], "dpo": [1, 1]}
    assert got["by_kind"]["instruction_following"]["sft"] == [1, 1]
    assert got["by_category"]["keywords"]["base"] == [0, 0]
    c = _quality_run(tmp_path / "c", 3, {"base": [1, 0], "sft": [1, 1], "dpo": [1, 1]}, profile="t4")
    with pytest.raises(qr.BadInputError, match=r"c: profile 't4' differs from the first run's 'h100'"):
        qr.summarize([a, c])
    for runs, why in (([a, tmp_path], "expected one quality_<device>.json"), ([a, a], "named twice")):
        with pytest.raises(qr.BadInputError, match=why):
            qr.summarize(runs)


def _edit_record(folder: Path, **changes) -> None:
    path = folder / "quality_GPU.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_quality_runs_count_a_target_at_its_edge_and_refuse_runs_that_cannot_be_compared(tmp_path, monkeypatch):
    qr = load("quality_runs")
    runs = [_quality_run(tmp_path / name, seed, {"base": [1, 0], "sft": [1, 1], "dpo": [1, 1]})
            for name, seed in (("edge", 1), ("under", 2))]
    for folder, pts in zip(runs, (3.0, 2.9)):   # DPO over SFT exactly at the target, and just under it
        _edit_record(folder, dpo_versus_sft={"variant": "dpo", "points": pts, "won": 1, "lost": 0, "sign_test_p": 1.0})
    assert qr.summarize(runs)["targets"] == {"sft_vs_base >= 5": 2, "dpo_vs_sft >= 3": 1, "both": 1, "runs": 2}
    a, b = runs
    rows = json.loads((b / "benchmark" / "sft.json").read_text())["rows"]
    (b / "benchmark" / "sft.json").write_text(json.dumps({"rows": rows[:1]}))   # a run that scored fewer items
    with pytest.raises(qr.BadInputError, match=r"under/benchmark/sft.json: its 1 items are not the 2 items"):
        qr.summarize(runs)
    (b / "benchmark" / "sft.json").write_text(json.dumps({"rows": [rows[0], {**rows[1], "prompt_id": "other"}]}))
    with pytest.raises(qr.BadInputError, match=r"under/benchmark/sft.json: its 2 items are not the 2 items"):
        qr.summarize(runs)
    (b / "benchmark" / "sft.json").unlink()
    with pytest.raises(qr.SitError, match=r"under/benchmark/sft.json"):
        qr.summarize(runs)
    monkeypatch.setattr(sys, "argv", ["quality_runs.py", str(a), str(b), "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit, match=r"^quality_runs: .*under/benchmark/sft.json"):   # one line, no traceback
        qr.main()
    record = json.loads((b / "quality_GPU.json").read_text())
    _edit_record(b, versus_base=record["versus_base"][:1])   # an SFT-only record
    with pytest.raises(qr.BadInputError, match=r"under: its record's versus_base has no sft or dpo entry"):
        qr.summarize(runs)
    _edit_record(b, versus_base=record["versus_base"], counts={"sft_steps": 80})
    with pytest.raises(qr.BadInputError, match=r"under/quality_GPU.json: no counts.benchmark_items"):
        qr.summarize(runs)
    _edit_record(b, dpo_versus_sft=None)
    with pytest.raises(qr.BadInputError, match=r"under/quality_GPU.json has no 'dpo_versus_sft' \(no DPO result"):
        qr.summarize(runs)
