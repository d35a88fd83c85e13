"""The transient master modes (compact, kahan, stochastic) in every setting the FP32 masters work in.

DDP (2 gloo ranks, replicas bitwise equal, compact == fp32 masters), stochastic rounding that does not depend
on the number of ranks, checkpoints that resume bitwise, skipped steps (synced and on the device) that change
nothing, micro-batch accumulation with clipping, torch.compile, and an optimizer that is not per-parameter
separable (LBFGS). Comparisons are against mode "fp32" (the paper's masters, whose equality with torch is
tested elsewhere) or against the same run taken another way; "bitwise" means every bit, NaN and -0.0 too.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import mixprec as mp
from helpers import results, run_workers

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSIENT = ["bf16-compact", "bf16-kahan", "bf16-sr"]
NATIVE = ",execution=native"
ROWS = 8  # rows per rank per step
STEPS = 10
Snapshot = dict[str, Any]


# ====================================================================================================
# Models, data, training: shared by the parent and the worker processes
# ====================================================================================================


def make_mlp(seed: int) -> torch.nn.Sequential:
    """Two Linears (16-bit, with masters) around a LayerNorm (an FP32 island: its own master)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def mlp_batch(step: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's rows depend on (step, rank) only; a 1-process run concatenates the ranks' rows."""
    xs, ys = [], []
    for rank in ranks:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(ROWS, 8, generator=g)
        xs.append(x)
        ys.append(torch.tanh(x[:, :4]) + 0.1 * torch.randn(ROWS, 4, generator=g))
    return torch.cat(xs), torch.cat(ys)


def mlp_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out.float(), y)


def exact_batch(step: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integers in, dyadic loss weights: every gradient of `exact_loss` through one Linear is a sum of
    at most 2 * ROWS * 6 eighths divided by a power of two, exact in BF16 and FP32 in any order of summation."""
    x = torch.cat([torch.randint(-3, 4, (ROWS, 8), generator=torch.Generator().manual_seed(1000 * step + r),
                                 dtype=torch.float32) for r in ranks])
    c = torch.randint(-2, 3, (1, 4), generator=torch.Generator().manual_seed(step), dtype=torch.float32) / 8
    return x, c


def exact_loss(out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Linear in the outputs: the output gradient is c / rows whatever the weights (a power of two rows)."""
    return (out.float() * c).sum() / out.shape[0]


MODELS = {"mlp": (lambda seed: make_mlp(seed), mlp_batch, mlp_loss),
          "exact": (lambda seed: (torch.manual_seed(seed), torch.nn.Linear(8, 4))[1], exact_batch, exact_loss)}


def clone(value: Any) -> Any:
    return value.detach().clone() if torch.is_tensor(value) else value


def snapshot(model: torch.nn.Module, opt: Any) -> Snapshot:
    """Everything a run leaves that must agree: weights, FP32 masters, the inner optimizer's state, what the
    transient modes hold between steps (remainders, compensations) and the stochastic step counter."""
    inner = opt.optimizer
    low = getattr(opt, "_low", None)
    return {
        "params": {k: clone(v) for k, v in mp.distributed.unwrap(model).state_dict().items()},
        "masters": [clone(opt.master_value(s)) for s in opt.grad_slots],
        "opt_state": [{k: clone(v) for k, v in inner.state.get(t, {}).items()} for t in opt.master_params],
        "held": [clone(h.buffer) for h in low.held.values() if h.buffer is not None] if low is not None else [],
        "sr_steps": {str(d): int(c) for d, c in low.steps.items()} if low is not None else {},
    }


def same_bits(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested results are not bitwise equal, with how much they differ ([] when identical)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and not torch.is_tensor(a):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    if same_bits(a, b):
        return []
    if torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.is_floating_point():
        diff = (a.double() - b.double()).abs()
        return [f"{path}: {int((diff != 0).sum())} of {diff.numel()} differ, max |diff| {float(diff.max()):.3g}"]
    return [f"{path}: {a!r} != {b!r}"]


def assert_bitwise(a: Any, b: Any, what: str, ignore: tuple[str, ...] = ()) -> None:
    if isinstance(a, dict):
        a, b = ({k: v for k, v in d.items() if k not in ignore} for d in (a, b))
    diffs = differences(a, b)
    assert not diffs, f"{what}:\n  " + "\n  ".join(diffs[:20])


def train(preset: str, steps: int, rank: int | None = None, model_kind: str = "mlp", init_seed: int = 0,
          probe: bool = False) -> Snapshot:
    """AdamW steps under `preset`. rank None: one process on every rank's rows; else this rank's rows inside
    DDP (the process group is up), mixprec's comm hook registered by mp.autocast(ddp).

    Also returns the FP32 gradients the optimizer stepped on, per step (read by a step pre-hook, after
    mp.step settled, reduced and unscaled them), and with `probe` what stochastic rounding makes of the
    same FP32 masters set at the end (see test_sr_rounding_of_a_master_depends_on_seed_step_and_index_only).
    """
    build, batch, loss_fn = MODELS[model_kind]
    model = build(init_seed)
    model, opt, scaler = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                                    preset)
    net: torch.nn.Module = model if rank is None else torch.nn.parallel.DistributedDataParallel(model)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([t.grad.clone() for t in o.master_params
                                                            if t.grad is not None]))
    ranks = [0, 1] if rank is None else [rank]
    for step in range(steps):
        x, y = batch(step, ranks)
        with mp.autocast(net):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        if not mp.step(opt, scaler).applied:  # workers never assert: the parent asserts on the results
            raise RuntimeError(f"{preset}: step {step} was skipped; these runs must apply every step")
        opt.zero_grad()
    result = snapshot(model, opt)
    result["grads"] = seen
    if probe:
        with torch.no_grad():
            for i, slot in enumerate(opt.grad_slots):
                opt.set_master_(slot, probe_master(slot.param.shape, i))
        result["probed"] = [clone(s.param) for s in opt.grad_slots]
    return result


def probe_master(shape: torch.Size, index: int) -> torch.Tensor:
    """An FP32 master off the BF16 grid (random low bits), the same in every process."""
    g = torch.Generator().manual_seed(77 + index)
    return torch.randn(shape, generator=g) * (1 + torch.rand(shape, generator=g) * 2.0**-7)


def single(preset: str, steps: int, **kwargs: Any) -> Snapshot:
    """A 1-process run with one torch thread, as the workers have."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(preset, steps, **kwargs)
    finally:
        torch.set_num_threads(threads)


# ====================================================================================================
# 1. DDP, and 2. stochastic rounding across ranks: one pair of processes for every scenario
# ====================================================================================================

DDP_PRESETS = [*TRANSIENT, *(p + NATIVE for p in TRANSIENT), "bf16-master", "bf16-master" + NATIVE]


def _ddp_scenarios() -> list[tuple[str, dict[str, Any]]]:
    # Different initial weights per rank (DDP and mixprec's hook must give every rank rank 0's parameters AND
    # remainders/compensations) and different data per rank.
    specs = [(p, {"preset": p, "steps": STEPS, "different_init": True}) for p in DDP_PRESETS]
    specs += [(f"exact {p}", {"preset": p, "steps": STEPS, "model_kind": "exact"}) for p in DDP_PRESETS]
    specs.append(("sr probe", {"preset": "bf16-sr", "steps": 3, "probe": True}))
    return specs


def ddp_worker(rank: int, scenarios: list[tuple[str, dict[str, Any]]]) -> dict[str, Snapshot]:
    """One rank: every scenario in order, in step with its peer (a barrier between scenarios)."""
    out = {}
    for name, spec in scenarios:
        spec = dict(spec)
        seed = rank if spec.pop("different_init", False) else 0
        out[name] = train(rank=rank, init_seed=seed, **spec)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Snapshot], dict[str, Snapshot]]:
    outcomes = run_workers(ddp_worker, (_ddp_scenarios(),), workdir=Path(tmp_path_factory.mktemp("ddp")),
                           timeout_s=240)
    r0, r1 = results(outcomes)
    return r0, r1


@pytest.mark.parametrize("preset", DDP_PRESETS)
def test_ddp_replicas_bitwise_equal_params_masters_state(ddp_runs, preset):
    r0, r1 = ddp_runs
    a, b = r0[preset], r1[preset]
    # The ranks saw different data and started from different weights: a replica that kept its own (a
    # remainder or compensation not broadcast, noise that depends on the rank) would differ here.
    assert_bitwise(a, b, f"{preset}: rank 0 and rank 1 differ")
    if "sr" in preset:
        assert a["sr_steps"] == {"cpu": STEPS}
    if "compact" in preset or "kahan" in preset:
        assert len(a["held"]) == 4 and any(bool(t.ne(0).any()) for t in a["held"])  # masters beyond bf16 bits
    # Not trivially equal: training moved the weights away from rank 0's initial ones.
    start = make_mlp(0)
    assert not torch.equal(a["params"]["0.weight"].float(), start[0].weight.detach().bfloat16().float())


@pytest.mark.parametrize("execution", ["", NATIVE])
def test_ddp_compact_equals_fp32_masters_bitwise(ddp_runs, execution):
    r0, r1 = ddp_runs
    for rank_result in (r0, r1):
        compact, fp32 = rank_result["bf16-compact" + execution], rank_result["bf16-master" + execution]
        assert_bitwise(compact, fp32, f"bf16-compact{execution} is not bf16-master{execution} under DDP",
                       ignore=("held", "sr_steps"))


@pytest.mark.parametrize("preset", DDP_PRESETS)
def test_ddp_on_half_batches_equals_one_process_on_the_full_batch(ddp_runs, preset):
    # What is asserted: with gradients that are exact in any summation order (exact_batch), the 1-process run
    # on both ranks' rows and each DDP rank on its half (mean per rank, averaged in FP32 by mixprec's hook)
    # step on bitwise equal FP32 gradients (checked first, step by step: the precondition), and then end on
    # the same bits. For bf16-sr: stochastic rounding's noise is a function of (seed, applied steps,
    # parameter index, element) only, never of the rank, the number of ranks or the process. For compact and
    # kahan: the remainders and compensations survive DDP's steps as they do in one process.
    r0, r1 = ddp_runs
    name = f"exact {preset}"
    ref = single(preset, STEPS, model_kind="exact")
    assert_bitwise(r0[name]["grads"], ref["grads"], "the reduced gradients differ from the 1-process ones "
                   "(the precondition of this test, not a master-mode failure)")
    for result in (r0[name], r1[name]):
        assert_bitwise(result, ref, f"{preset}: DDP on half batches is not the 1-process run")
    if "master" not in preset:  # the mode did something: a round-to-nearest run without masters ends elsewhere
        nearest = single("bf16-pure" + (NATIVE if NATIVE in preset else ""), STEPS, model_kind="exact")
        assert not same_bits(nearest["params"]["weight"], ref["params"]["weight"])


def test_sr_rounding_of_a_master_depends_on_seed_step_and_index_only(ddp_runs):
    # A realistic model's half-batch gradients, averaged across ranks, can differ from the full batch's in the
    # last FP32 bit (another summation order), so the trained weights are not compared here. Instead, after
    # the same number of applied steps, the same FP32 masters are stored (MasterWeights.set_master_) in both
    # settings: the stochastically rounded weights must be bitwise equal on both ranks and in 1 process.
    r0, r1 = ddp_runs
    ref = single("bf16-sr", 3, probe=True)
    assert r0["sr probe"]["sr_steps"] == ref["sr_steps"] == {"cpu": 3}
    for result in (r0["sr probe"], r1["sr probe"]):
        assert_bitwise(result["probed"], ref["probed"], "the same master rounded differently")
    nearer = []
    for i, got in enumerate(ref["probed"]):
        master = probe_master(got.shape, i)
        assert got.float().sub(master).abs().lt(master.abs() * 2.0**-7).all()  # one of its two neighbours
        nearer.append(got.float().eq(master.bfloat16().float()).flatten())
    share = float(torch.cat(nearer).float().mean())  # 3/4 expected for masters uniform between neighbours
    assert 0.6 < share < 0.9, f"{share:.2f} of {len(torch.cat(nearer))} masters rounded to the nearer neighbour"


# ====================================================================================================
# 2. Resume: 6 steps, a checkpoint through torch.save/torch.load, 6 more == 12 straight
# ====================================================================================================


def _steps(model: torch.nn.Module, opt: Any, scaler: mp.LossScaler, steps: range, micro: int = 1,
           clip: float | None = None) -> list[Any]:
    infos = []
    for step in steps:
        for k in range(micro):
            x, y = mlp_batch(10 * step + k, [0, 1])
            with mp.autocast(model):
                loss = mlp_loss(model(x), y) / micro
            scaler.scale(loss).backward()
        infos.append(mp.step(opt, scaler, max_grad_norm=clip))
        opt.zero_grad()
    return infos


def _prepared(preset: str, seed: int = 0, optimizer: str = "adamw") -> tuple[torch.nn.Module, Any, mp.LossScaler]:
    model = make_mlp(seed)
    inner: torch.optim.Optimizer
    if optimizer == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=optimizer == "fused")
    return mp.prepare(model, inner, preset)


@pytest.mark.parametrize("preset", [*TRANSIENT, "bf16-sr" + NATIVE, "bf16-compact" + NATIVE])
def test_resume_from_a_checkpoint_is_bitwise_the_straight_run(preset):
    model, opt, scaler = _prepared(preset)
    _steps(model, opt, scaler, range(12))
    straight = snapshot(model, opt)

    model, opt, scaler = _prepared(preset)
    _steps(model, opt, scaler, range(6))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, buffer)
    half = snapshot(model, opt)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model, opt, scaler = _prepared(preset, seed=123)  # other weights: only the checkpoint can make them equal
    model.load_state_dict(ckpt["model"])  # the documented order: the model, then the optimizer
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    assert_bitwise(snapshot(model, opt), half, f"{preset}: the loaded state is not the saved one")
    _steps(model, opt, scaler, range(6, 12))
    assert_bitwise(snapshot(model, opt), straight, f"{preset}: 6 + resume + 6 steps is not 12 steps")


def _resume_optimizer_first(preset: str) -> list[str]:
    model, opt, scaler = _prepared(preset)
    _steps(model, opt, scaler, range(4))
    straight = snapshot(model, opt)
    model, opt, scaler = _prepared(preset)
    _steps(model, opt, scaler, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model, opt, scaler = _prepared(preset, seed=123)
    opt.load_state_dict(ckpt["optimizer"])
    model.load_state_dict(ckpt["model"])  # the same values written again, after the masters were restored
    _steps(model, opt, scaler, range(2, 4))
    return differences(snapshot(model, opt), straight)


def test_resume_loading_the_optimizer_before_the_model_keeps_fp32_and_sr_masters():
    for preset in ("bf16-master", "bf16-sr"):  # an FP32 master is kept by value; SR keeps nothing beyond bf16
        assert not _resume_optimizer_first(preset), preset


@pytest.mark.xfail(strict=True, reason="a known gap: model.load_state_dict after optimizer.load_state_dict moves "
                   "the parameters' version counters, and a transient master then starts again from its "
                   "parameter (remainder/compensation zeroed), where an FP32 master is kept by value; the "
                   "documented order (model, then optimizer) resumes bitwise")
@pytest.mark.parametrize("preset", ["bf16-compact", "bf16-kahan"])
def test_resume_loading_the_optimizer_before_the_model_keeps_transient_masters(preset):
    assert not _resume_optimizer_first(preset)


# ====================================================================================================
# 3. Skipped steps change nothing
# ====================================================================================================

SCALED = [f"params=bf16,compute=bf16,master={m},scaling=dynamic" for m in ("compact", "kahan", "stochastic")]


def _overflowing_step(model: torch.nn.Module, opt: Any, scaler: mp.LossScaler, step: int, sync: bool) -> Any:
    """One backward whose gradients are finite but one value made inf after backward (after every hook)."""
    x, y = mlp_batch(step, [0, 1])
    with mp.autocast(model):
        loss = mlp_loss(model(x), y)
    scaler.scale(loss).backward()
    with torch.no_grad():
        model[2].weight.grad.view(-1)[0] = math.inf
    info = mp.step(opt, scaler, sync=sync)
    opt.zero_grad()
    return info


def _parse_checks(policy: str) -> None:
    parsed = mp.Policy.parse(policy)
    assert parsed.scaling.startswith("dynamic") and parsed.master_mode in ("compact", "kahan", "stochastic")
    assert mp.Policy.parse(str(parsed)) == parsed


@pytest.mark.parametrize("policy", [*SCALED, *(p + NATIVE for p in SCALED)])
def test_a_skipped_step_changes_nothing(policy):
    _parse_checks(policy)
    model, opt, scaler = _prepared(policy)
    assert isinstance(scaler, mp.DynamicScaler)
    _steps(model, opt, scaler, range(2))
    before = snapshot(model, opt)
    scale = scaler.loss_scale
    info = _overflowing_step(model, opt, scaler, 2, sync=True)
    assert not info.applied and info.skipped_steps == 1 and scaler.loss_scale <= scale
    assert_bitwise(snapshot(model, opt), before, f"{policy}: the skipped step changed something")
    # And training goes on as if the skipped step had never been there (the scale is a power of two apart).
    _steps(model, opt, scaler, range(2, 4))
    model2, opt2, scaler2 = _prepared(policy)
    _steps(model2, opt2, scaler2, range(4))
    assert_bitwise(snapshot(model, opt), snapshot(model2, opt2), f"{policy}: a skip left a trace on later steps")


def _fused_on_cpu() -> bool:
    try:
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.skipif(not _fused_on_cpu(), reason="this torch has no fused AdamW on CPU (sync=False needs one)")
@pytest.mark.parametrize("policy", [*SCALED, *(p + NATIVE for p in SCALED)])
def test_a_step_skipped_on_the_device_changes_nothing(policy):
    model, opt, scaler = _prepared(policy, optimizer="fused")
    infos = [_steps(model, opt, scaler, range(1))[0]]  # a first step is synced (no optimizer state yet)
    infos += [_sync_false_step(model, opt, scaler, step) for step in (1, 2)]
    before = snapshot(model, opt)
    info = _overflowing_step(model, opt, scaler, 3, sync=False)
    assert torch.is_tensor(info.applied) and not bool(info.applied)
    after = snapshot(model, opt)
    assert_bitwise(after, before, f"{policy}: the step skipped on the device changed something")
    assert all(bool(i.applied) for i in infos)
    assert int(after["opt_state"][0]["step"]) == 3


def _sync_false_step(model: torch.nn.Module, opt: Any, scaler: mp.LossScaler, step: int) -> Any:
    x, y = mlp_batch(step, [0, 1])
    with mp.autocast(model):
        loss = mlp_loss(model(x), y)
    scaler.scale(loss).backward()
    info = mp.step(opt, scaler, sync=False)
    opt.zero_grad()
    return info


# ====================================================================================================
# 4. Micro-batch accumulation and clipping; 5. torch.compile
# ====================================================================================================


@pytest.mark.parametrize("execution", ["", NATIVE])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_and_clipping_compact_equals_fp32_masters(execution, optimizer):
    runs = {}
    for preset in ("bf16-compact", "bf16-master"):
        model, opt, scaler = _prepared(preset + execution, optimizer=optimizer)
        infos = _steps(model, opt, scaler, range(6), micro=2, clip=0.5)
        runs[preset] = snapshot(model, opt)
        norms = [float(i.grad_norm) for i in infos]
    assert max(norms) > 0.5, f"clipping never acted: norms {norms}"
    assert_bitwise(runs["bf16-compact"], runs["bf16-master"], "accumulated and clipped: compact != fp32 masters",
                   ignore=("held", "sr_steps"))


def _compiled_run(preset: str, compiled: bool) -> tuple[Snapshot, list[float]]:
    model, opt, scaler = _prepared(preset)
    net = torch.compile(model, backend="aot_eager") if compiled else model
    losses = []
    for step in range(3):
        x, y = mlp_batch(step, [0, 1])
        with torch._dynamo.config.patch(error_on_recompile=compiled and step > 0):
            with mp.autocast(net):
                loss = mlp_loss(net(x), y)
            scaler.scale(loss).backward()
        assert mp.step(opt, scaler, max_grad_norm=1.0).applied
        opt.zero_grad()
        losses.append(loss.item())
    return snapshot(model, opt), losses


def _compile_works() -> bool:
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


@pytest.mark.skipif(not _compile_works(), reason="torch.compile (dynamo) is not supported on this Python/torch")
@pytest.mark.parametrize("preset", ["bf16-compact", "bf16-compact" + NATIVE])
def test_compiled_compact_training_equals_eager(preset):
    # backend="aot_eager": dynamo and AOTAutograd (graph capture, the joint forward/backward) without
    # generating kernels, so the arithmetic is eager's and the result is bitwise comparable, and the test stays
    # in seconds; inductor's C++ compilation takes minutes on 2 shared cores (benchmarks/bench_compile.py).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, eager_losses = _compiled_run(preset, compiled=False)
    counters.clear()
    compiled, compiled_losses = _compiled_run(preset, compiled=True)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs >= 1, "dynamo captured no graph: the 'compiled' run was eager"
    assert compiled_losses == eager_losses
    assert_bitwise(compiled, eager, f"{preset}: compiled training is not eager training")


# ====================================================================================================
# 6. An optimizer that is not per-parameter separable: LBFGS with a closure
# ====================================================================================================


def _lbfgs_run(mode: str, line_search: str | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    inner = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=3, line_search_fn=line_search)
    opt = mp.MasterWeights(inner, mode=mode)
    x, y = mlp_batch(0, [0, 1])
    x, y = x.bfloat16(), y.bfloat16()
    losses = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        return loss

    for _ in range(3):
        losses.append(opt.step(closure).item())
    state = inner.state[inner._params[0]]
    return {"params": [clone(p) for p in model.parameters()],
            "masters": [clone(opt.master_value(s)) for s in opt.grad_slots],
            "lbfgs": {k: clone(v) for k, v in state.items() if k != "al"}, "losses": losses}


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_with_compact_masters_equals_fp32_masters(line_search):
    compact, fp32 = _lbfgs_run("compact", line_search), _lbfgs_run("fp32", line_search)
    assert compact["losses"][-1] < compact["losses"][0], compact["losses"]  # it trained
    assert_bitwise(compact, fp32, f"LBFGS(line_search_fn={line_search}): compact != fp32 masters")
