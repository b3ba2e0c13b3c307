"""Where the GPU waits for the host: the idle time between kernels in a torch.profiler chrome trace (recorded with
with_stack=True), summed by the Python frames that the thread launching the kernel after each gap was in at the
middle of the gap (the main thread, or autograd's inside a backward).

A step whose wall time is well above its kernels' time is bound by its host part; this names that part (a sync
for a metric, a Python loop over modules, the data collator) instead of guessing. The profiler's own per-op cost
makes the host slower than without it, so the gaps are an upper bound; their ranking is what counts. Python frames
entered from C++ (a torch custom op's body, autograd's thread) can miss their return in the trace and then show as
callers of later frames: read the innermost frame first.

    python bench/trace_gaps.py TRACE.json [--top 25] [--kernels REGEX]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
# frames of these packages name the step's parts; torch's own frames (nn.Module.__call__ …) name nothing
OWN = ("sitlib/", "trl/", "transformers/", "peft/", "accelerate/", "liger_kernel/", "bench/", "datasets/")


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The union of the device's kernel, copy and memset intervals, in µs, sorted."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
    merged: list[list[float]] = []
    for s, t in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    return [(s, t) for s, t in merged]


def idle_gaps(busy: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    """(start, length) of the spaces between busy intervals of at least `min_us`."""
    return [(a[1], b[0] - a[1]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_us]


def frames_by_thread(events: list[dict]) -> dict:
    """Each thread's Python frames, sorted by start (outer before inner)."""
    out: dict = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "python_function":
            out[e["tid"]].append(e)
    for frames in out.values():
        frames.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    return dict(out)


def launches(events: list[dict]) -> dict:
    """correlation id -> (time, thread) of the host call that launched that device work."""
    return {e["args"]["correlation"]: (e["ts"], e["tid"]) for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}


def chains_at(threads: dict, queries: list[tuple[float, object]]) -> list[list[str]]:
    """The call chain of thread `tid` at time `t` for each (t, tid) query, in the queries' order."""
    out: list = [[] for _ in queries]
    by_tid: dict = defaultdict(list)
    for i, (t, tid) in enumerate(queries):
        by_tid[tid].append((t, i))
    for tid, items in by_tid.items():
        items.sort()
        for (_, i), chain in zip(items, stacks_at(threads.get(tid, []), [t for t, _ in items])):
            out[i] = chain
    return out


def _short(name: str) -> str:
    """'/x/site-packages/trl/trainer/dpo_trainer.py(1300): _compute_loss' -> 'trl/trainer/dpo_trainer.py(1300): …'"""
    for pkg in OWN:
        at = name.find(pkg)
        if at >= 0:
            return name[at:]
    return name


def stacks_at(frames: list[dict], times: list[float]) -> list[list[str]]:
    """A thread's Python call chain (outermost first) at each of the sorted `times`, from that thread's sorted
    frames: one sweep, since a thread's frames nest."""
    out, stack, i = [], [], 0
    for t in times:
        while i < len(frames) and frames[i]["ts"] <= t:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= frames[i]["ts"]:
                stack.pop()
            stack.append(frames[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= t:
            stack.pop()
        out.append([f["name"] for f in stack])
    return out


def attribute(chain: list[str], depth: int = 2) -> str:
    """The innermost `depth` frames of the chain that belong to the project or the libraries it drives."""
    own = [_short(n) for n in chain if any(p in n for p in OWN)]
    return " <- ".join(reversed(own[-depth:])) if own else (_short(chain[-1]) if chain else "(no Python frame)")


def kernel_sites(events: list[dict], threads: dict, pattern: str, top: int) -> list[str]:
    """Device time of the kernels whose name matches `pattern`, summed by the Python frames of the thread that
    launched them (a kernel and its launch share a correlation id; the backward's kernels come from autograd's
    thread): which line of which library makes the copies, say."""
    launched = launches(events)
    picked = [(launched[e["args"]["correlation"]], e) for e in events
              if e.get("ph") == "X" and e.get("cat") == "kernel" and re.search(pattern, e.get("name", ""))
              and e.get("args", {}).get("correlation") in launched]
    by, count = Counter(), Counter()
    for (_, e), chain in zip(picked, chains_at(threads, [at for at, _ in picked])):
        key = f"{e['name'][:40]}  @ {attribute(chain, 3)}"
        by[key] += e.get("dur", 0)
        count[key] += 1
    return [f"{by[k] / 1e3:7.1f}  {count[k]:5d}  {k}" for k, _ in by.most_common(top)]


def summary(trace: Path, top: int = 25, min_us: float = 5.0, kernels: str = "") -> str:
    events = json.loads(Path(trace).read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    busy = busy_intervals(events)
    if not busy:
        return "no device kernels in the trace\n"
    span = busy[-1][1] - busy[0][0]
    gaps = idle_gaps(busy, min_us)
    threads = frames_by_thread(events)
    main = max(threads, key=lambda tid: len(threads[tid])) if threads else None
    # a gap is charged to the thread that launched the kernel ending it (autograd's thread inside a backward)
    launched = launches(events)
    starts = {e["ts"]: e.get("args", {}).get("correlation") for e in events
              if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS}
    chains = chains_at(threads, [(s + n / 2, launched.get(starts.get(s + n), (None, main))[1]) for s, n in gaps])
    by = Counter()
    count = Counter()
    for (_, n), chain in zip(gaps, chains):
        key = attribute(chain)
        by[key] += n
        count[key] += 1
    idle = sum(n for _, n in gaps)
    lines = [f"device busy {sum(t - s for s, t in busy) / 1e3:.1f} ms of {span / 1e3:.1f} ms from first to last "
             f"kernel; idle in {len(gaps)} gaps of >= {min_us:g} us: {idle / 1e3:.1f} ms",
             "idle ms  gaps  where the launching thread was (innermost frames first)"]
    if not threads:
        lines.append("(no Python frames: record the trace with with_stack=True)")
    lines += [f"{by[k] / 1e3:7.1f}  {count[k]:5d}  {k}" for k, _ in by.most_common(top)]
    if kernels:
        lines += [f"\ndevice ms  kernels  kernels matching {kernels!r}, by the frames that launched them"]
        lines += kernel_sites(events, threads, kernels, top)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kernels", default="", help="a regex of kernel names: also their device time by launch site")
    a = ap.parse_args()
    print(summary(Path(a.trace), a.top, kernels=a.kernels), end="")


if __name__ == "__main__":
    main()
