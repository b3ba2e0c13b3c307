"""Output tree, SIT_OUTPUT_DIR, atomic writers, and fetch() against a local HTTP server."""
import functools
import http.server
import json
import threading

import pytest

from sitlib import artifacts, runtime


def test_output_tree_layout(tmp_path):
    tree = runtime.output_tree(tmp_path / "o")
    for rel in ("data/raw", "data/filtered", "data/preference", "models/sft", "models/prompt_tuning", "models/dpo",
                "evaluation/metrics", "evaluation/figures", "evaluation/results", "runs"):
        assert (tmp_path / "o" / rel).is_dir()
    assert tree.models_sft == tmp_path / "o" / "models" / "sft"


def test_env_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SIT_OUTPUT_DIR", str(tmp_path / "env"))
    assert runtime.resolve_output_dir() == tmp_path / "env"
    assert runtime.resolve_output_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SIT_OUTPUT_DIR")
    monkeypatch.chdir(tmp_path)
    assert runtime.resolve_output_dir() == tmp_path / "outputs"


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "m.json"
    artifacts.write_json(p, {"a": 1})

    def killed(*a):
        raise KeyboardInterrupt   # a kill between writing the temp file and the rename
    monkeypatch.setattr(artifacts.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        artifacts.write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]


def test_append_jsonl_and_metrics_with_config(tmp_path):
    p = tmp_path / "rows.jsonl"
    artifacts.append_jsonl(p, [{"i": 0}])
    artifacts.append_jsonl(p, [{"i": 1}, {"i": 2}])
    assert [r["i"] for r in artifacts.read_jsonl(p)] == [0, 1, 2]
    artifacts.write_metrics(tmp_path / "x_metrics.json", {"loss": 1.0}, {"seed": 1})
    assert json.loads((tmp_path / "x_metrics.config.json").read_text()) == {"seed": 1}


def test_missing_input_names_notebook(tmp_path):
    with pytest.raises(artifacts.MissingInputError, match="run 02_magpie_generation first"):
        artifacts.read_jsonl(tmp_path / "nope.jsonl", produced_by="02_magpie_generation")


@pytest.fixture
def http_root(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "data.jsonl").write_text('{"x": 1}\n')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_downloads_once_atomically(http_root, tmp_path):
    dest = tmp_path / "dl" / "data.jsonl"
    assert runtime.fetch(f"{http_root}/data.jsonl", dest) == dest
    assert dest.read_text() == '{"x": 1}\n'
    dest.write_text("kept")
    runtime.fetch(f"{http_root}/data.jsonl", dest)   # present: not downloaded again
    assert dest.read_text() == "kept"


def test_fetch_failure_leaves_nothing(http_root, tmp_path):
    dest = tmp_path / "dl" / "missing.jsonl"
    with pytest.raises(Exception):
        runtime.fetch(f"{http_root}/missing.jsonl", dest)
    assert not dest.exists()
