"""Overhead of mp.watch on a training step: the same recipe, watched and not, side by side.

Two identical runs of a recipe (same seed, same batches) step in turn: one plain, one under
``mp.watch(model)`` (every module, every kind, every named format). The whole step is timed (forward,
backward, mp.step); the watched run's statistics are read once at the end (its one sync). The runs
must stay bitwise equal (watch only reads): the script checks the final weights and says so.

Usage:
    python benchmarks/bench_watch.py [--recipes lm,digits] [--policy f16-master] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench_emulation import Run  # the same timed step (benchmarks/ is on the path when run as a script)
from mixprec.harness.environment import environment
from mixprec.report import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="lm,digits")
    parser.add_argument("--policy", default="f16-master")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/watch.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.recipes.split(","):
        plain, watched = Run(name, args.policy, False), Run(name, args.policy, True)
        for i in range(args.warmup + args.steps):
            for run in (plain, watched):
                run.step(timed=i >= args.warmup)
        tick = time.perf_counter()
        stats = watched.watch.stats()
        read_ms = (time.perf_counter() - tick) * 1e3
        equal = all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), watched.model.parameters(),
                                                      strict=True))
        p, w = statistics.median(plain.times), statistics.median(watched.times)
        results[name] = {"plain_ms_median": round(p * 1e3, 2), "watched_ms_median": round(w * 1e3, 2),
                         "overhead": round(w / p, 3), "stats_read_ms": round(read_ms, 1),
                         "watched_tensors": len(stats), "weights_bitwise_equal": equal}
        print(f"{name:7s} plain {p * 1e3:7.2f} ms  watched {w * 1e3:7.2f} ms  {w / p:.2f}x  "
              f"({len(stats)} module/kind entries, read in {read_ms:.1f} ms; weights equal: {equal})")
    record = {"benchmark": "watch", **environment("cpu", torch.get_num_threads()), "policy": args.policy,
              "timed": f"forward + backward + mp.step, median of {args.steps} steps after {args.warmup}, "
                       "plain and watched runs interleaved",
              "watched": "every module, every kind, every named format", "results": results}
    out = Path(args.out)
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
