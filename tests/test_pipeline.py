"""The papermill runner: parameters, stage selection, executed copies, and the failing cell named."""
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from sitlib import pipeline


def test_parse_stages_orders_and_rejects():
    assert pipeline.parse_stages("03,01") == ["01", "03"]
    with pytest.raises(pipeline.PipelineError, match="unknown stage '10'"):
        pipeline.parse_stages("10")


def test_parameters_split_dotted_overrides():
    p = pipeline.build_parameters("cpu", "/o", None, {"sft.epochs": 1, "ALLOW_MISSING": True})
    assert p == {"PROFILE": "cpu", "OUTPUT_DIR": "/o", "OVERRIDES": {"sft.epochs": 1}, "ALLOW_MISSING": True}


def _nb(path, source):
    cell = new_code_cell("X = 1")
    cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[cell, new_code_cell("y = 2"), new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_runner_writes_executed_copies_and_names_failing_cell(tmp_path, monkeypatch):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _nb(nbdir / "01_ok.ipynb", "print('ran', PROFILE, OVERRIDES)")
    _nb(nbdir / "02_bad.ipynb", "raise ValueError('bad input in data/raw')")
    _nb(nbdir / "03_never.ipynb", "print('unreachable')")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", nbdir)
    out = tmp_path / "out"
    with pytest.raises(pipeline.PipelineError) as err:
        pipeline.run_pipeline(["01", "02", "03"], out, "cpu", None, {"sft.epochs": 1}, log=lambda *_: None)
    msg = str(err.value)
    assert "02_bad.ipynb failed in cell" in msg and "ValueError: bad input in data/raw" in msg
    (run_dir,) = (out / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["01_ok.ipynb", "02_bad.ipynb"]
    executed = nbformat.read(str(run_dir / "01_ok.ipynb"), as_version=4)
    outputs = "".join(o.get("text", "") for c in executed["cells"] for o in c.get("outputs", []))
    assert "ran cpu {'sft.epochs': 1}" in outputs
