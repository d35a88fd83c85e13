"""Overhead of mp.step (unscale + check, optional clip, master update) against torch.amp.GradScaler.

Same model (an MLP with 50 parameter tensors, ~5M parameters), same Adam (foreach or fused), same device, timed
side by side in one run, interleaved so that drift in the machine hits both sides alike. The loop's
end is timed: the step and ``optimizer.zero_grad()`` (set_to_none, torch's default), after gradients
are put in place untimed, freshly allocated from a fixed set as backward leaves them. Both sides thus
free their gradients inside the timed region (mixprec: the FP32 ones in mp.step, which consumes them,
the 16-bit ones in zero_grad; torch: in zero_grad). Timing the step alone would charge mixprec for a
free that torch defers to zero_grad: on CPU that is a visible allocator cost (1.69x with it, earlier).

Variants (each reported as ratio = median(mixprec) / median(torch.amp)):

* ``masters``: mixprec with FP16 parameters + FP32 `MasterWeights` (FP16 grads on the parameters, as one
  backward leaves them; the step includes making their FP32 form, checking the masters against the
  model's weights by value, writing the unscaled gradients back into ``p.grad``, and the copy of masters
  back into FP16 params)
  vs torch.amp.GradScaler with FP32 parameters (its usual setup: autocast, FP32 weights). Both step an
  FP32 Adam over 5M FP32 values; mixprec additionally writes the 5M FP16 parameters.
* ``scaler-only``: FP32 parameters on both sides, plain Adam: mp.step + DynamicScaler vs GradScaler.
* ``scaler-only+clip``: as above with clipping to norm 1.0 (torch: unscale_, clip_grad_norm_, step).
* ``masters, fused Adam, sync=False``: as ``masters`` with Adam(fused=True) on both sides, and
  ``mp.step(..., sync=False)``: no side reads the device (GradScaler hands found_inf to fused Adam).
* ``... 600 small tensors``: the same with 600 tensors of at most 1024 values, where the cost per tensor
  (Python, kernel launches) dominates: the regime of small models on a GPU.

Usage:
    python benchmarks/bench_step.py [--iters 30] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.harness.environment import environment
from mixprec.report import write_json

WIDTH, LAYERS = 448, 25  # 25 x (448*448 + 448) = 5.03M parameters in 50 tensors
SMALL = (32, 300)  # 300 x (32*32 + 32) = 317K parameters in 600 tensors: the per-tensor cost shows


@dataclass(frozen=True)
class Setup:
    """What both sides share: the MLP's shape, the optimizer kind, the device; and how mixprec steps."""

    width: int = WIDTH
    layers: int = LAYERS
    fused: bool = False  # Adam(fused=True) on both sides (else foreach=True)
    sync: bool = True  # mp.step(..., sync=...): False needs fused; torch's GradScaler never syncs with fused
    device: str = "cpu"

    def mlp(self, dtype: torch.dtype) -> torch.nn.Module:
        torch.manual_seed(0)
        layers = [torch.nn.Linear(self.width, self.width) for _ in range(self.layers)]
        return torch.nn.Sequential(*layers).to(self.device, dtype)

    def adam(self, params: Any) -> torch.optim.Adam:
        kind = {"fused": True} if self.fused else {"foreach": True}
        return torch.optim.Adam(params, lr=1e-4, **kind)

    def grads(self, model: torch.nn.Module) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return [torch.randn(p.shape, generator=g).to(self.device) for p in model.parameters()]

    def done(self) -> None:
        """Wait for the device: a step that does not sync still has its kernels to run."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class Side:
    """One side of a comparison: how to put the gradients in place, and the timed step."""

    def __init__(self, set_grads: Callable[[], None], step: Callable[[], None]) -> None:
        self.set_grads, self.step = set_grads, step


def ours(masters: bool, clip: float | None, setup: Setup = Setup()) -> Side:
    model = setup.mlp(torch.float16 if masters else torch.float32)
    adam = setup.adam(model.parameters())
    opt = mp.MasterWeights(adam) if masters else adam
    scaler = mp.DynamicScaler(init_scale=2.0**16, growth_interval=10**9, device=setup.device)
    params = list(model.parameters())
    source = setup.grads(model)

    def set_grads() -> None:
        # What one backward leaves: the 16-bit gradient on each parameter (with masters, the FP32 form is
        # made by the step from it; an FP32 sum exists only between micro-batches, mixprec.gradients).
        for p, s in zip(params, source, strict=True):
            p.grad = s.to(p.dtype, copy=True)
        setup.done()

    def step() -> None:
        info = mp.step(opt, scaler, max_grad_norm=clip, sync=setup.sync)
        opt.zero_grad()  # set_to_none: the loop's end, as on torch's side
        setup.done()
        assert bool(info.applied)  # with sync=False, read once the device is done: no wait

    return Side(set_grads, step)


def theirs(clip: float | None, setup: Setup = Setup()) -> Side:
    model = setup.mlp(torch.float32)
    opt = setup.adam(model.parameters())
    scaler = torch.amp.GradScaler(setup.device.split(":")[0], init_scale=2.0**16, growth_interval=10**9)
    scaler.scale(torch.ones((), device=setup.device))  # GradScaler creates its scale tensor lazily
    params = list(model.parameters())
    source = setup.grads(model)

    def set_grads() -> None:
        for p, s in zip(params, source, strict=True):  # what backward leaves: freshly allocated gradients
            p.grad = s.clone()
        setup.done()

    def step() -> None:
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()  # set_to_none (torch's default): frees the gradients, as mp.step frees the FP32 ones
        setup.done()

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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/step_overhead[_cuda].json")
    args = parser.parse_args()
    big = Setup(device=args.device)
    fused = Setup(fused=True, sync=False, device=args.device)
    small = Setup(*SMALL, fused=True, sync=False, device=args.device)
    masters = ("mixprec: FP16 params + FP32 MasterWeights(Adam) + DynamicScaler + mp.step; "
               "torch: FP32 params + Adam + torch.amp.GradScaler (step, update)")
    variants = {
        "masters": (True, None, big, masters),
        "scaler-only": (False, None, big, "both FP32 params + Adam; mixprec: DynamicScaler + mp.step; "
                                          "torch: GradScaler step + update"),
        "scaler-only+clip": (False, 1.0, big, "as scaler-only, clipping to total norm 1.0 (torch: unscale_, "
                                              "clip_grad_norm_, step, update)"),
        "masters, fused Adam, sync=False": (True, None, fused, masters + "; Adam(fused=True) on both sides, "
                                            "mp.step(sync=False): neither side reads the device"),
        "masters, fused Adam, sync=False, 600 small tensors": (
            True, None, small, masters + "; Adam(fused=True), mp.step(sync=False); 600 tensors of <= 1024 values: "
                                         "the per-tensor (host) cost dominates"),
    }
    results = {}
    for name, (with_masters, clip, setup, what) in variants.items():
        t_ours, t_theirs = time_side_by_side(ours(with_masters, clip, setup), theirs(clip, setup), args.iters)
        m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
        model = setup.mlp(torch.float32)
        results[name] = {
            "compares": what,
            "model": f"MLP {setup.layers}x Linear({setup.width}, {setup.width}): {len(list(model.parameters()))} "
                     f"tensors, {sum(p.numel() for p in model.parameters())} params",
            "mixprec_ms_median": round(m_ours * 1e3, 3),
            "torch_amp_ms_median": round(m_theirs * 1e3, 3),
            "mixprec_ms_min": round(min(t_ours) * 1e3, 3),
            "torch_amp_ms_min": round(min(t_theirs) * 1e3, 3),
            "ratio": round(m_ours / m_theirs, 3),
        }
        print(f"{name:52s} mixprec {m_ours * 1e3:8.2f} ms   torch.amp {m_theirs * 1e3:8.2f} ms   "
              f"ratio {m_ours / m_theirs:.3f}")

    record = {
        "benchmark": "step_overhead",
        **environment(args.device),
        "iters": args.iters,
        "timed": "the loop's end: step (+ unscale/clip/update) and zero_grad(set_to_none), gradients put in place "
                 "(freshly allocated, as backward leaves them) untimed before each step; sides interleaved; "
                 "on CUDA up to the device finishing the step",
        "goal_ratio": 1.2,
        "results": results,
    }
    suffix = "" if args.device == "cpu" else "_cuda"
    out = Path(args.out or Path(__file__).parent / "results" / f"step_overhead{suffix}.json")
    write_json(out, record)  # atomic, strict JSON: the writer the reports use
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
