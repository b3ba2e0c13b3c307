"""`python -m sitlib <stage>`: run a stage's notebook with papermill (the notebook is the one orchestration);
`python -m sitlib filter --input … --output …`: the quality filter as a tool for any JSONL."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, load_config, parse_value
from .errors import BadInputError, MissingInputError, SitError

# CLI name → stage (the notebook numbered so); the number itself works too, e.g. `python -m sitlib 05`
STAGE_NAMES = {
    "setup": "01", "generate": "02", "preference": "04", "sft": "05", "prompt-tuning": "05b", "dpo": "06",
    "benchmark": "07", "agent-eval": "08", "compare": "09",
}
# the user's mistakes: one line, exit 2. Anything else (a bug here, in torch or TRL) keeps its traceback.
USER_ERRORS = (SitError,)


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), parse_value(v)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="auto", help="auto | cpu | t4 | l4 | a100 | a100-40gb | a100-80gb | h100")
    p.add_argument("--output-dir", default=None,
                   help="output tree (default: SIT_OUTPUT_DIR, Drive on Colab, ./outputs)")
    p.add_argument("--config", default=None, help="config JSON (default: the repo's config.json)")
    p.add_argument("-p", "--param", action="append", type=_kv, default=[],
                   help="config key (-p sft.epochs=1, -p seed=7) or UPPER_CASE notebook parameter (-p MAX_STEPS=4)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sitlib", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="run the notebook series with papermill")
    _common(p)
    p.add_argument("--stages", default=None, help="comma list, e.g. 01,02,03 (default: all)")
    p = sub.add_parser("filter", aliases=["03"],
                       help="quality-filter any JSONL of instruction/response rows (without --input: notebook 03)")
    _common(p)
    p.set_defaults(stage="03")
    p.add_argument("--input", default=None, help="any JSONL; without it, notebook 03 runs on the output tree")
    p.add_argument("--output", default=None)
    p.add_argument("--stats", default=None)
    p.add_argument("--rejected", default=None, help="also write rejected rows with their reasons")
    p.add_argument("--skip-bad-rows", action="store_true", help="report bad lines and go on instead of failing")
    for name, stage in STAGE_NAMES.items():
        p = sub.add_parser(name, aliases=[stage], help=f"run notebook {stage} with papermill")
        _common(p)
        p.set_defaults(stage=stage)
    return ap


def check_params(params: list[tuple[str, object]]) -> None:
    for key, _ in params:
        if not key.islower() and not key.isupper():
            raise ConfigError(f"-p {key}: expected a lower-case config key (seed=7, sft.epochs=1) or an UPPER_CASE "
                              "notebook parameter (MAX_STEPS=4)")


def validate(args) -> object:
    """Everything the user handed in, checked before anything is written (one line on a mistake)."""
    from . import hardware

    check_params(args.param)
    known = [*hardware.PROFILES, *getattr(hardware, "ALIASES", ())]
    if args.profile != "auto" and args.profile not in known:
        raise ConfigError(f"--profile {args.profile!r}: expected auto or one of {', '.join(known)}")
    prof = hardware.PROFILES.get(args.profile)
    return load_config(args.config, prof.overrides if prof else None, {k: v for k, v in args.param if k.islower()})


def check_writable(folder: Path, what: str = "output directory") -> None:
    """Create `folder` and a file in it, or fail in one line (read-only mount, Drive not mounted, a file there)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sit-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {folder} is not writable ({e.strerror}); choose another with --output-dir "
                          "or SIT_OUTPUT_DIR") from None


def check_notebook_params(stages: list[str], params: list[tuple[str, object]]) -> None:
    """UPPER_CASE -p keys must be parameters of a notebook that runs (papermill would only warn)."""
    import papermill as pm

    from .pipeline import notebook_for

    upper = [k for k, _ in params if k.isupper()]
    if not upper:
        return
    names = set()
    for stage in stages:
        names |= set(pm.inspect_notebook(str(notebook_for(stage))))
    for key in upper:
        if key not in names:
            raise ConfigError(f"-p {key}: not a parameter of notebook(s) {', '.join(stages)} "
                              f"(parameters: {', '.join(sorted(names))})")


def run_stages(args, stages: list[str]) -> int:
    from .pipeline import run_pipeline, series_order
    from .runtime import resolve_output_dir

    stages = series_order(stages, validate(args).preference.candidate_source)
    check_notebook_params(stages, args.param)
    out = resolve_output_dir(args.output_dir)
    check_writable(out)
    # under `accelerate launch` every process runs the training notebooks; rank 0 alone locks and writes runs/
    from .distributed import run_stages_on_world, world

    runner = run_stages_on_world if world().is_distributed else run_pipeline
    run_dir = runner(stages, out, args.profile, args.config, dict(args.param))
    print(f"executed notebooks and logs: {run_dir}")
    return 0


def filter_jsonl(args) -> int:
    """The filter as a plain function over any JSONL: nothing is written unless every row is readable."""
    from .artifacts import jsonl_lines, parse_jsonl_line, write_json, write_jsonl
    from .filtering import filter_rows, row_texts, strip_added

    cfg = validate(args)
    inp = Path(args.input)
    if not args.output:
        raise ConfigError("--output is required with --input")
    if not inp.is_file():
        raise MissingInputError(f"input not found: {inp}")
    rows, problems = [], []
    for n, line in jsonl_lines(inp):
        try:
            row = parse_jsonl_line(inp, n, line)
            try:
                row_texts(row)
            except (KeyError, TypeError) as e:
                # row_texts says what it needs (instruction/response or prompt/completion)
                raise BadInputError(f"{inp}:{n}: {e.args[0] if e.args else e}") from None
            rows.append(row)
        except BadInputError as e:
            if not args.skip_bad_rows:
                raise
            problems.append(str(e))
    if not rows:
        raise BadInputError(f"{inp}: no rows (expected JSON Lines: one {{\"instruction\": ..., \"response\": ...}} "
                            "object per line)")
    extra = [Path(p) for p in (args.output, args.stats, args.rejected) if p]
    for folder in {p.resolve().parent for p in extra}:
        check_writable(folder, "folder")
    kept, rejected, stats = filter_rows(rows, cfg.filter)
    if problems:
        stats["reasons"]["bad_row"] = len(problems)
        stats["bad_rows"] = problems
    write_jsonl(args.output, [strip_added(r) for r in kept])
    if args.rejected:
        write_jsonl(args.rejected, rejected)
    if args.stats:
        write_json(args.stats, stats)
    print(json.dumps(stats, indent=2))
    return 0


def run(argv: list[str] | None = None) -> int:
    from .pipeline import NotebookFailed, parse_stages

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "input", None) is not None:
            return filter_jsonl(args)
        if args.command == "pipeline":
            return run_stages(args, parse_stages(args.stages))
        return run_stages(args, [args.stage])
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NotebookFailed as e:
        # not the user's mistake: the notebook's own traceback, then where the copy and the log are
        print(e.traceback, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1


def main() -> None:
    sys.exit(run())
