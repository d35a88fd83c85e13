"""Training speed and memory under mixprec policies and torch's own baselines, side by side: the harness
behind `mixprec bench` and benchmarks/bench_train.py.

Every policy trains the recipe's model from the same initial weights on the same batches, in one
process, interleaved step by step (each timed step runs every policy once, starting from a different
one each time), so drift in the machine hits all of them alike. Per policy: the median time of the
forward pass, the backward pass and the optimizer step (unscale, check, clip, update, zero_grad);
throughput in samples/s (and tokens/s for token recipes); peak memory; and on CUDA the model FLOPs
utilisation (FLOPs of a forward+backward, counted by torch.utils.flop_counter, per second, over the
rate of a large bf16 matmul timed in the same run).

Policy names: any mixprec policy (``f16-master``, ``bf16-master,execution=native``, ...), run through
the README loop (mp.prepare, mp.autocast, scaler.scale(loss).backward(), mp.step), and these torch
baselines, written with torch's own API (`BASELINES`):

* ``fp32``: FP32, TF32 off (strict FP32 matmuls and convolutions);
* ``fp32-tf32``: FP32 with TF32 matmuls and convolutions (a CUDA mode: on a CPU it is fp32);
* ``amp-fp16``: torch.autocast(float16) + torch.amp.GradScaler, FP32 weights;
* ``amp-bf16``: torch.autocast(bfloat16), FP32 weights, no scaler.

Timing: on CUDA with CUDA events around each phase (a step ends with a synchronize); on a CPU with
time.perf_counter. TF32 settings change only for the fp32 baselines' steps, inside a context that
restores them. Peak memory on CUDA: the allocator's peak during each of a policy's steps over what the
other policies hold, plus what it holds itself (so policies that live side by side are measured as if
alone). A CPU has no allocator statistics: there the bytes `mp.memory` counts stand in (parameters,
masters, gradients, optimizer state, one forward's activations); the JSON has its categories everywhere.

The runs themselves (the baselines, the policies, `parse_runs` and `build`) are `mixprec.harness.bench_runs`'s;
this module times and summarises them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import mixprec as mp
from mixprec.harness.bench_runs import (
    BASELINES,
    MixprecRun,
    Run,
    Spec,
    TorchRun,
    build,
    check_fused,
    fused_optimizer,
    parse_runs,
    tf32,
)
from mixprec.harness.determinism import torch_threads
from mixprec.harness.environment import environment
from mixprec.recipes import Batch, Data, Recipe, get_recipe

#: what runs lives in `bench_runs` (re-exported here for the CLI and the tests); the measuring is here
__all__ = ["BASELINES", "DEFAULT_POLICIES", "GOALS", "MATMUL_SIZE", "Clock", "MixprecRun", "Run", "Spec",
           "TorchRun", "add_ratios", "benchmark", "bf16_matmul_tflops", "build", "check_batch_size", "check_fused",
           "count_flops", "fused_optimizer", "goals", "parse_runs", "run_step", "summarize_run", "tf32"]

DEFAULT_POLICIES = "fp32,fp32-tf32,amp-fp16,amp-bf16,f16-master,bf16-master"
MATMUL_SIZE = 8192  # the bf16 matmul whose rate is the MFU's denominator: n x n x n, 1.1 TFLOP


class Clock:
    """Marks on the device's timeline: CUDA events on CUDA, time.perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, marks: list[Any]) -> list[float]:
        """Seconds between consecutive marks. On CUDA this waits for the last mark (syncs: yes)."""
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(marks[:-1], marks[1:], strict=True)]
        return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def run_step(run: Run, batch: Batch, clock: Clock, timed: bool) -> None:
    """One training step of ``run``: forward, backward, step, each between two marks.

    On CUDA the memory it holds and the peak it reaches are tracked from the allocator (syncs: yes)."""
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(run.device)
        start_bytes = torch.cuda.memory_allocated(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
    with run.settings():
        marks = [clock.mark()]
        loss = run.forward(batch)
        marks.append(clock.mark())
        run.backward(loss)
        marks.append(clock.mark())
        run.step()
        marks.append(clock.mark())
    seconds = clock.seconds(marks)
    run.after_step()
    if cuda:
        # What others hold is start_bytes - held_bytes; this run alone would have peaked at that much less.
        peak = torch.cuda.max_memory_allocated(run.device) - start_bytes
        run.peak_bytes = max(run.peak_bytes, run.held_bytes + peak)
        run.held_bytes += torch.cuda.memory_allocated(run.device) - start_bytes
    if timed:
        for phase, value in zip(("forward", "backward", "step"), seconds, strict=True):
            run.times[phase].append(value)
    run.last_loss = loss.detach()


def bf16_matmul_tflops(device: torch.device, n: int = MATMUL_SIZE, repeats: int = 20) -> float:
    """The rate of an n x n x n bfloat16 matmul on ``device`` in TFLOP/s: median of ``repeats`` timed with
    CUDA events after 3 warm-ups, on random data (zeros run faster than real data)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b, c
    return 2 * n**3 / statistics.median(times) / 1e12


def count_flops(recipe: Recipe, batch: Batch) -> int | None:
    """FLOPs of one forward + backward of the recipe's loss on ``batch`` (matmuls, convolutions, attention:
    what torch.utils.flop_counter counts), on the meta device: nothing is allocated or computed.
    None where the recipe's model or loss cannot run on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = recipe.make_model()
        with FlopCounterMode(display=False) as counter:
            recipe.loss(model, tuple(t.to("meta") for t in batch)).backward()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return int(counter.get_total_flops())


def benchmark(recipe: Recipe | str, policies: str | list[Spec], *, steps: int = 20, warmup: int = 3,
              batch_size: int | None = None, compile: bool = False, device: str | torch.device = "cpu",
              threads: int | None = 1, seed: int = 0, data: Data | None = None, fused: bool = False) -> dict[str, Any]:
    """Train ``recipe`` under every policy side by side and return the results (JSON-ready).

    ``policies``: a --policies string or `parse_runs`'s list; ``data``: the recipe's, if already made;
    ``fused``: every run with the recipe's optimizer built with fused=True, the path on which torch.amp's
    GradScaler and mp.step(sync=False) never wait for the device.

    Example:
        >>> result = benchmark("gpt", "fp32,f32", steps=2, warmup=1, batch_size=2)
        >>> [r["policy"] for r in result["runs"]], result["runs"][0]["forward_ms"] > 0
        (['fp32', 'f32'], True)
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    device = torch.device(device)
    specs = parse_runs(policies, str(device)) if isinstance(policies, str) else policies
    batch_size = batch_size or recipe.batch_size
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if fused:
        check_fused(recipe)
    data = recipe.make_data() if data is None else data
    check_batch_size(recipe, data, batch_size)
    tokens_per_sample = data.info.get("block_size")  # token recipes: windows of block_size predictions
    # The batches are built before any timing and are the same for every policy: step k uses batch k.
    batches = [data.batch(k, batch_size, seed) for k in range(warmup + steps)]
    flops = count_flops(recipe, batches[0])
    batches = [tuple(t.to(device) for t in batch) for batch in batches]
    clock = Clock(device)
    started = time.perf_counter()
    with torch_threads(threads):
        matmul_tflops = bf16_matmul_tflops(device) if device.type == "cuda" else None
        runs = [build(spec, recipe, device, compile, seed, fused) for spec in specs]
        for k in range(warmup + steps):
            # Interleaved, and each step starts from another policy: drift hits all of them alike.
            order = runs[k % len(runs):] + runs[:k % len(runs)]
            for run in order:
                run_step(run, batches[k], clock, timed=k >= warmup)
        seconds = time.perf_counter() - started
        memory = [run.count_memory(batches[-1]) for run in runs]  # after the timing: it resets CUDA's peak
    results = [summarize_run(run, report, batch_size, tokens_per_sample, flops, matmul_tflops)
               for run, report in zip(runs, memory, strict=True)]
    add_ratios(results)
    return {
        "environment": environment(device, threads),
        "benchmark": {
            "recipe": recipe.name, "description": recipe.description, "batch_size": batch_size,
            "tokens_per_sample": tokens_per_sample, "steps": steps, "warmup": warmup, "compile": compile,
            "fused": fused, "seed": seed, "parameters": sum(p.numel() for p in _parameters(runs[0])),
            "model_flops_per_step": flops,
            "flops_counted_by": "torch.utils.flop_counter on one forward+backward (matmuls, convolutions, attention)",
            "bf16_matmul_tflops": matmul_tflops,
            "bf16_matmul": f"{MATMUL_SIZE}^3, median of 20" if matmul_tflops else None,
            "timing": "CUDA events around each phase" if device.type == "cuda" else "time.perf_counter",
            "peak_memory": ("CUDA allocator: peak during a step over what the other policies hold, plus what "
                            "the policy holds" if device.type == "cuda" else
                            "mp.memory, no allocator statistics here: bytes held by parameters, masters, "
                            "gradients and optimizer state after a backward, plus one forward's saved activations"),
            "memory_by_category": "mp.memory after the timed steps: held (bytes the tensors occupy) and formats "
                                  "(bytes in the policy's formats; they differ only in emulation)",
            "interleaved": "every timed step runs each policy once, starting from a different one each time",
            "seconds": round(seconds, 2),
        },
        "runs": results,
        "goals": goals(results) if device.type == "cuda" else [],
    }


def check_batch_size(recipe: Recipe, data: Data, batch_size: int) -> None:
    if batch_size > data.train_size:
        raise ValueError(f"--batch-size {batch_size} is larger than {recipe.name}'s training set "
                         f"({data.train_size} rows)")


def _parameters(run: Run) -> list[torch.nn.Parameter]:
    model = getattr(run.model, "_orig_mod", run.model)  # torch.compile's wrapper
    return list(model.parameters())


def summarize_run(run: Run, memory: mp.MemoryReport, batch_size: int, tokens_per_sample: int | None,
                  flops: int | None, matmul_tflops: float | None) -> dict[str, Any]:
    totals = [sum(t) for t in zip(*run.times.values(), strict=True)]
    total = statistics.median(totals)
    ms = {f"{phase}_ms": 1000 * statistics.median(values) for phase, values in run.times.items()}
    cuda = run.device.type == "cuda"
    return {
        "policy": run.name, "kind": run.kind, "description": run.description, "execution": run.execution,
        **ms,
        "total_ms": 1000 * total, "total_ms_min": 1000 * min(totals), "total_ms_max": 1000 * max(totals),
        "samples_per_s": batch_size / total,
        "tokens_per_s": batch_size * tokens_per_sample / total if tokens_per_sample else None,
        "peak_memory_bytes": run.peak_bytes if cuda else sum(memory.held.values()),
        "memory_held": memory.held, "memory_formats": memory.formats,
        "model_tflops": flops / total / 1e12 if flops else None,
        "mfu": flops / total / 1e12 / matmul_tflops if flops and matmul_tflops else None,
        "final_loss": float(run.last_loss) if run.last_loss is not None else None,
        "loss_scale": run.loss_scale(),
        "skipped_steps": run.skipped_steps,
        "note": run.note,
    }


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Each run's throughput and peak memory over every other run's: ``throughput_vs["fp32"] = 3.1``."""
    for row in results:
        row["throughput_vs"] = {o["policy"]: row["samples_per_s"] / o["samples_per_s"]
                                for o in results if o is not row}
        row["peak_memory_vs"] = {o["policy"]: row["peak_memory_bytes"] / o["peak_memory_bytes"]
                                 for o in results if o is not row and row["peak_memory_bytes"]
                                 and o["peak_memory_bytes"]}


#: issue 13's goals on an H100: (run, measure, against, target, comparison)
GOALS = (
    ("f16-master", "throughput", "amp-fp16", 1.05, ">="),
    ("bf16-master", "throughput", "amp-bf16", 1.05, ">="),
    ("f16-master", "throughput", "fp32", 3.0, ">="),
    ("bf16-master", "throughput", "fp32", 3.0, ">="),
    ("bf16-master", "mfu", None, 0.45, ">="),
    ("f16-master", "peak_memory", "fp32", 0.6, "<="),
    ("f16-master", "peak_memory", "amp-fp16", 0.85, "<="),
)


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals whose runs are in ``results``, each with its measured value and whether it is met."""
    by_name = {r["policy"]: r for r in results}
    found = []
    for name, measure, against, target, op in GOALS:
        row = by_name.get(name)
        if row is None or (against is not None and against not in by_name):
            continue
        value = row["mfu"] if measure == "mfu" else row[f"{measure}_vs"].get(against)
        if value is None:
            continue
        met = value >= target if op == ">=" else value <= target
        what = f"{name} MFU" if against is None else f"{name} {measure.replace('_', ' ')} / {against}"
        found.append({"goal": f"{what} {op} {target:g}", "value": value, "met": met})
    return found
