"""Several processes on CPU: DDP (gloo) training matches one process, sharded generation matches unsharded,
batch bookkeeping, checkpoints of 2 processes resume in 1. Run as a script, this file is the training driver
that `accelerate launch` starts in each process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sitlib import distributed as dist
from sitlib.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["sea", "poem", "capital", "France", "answer", "numbers", "photosynthesis", "list"]


# ---------------------------------------------------------------- batch bookkeeping and world facts

@pytest.mark.parametrize("batch,accum,world,expected", [
    (4, 4, 1, 4), (4, 4, 2, 2), (4, 4, 4, 1), (12, 2, 2, 1), (2, 8, 8, 1), (1, 6, 3, 2)])
def test_accumulation_keeps_the_effective_batch(batch, accum, world, expected):
    got, line = dist.accumulation_for_world(batch, accum, world)
    assert got == expected and batch * got * world == batch * accum
    assert f"{batch * accum}" in line and (world == 1 or f"{accum} → {expected}" in line)


def test_accumulation_that_cannot_split_names_a_fix():
    with pytest.raises(ConfigError, match=r"gradient_accumulation=3 cannot be split over 2 processes") as e:
        dist.accumulation_for_world(4, 3, 2)
    assert "batch_size=3 with gradient_accumulation=4 keeps it" in str(e.value)   # 3 × 2 × 2 = 12 = 4 × 3
    with pytest.raises(ConfigError, match="effective batch 1 .*: choose a gradient_accumulation that is a multiple of 2$"):
        dist.accumulation_for_world(1, 1, 2)                               # effective batch 1: no split at all
    with pytest.raises(ConfigError, match="world size=0"):
        dist.accumulation_for_world(4, 2, 0)


def test_for_world_changes_only_what_the_world_needs(capsys):
    args = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "learning_rate": 2e-4}
    assert dist.for_world(args, 1) == args
    two = dist.for_world(args, 2)
    assert two == {**args, "gradient_accumulation_steps": 2, "ddp_find_unused_parameters": False}
    assert args["gradient_accumulation_steps"] == 4                        # the caller's dict is not changed
    assert "effective batch stays 16" in capsys.readouterr().out


def test_world_from_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist.world() == dist.World(0, 1, 0) and dist.is_main_process()
    write = dist.main_process_only(lambda: "written")
    assert write() == "written"
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "4"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.world() == dist.World(3, 4, 1) and not dist.is_main_process() and write() is None
    assert dist.device_map_for_load() == {"": 1}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert dist.device_map_for_load() is None
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4 WORLD_SIZE=4"):
        dist.world()


def test_shard_and_merge_are_inverse():
    for n in range(0, 11):
        for w in range(1, 5):
            items = list(range(n))
            parts = [dist.shard(items, r, w) for r in range(w)]
            assert sorted(x for p in parts for x in p) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
            assert dist.merge(parts) == items
    with pytest.raises(Exception, match="shard 0 of 2 holds 0 results, expected 1"):
        dist.merge([[], [0]])
    assert dist.chunks([3, 4, 5, 6, 9, 12], 4) == [{"id": 3, "ids": [3, 4, 5, 6]}, {"id": 9, "ids": [9, 12]}]


def test_notebook_launch_runs_the_function_in_two_processes(tmp_path):
    # in a fresh interpreter, as in a notebook kernel: accelerate refuses to fork once a Trainer has set its state
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_distributed import report_world; "
            f"from sitlib.distributed import notebook_launch; notebook_launch(report_world, 2, {str(tmp_path)!r}, "
            f"port={_free_port()})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.read_text() for p in tmp_path.glob("rank-*")) == ["0 2 gloo", "1 2 gloo"]


def report_world(folder: str) -> None:
    """Launched function: each process joins the gloo group and writes what it sees."""
    from accelerate import PartialState

    state, w = PartialState(cpu=True), dist.world()
    Path(folder, f"rank-{w.rank}").write_text(f"{w.rank} {state.num_processes} {state.backend}")


# ---------------------------------------------------------------- data-parallel generation

def sample_process(tok, model):
    """make_process for ModelWorker: sampled answers for a chunk of row ids, seeded by the chunk's id
    (module-level: spawned workers import it)."""
    import torch

    from sitlib.generation import Sampling, chat_input_ids, generate

    def run(item):
        torch.manual_seed(item["id"])
        convs = [[{"role": "user", "content": f"Tell me about the {WORDS[i % 8]}, number {i}."}] for i in item["ids"]]
        outs = generate(model, tok, chat_input_ids(tok, convs), Sampling(8, 1.0, 1.0), 3)
        return [{"id": i, "text": o.text, "tokens": o.n_tokens} for i, o in zip(item["ids"], outs)]
    return run


@pytest.mark.slow
def test_sharded_generation_gives_the_rows_of_one_process_and_resumes(tiny_model_dir, tmp_path):
    from sitlib.hardware import PROFILES

    worker = dist.ModelWorker(str(tiny_model_dir), PROFILES["cpu"], sample_process)
    work = dist.chunks(range(12), 3)
    one = dist.generate_data_parallel(worker, work, ["cpu"])
    # a run killed after two chunks on one process, finished on two processes from the same results folder
    folder = tmp_path / "shards"
    dist.generate_data_parallel(worker, work[:2], ["cpu"], folder)
    two = dist.generate_data_parallel(worker, work, ["cpu", "cpu"], folder)
    rows = [r for chunk in two for r in chunk]
    assert [r["id"] for r in rows] == list(range(12))
    assert two == one
    assert len({r["text"] for r in rows}) > 1        # sampled rows, not one text repeated
    assert sorted(p.name for p in folder.iterdir()) == ["shard-000-of-001.jsonl", "shard-000-of-002.jsonl",
                                                        "shard-001-of-002.jsonl"]


# ---------------------------------------------------------------- DDP training (driver below)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model_dir: Path, out: Path, processes: int, max_steps: int, resume: bool = False) -> dict:
    script = [str(Path(__file__)), "--model", str(model_dir), "--out", str(out), "--max-steps", str(max_steps)] + \
        (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if processes == 1:
        cmd = [sys.executable] + script
    else:   # the shipped DDP config, on CPU: accelerate starts torchrun, the Trainer picks gloo
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(_free_port()), "--dynamo_backend", "no"] + script
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    result["stdout"] = done.stdout
    return result


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_and_resumes_on_one(tiny_model_dir, tmp_path):
    one = _run(tiny_model_dir, tmp_path / "one", 1, max_steps=4)
    two = _run(tiny_model_dir, tmp_path / "two", 2, max_steps=4)
    print("losses 1 process:", one["losses"], "\nlosses 2 processes:", two["losses"])
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert (one["trainer_processes"], two["trainer_processes"], two["ddp"]) == (1, 2, "DistributedDataParallel")
    assert (one["accumulation"], two["accumulation"]) == (2, 1)
    assert "2 processes: gradient_accumulation 2 → 1 per process, effective batch stays 4" in two["stdout"]
    assert one["global_step"] == two["global_step"] == 4
    assert len(one["losses"]) == len(two["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 0.05 * abs(a), (one["losses"], two["losses"])
    assert one["losses"][-1] < one["losses"][0]                  # it trained
    assert [p.name for p in sorted((tmp_path / "two").glob("rank-*.txt"))] == ["rank-0.txt"]   # rank 0 wrote

    # checkpoints of the 2-process run resume in one process: drop the last, continue from checkpoint-2
    import shutil

    shutil.rmtree(tmp_path / "two" / "checkpoints" / "checkpoint-4")
    resumed = _run(tiny_model_dir, tmp_path / "two", 1, max_steps=4, resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert [s for s, _ in resumed["steps"]] == [1, 2, 3, 4]      # steps 1-2 come from the checkpoint's state
    for (_, a), (_, b) in zip(resumed["steps"][2:], two["steps"][2:]):
        assert abs(a - b) <= 0.05 * abs(b), (resumed["steps"], two["steps"])


PROBE = """import torch, torch.distributed as d
from pathlib import Path
from accelerate import PartialState
from sitlib import distributed as dist
from sitlib.artifacts import write_json
state = PartialState(cpu=True)   # the kernel joins the group its launcher's environment describes
total = torch.tensor([float(state.process_index + 1)])
d.all_reduce(total)
dist.main_process_only(write_json)(Path(OUTPUT_DIR) / "probe.json",
                                   {"world": dist.world().size, "sum": total.item(), "overrides": OVERRIDES})"""


@pytest.mark.slow
def test_stage_notebook_runs_in_every_launched_process_and_rank0_writes(tmp_path):
    import nbformat

    nb_dir, out = tmp_path / "notebooks", tmp_path / "out"
    nb_dir.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    params = nbformat.v4.new_code_cell('PROFILE = "auto"\nOUTPUT_DIR = ""\nOVERRIDES = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(PROBE)]
    nbformat.write(nb, str(nb_dir / "05_probe.ipynb"))
    driver = tmp_path / "driver.py"   # the entry point, with the notebooks folder pointed at the probe
    driver.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom pathlib import Path\n"
                      f"import sitlib.pipeline as p\np.NOTEBOOK_DIR = Path({str(nb_dir)!r})\n"
                      "from sitlib.distributed import main\nraise SystemExit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
           str(_free_port()), str(driver), "sft", "--profile", "cpu", "--output-dir", str(out), "-p", "sft.epochs=1"]
    done = subprocess.run(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "probe.json").read_text()) == {"world": 2, "sum": 3.0, "overrides": {"sft.epochs": 1}}
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "05_probe.ipynb").exists()     # rank 0's executed copy only
    assert "rank 1 of 2: executed notebooks and logs in" in done.stdout
    assert not (out / ".sit-run.lock").exists()                         # rank 0 released the tree


def test_generation_stages_are_refused_under_accelerate_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="stage.s. 02 under accelerate launch"):
        dist.run_stages_on_world(["02"], "unused")


def _rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Write a short poem about the {WORDS[i % 8]}."}],
             "completion": [{"role": "assistant", "content": f"The answer is {WORDS[(i + 3) % 8]} and {WORDS[i % 5]}."}]}
            for i in range(n)]


def _train(model_dir: str, out: Path, max_steps: int, resume: bool) -> None:
    """SFT with LoRA on every launched process; configured batch 2 × accumulation 2 (effective batch 4)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from sitlib.artifacts import write_json, write_text

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ckpt = out / "checkpoints"
    kwargs = dist.for_world({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    args = SFTConfig(output_dir=str(ckpt), max_steps=max_steps, learning_rate=2e-2, lr_scheduler_type="constant",
                     logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none", seed=0, dataloader_num_workers=0,
                     max_length=64, completion_only_loss=True, save_only_model=False, **kwargs)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(16)), processing_class=tok,
                         peft_config=lora)
    last = get_last_checkpoint(str(ckpt)) if resume else None
    trainer.train(resume_from_checkpoint=last)
    result = {"world_size": dist.world().size, "trainer_processes": trainer.accelerator.num_processes,
              "ddp": type(trainer.model_wrapped).__name__, "accumulation": args.gradient_accumulation_steps,
              "global_step": trainer.state.global_step, "resumed_from": last,
              "steps": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]}
    result["losses"] = [loss for _, loss in result["steps"]]
    dist.main_process_only(write_json)(out / "result.json", result)
    dist.main_process_only(write_text)(out / f"rank-{dist.world().rank}.txt", "written\n")
    if torch.distributed.is_initialized():   # as PyTorch asks of every script: gloo's threads can abort at exit
        # every rank reaches the teardown together: rank 1 destroying while rank 0 still wrote its files hung the
        # launch past its timeout, after training had finished
        dist.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    _train(a.model, a.out, a.max_steps, a.resume)
