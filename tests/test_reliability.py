"""Reliability: JSON Lines that survive any text, bad input named in one line with nothing written, one run per
output tree, kills during an append."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sitlib import artifacts, lock
from sitlib.config import REPO_ROOT
from sitlib.errors import BadInputError, MissingInputError, RunLockedError

SEPARATORS = "a\u2028b\u2029c\u0085d\x0be\x0cf\x1cg\rh"   # all of these are line breaks to str.splitlines()
GOOD = "Explain how photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen."
ANSWER = ("Plants capture light with chlorophyll, split water to release oxygen, and use the energy to fix "
          "carbon dioxide into sugars in the Calvin cycle. " + SEPARATORS)


def sitlib_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sitlib", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})


def test_rows_with_line_separators_round_trip_and_count(tmp_path):
    p = tmp_path / "rows.jsonl"
    rows = [{"id": i, "text": SEPARATORS * i} for i in range(4)]
    artifacts.write_jsonl(p, rows[:2])
    artifacts.append_jsonl(p, rows[2:])
    assert artifacts.read_jsonl(p) == rows
    assert artifacts.count_jsonl_rows(p) == 4 and artifacts.count_jsonl_rows(tmp_path / "none.jsonl") == 0


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "x", "completion": ', "rows.jsonl:2: not JSON"),
    ('["a list"]', "rows.jsonl:2: a JSON list, not an object"),
    ('{"prompt": "x"}', "rows.jsonl:2: missing field 'completion' (expected one JSON object per line, like "
                        '{"prompt": ..., "completion": ...})'),
])
def test_bad_line_names_file_and_line(tmp_path, line, words):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(BadInputError) as err:
        artifacts.read_jsonl(p, fields=("prompt", "completion"))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_filter_cli_keeps_text_with_line_separators(tmp_path):
    inp, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    rows = [{"id": i, "instruction": f"{GOOD} Case {i}: {'abc'[i]} \u2028 please.", "response": ANSWER + f" ({i})"}
            for i in range(3)]
    artifacts.write_jsonl(inp, rows)
    r = sitlib_cli("filter", "--input", str(inp), "--output", str(out), "--stats", str(stats))
    assert r.returncode == 0, r.stderr
    kept = artifacts.read_jsonl(out)
    assert json.loads(stats.read_text())["input_rows"] == 3
    assert kept and all(row in rows for row in kept)   # separators intact, fields unchanged


@pytest.mark.parametrize("content, words", [
    ('{"instruction": "a", "response": "b"}\n{oops\n', "in.jsonl:2: not JSON"),
    ('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n',
     "in.jsonl:2: needs 'instruction' and 'response'"),
    ("\n\n", "in.jsonl: no rows"),
])
def test_filter_cli_bad_input_one_line_nothing_written(tmp_path, content, words):
    inp, out = tmp_path / "in.jsonl", tmp_path / "o" / "out.jsonl"
    inp.write_text(content)
    r = sitlib_cli("filter", "--input", str(inp), "--output", str(out))
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.parent.exists()


def test_missing_input_names_the_notebook_to_run_first(tmp_path):
    with pytest.raises(MissingInputError, match=r"missing input .*sft_train\.jsonl \(run 03_quality_filtering first\)"):
        artifacts.read_jsonl(tmp_path / "sft_train.jsonl", produced_by="03_quality_filtering")


@pytest.mark.slow
def test_stage_without_its_prerequisite_names_the_notebook_to_run_first(tmp_path):
    """The real 03 notebook on an empty tree."""
    out = tmp_path / "out"
    r = sitlib_cli("filter", "--profile", "cpu", "--output-dir", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith("error: 03_quality_filtering.ipynb, cell ") and "02_magpie_generation" in r.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and "runs" not in p.relative_to(out).parts]


def test_bad_json_config_is_one_line_and_nothing_written(tmp_path):
    cfg, out = tmp_path / "c.json", tmp_path / "out"
    cfg.write_text('{"sft": {"epochs": 1,}}')
    r = sitlib_cli("sft", "--config", str(cfg), "--output-dir", str(out))
    assert r.returncode == 2 and f"{cfg}: not valid JSON (line 1" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------- one run per tree

def _holder(tree, seconds=60):
    """A separate process that holds the tree's lock."""
    code = (f"import sitlib.lock as l, time\nwith l.hold({str(tree)!r}, 'test holder'):\n"
            f"    print('held', flush=True); time.sleep({seconds})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_tree_is_refused_naming_tree_and_pid(tmp_path, monkeypatch):
    monkeypatch.delenv(lock.HOLDER_ENV, raising=False)
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err:
            lock.acquire(tmp_path)
        assert str(tmp_path) in str(err.value) and f"pid {proc.pid}" in str(err.value)
        r = sitlib_cli("sft", "--output-dir", str(tmp_path), env={lock.HOLDER_ENV: ""})
        assert r.returncode == 2 and f"pid {proc.pid}" in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "runs").exists()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(lock.HOLDER_ENV, raising=False)
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / lock.LOCK_NAME).exists()          # the killed run could not clean up
    path = lock.acquire(tmp_path, "second")
    assert f"taking over the lock of run pid {proc.pid}" in capsys.readouterr().out
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release(path)
    assert not path.exists()


def test_processes_started_by_the_holder_work_inside_its_lock(tmp_path, monkeypatch):
    monkeypatch.delenv(lock.HOLDER_ENV, raising=False)
    with lock.hold(tmp_path, "parent") as path:
        assert path is not None and os.environ[lock.HOLDER_ENV].endswith(f":{os.getpid()}")
        code = f"import sitlib.lock as l; print(l.acquire({str(tmp_path)!r}))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
        assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr    # a kernel of this run
    assert lock.HOLDER_ENV not in os.environ and not path.exists()


def test_lock_from_another_machine_is_stale_only_without_heartbeat(tmp_path):
    p = tmp_path / lock.LOCK_NAME
    p.write_text(json.dumps({"pid": 1, "host": "colab-runtime-that-is-gone", "started": 0}))
    assert not lock.is_stale(json.loads(p.read_text()), p)
    old = time.time() - lock.STALE_AFTER_S - 5
    os.utime(p, (old, old))
    assert lock.is_stale(json.loads(p.read_text()), p)


# ---------------------------------------------------------------- kills

APPENDER = """
import sys, sitlib.artifacts as a
path = sys.argv[1]
i = a.count_jsonl_rows(path)
while True:
    a.append_jsonl(path, [{"id": i + k, "text": "x\\u2028" * 2000} for k in range(7)])
    i += 7
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_appends_leaves_whole_rows_and_resume_continues(tmp_path):
    path = tmp_path / "rows.jsonl"
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)], cwd=REPO_ROOT, stdout=subprocess.PIPE)
        while int(proc.stdout.readline() or 0) < 7 * (20 * (round_ + 1)):   # let it write many chunks
            pass
        time.sleep(0.01 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ids = [r["id"] for r in artifacts.read_jsonl(path)]
        assert ids == list(range(len(ids))) and len(ids) % 7 == 0   # no row lost, duplicated or cut
    assert not [p for p in tmp_path.iterdir() if p.name != "rows.jsonl" and not p.name.endswith(".tmp")]


# ---------------------------------------------------------------- models the user names

LOAD_STUDENT = ("import sitlib\nfrom sitlib import models\n"
                "S = sitlib.setup(PROFILE, OUTPUT_DIR, CONFIG_PATH, OVERRIDES)",
                "tok = models.load_tokenizer(S.config.models.student)")


def _run_setup_notebook(tmp_path, student):
    from test_pipeline import write_nb   # tests/ is on sys.path (pytest's prepend import mode)

    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    write_nb(nbdir / "01_setup.ipynb", *LOAD_STUDENT)
    code = (f"import sitlib.pipeline as p, pathlib, sys; p.NOTEBOOK_DIR = pathlib.Path({str(nbdir)!r}); "
            f"from sitlib.cli import run; sys.exit(run(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "setup", "--profile", "cpu", "--output-dir",
                           str(tmp_path / "out"), "-p", f"models.student={student}"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


@pytest.mark.slow
def test_unknown_model_id_is_one_line_naming_the_model(tmp_path):
    r = _run_setup_notebook(tmp_path, "no-such-org/no-such-model-xyz")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: 01_setup.ipynb, cell 3 (`tok = models.load_tokenizer(") and \
        "no-such-org/no-such-model-xyz" in r.stderr


@pytest.mark.slow
def test_missing_local_model_folder_is_one_line(tmp_path):
    r = _run_setup_notebook(tmp_path, str(tmp_path / "no-such-folder"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: 01_setup.ipynb, cell 3 (") and str(tmp_path / "no-such-folder") in r.stderr


# ---------------------------------------------------------------- secrets

TOKEN = "hf_DummyTokenForTheLeakCheck0123456789"


def _files_with(tree, needle):
    return [p for p in tree.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_printed_token_is_masked_in_terminal_log_and_executed_copy(tmp_path):
    from test_pipeline import write_nb   # tests/ is on sys.path (pytest's prepend import mode)

    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    write_nb(nbdir / "01_setup.ipynb", "import os\nprint('token:', os.environ['HF_TOKEN'])")
    code = (f"import sitlib.pipeline as p, pathlib, sys; p.NOTEBOOK_DIR = pathlib.Path({str(nbdir)!r}); "
            f"from sitlib.cli import run; sys.exit(run(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "setup", "--output-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "HF_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    assert "token: ***" in r.stdout and TOKEN not in r.stdout + r.stderr
    assert not _files_with(tmp_path / "out", TOKEN)
    assert "token: ***" in next((tmp_path / "out" / "runs").glob("*/01_setup.log")).read_text()


@pytest.mark.slow
def test_token_in_environment_reaches_no_file_of_the_tree(tmp_path):
    """The real 01 notebook with a dummy token in the environment (it reports where the token came from)."""
    out = tmp_path / "out"
    r = sitlib_cli("setup", "--profile", "cpu", "--output-dir", str(out), env={"HF_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Hugging Face login: environment" in r.stdout    # the run saw the token
    assert TOKEN not in r.stdout + r.stderr and not _files_with(out, TOKEN)
    assert list(out.glob("runs/*/01_setup.ipynb"))
