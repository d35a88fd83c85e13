"""Compiled vs eager training step time for the `lm` recipe, per policy, on this machine's CPU.

Each policy trains the recipe's GPT (2 layers, 64 wide, batch 32 x 64 bytes) eagerly and under
``torch.compile`` (inductor), from the same seed, on the same batches; a step is forward, backward and
``mp.step``. The first ``--warmup`` steps (compilation) are not timed; the rest are, as medians.
Eager and compiled are timed in the same run, one after the other, and their ratio is what we compare.
The final losses of both are recorded too (inductor fuses FP32 arithmetic differently: close, not
bitwise).

Usage:
    python benchmarks/bench_compile.py [--steps 30] [--warmup 5] [--out benchmarks/results/compile.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import mixprec as mp
from mixprec.harness.environment import environment
from mixprec.recipes import get_recipe
from mixprec.report import write_json

POLICIES = ["f32", "bf16-mixed", "f16-master", "bf16-master"]


def run(policy: str, compiled: bool, steps: int, warmup: int) -> tuple[list[float], float]:
    recipe = get_recipe("lm")
    data = recipe.make_data()
    torch.manual_seed(0)
    model = recipe.make_model()
    model, optimizer, scaler = mp.prepare(model, recipe.build_optimizer(model.parameters()), policy)
    net = torch.compile(model) if compiled else model
    times, loss = [], torch.zeros(())
    for step in range(warmup + steps):
        batch = data.batch(step, recipe.batch_size, seed=0)
        start = time.perf_counter()
        with mp.autocast(net):
            loss = recipe.loss(net, batch)
        scaler.scale(loss).backward()
        mp.step(optimizer, scaler, max_grad_norm=recipe.max_grad_norm)
        optimizer.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile.json"))
    args = parser.parse_args()

    results = {}
    for policy in args.policies.split(","):
        torch._dynamo.reset()
        eager, eager_loss = run(policy, False, args.steps, args.warmup)
        compiled, compiled_loss = run(policy, True, args.steps, args.warmup)
        e, c = statistics.median(eager), statistics.median(compiled)
        results[policy] = {
            "execution": mp.Policy.parse(policy).resolve_execution("cpu"),
            "eager_ms_median": round(e * 1e3, 2), "compiled_ms_median": round(c * 1e3, 2),
            "speedup": round(e / c, 3), "eager_final_loss": eager_loss, "compiled_final_loss": compiled_loss,
        }
        print(f"{policy:12s} eager {e * 1e3:8.1f} ms  compiled {c * 1e3:8.1f} ms  speedup {e / c:.2f}x  "
              f"loss {eager_loss:.4f} / {compiled_loss:.4f}")

    record = {
        "benchmark": "compile",
        **environment("cpu", torch.get_num_threads()),
        "model": "recipe lm: GPT 2 layers, 64 wide, 4 heads; batch 32 x 64 bytes; AdamW; clip 1.0",
        "timed": f"forward + backward + mp.step, median of {args.steps} steps after {args.warmup} untimed",
        "backend": "inductor (torch.compile default)",
        "results": results,
    }
    out = Path(args.out)
    write_json(out, record)  # atomic, strict JSON: the writer the reports use
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
