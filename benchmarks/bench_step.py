"""Overhead of mp.step (unscale + check, optional clip, master update) against torch.amp.GradScaler.

Same model (an MLP with 50 parameter tensors, ~5M parameters), same Adam (foreach), same device, timed
side by side in one run, interleaved so that drift in the machine hits both sides alike. The loop's
end is timed: the step and ``optimizer.zero_grad()`` (set_to_none, torch's default), after gradients
are put in place untimed, freshly allocated from a fixed set as backward leaves them. Both sides thus
free their gradients inside the timed region (mixprec: the FP32 ones in mp.step, which consumes them,
the 16-bit ones in zero_grad; torch: in zero_grad). Timing the step alone would charge mixprec for a
free that torch defers to zero_grad: on CPU that is a visible allocator cost (1.69x with it, earlier).

Variants (each reported as ratio = median(mixprec) / median(torch.amp)):

* ``masters``: mixprec with FP16 parameters + FP32 `MasterWeights` (FP16 grads on the parameters and
  their FP32 form on the masters, as the backward hooks leave them; the step includes checking the FP32
  grads and masters against the model's, and the copy of masters back into FP16 params)
  vs torch.amp.GradScaler with FP32 parameters (its usual setup: autocast, FP32 weights). Both step an
  FP32 Adam over 5M FP32 values; mixprec additionally writes the 5M FP16 parameters.
* ``scaler-only``: FP32 parameters on both sides, plain Adam: mp.step + DynamicScaler vs GradScaler.
* ``scaler-only+clip``: as above with clipping to norm 1.0 (torch: unscale_, clip_grad_norm_, step).

Usage:
    python benchmarks/bench_step.py [--iters 30] [--out benchmarks/results/step_overhead.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mixprec as mp
from mixprec.report import write_json
from mixprec.report.environment import environment

WIDTH, LAYERS = 448, 25  # 25 x (448*448 + 448) = 5.03M parameters in 50 tensors


def make_mlp(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]).to(dtype)


def fixed_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


class Side:
    """One side of a comparison: how to put the gradients in place, and the timed step."""

    def __init__(self, set_grads: Callable[[], None], step: Callable[[], None]) -> None:
        self.set_grads, self.step = set_grads, step


def ours(masters: bool, clip: float | None) -> Side:
    model = make_mlp(torch.float16 if masters else torch.float32)
    adam = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    opt = mp.MasterWeights(adam) if masters else adam
    scaler = mp.DynamicScaler(init_scale=2.0**16, growth_interval=10**9)
    targets = [p for g in opt.param_groups for p in g["params"]]  # masters (FP32) or the params
    params = list(model.parameters())
    source = fixed_grads(model)

    slots = opt.grad_slots if masters else []

    def set_grads() -> None:
        # What backward leaves: the 16-bit gradient on each parameter and, with masters, its FP32 form on
        # the master, written back by the hook (mp.step consumes the FP32 one: both are put back each time).
        for p, t, s in zip(params, targets, source, strict=True):
            p.grad = s.to(p.dtype, copy=True)
            if t is not p:
                t.grad = s.clone()
        for slot in slots:
            slot.write_back_hook(slot.param)

    def step() -> None:
        info = mp.step(opt, scaler, max_grad_norm=clip)
        assert info.applied
        opt.zero_grad()  # set_to_none: the loop's end, as on torch's side

    return Side(set_grads, step)


def theirs(clip: float | None) -> Side:
    model = make_mlp(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=10**9)
    scaler.scale(torch.ones(()))  # GradScaler creates its scale tensor lazily, on the first scale()
    params = list(model.parameters())
    source = fixed_grads(model)

    def set_grads() -> None:
        for p, s in zip(params, source, strict=True):  # what backward leaves: freshly allocated gradients
            p.grad = s.clone()

    def step() -> None:
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()  # set_to_none (torch's default): frees the gradients, as mp.step frees the FP32 ones

    return Side(set_grads, step)


def time_side_by_side(a: Side, b: Side, iters: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + iters):
        for side, out in ((a, times[0]), (b, times[1])) if i % 2 == 0 else ((b, times[1]), (a, times[0])):
            side.set_grads()
            start = time.perf_counter()
            side.step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                out.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = parser.parse_args()

    variants = {
        "masters": (
            lambda: ours(masters=True, clip=None),
            lambda: theirs(clip=None),
            "mixprec: FP16 params + FP32 MasterWeights(Adam) + DynamicScaler + mp.step; "
            "torch: FP32 params + Adam + torch.amp.GradScaler (step, update)",
        ),
        "scaler-only": (
            lambda: ours(masters=False, clip=None),
            lambda: theirs(clip=None),
            "both FP32 params + Adam; mixprec: DynamicScaler + mp.step; torch: GradScaler step + update",
        ),
        "scaler-only+clip": (
            lambda: ours(masters=False, clip=1.0),
            lambda: theirs(clip=1.0),
            "as scaler-only, clipping to total norm 1.0 (torch: unscale_, clip_grad_norm_, step, update)",
        ),
    }
    results = {}
    for name, (make_ours, make_theirs, what) in variants.items():
        t_ours, t_theirs = time_side_by_side(make_ours(), make_theirs(), args.iters)
        m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
        results[name] = {
            "compares": what,
            "mixprec_ms_median": round(m_ours * 1e3, 3),
            "torch_amp_ms_median": round(m_theirs * 1e3, 3),
            "mixprec_ms_min": round(min(t_ours) * 1e3, 3),
            "torch_amp_ms_min": round(min(t_theirs) * 1e3, 3),
            "ratio": round(m_ours / m_theirs, 3),
        }
        print(f"{name:18s} mixprec {m_ours * 1e3:8.2f} ms   torch.amp {m_theirs * 1e3:8.2f} ms   "
              f"ratio {m_ours / m_theirs:.3f}")

    model = make_mlp(torch.float32)
    record = {
        "benchmark": "step_overhead",
        **environment("cpu"),
        "model": f"MLP {LAYERS}x Linear({WIDTH}, {WIDTH}): {len(list(model.parameters()))} tensors, "
        f"{sum(p.numel() for p in model.parameters())} params; Adam(foreach=True)",
        "iters": args.iters,
        "timed": "the loop's end: step (+ unscale/clip/update) and zero_grad(set_to_none), gradients put in place "
                 "(freshly allocated, as backward leaves them) untimed before each step; sides interleaved",
        "goal_ratio": 1.2,
        "results": results,
    }
    out = Path(args.out)
    write_json(out, record)  # atomic, strict JSON: the writer the reports use
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
