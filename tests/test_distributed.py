"""A prepared model inside DistributedDataParallel: 2 gloo processes on CPU, replicas bitwise equal, every
rank taking the same skip decision, and the result of a 1-process run on the concatenated batch.

The loop under test (the public API only):

    model, opt, scaler = mp.prepare(model, opt, preset)
    ddp = DistributedDataParallel(model)                      # wrapped AFTER prepare
    for micro in range(n):                                    # ddp.no_sync() on all but the last
        with mp.autocast(ddp):
            loss = mse(ddp(x), y)
        scaler.scale(loss).backward()
    info = mp.step(opt, scaler, max_grad_norm=1.0)
    opt.zero_grad()

How the harness works: the test starts 2 worker processes through ``helpers.run_workers`` (each with one
torch thread, joined in one gloo process group through a rendezvous file in the test's tmp dir: no port to
pick, none to collide). A group of scenarios (several presets) runs inside ONE pair of processes, with a
barrier between scenarios. Each rank writes, per scenario, its final state (``torch.save``) or the traceback
of its exception; a rank that raised exits, its peer's collective fails at once, and the parent starts a new
pair for the scenarios not yet attempted, so one failure never leaks into the next scenario. Collectives time
out after COLLECTIVE_TIMEOUT_S and the parent stops a pair after PAIR_TIMEOUT_S: a hang fails the test, it
never blocks. The parent computes the 1-process references itself and asserts; children never assert.
"""

from __future__ import annotations

import contextlib
import math
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import mixprec as mp
from helpers import Checkpointed, run_workers, step_float, typed_prepare

WORLD = 2
ROWS = 16  # rows per rank per micro-batch
STEPS = 10
LR = 0.1
FAULT_STEPS = (3, 7)
PAIR_TIMEOUT_S = 120  # a whole pair of processes (one group of scenarios)
COLLECTIVE_TIMEOUT_S = 30  # one collective / the rendezvous inside a child
NATIVE = ["f16-master,execution=native", "bf16-master,execution=native"]
VARIANTS = [  # the policy's reduce key: the gradient all-reduce in 16 bits instead of FP32 (emulated, native)
    "f16-master,reduce=fp16", "bf16-master,reduce=bf16",
    "f16-master,execution=native,reduce=fp16", "bf16-master,execution=native,reduce=bf16",
    "f16-pure,execution=native",  # native 16-bit parameters, no masters: a real float16 all-reduce
]
FAULT_PRESETS = ["f16-master", "bf16-master"]

Spec = dict[str, Any]
Result = dict[str, Any]


# ====================================================================================================
# What each process runs (also used by the parent for the 1-process references)
# ====================================================================================================


def scenario(name: str, preset: str | None, **options: Any) -> Spec:
    """A JSON-ready description of one training run. preset None: plain PyTorch, no mixprec."""
    spec: Spec = {"name": name, "preset": preset, "ddp": True, "optimizer": "sgd", "steps": STEPS, "micro": 1,
                  "fault": None, "seeds": "same", "autocast_on": "ddp", "ddp_options": {}, "sync": True,
                  "checkpointed": False}
    unknown = set(options) - set(spec)
    if unknown:
        raise TypeError(f"unknown scenario options {sorted(unknown)}")
    spec.update(options)
    return spec


def make_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    first, norm, head = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1)
    with torch.no_grad():  # small outputs, small targets: see micro_batch
        head.weight.mul_(0.1)
        head.bias.mul_(0.1)
    return torch.nn.Sequential(first, norm, head)


def micro_batch(step: int, micro: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's rows depend on (step, micro, rank) only; a 1-process run concatenates both ranks' rows.

    Outputs (make_model) and targets are ~0.1 so that no step overflows FP16 at the default initial loss
    scale 2^16: the largest scaled per-rank weight gradient stays under 1/4 of FP16's max (measured). At
    that boundary a DDP run may rightly skip where the 1-process run does not (each rank's loss is a mean
    over its own rows: its activation gradients are WORLD times the 1-process run's, its weight gradient a
    noisier half-batch estimate), which would make the comparison meaningless; here every skip is injected.
    """
    xs, ys = [], []
    for rank in ranks:
        g = torch.Generator().manual_seed(100_000 * step + 100 * micro + rank)
        x = torch.randn(ROWS, 8, generator=g)
        xs.append(x)
        ys.append(0.1 * (x[:, :1] * 0.5 - x[:, 1:2]) + 0.01 * torch.randn(ROWS, 1, generator=g))
    return torch.cat(xs), torch.cat(ys)


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "adam-fused":  # skips on the device: mp.step(..., sync=False) can use it
        return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    raise ValueError(kind)


def _prepare(model: torch.nn.Sequential, opt: torch.optim.Optimizer, preset: str | None,
             ) -> tuple[torch.nn.Sequential, torch.optim.Optimizer, mp.LossScaler | None]:
    """``mp.prepare`` under the preset; preset None: plain PyTorch, nothing prepared and no scaler."""
    return (model, opt, None) if preset is None else typed_prepare(model, opt, preset)


def _stepped_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What the optimizer steps: the FP32 masters under MasterWeights, else the model's parameters."""
    return [p for g in opt.param_groups for p in g["params"]]


def _master_values(opt: torch.optim.Optimizer, stepped: list[torch.Tensor]) -> list[torch.Tensor]:
    """The FP32 value of each stepped tensor: a master rebuilt where the mode keeps it in fewer bytes."""
    if not isinstance(opt, mp.MasterWeights):
        return [_clone(p) for p in stepped]
    by_master = {id(s.master): opt.master_value(s) for s in opt.grad_slots}
    return [by_master.get(id(p), _clone(p)) for p in stepped]


def _clone(value: Any) -> Any:
    return value.detach().clone() if torch.is_tensor(value) else value


def _corrupt_gradient_after_backward(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """Write inf into one parameter's gradient after backward returned (i.e. after DDP's all-reduce).

    Into the model parameter's .grad where backward left one there, else into the gradient the optimizer
    steps on (the FP32 master's, for a design that moves gradients into the masters during backward).
    """
    index = len(list(model.parameters())) - 2  # the last Linear's weight
    param = list(model.parameters())[index]
    stepped = _stepped_params(opt)[index]
    with torch.no_grad():
        for where, tensor in (("param.grad", param), ("optimizer param .grad", stepped)):
            if tensor.grad is not None:
                tensor.grad.view(-1)[0] = math.inf
                return where
    raise RuntimeError("after backward neither the parameter nor the optimizer's tensor has a .grad to corrupt")


def train(spec: Spec, rank: int | None) -> Result:
    """Run one scenario: ``rank`` None is the 1-process reference on both ranks' rows concatenated
    (no DDP, no process group); otherwise this rank's part of the DDP run (a process group is up)."""
    distributed = rank is not None and spec["ddp"]
    preset = spec["preset"]
    seed = 1000 + rank if (spec["seeds"] == "different" and rank is not None) else 1000
    model = make_model(seed)
    if spec["checkpointed"]:  # the first Linear and the LayerNorm (an FP32 island) recomputed in backward
        model[0], model[1] = Checkpointed(model[0]), Checkpointed(model[1])
    model, opt, scaler = _prepare(model, make_optimizer(spec["optimizer"], model), preset)

    armed = {"inf": False}  # fault "activation": inf into the activation gradient on this backward

    def poison_activation_gradient(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if armed["inf"] and output.requires_grad:
            def hook(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad.view(-1)[0] = math.inf
                return grad

            output.register_hook(hook)

    if spec["fault"] == "activation":
        model[0].register_forward_hook(poison_activation_gradient)  # its output is the LayerNorm's input

    ddp = torch.nn.parallel.DistributedDataParallel(model, **spec["ddp_options"]) if distributed else None
    if ddp is not None and spec["autocast_on"] == "inner+hook":
        mp.distributed.register_comm_hook(ddp)
    net: torch.nn.Module = model if ddp is None else ddp
    # "inner": no mixprec hook at all; DDP reduces the 16-bit .grad itself, mp.step must then use only those
    autocast_target = model if spec["autocast_on"] in ("inner+hook", "inner") else net
    ranks = list(range(WORLD)) if rank is None else [rank]  # without DDP: each rank its own rows

    applied: list[bool] = []
    loss_scales: list[float] = []
    grad_norms: list[float] = []
    fault_targets: list[str] = []
    n = spec["micro"]
    for step in range(spec["steps"]):
        faulty_step = rank == 1 and step in FAULT_STEPS  # the reference (rank None) never faults
        for k in range(n):
            x, y = micro_batch(step, k, ranks)
            no_sync = ddp.no_sync() if ddp is not None and k < n - 1 else contextlib.nullcontext()
            with no_sync:
                armed["inf"] = spec["fault"] == "activation" and faulty_step
                if scaler is None:  # plain PyTorch
                    loss = torch.nn.functional.mse_loss(net(x), y) / n
                    loss.backward()
                else:
                    with mp.autocast(autocast_target):
                        loss = torch.nn.functional.mse_loss(net(x).float(), y) / n
                    scaler.scale(loss).backward()
        armed["inf"] = False
        if spec["fault"] == "grad" and faulty_step:
            fault_targets.append(_corrupt_gradient_after_backward(model, opt))
        if scaler is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            applied.append(True)
            grad_norms.append(float(norm))
        else:
            info = mp.step(opt, scaler, max_grad_norm=1.0, sync=spec["sync"])
            applied.append(bool(info.applied))  # sync=False: 0-dim tensors, read here only to compare
            loss_scales.append(float(info.loss_scale))
            grad_norms.append(step_float(info.grad_norm))
        opt.zero_grad()

    stepped = _stepped_params(opt)
    return {
        "params": {k: _clone(v) for k, v in model.state_dict().items()},
        "masters": _master_values(opt, stepped),
        "opt_state": [{k: _clone(v) for k, v in opt.state.get(p, {}).items()} for p in stepped],
        "scaler": None if scaler is None else scaler.state_dict(),
        "applied": applied,
        "loss_scales": loss_scales,
        "grad_norms": grad_norms,
        "fault_targets": fault_targets,
    }


def _file_stem(index: int, rank: int) -> str:
    return f"scenario{index}.rank{rank}"


def _pair_worker(rank: int, out: str, scenarios: list[tuple[int, Spec]]) -> None:
    """One rank of a pair (started by helpers.run_workers, its gloo group up): the scenarios in order, each
    result into its own file, until one fails.

    A scenario that raises on this rank ends the process (after writing the traceback): its peer's pending
    or next collective then fails at once (connection reset) instead of pairing with a collective of another
    scenario, and the parent starts a new pair for the scenarios not yet attempted. (One group per process,
    not one per scenario: creating gloo groups again after destroying one aborts now and then, in torch.)
    """
    for index, spec in scenarios:
        stem = Path(out) / _file_stem(index, rank)
        try:
            result = train(spec, rank)
            torch.save(result, f"{stem}.tmp")
            os.replace(f"{stem}.tmp", f"{stem}.pt")  # never a half-written result
            dist.barrier()  # both ranks are done with this scenario: the next one starts in step
        except Exception:
            if not Path(f"{stem}.pt").exists():  # a failed barrier after a saved result: the peer failed
                Path(f"{stem}.err").write_text(traceback.format_exc())
            raise  # run_workers ends the process at once: no teardown of a group that may be mid-collective


# ====================================================================================================
# The parent: start pairs, collect, compare
# ====================================================================================================


def _start_pair(todo: list[int], scenarios: list[Spec], workdir: Path, attempt: int,
                timeout_s: float) -> Callable[[int], str]:
    """Run one pair of workers on the scenarios ``todo`` until both exit (or are stopped); return a function
    that explains, per rank, why a scenario of this attempt has no file from that rank."""
    outcomes = run_workers(_pair_worker, (str(workdir), [(i, scenarios[i]) for i in todo]),
                           workdir=workdir / f"attempt{attempt}", world_size=WORLD, timeout_s=timeout_s,
                           collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    return lambda rank: outcomes[rank].describe()


def run_pair(scenarios: list[Spec], workdir: Path, timeout_s: float = PAIR_TIMEOUT_S) -> dict[str, Any]:
    """Run the scenarios in pairs of worker processes; return name -> [rank0 result, rank1 result] or the
    error text (tracebacks, exit codes, log tails). One pair runs them all unless one fails; each failure
    costs a new pair (a few seconds) for the scenarios after it."""
    workdir.mkdir(parents=True, exist_ok=True)
    attempted: dict[int, Callable[[int], str]] = {}  # scenario -> why() of the pair that attempted it
    todo = list(range(len(scenarios)))
    for attempt in range(len(scenarios)):
        why = _start_pair(todo, scenarios, workdir, attempt, timeout_s)
        # The pair ran its scenarios in order, in step: the first one without both results is where it
        # broke (an exception, a crash, a hang): that one is done too, failed; the rest go to a new pair.
        complete = [all(Path(f"{workdir / _file_stem(i, r)}.pt").exists() for r in range(WORLD)) for i in todo]
        broke_at = complete.index(False) if False in complete else len(todo) - 1
        attempted.update({i: why for i in todo[: broke_at + 1]})
        todo = todo[broke_at + 1:]
        if not todo:
            break

    results: dict[str, Any] = {}
    for i, spec in enumerate(scenarios):
        name, per_rank, errors = spec["name"], [], []
        for rank in range(WORLD):
            stem = workdir / _file_stem(i, rank)
            if Path(f"{stem}.pt").exists():
                per_rank.append(torch.load(f"{stem}.pt", weights_only=False))
            elif Path(f"{stem}.err").exists():
                errors.append(f"--- rank {rank} raised:\n{Path(f'{stem}.err').read_text()}")
            else:
                errors.append(f"--- rank {rank} did not finish {name!r}: {attempted[i](rank)}")
        results[name] = "\n".join(errors) if errors else per_rank
    return results


def replicas(results: dict[str, Any], name: str) -> tuple[Result, Result]:
    got = results[name]
    if isinstance(got, str):
        pytest.fail(f"scenario {name!r} failed in a worker process:\n{got}", pytrace=False)
    return got[0], got[1]


def reference(spec: Spec) -> Result:
    """The 1-process run of a scenario on both ranks' rows (computed here, with one thread like the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train({**spec, "seeds": "same"}, rank=None)  # DDP starts every rank from rank 0's weights
    finally:
        torch.set_num_threads(threads)


def flatten(result: Result) -> dict[str, Any]:
    """Everything that must agree across replicas, by a readable key."""
    flat: dict[str, Any] = {f"param {k}": v for k, v in result["params"].items()}
    flat.update({f"master {i}": v for i, v in enumerate(result["masters"])})
    for i, state in enumerate(result["opt_state"]):
        flat.update({f"optimizer state {i}.{k}": v for k, v in state.items()})
    for k, v in (result["scaler"] or {}).items():
        flat[f"scaler {k}"] = v
    for k in ("applied", "loss_scales", "grad_norms"):
        flat[k] = result[k]
    return flat


def _same_bits(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # NaN, -0.0 too
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _describe(a: Any, b: Any) -> str:
    if torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.is_floating_point():
        diff = (a.double() - b.double()).abs()
        return f"{int((diff != 0).sum())} of {diff.numel()} values differ, max |diff| {float(diff.max()):.3g}"
    return f"{a!r} != {b!r}"


def bitwise_differences(a: Result, b: Result, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every entry that is not bitwise equal between two replicas ([] when they are identical)."""
    fa, fb = flatten(a), flatten(b)
    for key in ignore:
        fa.pop(key, None), fb.pop(key, None)
    diffs = [f"{k}: only on one side" for k in sorted(set(fa) ^ set(fb))]
    diffs += [f"{k}: {_describe(fa[k], fb[k])}" for k in fa if k in fb and not _same_bits(fa[k], fb[k])]
    return diffs


def assert_replicas_equal(r0: Result, r1: Result, ignore: tuple[str, ...] = ()) -> None:
    diffs = bitwise_differences(r0, r1, ignore)
    assert not diffs, "rank 0 and rank 1 differ:\n  " + "\n  ".join(diffs)


def noise_eps(preset: str | None) -> float:
    """The coarsest format the run rounds gradients or parameters to: sets the honest tolerance below."""
    if preset is None:
        return mp.F32.eps
    policy = mp.Policy.parse(preset)
    return max(policy.params.eps, policy.compute.eps)


#: Tolerance against the 1-process run, per tensor: max |diff| <= ulps(eps) * eps * max|reference tensor|,
#: eps of the coarsest format the run rounds to (`noise_eps`). Why not bitwise: DDP averages per-rank
#: gradients where the reference sums all rows at once, so FP32 additions happen in another order; and where
#: the policy rounds onto a 16-bit grid it rounds each rank's half-batch gradient separately:
#: round(a) + round(b) != round(a + b), by up to half an ulp of the gradient. A master that lands differently
#: by a hair can then round to the neighbouring 16-bit value: a 1-ulp difference in a parameter. Measured on
#: this data (10 SGD-momentum steps; every preset and variant; both through DDP and through a hand-written
#: FP32 all-reduce of the gradients): at most 1.9 eps-units for 16-bit runs (bf16-pure, no masters, the worst),
#: 2.4 for f32 (reduction order alone, in FP32's much finer ulps). The budgets below are 3x and 6x that.
#: What real bugs do, measured the same way: a rank's gradient never reduced: 85 (bf16), 680 (fp16), 5e6 (f32)
#: eps-units; a summed instead of averaged gradient (update x2): 210 (bf16), 1650 (fp16). Not caught: a few
#: percent off in the update under bf16 (5% is 5.4 eps-units); the bitwise replica checks do not depend on this.
ULPS_16BIT = 6
ULPS_FP32 = 16


def reference_differences(got: Result, ref: Result, eps: float) -> list[str]:
    diffs = []
    pairs = [(f"param {k}", got["params"][k], v) for k, v in ref["params"].items() if v.is_floating_point()]
    pairs += [(f"master {i}", g, r) for i, (g, r) in enumerate(zip(got["masters"], ref["masters"], strict=True))]
    ulps = ULPS_FP32 if eps == mp.F32.eps else ULPS_16BIT
    for key, g, r in pairs:
        err = float((g.double() - r.double()).abs().max())
        unit = eps * max(float(r.double().abs().max()), 1e-3)
        if not err <= ulps * unit:  # also catches NaN
            diffs.append(f"{key}: max |diff| {err:.3g} = {err / unit:.1f} eps-units of its max, allowed {ulps}")
    return diffs


def assert_close_to_reference(got: Result, ref: Result, preset: str | None) -> None:
    assert got["applied"] == ref["applied"], (
        f"skip decisions differ from the 1-process run: DDP {got['applied']}, 1-process {ref['applied']}")
    diffs = reference_differences(got, ref, noise_eps(preset))
    assert not diffs, "the DDP run is not the 1-process run on the concatenated batch:\n  " + "\n  ".join(diffs)


# ----- groups of scenarios: each group is ONE pair of processes, run once per test session ------------


def _preset_group() -> list[Spec]:
    specs = [scenario(f"ddp {p}", p) for p in [*mp.PRESETS, *NATIVE, *VARIANTS]]
    specs += [scenario(f"comm hook {p}", p, autocast_on="inner+hook") for p in ("f16-master", "bf16-master")]
    return specs


def _control_group() -> list[Spec]:
    return [scenario("plain ddp", None), scenario("plain no ddp", None, ddp=False),
            scenario("plain ddp different seeds", None, seeds="different", steps=5, optimizer="adam")]


def _fault_group() -> list[Spec]:
    specs = [scenario(f"fault {fault} {p}", p, fault=fault, optimizer="adam")
             for fault in ("activation", "grad") for p in FAULT_PRESETS]
    return specs + [scenario(f"fault {fault} fused sync={sync}", "f16-master", fault=fault, optimizer="adam-fused",
                             sync=sync) for fault in ("activation", "grad") for sync in (True, False)]


def _no_sync_group() -> list[Spec]:
    return [scenario("no_sync f16-master", "f16-master", micro=4, steps=5),
            *(scenario(f"{'' if on else 'not '}checkpointed {p}", p, micro=2, steps=5, checkpointed=on)
              for p in ("f16-master", "bf16-master,execution=native") for on in (True, False))]


def _seeds_group() -> list[Spec]:
    return [scenario(f"different seeds {p}", p, seeds="different", steps=5, optimizer="adam")
            for p in ("f16-master", "bf16-master")]


#: DDP's own options, and DDP without mixprec's hook (mp.autocast on the inner module): (name, options).
DDP_VARIANTS: dict[str, dict[str, Any]] = {
    "gradient_as_bucket_view": dict(ddp_options={"gradient_as_bucket_view": True}, micro=2),
    "find_unused_parameters": dict(ddp_options={"find_unused_parameters": True}, micro=2),
    "static_graph": dict(ddp_options={"static_graph": True}),  # torch's static_graph refuses no_sync at first
    "no mixprec hook": dict(autocast_on="inner", micro=2),
}
DDP_VARIANT_PRESETS = ["f16-master", "bf16-master,execution=native", "f16-pure"]


def _ddp_options_group() -> list[Spec]:
    return [scenario(f"{variant} {p}", p, steps=5, **options)
            for variant, options in DDP_VARIANTS.items() for p in DDP_VARIANT_PRESETS]


GROUPS: dict[str, Callable[[], list[Spec]]] = {
    "presets": _preset_group, "control": _control_group, "faults": _fault_group, "no_sync": _no_sync_group,
    "seeds": _seeds_group, "ddp options": _ddp_options_group,
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], dict[str, Any]]]:
    """``pairs(group)``: that group's results, run on first use and kept for the module's other tests."""
    cache: dict[str, dict[str, Any]] = {}

    def get(group: str) -> dict[str, Any]:
        if group not in cache:
            cache[group] = run_pair(GROUPS[group](), tmp_path_factory.mktemp(f"ddp-{group}"))
        return cache[group]

    yield get


def _spec(group: str, name: str) -> Spec:
    return next(s for s in GROUPS[group]() if s["name"] == name)


# ====================================================================================================
# The tests
# ====================================================================================================


@pytest.mark.parametrize("preset", [*mp.PRESETS, *NATIVE, *VARIANTS])
def test_ddp_replicas_are_bitwise_equal_and_match_the_one_process_run(pairs, preset):
    name = f"ddp {preset}"
    r0, r1 = replicas(pairs("presets"), name)
    assert_replicas_equal(r0, r1)
    assert_close_to_reference(r0, reference(_spec("presets", name)), preset)


@pytest.mark.parametrize("preset", ["f16-master", "bf16-master"])
def test_comm_hook_registered_by_hand_when_autocast_wraps_the_inner_module(pairs, preset):
    name = f"comm hook {preset}"
    r0, r1 = replicas(pairs("presets"), name)
    assert_replicas_equal(r0, r1)
    assert_close_to_reference(r0, reference(_spec("presets", name)), preset)


def test_plain_pytorch_ddp_replicas_are_bitwise_equal_and_match_the_one_process_run(pairs):
    r0, r1 = replicas(pairs("control"), "plain ddp")
    assert_replicas_equal(r0, r1)
    assert_close_to_reference(r0, reference(_spec("control", "plain ddp")), None)


def test_plain_pytorch_ddp_starts_every_rank_from_rank_0s_weights(pairs):
    r0, r1 = replicas(pairs("control"), "plain ddp different seeds")
    assert_replicas_equal(r0, r1)


def test_the_equality_check_sees_drift_without_ddp(pairs):
    # The negative control: each rank trains on its own rows with no reduction; the replicas must drift,
    # and the check used everywhere above must say so (it is not vacuous).
    r0, r1 = replicas(pairs("control"), "plain no ddp")
    diffs = bitwise_differences(r0, r1)
    assert any(d.startswith("param ") for d in diffs) and any(d.startswith("optimizer state") for d in diffs)
    assert reference_differences(r0, reference(_spec("control", "plain no ddp")), mp.F32.eps)


@pytest.mark.parametrize("preset", FAULT_PRESETS)
@pytest.mark.parametrize("fault", ["activation", "grad"])
def test_an_overflow_on_one_rank_is_skipped_on_every_rank(pairs, fault, preset):
    # "activation": inf in rank 1's activation gradient during backward (it reaches the all-reduce);
    # "grad": inf written into rank 1's gradient after backward returned (after the all-reduce), so only
    # mp.step agreeing on found-inf across ranks makes rank 0 skip too.
    r0, r1 = replicas(pairs("faults"), f"fault {fault} {preset}")
    expected = [step not in FAULT_STEPS for step in range(STEPS)]  # no step overflows by itself: see micro_batch
    assert r1["applied"] == expected, f"rank 1 applied {r1['applied']}, expected {expected}"
    assert r0["applied"] == expected, f"rank 0 applied {r0['applied']} (rank 1: {r1['applied']}), expected {expected}"
    # StepInfo.grad_norm is each rank's own measurement: after a post-reduction fault rank 1's is inf, rank 0's
    # need not be. Everything that is state must still be identical.
    assert_replicas_equal(r0, r1, ignore=("grad_norms",) if fault == "grad" else ())
    adam_steps = {float(s["step"]) for s in r0["opt_state"] if "step" in s}
    assert adam_steps == {float(sum(expected))}, f"Adam's step counters {adam_steps}, applied steps {sum(expected)}"


@pytest.mark.parametrize("fault", ["activation", "grad"])
def test_sync_free_steps_skip_on_every_rank_as_synced_steps_do(pairs, fault):
    # mp.step(..., sync=False): no host read; the ranks agree on found-inf in the all-reduce and fused Adam
    # skips on the device. The replicas stay equal, and equal to the synced run bit for bit.
    results = pairs("faults")
    synced, free = (replicas(results, f"fault {fault} fused sync={sync}") for sync in (True, False))
    expected = [step not in FAULT_STEPS for step in range(STEPS)]
    assert free[0]["applied"] == free[1]["applied"] == synced[0]["applied"] == expected
    ignore = ("grad_norms",) if fault == "grad" else ()
    assert_replicas_equal(*free, ignore=ignore)
    for rank in range(WORLD):
        assert_replicas_equal(free[rank], synced[rank])


@pytest.mark.parametrize("preset", ["f16-master", "bf16-master,execution=native"])
def test_activation_checkpointing_under_ddp_trains_as_without_it(pairs, preset):
    # Backward recomputes the checkpointed modules' forward inside DDP's backward (with no_sync micro-batches):
    # replicas equal, and bit for bit the run without checkpointing (whose parameters are named differently).
    results = pairs("no_sync")
    with_it, without = replicas(results, f"checkpointed {preset}"), replicas(results, f"not checkpointed {preset}")
    assert_replicas_equal(*with_it)
    for a, b in zip(with_it, without, strict=True):
        assert a["applied"] == b["applied"] and a["loss_scales"] == b["loss_scales"]
        assert _same_bits(list(a["params"].values()), list(b["params"].values()))
        assert _same_bits(a["masters"], b["masters"])
        assert all(x.keys() == y.keys() and _same_bits(list(x.values()), list(y.values()))
                   for x, y in zip(a["opt_state"], b["opt_state"], strict=True))


def test_no_sync_micro_batches_accumulate_and_reduce_once(pairs):
    r0, r1 = replicas(pairs("no_sync"), "no_sync f16-master")
    assert_replicas_equal(r0, r1)
    assert_close_to_reference(r0, reference(_spec("no_sync", "no_sync f16-master")), "f16-master")


@pytest.mark.parametrize("preset", ["f16-master", "bf16-master"])
def test_ranks_seeded_differently_train_rank_0s_weights(pairs, preset):
    # DDP broadcasts rank 0's parameters at construction; masters and optimizer state must follow them.
    name = f"different seeds {preset}"
    r0, r1 = replicas(pairs("seeds"), name)
    assert_replicas_equal(r0, r1)
    assert_close_to_reference(r0, reference(_spec("seeds", name)), preset)


@pytest.mark.parametrize("preset", DDP_VARIANT_PRESETS)
@pytest.mark.parametrize("variant", DDP_VARIANTS)
def test_ddp_options_and_ddp_without_the_hook_keep_replicas_equal(pairs, variant, preset):
    # Buckets as gradient views, unused-parameter search, a static graph: the hook and the FP32 gradients
    # must not care. Without mixprec's hook, DDP reduces the 16-bit .grad and mp.step uses only that.
    name = f"{variant} {preset}"
    r0, r1 = replicas(pairs("ddp options"), name)
    assert_replicas_equal(r0, r1)
    assert_close_to_reference(r0, reference(_spec("ddp options", name)), preset)

