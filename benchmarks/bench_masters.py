"""Master-weight modes side by side: step time, bytes per parameter, and the transient peak of the step.

One MLP of four Linear layers (12.6M parameters in BF16 storage, ``model.to(torch.bfloat16)``), wrapped
directly in ``mp.MasterWeights(torch.optim.AdamW(...), mode=MODE)`` for each mode (fp32, compact, kahan,
stochastic, none); AdamW with its defaults (foreach left to torch: on CPU it picks the per-tensor loop).
Every mode has its own copy of the model (same initial weights, same batch).

Measured, per mode:

* step time: ``MasterWeights.step()`` alone, after an untimed ``zero_grad`` + forward + backward; the
  modes take turns within each round (the order rotates every round), so drift in a shared machine hits
  all of them alike; reported as the median over rounds, and as a ratio to mode fp32 (ratio of medians;
  the median of the per-round ratios beside it).
* bytes per parameter, from the real tensors (``mp.memory(model, opt)``): weights + masters (the
  parameters and ``MasterWeights.held_tensors()``: FP32 masters, int16 remainders, compensations) and
  the optimizer state, after a step; the gradients after a backward.
* transient peak extra bytes of the step: the highest number of bytes torch's allocator has handed out
  during ``MasterWeights.step()`` beyond what was allocated when it began, from the allocation events of
  ``torch.profiler`` (``profile_memory=True``; every tensor allocation and free, in order), max over
  repeats. The same for ``collect_grads_()`` alone: the FP32 gradients every mode with masters makes
  from the BF16 ones at the start of a step. A cross-check that trusts nothing of torch: in a fresh
  process per mode, the resident set's high-water mark (``VmHWM``, reset through /proc/self/clear_refs
  just before the step) minus the resident set before it, with glibc's mmap threshold fixed so freed
  buffers go back to the kernel. Both are compared with the largest parameter's FP32 size.

Goals (issue 21): step time compact <= 1.15x, kahan and stochastic <= 1.3x the fp32 step; peak extra
during the step <= the largest parameter tensor's FP32 size (for the transient modes).

Usage:
    python benchmarks/bench_masters.py [--quick] [--rounds 25] [--threads N] [--no-rss] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import mixprec as mp
from mixprec.harness.environment import environment
from mixprec.report import write_json

MODES = ("fp32", "compact", "kahan", "stochastic", "none")
TRANSIENT = ("compact", "kahan", "stochastic")
GOALS = {"compact": 1.15, "kahan": 1.3, "stochastic": 1.3}
#: (in, out) of each Linear: 4.20M + 4.20M + 2.10M + 2.10M = 12.59M parameters; the largest is 4096 x 1024.
SHAPES = ((1024, 4096), (4096, 1024), (1024, 2048), (2048, 1024))
QUICK_SHAPES = tuple((i // 2, o // 2) for i, o in SHAPES)  # 3.15M parameters
BATCH = 32
#: glibc: every allocation of at least this size is its own mmap, returned to the kernel when freed (the
#: fixed value also turns off glibc's growing threshold), so the resident set follows the live tensors.
MMAP_THRESHOLD = str(128 * 1024)


class Setup:
    """One mode: its BF16 model, its MasterWeights(AdamW), a fixed batch."""

    def __init__(self, mode: str, shapes: tuple[tuple[int, int], ...]) -> None:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for n, (fan_in, fan_out) in enumerate(shapes):
            layers += [torch.nn.Linear(fan_in, fan_out)] + ([torch.nn.ReLU()] if n < len(shapes) - 1 else [])
        self.mode = mode
        self.model = torch.nn.Sequential(*layers).to(torch.bfloat16)
        self.opt = mp.MasterWeights(torch.optim.AdamW(self.model.parameters(), lr=1e-4), mode=mode)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(BATCH, shapes[0][0], generator=g).to(torch.bfloat16)
        self.y = torch.randn(BATCH, shapes[-1][1], generator=g)

    def backward(self) -> None:
        self.opt.zero_grad()
        loss = (self.model(self.x).float() - self.y).pow(2).mean()
        loss.backward()

    def timed_step(self) -> float:
        self.backward()
        start = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - start


def params_info(model: torch.nn.Module) -> dict[str, Any]:
    params = list(model.parameters())
    largest = max(p.numel() for p in params)
    return {"tensors": len(params), "params": sum(p.numel() for p in params), "largest_param_elements": largest,
            "largest_param_fp32_bytes": 4 * largest}


def time_modes(setups: dict[str, Setup], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each round, every mode steps once, in an order that rotates by one mode per round."""
    times: dict[str, list[float]] = {m: [] for m in setups}
    names = list(setups)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            elapsed = setups[name].timed_step()
            if r >= warmup:
                times[name].append(elapsed)
    return times


def per_param(setup: Setup) -> dict[str, float]:
    """Bytes per parameter from the real tensors: after a backward (gradients), after a step (the rest)."""
    n = sum(p.numel() for p in setup.model.parameters())
    setup.backward()
    grads = mp.memory(setup.model, setup.opt).held["gradients"]
    setup.opt.step()
    setup.opt.zero_grad()
    held = mp.memory(setup.model, setup.opt).held
    return {"weights": held["parameters"] / n, "masters": held["masters"] / n,
            "weights_plus_masters": (held["parameters"] + held["masters"]) / n,
            "optimizer_state": held["optimizer_state"] / n, "gradients_after_backward": grads / n}


def allocation_peak(fn: Any) -> tuple[int, int]:
    """(peak bytes allocated beyond the start, bytes still allocated at the end) while `fn` runs, from the
    profiler's record of every tensor allocation and free on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak, now


def profiled(setup: Setup, repeats: int) -> dict[str, int]:
    """The step's and collect_grads_'s allocation peaks (max over `repeats`)."""
    step_peaks, grad_peaks, grad_kept = [], [], []
    for _ in range(repeats):
        setup.backward()
        step_peaks.append(allocation_peak(setup.opt.step)[0])
    for _ in range(repeats):
        setup.backward()
        peak, kept = allocation_peak(setup.opt.collect_grads_)
        grad_peaks.append(peak)
        grad_kept.append(kept)
        setup.opt.release_grads_()
    setup.opt.zero_grad()
    return {"step_peak_extra_bytes": max(step_peaks), "collect_grads_kept_bytes": max(grad_kept),
            "collect_grads_peak_bytes": max(grad_peaks)}


def pieces(setup: Setup, repeats: int) -> dict[str, float]:
    """On the largest parameter of a transient mode: the time and allocation peak of rebuilding its FP32
    master (``master_value``: the mode's join) and of storing it again (``set_master_``: the mode's split)."""
    slot = max(setup.opt.grad_slots, key=lambda s: s.param.numel())
    value = setup.opt.master_value(slot)
    join_t, split_t = [], []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        setup.opt.master_value(slot)
        join_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        setup.opt.set_master_(slot, value)  # the value it holds: nothing changes
        split_t.append(time.perf_counter() - start)
    return {"join_ms": round(statistics.median(join_t) * 1e3, 3),
            "split_ms": round(statistics.median(split_t) * 1e3, 3),
            "join_peak_bytes": allocation_peak(lambda: setup.opt.master_value(slot))[0],
            "split_peak_bytes": allocation_peak(lambda: setup.opt.set_master_(slot, value))[0]}


def adamw_alone(numel: int, repeats: int) -> dict[str, float]:
    """torch's AdamW (defaults) stepping one FP32 tensor of `numel` elements: its time and its own
    temporaries (allocation peak), the part of every mode's step that is the optimizer's."""
    p = torch.nn.Parameter(torch.randn(numel))
    opt = torch.optim.AdamW([p], lr=1e-4)
    p.grad = torch.randn(numel)
    opt.step()  # its state exists from now on
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return {"ms": round(statistics.median(times) * 1e3, 3), "peak_bytes": allocation_peak(opt.step)[0]}


def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def rss_child(mode: str, quick: bool, repeats: int) -> None:
    """In this (fresh) process: the resident high-water of `repeats` steps of `mode`, each beyond the
    resident set just before it; prints JSON."""
    setup = Setup(mode, QUICK_SHAPES if quick else SHAPES)
    for _ in range(2):  # AdamW's state exists from the first step on
        setup.timed_step()
    extra = []
    for _ in range(repeats):
        setup.backward()
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        setup.opt.step()
        extra.append((_status_kb("VmHWM") - before) * 1024)
    print(json.dumps({"mode": mode, "rss_peak_extra_bytes": max(extra), "all": extra}))


def rss_peaks(quick: bool, repeats: int) -> dict[str, int | None]:
    """`rss_child` for every mode, each in a fresh process; None where it could not be measured."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    out: dict[str, int | None] = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--rss-child", mode, "--repeats", str(repeats),
               "--threads", str(torch.get_num_threads())] + ["--quick"] * quick
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        out[mode] = json.loads(lines[-1])["rss_peak_extra_bytes"] if done.returncode == 0 and lines else None
        if out[mode] is None:
            print(f"rss child for {mode} failed: {done.stderr[-2000:]}", file=sys.stderr)
    return out


def equal_to_fp32(setups: dict[str, Setup]) -> dict[str, float]:
    """Fraction of BF16 weight elements bitwise equal to mode fp32's after the same steps on the same batch."""
    ref = [p.detach().view(torch.int16) for p in setups["fp32"].model.parameters()]
    total = sum(r.numel() for r in ref)
    return {m: sum(int((p.detach().view(torch.int16) == r).sum()) for p, r in zip(s.model.parameters(), ref,
                                                                                   strict=True)) / total
            for m, s in setups.items()}


def summarize(times: dict[str, list[float]], info: dict[str, Any], memory: dict[str, dict[str, float]],
              peaks: dict[str, dict[str, int]], rss: dict[str, int | None], same: dict[str, float]
              ) -> dict[str, dict[str, Any]]:
    base = statistics.median(times["fp32"])
    limit = info["largest_param_fp32_bytes"]
    results: dict[str, dict[str, Any]] = {}
    for mode, t in times.items():
        median = statistics.median(t)
        paired = statistics.median(a / b for a, b in zip(t, times["fp32"], strict=True))
        peak = peaks[mode]["step_peak_extra_bytes"]
        results[mode] = {
            "step_ms_median": round(median * 1e3, 3), "step_ms_min": round(min(t) * 1e3, 3),
            "ratio_to_fp32": round(median / base, 3), "paired_ratio_median": round(paired, 3),
            "min_ratio_to_fp32": round(min(t) / min(times["fp32"]), 3),  # the least disturbed rounds
            "bytes_per_param": {k: round(v, 4) for k, v in memory[mode].items()},
            **peaks[mode], "step_peak_extra_over_largest_fp32": round(peak / limit, 3),
            # what is left once the FP32 gradients (alive through the whole step) are taken out, and beyond
            # the fp32 mode's peak (the same gradients and AdamW temporaries, FP32 masters held, not made)
            "step_peak_beyond_fp32_grads_over_largest": round(
                (peak - peaks[mode]["collect_grads_kept_bytes"]) / limit, 3),
            "step_peak_beyond_fp32_mode_over_largest": round(
                (peak - peaks["fp32"]["step_peak_extra_bytes"]) / limit, 3),
            "rss_peak_extra_bytes": rss.get(mode),
            "rss_peak_extra_over_largest_fp32": None if rss.get(mode) is None else round(rss[mode] / limit, 3),
            "weights_bitwise_equal_to_fp32_mode": round(same[mode], 6),
        }
        if mode in GOALS:
            results[mode]["goal_ratio"] = GOALS[mode]
            results[mode]["time_goal_met"] = median / base <= GOALS[mode]
        if mode in TRANSIENT:
            results[mode]["peak_goal_met"] = peak <= limit
            results[mode]["rss_peak_goal_met"] = None if rss.get(mode) is None else rss[mode] <= limit
    return results


def print_table(results: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    mb = 1e6
    print(f"model: {info['tensors']} tensors, {info['params']:,} params; largest parameter "
          f"{info['largest_param_elements']:,} elements = {info['largest_param_fp32_bytes'] / mb:.2f} MB in FP32")
    print(f"{'mode':<11}{'step ms':>9}{'ratio':>7}{'paired':>8}{'min-r':>7}{'goal':>6}{'W+M B/p':>9}{'opt B/p':>9}"
          f"{'grad B/p':>9}{'peak MB':>9}{'/largest':>9}{'RSS MB':>8}{'/largest':>9}{'FP32 grads MB':>14}"
          f"{'-grads':>8}{'-fp32':>7}")
    for mode, r in results.items():
        b = r["bytes_per_param"]
        rss = r["rss_peak_extra_bytes"]
        print(f"{mode:<11}{r['step_ms_median']:>9.2f}{r['ratio_to_fp32']:>7.3f}{r['paired_ratio_median']:>8.3f}{r['min_ratio_to_fp32']:>7.3f}"
              f"{r.get('goal_ratio', ''):>6}{b['weights_plus_masters']:>9.3f}{b['optimizer_state']:>9.3f}"
              f"{b['gradients_after_backward']:>9.3f}{r['step_peak_extra_bytes'] / mb:>9.2f}"
              f"{r['step_peak_extra_over_largest_fp32']:>9.2f}"
              f"{'n/a' if rss is None else f'{rss / mb:.2f}':>8}"
              f"{'n/a' if rss is None else r['rss_peak_extra_over_largest_fp32']:>9}"
              f"{r['collect_grads_kept_bytes'] / mb:>14.2f}"
              f"{r['step_peak_beyond_fp32_grads_over_largest']:>8.2f}{r['step_peak_beyond_fp32_mode_over_largest']:>7.2f}")
    print("ratio: median over median of mode fp32; paired: median of the per-round ratios; min-r: min over min")
    print("peak: bytes allocated during MasterWeights.step beyond its start (torch.profiler); RSS: VmHWM - VmRSS in "
          "a fresh process; /largest: over the largest parameter's FP32 bytes; -grads: the peak less the FP32 "
          "gradients collect_grads_ makes, over the largest; -fp32: the peak less mode fp32's, over the largest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 3.2M-parameter model, few rounds: a fast check")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 25; quick: 6)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each peak measurement (max taken)")
    parser.add_argument("--no-rss", action="store_true", help="skip the resident-set cross-check (5 processes)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/masters[_quick].json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rss-child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.quick, args.repeats)
        return
    env = environment("cpu", torch.get_num_threads())  # before the runs: the commit they ran
    rounds = args.rounds or (6 if args.quick else 25)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    setups = {mode: Setup(mode, shapes) for mode in MODES}
    info = params_info(setups["fp32"].model)
    times = time_modes(setups, rounds, warmup=2 if args.quick else 3)
    same = equal_to_fp32(setups)  # every mode took the same number of steps on the same batch by now
    memory = {mode: per_param(s) for mode, s in setups.items()}
    peaks = {mode: profiled(s, args.repeats) for mode, s in setups.items()}
    parts = {mode: pieces(setups[mode], args.repeats) for mode in TRANSIENT}
    alone = adamw_alone(info["largest_param_elements"], args.repeats)
    del setups
    rss = {} if args.no_rss else rss_peaks(args.quick, args.repeats)
    results = summarize(times, info, memory, peaks, rss, same)
    print_table(results, info)
    print(f"largest parameter alone: AdamW step on it in FP32 {alone['ms']:.2f} ms, its own temporaries "
          f"{alone['peak_bytes'] / 1e6:.2f} MB")
    for mode, part in parts.items():
        print(f"  {mode:<11} join {part['join_ms']:7.2f} ms, peak {part['join_peak_bytes'] / 1e6:6.2f} MB;  "
              f"split {part['split_ms']:7.2f} ms, peak {part['split_peak_bytes'] / 1e6:6.2f} MB")
    flags = env["cpu_flags"]
    record = {
        "benchmark": "masters",
        **env,
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "quick": args.quick, "rounds": rounds,
        "model": f"MLP of Linear {', '.join(f'{i}->{o}' for i, o in shapes)} (ReLU between), bfloat16 storage; "
                 f"batch {BATCH}; MasterWeights(AdamW(lr=1e-4), mode=MODE), foreach left to torch's default",
        **info,
        "timed": "MasterWeights.step() alone, after an untimed zero_grad + forward + backward; modes interleaved, "
                 "the order rotating each round; ratio = median(mode) / median(fp32)",
        "peak": "torch.profiler(profile_memory=True): max over the step of bytes allocated beyond those at its start "
                "(max over repeats); rss: VmHWM - VmRSS around one step in a fresh process per mode, "
                f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
        "goals": {"ratio_to_fp32": GOALS, "peak_extra": "<= largest parameter's FP32 bytes (transient modes)"},
        "results": results,
        "largest_param_pieces": {"what": "on the largest parameter alone: join = MasterWeights.master_value "
                                         "(rebuild the FP32 master), split = set_master_ (store it); peaks from "
                                         "the profiler, the returned FP32 value included in join's",
                                 **parts},
        "adamw_alone_on_largest_fp32": alone,
    }
    name = "masters_quick.json" if args.quick else "masters.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
