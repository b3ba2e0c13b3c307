"""A kill in the middle of a Trainer checkpoint save: the rerun resumes from the newest complete checkpoint."""
import json
import subprocess
import sys

import pytest

from sitlib.checkpoints import is_complete
from sitlib.config import REPO_ROOT

TRAIN = """
import os, signal, sys
from pathlib import Path
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from sitlib.checkpoints import prepare_checkpoints

model_dir, ckpt, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
resume = prepare_checkpoints(ckpt, "same-config-and-data", "float32")
rows = [[1 + (i * 7 + j) % 50 for j in range(16)] for i in range(32)]
args = TrainingArguments(output_dir=str(ckpt), max_steps=12, per_device_train_batch_size=4, save_steps=3,
                         save_total_limit=2, logging_steps=1, report_to="none", use_cpu=True, learning_rate=1e-3,
                         dataloader_num_workers=0)
trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                  train_dataset=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows]))
save_rng = trainer._save_rng_state

def save_rng_then_die(output_dir):
    # weights, optimizer and scheduler are on disk, trainer_state.json (written last) is not: die here
    save_rng(output_dir)
    if trainer.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

trainer._save_rng_state = save_rng_then_die
trainer.train(resume_from_checkpoint=resume)
print("finished at step", trainer.state.global_step, flush=True)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_save_then_rerun_resumes_from_newest_complete(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "checkpoints"

    def run(kill_at):
        return subprocess.run([sys.executable, "-c", TRAIN, str(tiny_model_dir), str(ckpt), str(kill_at)],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)

    first = run(kill_at=9)
    assert first.returncode == -9, first.stderr[-2000:]
    assert not is_complete(ckpt / "checkpoint-9") and is_complete(ckpt / "checkpoint-6")
    second = run(kill_at=-1)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "skipping incomplete checkpoint-9" in second.stdout and "resuming from checkpoint-6" in second.stdout
    assert "finished at step 12" in second.stdout
    left = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("checkpoint-"))
    assert left == ["checkpoint-12", "checkpoint-9"] and all(is_complete(ckpt / n) for n in left)
    state = json.loads((ckpt / "checkpoint-12" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 13))
