"""The papermill runner and the stage CLI: parameters, executed copies and logs, one line for the user's
mistakes, the traceback for anything else, and no kernel left behind."""
import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from sitlib import cli, pipeline
from sitlib.config import REPO_ROOT
from sitlib.errors import PipelineError


def test_parse_stages_orders_and_rejects():
    assert pipeline.parse_stages("03,01") == ["01", "03"]
    with pytest.raises(pipeline.PipelineError, match="unknown stage '10'"):
        pipeline.parse_stages("10")


def test_sft_written_candidates_put_04_after_05(monkeypatch, tmp_path):
    """With preference.candidate_source: sft, 04 reads the SFT adapter: the series runs 05 before it."""
    assert pipeline.series_order(["01", "04", "05", "06"], "sft") == ["01", "05", "04", "06"]
    assert pipeline.series_order(["01", "04", "05", "06"], "teacher") == ["01", "04", "05", "06"]
    assert pipeline.series_order(["04", "06"], "sft") == ["04", "06"]   # 04 alone: it names 05 if that is missing
    ran = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda stages, *a, **k: ran.append(stages) or tmp_path)
    out = str(tmp_path / "out")
    assert cli.run(["pipeline", "--stages", "03,04,05,05b", "--output-dir", out, "--profile", "cpu",
                    "-p", "preference.candidate_source=sft"]) == 0
    assert cli.run(["pipeline", "--stages", "03,04,05,05b", "--output-dir", out, "--profile", "cpu"]) == 0
    assert ran == [["03", "05", "04", "05b"], ["03", "04", "05", "05b"]]


def test_parameters_split_config_overrides_from_notebook_parameters():
    p = pipeline.build_parameters("cpu", "/o", None, {"sft.epochs": 1, "seed": 7, "ALLOW_MISSING": True})
    assert p == {"PROFILE": "cpu", "OUTPUT_DIR": "/o", "OVERRIDES": {"sft.epochs": 1, "seed": 7},
                 "ALLOW_MISSING": True}


def test_cli_takes_the_top_level_seed_as_a_config_key(nbdir, monkeypatch, tmp_path):
    """-p seed=7 (no dot) is the config's seed, not a notebook parameter: it was refused as neither before."""
    write_nb(nbdir / "05_sft.ipynb", "pass")
    got = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda stages, out, prof, cfg, params: got.append(params) or tmp_path)
    assert cli.run(["05", "-p", "seed=7", "--output-dir", str(tmp_path / "out"), "--profile", "cpu"]) == 0
    assert got == [{"seed": 7}]


PARAMS = "PROFILE = 'auto'\nOUTPUT_DIR = None\nCONFIG_PATH = None\nOVERRIDES = {}\nSTEPS = 1"


def write_nb(path, *sources, params=PARAMS):
    cell = new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[cell, *[new_code_cell(s) for s in sources]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture
def nbdir(tmp_path, monkeypatch):
    d = tmp_path / "nbs"
    d.mkdir()
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", d)
    return d


@pytest.mark.slow
def test_runner_streams_output_writes_copy_and_log_and_stops_at_failure(nbdir, tmp_path, capsys):
    write_nb(nbdir / "01_ok.ipynb", "print('resuming from checkpoint-4', PROFILE, OVERRIDES, STEPS)")
    write_nb(nbdir / "02_bad.ipynb", "from sitlib.errors import BadInputError\n"
             "raise BadInputError('data/raw/x.jsonl:3: not JSON')")
    write_nb(nbdir / "03_never.ipynb", "print('unreachable')")
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as err:
        pipeline.run_pipeline(["01", "02", "03"], out, "cpu", None, {"sft.epochs": 1, "STEPS": 3},
                              log=lambda *_: None)
    assert str(err.value) == ("02_bad.ipynb, cell 2 (`from sitlib.errors import BadInputError`): "
                              "data/raw/x.jsonl:3: not JSON")
    assert "resuming from checkpoint-4 cpu {'sft.epochs': 1} 3" in capsys.readouterr().out   # streamed live
    (run_dir,) = (out / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["01_ok.ipynb", "01_ok.log", "02_bad.ipynb", "02_bad.log"]
    assert "resuming from checkpoint-4" in (run_dir / "01_ok.log").read_text()
    assert not (out / ".sit-run.lock").exists()


@pytest.mark.slow
def test_cli_user_error_is_one_line_real_bug_keeps_traceback(nbdir, tmp_path, capsys):
    write_nb(nbdir / "05_sft.ipynb", "import sitlib.errors as e\n"
             "raise e.OutOfMemoryError('out of GPU memory on profile t4: lower sft.batch_size (now 4)')")
    write_nb(nbdir / "06_dpo.ipynb", "import torch\nraise torch.OutOfMemoryError('CUDA out of memory')")
    out = str(tmp_path / "out")
    assert cli.run(["sft", "--output-dir", out, "--profile", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: 05_sft.ipynb, cell 2 (`import sitlib.errors as e`): "
                   "out of GPU memory on profile t4: lower sft.batch_size (now 4)\n")
    # torch's own OutOfMemoryError has the same class name but is not the user's mistake → traceback, exit 1
    assert cli.run(["dpo", "--output-dir", out]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise torch.OutOfMemoryError" in err
    assert "06_dpo.ipynb failed in cell 2 (`import torch`): OutOfMemoryError: CUDA out of memory" in err
    assert "executed copy: " in err and err.rstrip().endswith("06_dpo.log")


@pytest.mark.parametrize("argv, words", [
    (["sft", "-p", "lora.r=0"], "lora.r"),
    (["sft", "-p", "sft.epochz=1"], "sft.epochz"),
    (["sft", "-p", "epochs=1"], "unknown config key 'epochs'"),
    (["sft", "-p", "Epochs=1"], "UPPER_CASE"),
    (["sft", "--profile", "tpu"], "--profile 'tpu'"),
])
def test_cli_rejects_bad_input_in_one_line_before_writing(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.run([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and not out.exists()


def test_cli_rejects_unknown_notebook_parameter(nbdir, tmp_path, capsys):
    write_nb(nbdir / "05_sft.ipynb", "pass")
    out = tmp_path / "out"
    assert cli.run(["05", "-p", "EPOCS=1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "-p EPOCS: not a parameter of notebook(s) 05" in err and "STEPS" in err and not out.exists()


def test_cli_names_an_output_dir_it_cannot_write(nbdir, tmp_path, capsys):
    write_nb(nbdir / "05_sft.ipynb", "pass")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.run(["sft", "--output-dir", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output directory {blocker / 'out'} is not writable") and err.count("\n") == 1


def _gone(pid, timeout):
    import psutil

    end = time.time() + timeout
    while time.time() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_sigkill_of_the_cli_takes_its_kernel_down(tmp_path):
    nbdir, pidfile = tmp_path / "nbs", tmp_path / "kernel.pid"
    nbdir.mkdir()
    write_nb(nbdir / "05_sft.ipynb", f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
             "time.sleep(120)")
    code = (f"import sitlib.pipeline as p, pathlib; p.NOTEBOOK_DIR = pathlib.Path({str(nbdir)!r}); "
            f"from sitlib.cli import run; run(['sft', '--output-dir', {str(tmp_path / 'out')!r}])")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.time() + 90
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < end and proc.poll() is None, "the notebook never started"
        time.sleep(0.2)
    kernel = int(pidfile.read_text())
    assert not _gone(kernel, 0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(kernel, 10), f"kernel {kernel} outlived the killed CLI"


@pytest.mark.slow
def test_a_kernel_that_dies_is_reported_with_copy_and_log(nbdir, tmp_path, capsys):
    write_nb(nbdir / "05_sft.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert cli.run(["sft", "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "05_sft.ipynb: the kernel died" in err and err.rstrip().endswith("05_sft.log")
