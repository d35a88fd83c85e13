"""`mixprec bench`: training speed and memory under mixprec policies and torch's own baselines, side by side.

    mixprec bench --recipe gpt --policies fp32,amp-bf16,f32,f16-master --steps 20
    mixprec bench --recipe gpt2-small --device cuda --compile --out benchmarks/results/bench_h200.json

Prints a table (or JSON) of what `mixprec.harness.benchmark.benchmark` measures: per policy the forward,
backward and step times, throughput, memory and (CUDA) MFU, next to FP32 and torch.amp run in the same
process. docs/performance.md has the commands for a CPU and an H100/H200, and the figures measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixprec.harness.benchmark import BASELINES, DEFAULT_POLICIES, benchmark, check_batch_size, check_fused, parse_runs
from mixprec.harness.checkpoints import check_writable
from mixprec.recipes import RECIPES, get_recipe
from mixprec.report import clean_json, format_bytes, render, write_json

from . import device_name, non_negative_int, positive_int, seed_int
from .train import default_device

HELP = "Time training steps (forward, backward, step), throughput, peak memory and MFU: policies vs FP32 and torch.amp."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="gpt",
                        help=f"a built-in ({', '.join(RECIPES)}) or module.path:object (default gpt; "
                             "gpt2-small for GPT-2 small's shapes on a GPU)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated mixprec policies and torch baselines ({', '.join(BASELINES)}); "
                             f"key=value parts belong to the policy before them, and ; also separates "
                             f"(default {DEFAULT_POLICIES})")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per policy (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed steps per policy first (default 3; compilation happens here)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the recipe's")
    parser.add_argument("--compile", action="store_true", help="torch.compile every policy's model")
    parser.add_argument("--fused", action="store_true",
                        help="fused optimizers on every side: torch.amp's GradScaler and mixprec's "
                             "mp.step(sync=False) then never wait for the device")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1; on a busy machine more threads mostly wait on each other)")
    parser.add_argument("--seed", type=seed_int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", type=Path, default=None, help="also write the results JSON to this file")


# ----- reporting ----------------------------------------------------------------------------------------


def results_table(result: dict[str, Any]) -> str:
    """The runs as an 80-column text table: medians, throughput against the first run, memory, MFU (CUDA)."""
    from rich import box
    from rich.table import Table

    bench, env = result["benchmark"], result["environment"]
    cuda = env["device"].startswith("cuda")
    tokens = bench["tokens_per_sample"] is not None
    first = result["runs"][0]["policy"]
    title = (f"{bench['recipe']}, batch {bench['batch_size']}, {bench['steps']} steps "
             f"({bench['warmup']} warm-up){', compiled' if bench['compile'] else ''}"
             f"{', fused' if bench['fused'] else ''}, on {env['device']} "
             f"({env['device_name']}), torch {env['torch']}; medians, * emulated")
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left",
                  collapse_padding=True, pad_edge=False)
    headers = ["policy", "fwd ms", "bwd ms", "step ms", "total ms", "tok/s" if tokens else "samples/s",
               f"x {first}", *(("peak", "MFU") if cuda else ("held", "formats"))]
    for header in headers:
        table.add_column(header, justify="left" if header == "policy" else "right", no_wrap=header != "policy",
                         overflow="fold")
    for row in result["runs"]:
        rate = row["tokens_per_s"] if tokens else row["samples_per_s"]
        memory = [format_bytes(row["peak_memory_bytes"]),
                  f"{100 * row['mfu']:.0f}%" if row["mfu"] is not None else "-"] if cuda else [
                  format_bytes(sum(row["memory_held"].values())), format_bytes(sum(row["memory_formats"].values()))]
        table.add_row(
            row["policy"] + ("*" if row["execution"].startswith("emulated") else ""),
            f"{row['forward_ms']:.1f}", f"{row['backward_ms']:.1f}", f"{row['step_ms']:.1f}",
            f"{row['total_ms']:.1f}", f"{rate:,.0f}", f"{row['throughput_vs'].get(first, 1.0):.2f}", *memory,
        )
    return render(table).rstrip("\n")


def run(args: argparse.Namespace) -> int:
    # Everything is checked before anything is built: a typo costs a second.
    recipe = get_recipe(args.recipe)
    device = default_device(args.device)
    specs = parse_runs(args.policies, device)
    if args.fused:
        check_fused(recipe)
    if args.out is not None:
        if args.out.is_dir():
            raise ValueError(f"--out {str(args.out)!r} is a folder; give a file name, e.g. {args.out / 'bench.json'}")
        check_writable(args.out.parent)
    data = recipe.make_data()
    check_batch_size(recipe, data, args.batch_size or recipe.batch_size)
    if not args.json:
        print(f"mixprec bench: {recipe.name} under {', '.join(name for name, _ in specs)} on {device}, "
              f"{args.warmup} + {args.steps} steps each, interleaved", flush=True)
    result = benchmark(recipe, specs, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                       compile=args.compile, fused=args.fused, device=device, threads=args.threads,
                       seed=args.seed, data=data)
    if args.out is not None:
        write_json(args.out, result)
    if args.json:
        print(json.dumps(clean_json(result), indent=2))
        return 0
    print(results_table(result))
    for row in result["runs"]:
        if row["note"]:
            print(f"  {row['policy']}: {row['note']}")
    if not device.startswith("cuda"):
        print(f"  held / formats: bytes counted by mp.memory (parameters, masters, gradients, optimizer state, "
              f"one forward's activations) as held and in the policy's formats; {device} has no allocator "
              "peak, and MFU is measured on CUDA only")
    for goal in result["goals"]:
        print(f"  goal {goal['goal']}: {goal['value']:.3g} {'met' if goal['met'] else 'NOT met'}")
    if args.out is not None:
        print(f"results: {args.out}")
    return 0
