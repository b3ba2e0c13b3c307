"""The committed notebooks are what the spec builds, share one shape, and are clean (no outputs)."""
import importlib.util
import json

import pytest

from sitlib.config import REPO_ROOT
from sitlib.pipeline import STAGES

NB_DIR = REPO_ROOT / "notebooks"


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_notebooks_match_the_spec(tmp_path):
    built = _builder().build(tmp_path)
    assert sorted(p.name for p in built) == sorted(p.name for p in NB_DIR.glob("*.ipynb"))
    for p in built:
        assert json.loads(p.read_text()) == json.loads((NB_DIR / p.name).read_text()), \
            f"{p.name} differs from notebooks/build_notebooks.py: rerun it"


def test_one_notebook_per_stage():
    names = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
    assert [n.split("_")[0] for n in names] == STAGES


@pytest.mark.parametrize("path", sorted(NB_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[1]["metadata"].get("tags", [])
    assert "sitlib.setup(PROFILE, OUTPUT_DIR, CONFIG_PATH, OVERRIDES)" in "".join(code[2]["source"])
    assert "".join(cells[-2]["source"]) == "## Results"
    assert not any(c.get("outputs") for c in code) and all(c.get("execution_count") is None for c in code)
    assert all(len("".join(c["source"]).splitlines()) <= 25 for c in code)
