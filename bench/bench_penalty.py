"""02 with and without a repetition penalty: the embedded teacher (SmolLM2-135M) writes the same Magpie rows under
each penalty (same seed, 02's lengths on the 80 GB profiles: instructions up to 256 tokens, answers up to 384, no
system prompt, half the rows constrained and answered 4 times), then 03's rules say why rows would be dropped, and
the model's own loss on the kept answers says how unlikely they are to it (where SFT on them starts).

    python bench/bench_penalty.py [--rows 64] [--penalties 1.0,1.2] [--out bench/results]

Writes <out>/repetition_penalty_<device>.json: {"device", "rows", "settings", "penalties": {P: {"kept",
"kept_answer_loss", "reasons", "constrained_rows_with_a_passing_answer", "constraint_samples_passed",
"constraint_samples_total", "instruction_complete_rate", "response_complete_rate", "seconds"}}}. Runs on the CPU
(6-7 min per penalty at 64 rows on 2 cores) or a GPU.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SETTINGS = {"generation.system_prompt": None, "generation.instruction_max_new_tokens": 256,
            "generation.response_max_new_tokens": 384, "generation.batch_size": 64, "generation.chunk_size": 64,
            "generation.constraint_share": 0.5, "generation.constraint_samples": 4}


def answer_nll(model, tok, rows: list[dict]) -> float:
    """Mean loss per answer token of the kept rows under the model itself, as SFT computes it (05's tokenization):
    what a student that is also the teacher starts its training from."""
    import torch

    from sitlib import filtering, training

    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            inst, resp = filtering.row_texts(r)
            ex = training.tokenize_sft(tok, {"prompt": [{"role": "user", "content": inst}],
                                             "completion": [{"role": "assistant", "content": resp}]}, 1024)
            labels = [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])]
            n = sum(ex["completion_mask"][1:])   # transformers' loss: the mean over the shifted answer tokens
            loss = model(input_ids=torch.tensor([ex["input_ids"]], device=model.device),
                         labels=torch.tensor([labels], device=model.device)).loss
            total, count = total + float(loss) * n, count + n
    return round(total / count, 4) if count else None


def one(model, tok, profile, rows: int, penalty: float, work: Path) -> dict:
    from sitlib import filtering, magpie
    from sitlib.artifacts import read_jsonl
    from sitlib.config import load_config

    cfg = load_config(None, profile.overrides, {**SETTINGS, "generation.num_instructions": rows,
                                                "generation.repetition_penalty": penalty})
    out = work / f"rows_{penalty}.jsonl"
    t = time.perf_counter()
    m = magpie.run_generation(model, tok, cfg.generation, out, work / f"metrics_{penalty}.json", "embedded", seed=42)
    made = read_jsonl(out)
    reasons = [filtering.rule_reasons(r, cfg.filter) for r in made]
    kept = [r for r, why in zip(made, reasons) if not why]
    return {"kept": len(kept), "kept_answer_loss": answer_nll(model, tok, kept),
            "reasons": dict(collections.Counter(x for r in reasons for x in r).most_common()),
            **{k: m.get(k) for k in ("constrained_rows_with_a_passing_answer", "constraint_samples_passed",
                                     "constraint_samples_total", "instruction_complete_rate",
                                     "response_complete_rate")},
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--penalties", default="1.0,1.2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    import common
    from sitlib import hardware, models
    from sitlib.artifacts import write_json

    profile = hardware.PROFILES["cpu" if common.device_name() == "cpu" else "h100"]
    tok, model = models.load_tokenizer("embedded"), models.load_model("embedded", profile)
    work = Path(tempfile.mkdtemp(prefix="sit-penalty-"))
    res = {}
    for p in (float(x) for x in a.penalties.split(",")):
        res[str(p)] = one(model, tok, profile, a.rows, p, work)
        print(p, res[str(p)], flush=True)
    name = "".join(c if c.isalnum() else "_" for c in common.device_name()).strip("_")
    path = write_json(Path(a.out) / f"repetition_penalty_{name}.json",
                      {"device": common.device_name(), "rows": a.rows, "settings": SETTINGS, "penalties": res})
    print(path)


if __name__ == "__main__":
    main()
