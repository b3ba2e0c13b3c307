"""Each long stage, run through `python -m sitlib <stage>` on the CPU profile (embedded teacher, a tiny random
student), is SIGKILLed once its first resumable artefact appears, then rerun: the rerun must finish, resume
(training stages say from which checkpoint), and leave only whole, valid files. Stages run in order on one tree;
a stage whose prerequisite failed is skipped."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sitlib.artifacts import read_jsonl
from sitlib.checkpoints import is_complete
from sitlib.config import REPO_ROOT

pytestmark = pytest.mark.slow

# stage → (CLI name, glob under the tree whose appearance means the stage is mid-way, what its rerun must print)
STAGES = [
    ("02", "generate", "data/raw/instructions.jsonl", None),
    ("03", "filter", None, None),
    ("04", "preference", "data/preference/candidates.jsonl", None),
    ("05", "sft", "models/sft/checkpoints/checkpoint-*", "resuming from checkpoint-"),
    ("05b", "prompt-tuning", "models/prompt_tuning/checkpoints/checkpoint-*", "resuming from checkpoint-"),
    ("06", "dpo", "models/dpo/checkpoints/checkpoint-*", "resuming from checkpoint-"),
    ("07", "benchmark", "evaluation/results/benchmark/*.json", None),
    ("08", "agent-eval", "evaluation/results/agent/*.json", None),
    ("09", "compare", None, None),
]
FAILED: set = set()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return tmp_path_factory.mktemp("kill-rerun") / "out"


def command(name, tree, student):
    return [sys.executable, "-m", "sitlib", name, "--profile", "cpu", "--output-dir", str(tree),
            "-p", f"models.student={student}"]


def wait_for(tree: Path, pattern: str, proc, timeout=900) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if any(tree.glob(pattern)):
            return True
        time.sleep(0.2)
    return False


def kill_with_kernel(proc) -> None:
    kernels = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(kernels, timeout=15)
    assert not alive, f"kernel(s) outlived the killed CLI: {[p.pid for p in alive]}"


def check_tree(tree: Path) -> None:
    """Nothing partial under a final name: every JSON / JSONL parses, ids are unique, checkpoints complete."""
    for path in tree.rglob("*.json"):
        if "runs" not in path.relative_to(tree).parts:
            json.loads(path.read_text())
    for path in tree.rglob("*.jsonl"):
        rows = read_jsonl(path)
        ids = [r["id"] for r in rows if isinstance(r, dict) and "id" in r]
        assert len(ids) == len(set(ids)), f"{path}: duplicated ids"
    for ckpt in tree.rglob("checkpoint-*"):
        if ckpt.is_dir():
            assert is_complete(ckpt), f"{ckpt} is incomplete"


@pytest.mark.parametrize("stage, name, trigger, resumed", STAGES, ids=[s[0] for s in STAGES])
def test_kill_then_rerun(stage, name, trigger, resumed, tree, tiny_model_dir, tmp_path):
    if FAILED:
        pytest.skip(f"an earlier stage failed: {sorted(FAILED)}")
    FAILED.add(stage)
    cmd = command(name, tree, tiny_model_dir)
    if trigger:
        log = tmp_path / "killed.out"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
            started = wait_for(tree, trigger, proc)
            time.sleep(random.Random(stage).uniform(0, 1.0))   # a varying point after it, mid-write included
            assert started and proc.poll() is None, \
                f"{stage} ended before {trigger} appeared:\n{log.read_text()[-3000:]}"
            kill_with_kernel(proc)
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{stage} rerun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if trigger:
        assert "taking over the lock of run pid" in r.stdout   # the killed run's lock was stale
    if resumed:
        assert resumed in r.stdout, r.stdout[-3000:]
    check_tree(tree)
    if stage == "02":
        rows = read_jsonl(tree / "data/raw/instructions.jsonl")
        assert sorted(r["id"] for r in rows) == list(range(len(rows)))   # no id lost or skipped on resume
    FAILED.discard(stage)
