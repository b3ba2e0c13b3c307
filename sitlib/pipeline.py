"""Run the notebook series in order with papermill; executed copies go to runs/<timestamp>/."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .config import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
STAGES = ["01", "02", "03", "04", "05", "05b", "06", "07", "08", "09"]


class PipelineError(RuntimeError):
    pass


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


def build_parameters(profile: str, output_dir: Path, config_path: Optional[str], params: dict) -> dict:
    """UPPER_CASE keys are notebook parameters; dotted keys (sft.epochs=1) become config OVERRIDES."""
    out = {"PROFILE": profile, "OUTPUT_DIR": str(output_dir), "OVERRIDES": {}}
    if config_path:
        out["CONFIG_PATH"] = str(Path(config_path).resolve())
    for key, value in params.items():
        if "." in key:
            out["OVERRIDES"][key] = value
        else:
            out[key] = value
    return out


def run_pipeline(stages: list[str], output_dir: Path, profile: str = "auto", config_path: Optional[str] = None,
                 params: Optional[dict] = None, log=print) -> Path:
    import papermill as pm

    output_dir = Path(output_dir).resolve()
    run_dir = output_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = build_parameters(profile, output_dir, config_path, params or {})
    for stage in stages:
        nb = notebook_for(stage)
        target = run_dir / nb.name
        log(f"[{stage}] {nb.name} → {target}")
        t = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(target), parameters=parameters, kernel_name="python3",
                                cwd=str(REPO_ROOT), progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as e:
            raise PipelineError(f"{nb.name} failed in cell {e.exec_count} (code cell index {e.cell_index}): "
                                f"{e.ename}: {e.evalue}\nexecuted copy: {target}") from None
        log(f"[{stage}] done in {time.perf_counter() - t:.0f} s")
    return run_dir
