"""Each long stage, run through `python -m sitlib <stage>` on the CPU profile with a tiny random model as student
and teacher, is SIGKILLed once its first resumable artefact appears, then rerun: the rerun must finish, resume
(training stages say from which checkpoint), take over the dead run's lock and leave only whole, valid files.

The training stages start from filtered SFT rows and preference pairs written here (a tiny random model's
generations would not pass 03's filter); 02 and 04 run last, on the same tree, so their outputs feed nothing."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sitlib.artifacts import read_jsonl, write_jsonl
from sitlib.checkpoints import is_complete
from sitlib.config import REPO_ROOT

pytestmark = pytest.mark.slow

# stage → (CLI name, glob under the tree whose appearance means the stage is mid-way, what its rerun must print,
#          stages it needs, extra -p settings: enough steps/rows that the kill lands before the end)
CKPT = "models/{}/checkpoints/checkpoint-*/trainer_state.json"   # a complete checkpoint exists: kill after it
RESUMED = "resuming from checkpoint-"
STAGES = [
    ("05", "sft", CKPT.format("sft"), RESUMED, [], ["sft.max_steps=16"]),
    ("05b", "prompt-tuning", CKPT.format("prompt_tuning"), RESUMED, [], ["prompt_tuning.max_steps=16"]),
    ("06", "dpo", CKPT.format("dpo"), RESUMED, ["05"], ["dpo.max_steps=12"]),
    ("07", "benchmark", "evaluation/results/benchmark/*.json", None, ["05", "05b", "06"], []),
    ("08", "agent-eval", "evaluation/results/agent/*.json", None, ["05", "05b", "06"], []),
    ("02", "generate", "data/raw/instructions.jsonl", None, [],
     ["generation.num_instructions=24", "generation.chunk_size=4", "generation.batch_size=4",
      "generation.instruction_max_new_tokens=24", "generation.response_max_new_tokens=32"]),
    # a random model rarely ends an answer (a cut-off answer is never chosen): many prompts, any margin
    ("04", "preference", "data/preference/candidates.jsonl", None, [],
     ["preference.chunk_size=2", "preference.min_margin=0", "preference.max_prompts=30"]),
]
FAILED: set = set()
TOPICS = ["rainbows", "tides", "volcanoes", "bread", "bicycles", "bees", "clouds", "magnets", "glaciers", "ink",
          "compasses", "coffee", "owls", "bridges", "batteries", "maps", "wool", "salt", "kites", "echoes",
          "lenses", "moss", "sails", "candles", "thunder", "cheese", "rivers", "paper", "soap", "clocks"]


def seed_data(tree: Path) -> None:
    """Filtered SFT rows and preference pairs in the shapes 03 and 04 write."""
    sft = [{"id": i, "prompt": [{"role": "user", "content": f"Explain in two sentences how {t} work."}],
            "completion": [{"role": "assistant", "content": f"Here is how {t} work, in short. It is simple."}],
            "quality_score": 0.8} for i, t in enumerate(TOPICS)]
    write_jsonl(tree / "data/filtered/sft_train.jsonl", sft[:24])
    write_jsonl(tree / "data/filtered/sft_val.jsonl", sft[24:])
    pairs = [{"id": r["id"], "prompt": r["prompt"], "chosen": r["completion"],
              "rejected": [{"role": "assistant", "content": "I don't know."}], "score_chosen": 0.8,
              "score_rejected": 0.1, "margin": 0.7, "pair_rule": "score", "chosen_from": "teacher",
              "rejected_from": "teacher", "candidate_source": "teacher", "scorer": "offline"} for r in sft]
    write_jsonl(tree / "data/preference/dpo_train.jsonl", pairs[:24])
    write_jsonl(tree / "data/preference/dpo_val.jsonl", pairs[24:])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-rerun") / "out"
    seed_data(out)
    return out


def command(name, tree, model, extra):
    cmd = [sys.executable, "-m", "sitlib", name, "--profile", "cpu", "--output-dir", str(tree),
           "-p", f"models.student={model}", "-p", f"models.teacher={model}"]
    for kv in extra:
        cmd += ["-p", kv]
    return cmd


def wait_for(tree: Path, pattern: str, proc, timeout=600) -> bool:
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


@pytest.mark.parametrize("stage, name, trigger, resumed, needs, extra", STAGES, ids=[s[0] for s in STAGES])
def test_kill_then_rerun(stage, name, trigger, resumed, needs, extra, tree, tiny_model_dir, tmp_path):
    if FAILED & set(needs):
        pytest.skip(f"needs stage(s) that failed: {sorted(FAILED & set(needs))}")
    FAILED.add(stage)
    cmd = command(name, tree, tiny_model_dir, extra)
    if trigger:
        log = tmp_path / "killed.out"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
            started = wait_for(tree, trigger, proc)
            time.sleep(random.Random(stage).uniform(0, 0.5))   # a varying point after it, mid-write included
            assert started and proc.poll() is None, \
                f"{stage} ended before {trigger} appeared:\n{log.read_text()[-3000:]}"
            kill_with_kernel(proc)
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{stage} rerun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if trigger:
        assert "taking over the lock of run pid" in r.stdout   # the killed run's lock was stale
    check_tree(tree)
    if stage == "02":
        rows = read_jsonl(tree / "data/raw/instructions.jsonl")
        assert sorted(r["id"] for r in rows) == list(range(len(rows)))   # no id lost or skipped on resume
    FAILED.discard(stage)   # its outputs are whole: later stages may use them even if the resume check fails
    if resumed:
        assert resumed in r.stdout, f"{stage} did not resume:\n{r.stdout[-3000:]}"
