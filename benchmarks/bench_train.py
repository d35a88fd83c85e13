"""Training speed and memory under mixprec policies and torch's own baselines, side by side, recorded.

The code of `mixprec bench` (mixprec/harness/benchmark.py), with defaults for a recorded run: the results JSON
(device, torch version, commit, date, and per policy the forward/backward/step medians, throughput,
peak memory, MFU on CUDA, ratios and the GPU goals) goes to benchmarks/results/ unless --out says
otherwise, and the table is printed. Every option of `mixprec bench` works here.

Usage:
    python benchmarks/bench_train.py                  # CPU: recipe gpt -> results/bench_cpu.json
    python benchmarks/bench_train.py --device cuda    # GPU: recipe gpt2-small -> results/bench_cuda.json
    python benchmarks/bench_train.py --device cuda --compile   # -> results/bench_cuda_compiled.json
    python benchmarks/bench_train.py --device cuda --fused     # -> results/bench_cuda_fused.json

docs/performance.md has the commands for an H100/H200 and the table measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mixprec.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


def defaults(argv: list[str]) -> list[str]:
    """``argv`` with the recorded run's defaults added: on CUDA the GPT-2 small recipe, and an --out
    under benchmarks/results/ named after the device type (and ``_compiled`` with --compile, ``_fused``
    with --fused)."""
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--device", default=None)
    known.add_argument("--recipe", default=None)
    known.add_argument("--out", default=None)
    known.add_argument("--compile", action="store_true")
    known.add_argument("--fused", action="store_true")
    known.add_argument("-h", "--help", action="store_true")
    args, _ = known.parse_known_args(argv)
    if args.help:
        return argv
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    extra = []
    if args.device is None:
        extra += ["--device", device]
    if args.recipe is None:
        extra += ["--recipe", "gpt2-small" if cuda else "gpt"]
    if args.out is None:
        name = (f"bench_{'cuda' if cuda else device.split(':')[0]}{'_compiled' if args.compile else ''}"
                f"{'_fused' if args.fused else ''}.json")
        extra += ["--out", str(RESULTS / name)]
    return [*argv, *extra]


if __name__ == "__main__":
    sys.exit(main(["bench", *defaults(sys.argv[1:])]))
