"""Throughput of mp.quantize against torch's native round trip ``x.to(dtype).to(float32)``.

For each format torch has as a dtype, three ways to put 16M float32 values onto the format's grid,
timed side by side in one run (best of N, after a warm-up):

* native:   ``x.to(dtype).to(torch.float32)`` (torch's cast),
* general:  ``mixprec.quantize.quantize_bits`` (integer/float arithmetic, no native cast: any format),
* quantize: ``mp.quantize`` with nearest rounding (uses the native cast as a fast path when it exists).

Goal: general >= 0.5x native throughput; quantize == native.
Writes benchmarks/results/quantize.json with device, torch version, commit and date.

    python benchmarks/bench_quantize.py [--elements 16777216] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mixprec as mp
from mixprec.harness.environment import environment
from mixprec.quantize import quantize_bits
from mixprec.report import write_json


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=16 * 2**20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantize.json")
    args = parser.parse_args()

    x = torch.randn(args.elements, generator=torch.Generator().manual_seed(0)) * 100
    rows = []
    for fmt in (mp.F16, mp.BF16, mp.E4M3, mp.E5M2):
        dtype = fmt.torch_dtype
        native = best_time(lambda: x.to(dtype).to(torch.float32), args.repeats)  # noqa: B023
        general = best_time(lambda: quantize_bits(x, fmt), args.repeats)  # noqa: B023
        public = best_time(lambda: mp.quantize(x, fmt), args.repeats)  # noqa: B023
        stochastic = best_time(lambda: quantize_bits(x, fmt, "stochastic"), args.repeats)  # noqa: B023
        mega = args.elements / 1e6
        row = {
            "format": fmt.name,
            "native_ms": round(native * 1e3, 2),
            "general_ms": round(general * 1e3, 2),
            "quantize_ms": round(public * 1e3, 2),
            "stochastic_ms": round(stochastic * 1e3, 2),
            "native_melem_per_s": round(mega / native, 1),
            "general_melem_per_s": round(mega / general, 1),
            "general_over_native_throughput": round(native / general, 3),
            "quantize_over_native_throughput": round(native / public, 3),
        }
        rows.append(row)
        print(
            f"{fmt.name:5s} native {row['native_ms']:7.1f} ms | general {row['general_ms']:7.1f} ms "
            f"({row['general_over_native_throughput']:.2f}x native throughput) | quantize "
            f"{row['quantize_ms']:7.1f} ms ({row['quantize_over_native_throughput']:.2f}x) | stochastic "
            f"{row['stochastic_ms']:7.1f} ms"
        )
    result = {
        "benchmark": "quantize throughput vs native cast round trip",
        "elements": args.elements,
        "repeats": args.repeats,
        "timing": "best of repeats, after one warm-up",
        **environment("cpu"),
        "results": rows,
        "goal": "general >= 0.5x native throughput; quantize (nearest, fast path) == native",
    }
    write_json(args.out, result)  # atomic, strict JSON: the writer the reports use
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
