"""Run stage notebooks with papermill: executed copies and logs under runs/<timestamp>/, output streamed live."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .config import REPO_ROOT
from .errors import PipelineError, SitError

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
STAGES = ["01", "02", "03", "04", "05", "05b", "06", "07", "08", "09"]
# environment variable naming the file the kernel writes a user error's class to (see load_ipython_extension)
ERROR_FILE_ENV = "SIT_ERROR_FILE"
# values of these variables are replaced by *** in the streamed output and the log
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NotebookFailed(Exception):
    """A notebook raised something that is not the user's mistake: carries its traceback (not a SitError, so
    the CLI shows it in full)."""

    def __init__(self, message: str, traceback: str):
        super().__init__(message)
        self.traceback = traceback


def notebook_for(stage: str) -> Path:
    matches = sorted(NOTEBOOK_DIR.glob(f"{stage}_*.ipynb"))
    if not matches:
        raise PipelineError(f"no notebook for stage {stage!r} in {NOTEBOOK_DIR} (stages: {', '.join(STAGES)})")
    return matches[0]


def parse_stages(text: Optional[str]) -> list[str]:
    if not text:
        return [s for s in STAGES if list(NOTEBOOK_DIR.glob(f"{s}_*.ipynb"))]
    stages = [s.strip() for s in text.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise PipelineError(f"unknown stage {s!r} (stages: {', '.join(STAGES)})")
    return sorted(stages, key=STAGES.index)


def series_order(stages: list[str], candidate_source: str) -> list[str]:
    """The stages in the series' order, except that 04 runs right after 05 when the SFT model writes 04's candidates
    (`preference.candidate_source: sft`): 04 reads the SFT adapter."""
    if candidate_source != "sft" or "04" not in stages or "05" not in stages:
        return stages
    rest = [s for s in stages if s != "04"]
    rest.insert(rest.index("05") + 1, "04")
    return rest


def build_parameters(profile: str, output_dir: Path, config_path: Optional[str], params: dict) -> dict:
    """UPPER_CASE keys are notebook parameters; lower-case keys (sft.epochs=1, seed=7) become config OVERRIDES."""
    out = {"PROFILE": profile, "OUTPUT_DIR": str(output_dir), "OVERRIDES": {}}
    if config_path:
        out["CONFIG_PATH"] = str(Path(config_path).resolve())
    for key, value in params.items():
        if key.islower():
            out["OVERRIDES"][key] = value
        else:
            out[key] = value
    return out


def _secrets() -> list[str]:
    return [v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= 8]


def mask_secrets_in(path: Path) -> None:
    """A notebook that printed a token must not keep it in the executed copy (it sits on Drive, gets shared)."""
    secrets = _secrets()
    if not secrets or not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    if any(s in text for s in secrets):
        from .artifacts import write_text

        for s in secrets:
            text = text.replace(s, "***")
        write_text(path, text)


class _Tee:
    """stdout_file for papermill: each chunk of cell output goes to the terminal and the log, secrets masked."""

    def __init__(self, log, stream):
        self.log, self.stream = log, stream
        self.secrets = _secrets()

    def write(self, text: str) -> None:
        for s in self.secrets:
            text = text.replace(s, "***")
        self.stream.write(text)
        self.log.write(_ANSI.sub("", text))
        self.log.flush()   # the kernel writes to the same file (see _kernel_manager_class)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


def load_ipython_extension(ip) -> None:
    """Loaded into each kernel this runner starts: when a cell raises a SitError, record its class in
    $SIT_ERROR_FILE. The kernel only reports the bare class name, and torch has an OutOfMemoryError too."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return

    def record(shell, etype, value, tb, tb_offset=None):
        Path(path).write_text(json.dumps({"class": f"{etype.__module__}.{etype.__qualname__}", "message": str(value)}))
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)   # shown in the notebook as usual

    ip.set_custom_exc((SitError,), record)


def _cell_name(target: Path, exec_count: int) -> str:
    """'cell N (`first line`)', N counted in the notebook as stored: papermill's injected parameters cell and
    its error banner are not counted."""
    import nbformat

    added = {"injected-parameters", "papermill-error-cell-tag"}
    cells = [c for c in nbformat.read(str(target), as_version=4).cells
             if not added & set(c.metadata.get("tags", []))]
    n, cell = next((i, c) for i, c in enumerate(cells, 1) if c.get("execution_count") == exec_count)
    first = next((ln.strip() for ln in cell.source.splitlines() if ln.strip()), "")
    return f"cell {n} (`{first[:60]}`)"


def _failure(nb: Path, target: Path, log_path: Path, err, error_file: Path) -> Exception:
    try:
        cell = _cell_name(target, err.exec_count)
    except Exception:   # the executed copy unreadable: the kernel's count still locates the cell
        cell = f"cell [{err.exec_count}]"
    if error_file.exists():
        # the user's mistake (bad input, missing prerequisite, no memory): one line, as the notebook said it
        return PipelineError(f"{nb.name}, {cell}: {err.evalue}")
    tb = _ANSI.sub("", "\n".join(err.traceback))
    return NotebookFailed(f"{nb.name} failed in {cell}: {err.ename}: {err.evalue}\n"
                          f"executed copy: {target}\nlog: {log_path}", tb)


def _kernel_manager_class(log):
    """A kernel manager whose kernel writes its own stdout/stderr (start-up warnings, a crash) into the stage's
    log instead of the terminal, so the terminal shows only the notebook's output and our one error line."""
    from jupyter_client.manager import AsyncKernelManager

    class KernelLoggingToFile(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["stdout"] = kw["stderr"] = log
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return KernelLoggingToFile


def run_notebook(stage: str, run_dir: Path, parameters: dict, stream=None) -> Path:
    """Execute one stage's notebook into run_dir (copy + .log); raise PipelineError / NotebookFailed."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    stream = stream or sys.stdout
    nb = notebook_for(stage)
    target, log_path = run_dir / nb.name, run_dir / f"{nb.stem}.log"
    with tempfile.TemporaryDirectory(prefix="sit-kernel-") as tmp, open(log_path, "a", encoding="utf-8") as log:
        error_file = Path(tmp) / "error.json"
        os.environ[ERROR_FILE_ENV] = str(error_file)   # inherited by the kernel started below
        tee = _Tee(log, stream)
        try:
            pm.execute_notebook(str(nb), str(target), parameters=parameters, kernel_name="python3",
                                cwd=str(REPO_ROOT), progress_bar=False, log_output=False,
                                stdout_file=tee, stderr_file=tee,
                                extra_arguments=["--IPKernelApp.extensions=sitlib.pipeline"],
                                kernel_manager_class=_kernel_manager_class(log))
        except pm.PapermillExecutionError as e:
            raise _failure(nb, target, log_path, e, error_file) from None
        except DeadKernelError as e:
            # the kernel process vanished (the OS killed it for memory, or someone did): no cell error to show
            raise NotebookFailed(f"{nb.name}: the kernel died ({e}); executed copy: {target}\nlog: {log_path}",
                                 f"the kernel running {nb.name} exited without an error from a cell") from None
        finally:
            os.environ.pop(ERROR_FILE_ENV, None)
            mask_secrets_in(target)
    return target


def new_run_dir(output_dir: Path) -> Path:
    base = Path(output_dir).resolve() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while run_dir.exists():   # two runs in one second (a rerun after a quick failure) keep both copies
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def run_pipeline(stages: list[str], output_dir: Path, profile: str = "auto", config_path: Optional[str] = None,
                 params: Optional[dict] = None, log=print) -> Path:
    """Run the stages' notebooks in order while holding the output tree's lock; returns the run folder."""
    from .lock import hold

    output_dir = Path(output_dir).resolve()
    with hold(output_dir):
        run_dir = new_run_dir(output_dir)
        parameters = build_parameters(profile, output_dir, config_path, params or {})
        for stage in stages:
            log(f"[{stage}] {notebook_for(stage).name} → {run_dir}")
            t = time.perf_counter()
            run_notebook(stage, run_dir, parameters)
            log(f"[{stage}] done in {time.perf_counter() - t:.0f} s")
    return run_dir
