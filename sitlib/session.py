"""`setup()`: the set-up cell of every notebook and every CLI stage — profile, config, output tree, seeds."""
from __future__ import annotations

import importlib.metadata as md
import platform
import time
from dataclasses import dataclass
from typing import Optional

from .config import Config, load_config
from .hardware import Detection, Profile, apply_memory_limit, get_profile, set_precision
from .hub import login_status
from .runtime import OutputTree, in_colab, output_tree, seed_everything

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "papermill")


@dataclass
class Session:
    config: Config
    profile: Profile
    detection: Detection
    paths: OutputTree

    def describe(self) -> str:
        d = self.detection
        return (f"profile: {self.profile.name} ({'chosen by hand' if d.profile != self.profile.name else d.reason})\n"
                f"device: {d.device_name}" + (f", {d.memory_gb:.1f} GiB" if d.memory_gb else "") + "\n"
                f"student: {self.config.models.student} · teacher: {self.config.models.teacher}\n"
                f"{login_status()}\n"
                f"outputs: {self.paths.root}")


def setup(profile: str = "auto", output_dir: Optional[str] = None, config_path: Optional[str] = None,
          overrides: Optional[dict] = None, verbose: bool = True, models: tuple = ()) -> Session:
    """models: the roles ("student", "teacher", "reward") whose hub models this stage loads, checked up front."""
    prof, det = get_profile(profile)
    cfg = load_config(config_path, prof.overrides, overrides)
    set_precision(prof)
    apply_memory_limit(det)   # SIT_EMULATE_GPU_GB: a smaller card emulated on a larger one
    seed_everything(cfg.seed)
    session = Session(cfg, prof, det, output_tree(output_dir))
    if verbose:
        print(session.describe())
    if models:
        from .hub import require_models

        require_models(session, models)
    return session


def library_versions() -> dict:
    out = {"python": platform.python_version(), "colab": in_colab()}
    for name in LIBRARIES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_student(session: Session, prompt: str = "Give me one tip for writing clear code.",
                  max_new_tokens: int = 64) -> dict:
    """01's measured check: load the student, answer one chat message, write evaluation/metrics/setup.json."""
    from .artifacts import write_metrics
    from .generation import Sampling, chat_input_ids, generate_batch
    from .models import timed_load

    from .hub import require_models

    require_models(session)   # 01 checks every configured hub model up front, not only the student
    name = session.config.models.student
    tok, model, load_s = timed_load(name, session.profile)
    t = time.perf_counter()
    reply = generate_batch(model, tok, chat_input_ids(tok, [[{"role": "user", "content": prompt}]]),
                           Sampling.greedy(max_new_tokens))[0]
    gen_s = time.perf_counter() - t
    metrics = {
        "device": session.detection.device_name, "profile": session.profile.name,
        "profile_reason": session.detection.reason, "compute_capability": session.detection.compute_capability,
        "gpu_memory_gb": round(session.detection.memory_gb, 2), "student": name,
        "versions": library_versions(), "model_load_seconds": round(load_s, 3),
        "generation": {"prompt": prompt, "reply": reply.text, "new_tokens": reply.n_tokens,
                       "stopped_on_eos": reply.ended, "seconds": round(gen_s, 3),
                       "tokens_per_second": round(reply.n_tokens / gen_s, 2) if gen_s else None},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_metrics(session.paths.evaluation_metrics / "setup.json", metrics, session.config)
    return metrics
