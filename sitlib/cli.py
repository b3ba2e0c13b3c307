"""`python -m sitlib <stage>`: the same functions the notebooks call, from a shell."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

from .config import ConfigError, parse_value

# CLI stage → (module, function taking a Session and returning its metrics dict)
STAGE_FUNCTIONS = {
    "setup": ("sitlib.session", "check_student"),
    "generate": ("sitlib.magpie", "run_magpie"),
    "preference": ("sitlib.preference", "run_preference"),
    "sft": ("sitlib.training", "train_sft"),
    "prompt-tuning": ("sitlib.training", "train_prompt_tuning"),
    "dpo": ("sitlib.training", "train_dpo"),
    "benchmark": ("sitlib.benchmark", "run_benchmark"),
    "agent-eval": ("sitlib.agent", "run_agent_eval"),
    "compare": ("sitlib.comparison", "run_comparison"),
}
# errors that are the user's input, not a bug: one line, no traceback
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, RuntimeError)  # PipelineError is a RuntimeError


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), parse_value(v)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="auto", help="auto | cpu | t4 | a100 | h100")
    p.add_argument("--output-dir", default=None, help="output tree (default: SIT_OUTPUT_DIR, Drive on Colab, ./outputs)")
    p.add_argument("--config", default=None, help="config JSON (default: the repo's config.json)")
    p.add_argument("-p", "--param", action="append", type=_kv, default=[],
                   help="dotted config key or notebook parameter, e.g. -p sft.epochs=1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sitlib", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="run the notebook series with papermill")
    _common(p)
    p.add_argument("--stages", default=None, help="comma list, e.g. 01,02,03 (default: all)")
    p = sub.add_parser("filter", help="quality-filter a JSONL of instruction/response rows (default: 03's files)")
    _common(p)
    p.add_argument("--input", default=None, help="any JSONL; without it, 03 runs on the output tree")
    p.add_argument("--output", default=None)
    p.add_argument("--stats", default=None)
    p.add_argument("--rejected", default=None, help="also write rejected rows with their reasons")
    p.add_argument("--skip-bad-rows", action="store_true", help="report bad lines and go on instead of failing")
    for name in STAGE_FUNCTIONS:
        p = sub.add_parser(name, help=f"run stage '{name}'")
        _common(p)
    return ap


def _session(args):
    from .session import setup

    overrides = {k: v for k, v in args.param if "." in k}
    return setup(args.profile, args.output_dir, args.config, overrides, verbose=False)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pipeline":
            from .pipeline import parse_stages, run_pipeline
            from .runtime import resolve_output_dir

            from .config import load_config
            load_config(args.config, None, {k: v for k, v in args.param if "." in k})  # fail before writing
            run_dir = run_pipeline(parse_stages(args.stages), resolve_output_dir(args.output_dir), args.profile,
                                   args.config, dict(args.param))
            print(f"executed notebooks: {run_dir}")
            return 0
        if args.command == "filter" and args.input is None:
            from .filtering import run_filter

            print(json.dumps(run_filter(_session(args)), indent=2))
            return 0
        if args.command == "filter":
            if not args.output:
                raise ValueError("--output is required with --input")
            from .filtering import filter_file
            from .config import load_config

            cfg = load_config(args.config, None, {k: v for k, v in args.param if "." in k})
            stats = filter_file(Path(args.input), Path(args.output), cfg.filter,
                                Path(args.stats) if args.stats else None,
                                Path(args.rejected) if args.rejected else None, args.skip_bad_rows, cfg.seed)
            print(json.dumps(stats, indent=2))
            return 0
        module, fn = STAGE_FUNCTIONS[args.command]
        func = getattr(importlib.import_module(module), fn)
        # non-dotted -p keys are the notebook's own parameters, e.g. compare -p ALLOW_MISSING=True
        kwargs = {k.lower(): v for k, v in args.param if "." not in k}
        # only plain flags (e.g. allow_missing) may come from -p; objects like a loaded teacher may not
        accepted = {k for k, prm in inspect.signature(func).parameters.items()
                    if k != "session" and isinstance(prm.default, bool)}
        if set(kwargs) - accepted:
            raise ValueError(f"stage '{args.command}' takes no parameter(s) "
                             f"{', '.join(k.upper() for k in set(kwargs) - accepted)}")
        result = func(_session(args), **kwargs)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main() -> None:
    sys.exit(run())
