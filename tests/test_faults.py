"""Faults survived: the fault spec, injection from the API, the training loop and the CLI; a recipe run with
100+ injected gradient faults (every faulty step skipped, nothing changed by it, the final metric within
FP32's spread); the NaN-storm guard stopping a run with a diagnosis and a checkpoint of the last good state."""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec.cli import main
from mixprec.harness.checkpoints import load_checkpoint
from mixprec.harness.determinism import torch_threads
from mixprec.harness.faults import Fault, FaultInjector, FaultPlan, Injection
from mixprec.harness.training import train
from mixprec.recipes import get_recipe

# ----- the spec: parses, prints back, says what is valid --------------------------------------------------


def test_a_spec_parses_and_prints_back():
    text = "grad:inf@3,7;loss:nan@rate=0.01;act[0]:-inf@10-20,22;grad[fc.weight]:nan@1;seed=1"
    plan = FaultPlan.parse(text)
    assert str(plan) == text and FaultPlan.parse(str(plan)) == plan
    assert plan.faults[2] == Fault("act", "-inf", steps=((10, 20), (22, 22)), target="0")
    assert str(FaultPlan.parse("grad:nan@5,3,4,9-12,10")) == "grad:nan@3-5,9-12;seed=0"  # sorted and merged
    assert FaultPlan.parse(plan) is plan


faults = st.builds(
    Fault,
    kind=st.sampled_from(["grad", "act"]),
    value=st.sampled_from(["inf", "-inf", "nan"]),
    steps=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 5)), min_size=1, max_size=4).map(
        lambda items: FaultPlan.parse("grad:inf@" + ",".join(f"{a}-{a + n}" for a, n in items)).faults[0].steps),
    target=st.one_of(st.none(), st.sampled_from(["0.weight", "layers.1.bias"])),
) | st.builds(Fault, kind=st.just("loss"), value=st.sampled_from(["inf", "nan"]),
              rate=st.floats(1e-6, 1.0, exclude_min=False))


@settings(max_examples=100, deadline=None)
@given(st.lists(faults, min_size=1, max_size=4), st.integers(0, 2**32))
def test_every_plan_prints_to_a_spec_that_parses_back_to_it(fault_list, seed):
    plan = FaultPlan(tuple(fault_list), seed)
    assert FaultPlan.parse(str(plan)) == plan


@pytest.mark.parametrize("spec, why", [
    ("", "an empty clause"),
    ("seed=3", "no fault in it"),
    ("grad:inff@3", "unknown value 'inff'"),
    ("weights:nan@3", "unknown kind 'weights'"),
    ("grad:inf", "cannot read 'grad:inf'"),
    ("grad:inf@0", "'0' in 'grad:inf@0' is not a step"),
    ("grad:inf@5-3", "'5-3' in 'grad:inf@5-3' is not a step"),
    ("grad:inf@3;;loss:nan@4", "an empty clause"),
    ("grad:inf@rate=0", r"rate must be a probability in \(0, 1\], got 'rate=0'"),
    ("grad:inf@rate=1.5", "rate must be a probability"),
    ("grad:inf@rate=often", "rate must be a probability"),
    ("loss[x]:nan@3", "a loss fault has no target"),
    ("grad[]:nan@3", "empty target"),
    ("grad:nan@3;seed=-1", "seed must be an integer >= 0, got '-1'"),
    ("grad:nan@3;seed=1;seed=2", "seed is given twice"),
])
def test_bad_specs_say_what_is_wrong_and_what_is_valid(spec, why):
    with pytest.raises(ValueError, match=why) as error:
        FaultPlan.parse(spec)
    assert f"bad fault spec {spec!r}" in str(error.value)
    assert "KIND grad, loss or act; VALUE inf, -inf or nan" in str(error.value)


def test_a_target_the_model_does_not_have_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"no parameter named '0.wieght'; its parameters: 0.weight, 0.bias"):
        FaultInjector("grad[0.wieght]:nan@1", model)
    with pytest.raises(ValueError, match="no module named '3'"):
        FaultInjector("act[3]:inf@1", model)


# ----- injection ---------------------------------------------------------------------------------------


def test_random_faults_are_a_pure_function_of_seed_clause_and_step():
    plan = FaultPlan.parse("grad:inf@rate=0.3;loss:nan@rate=0.1;seed=7")
    fired = [[f.kind for f in plan.at(step)] for step in range(1, 400)]
    assert fired == [[f.kind for f in plan.at(step)] for step in range(1, 400)]  # the same, asked again
    grads = sum("grad" in kinds for kinds in fired)
    assert 90 < grads < 150  # about 30% of 399 steps
    other = FaultPlan.parse("grad:inf@rate=0.3;loss:nan@rate=0.1;seed=8")
    assert fired != [[f.kind for f in other.at(step)] for step in range(1, 400)]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _one_step(model, opt, scaler, injector, step):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
    with injector.forward(step), mp.autocast(model):
        loss = model(x).float().pow(2).mean()
    loss = injector.loss(step, loss)
    scaler.scale(loss).backward()
    injector.grads(step)
    info = mp.step(opt, scaler)
    opt.zero_grad()
    return info


@pytest.mark.parametrize("spec, target", [
    ("grad:inf@2", None), ("grad[2.bias]:nan@2", "2.bias"), ("grad:-inf@2", None),
    ("loss:nan@2", "loss"), ("loss:inf@2", "loss"), ("act[1]:inf@2", "1"), ("act:nan@2", None),
])
def test_each_kind_of_fault_skips_its_step_and_only_that_step(spec, target):
    model = _mlp()
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    scaler = mp.StaticScaler(2.0**8)
    injector = FaultInjector(spec, model)
    applied = [_one_step(model, opt, scaler, injector, step).applied for step in (1, 2, 3)]
    assert applied == [True, False, True]
    [injection] = injector.injections
    assert injection.step == 2 and injection.kind == spec.split(":")[0].split("[")[0]
    assert target is None or injection.target == target


def test_an_activation_fault_without_a_target_finds_a_model_that_is_one_module():
    # A bare nn.Linear has no submodules: the model itself is the module whose output takes the fault.
    model = torch.nn.Linear(4, 1)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    scaler, injector = mp.StaticScaler(2.0**8), FaultInjector("act:inf@2", model)
    applied = [_one_step(model, opt, scaler, injector, step).applied for step in (1, 2, 3)]
    assert applied == [True, False, True] and injector.injections[0].target == ""


def test_the_same_seed_injects_the_same_faults_into_the_same_elements():
    runs = []
    for _ in range(2):
        model = _mlp()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        injector = FaultInjector("grad:nan@rate=0.5;seed=3", model)
        for step in range(1, 20):
            injector.grads(step)
        runs.append((injector.injections, [p.grad.isnan().nonzero().tolist() for p in model.parameters()]))
    assert runs[0] == runs[1] and len(runs[0][0]) > 3
    assert all(isinstance(i, Injection) for i in runs[0][0])


# ----- a recipe run with 100+ injected gradient faults ---------------------------------------------------


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [m.detach().clone() for g in opt.param_groups for m in g["params"]]  # the FP32 masters
    tensors += [v.clone() for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensors


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a, b, strict=True))


def train_through_faults(spec: str | None, policy: str, applied_steps: int, seed: int = 0) -> dict:
    """The reference training loop's steps on the underflow recipe (emulated FP16 on the CPU), with faults,
    until `applied_steps` updates were applied (the LR schedule spans those): a fault costs its step and
    nothing else. Checks, for every step a fault hit, that it was skipped and changed no bit of the
    parameters, FP32 masters or optimizer state."""
    with torch_threads(1):  # as train() runs: these models are small, more threads only wait on each other
        return _train_through_faults(spec, policy, applied_steps, seed)


def _train_through_faults(spec: str | None, policy: str, applied_steps: int, seed: int) -> dict:
    recipe = get_recipe("underflow")
    data = recipe.make_data()
    torch.manual_seed(seed)  # as train() seeds the initial weights
    model = recipe.make_model()
    model, opt, scaler = mp.prepare(model, recipe.build_optimizer(model.parameters()), policy)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: recipe.lr_factor(s, applied_steps))
    injector = FaultInjector(spec or "grad:nan@1000000", model)
    step = applied = faulty = skipped = changed = 0
    while applied < applied_steps:
        step += 1
        hits = len(injector.injections)
        with injector.forward(step), mp.autocast(model):
            loss = recipe.loss(model, data.batch(step - 1, recipe.batch_size, seed))
        loss = injector.loss(step, loss)
        scaler.scale(loss).backward()
        injector.grads(step)
        hit = len(injector.injections) > hits
        before = _state(model, opt) if hit else None
        info = mp.step(opt, scaler, max_grad_norm=recipe.max_grad_norm)
        if hit:
            faulty, skipped = faulty + 1, skipped + (not info.applied)
            changed += not _bitwise_equal(before, _state(model, opt))
        if info.applied:
            scheduler.step()
            applied += 1
        opt.zero_grad()
    model.eval()
    with torch.no_grad(), mp.autocast(model):
        metric = recipe.evaluate(model, data)
    kinds = [i.kind for i in injector.injections]
    return dict(metric=metric, steps=step, faulty=faulty, skipped=skipped, changed=changed,
                grad_faults=kinds.count("grad"), other_faults=len(kinds) - kinds.count("grad"),
                loss_scale=scaler.loss_scale)


def test_a_recipe_run_survives_100_gradient_faults_bitwise_and_ends_within_fp32s_spread():
    # A static scale: every fault is a skip and nothing else (see the next test for the dynamic scaler).
    spec = "grad:inf@rate=0.2;grad:nan@rate=0.1;loss:nan@rate=0.01;act:inf@rate=0.01;seed=2"
    run = train_through_faults(spec, "f16-master,scaling=static:65536", applied_steps=300)
    assert run["grad_faults"] >= 100
    assert run["faulty"] == run["skipped"] == run["steps"] - 300 and run["changed"] == 0
    # FP32's spread: 5 seeds of the same recipe and steps. The faulty run, with its 300 applied updates on
    # other batches (the faulty steps' batches are lost), must end inside it; widened by one standard
    # deviation on each side for torch builds that round differently (here it lies inside the plain range).
    fp32 = [train("underflow", "f32", seed=s, threads=1).final_metric for s in range(5)]
    margin = statistics.stdev(fp32)
    assert min(fp32) - margin <= run["metric"] <= max(fp32) + margin, (run, fp32)


def test_faults_the_dynamic_scaler_takes_for_overflows_drive_its_scale_to_the_floor():
    # A fault looks like an overflow: the default DynamicScaler backs off on each (after its hysteresis of 2)
    # and grows only after 2000 clean steps, so 20 faults in a short run leave it at min_scale = 1, where this
    # recipe's gradients (2^-25.5) underflow: the weights stop learning. Measured, not a bug of the skip.
    spec = "grad:inf@" + ",".join(str(5 * k) for k in range(1, 21)) + ";seed=0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the floor's warning
        run = train_through_faults(spec, "f16-master", applied_steps=150)
    assert run["faulty"] == run["skipped"] == 20 and run["changed"] == 0
    assert run["loss_scale"] == 1.0


# ----- the training loop and the CLI ------------------------------------------------------------------


def test_train_injects_faults_and_skips_exactly_those_steps():
    result = train("underflow", "f16-master,scaling=static:65536", steps=40, threads=1,
                   faults="grad:nan@10-19;loss:nan@30;act[2]:inf@33")
    skipped = [r["step"] for r in result.history if r["kind"] == "step" and not r["applied"]]
    assert skipped == [*range(10, 20), 30, 33] and result.skipped_steps == 12


def test_a_nan_storm_in_training_stops_with_names_and_a_checkpoint_of_the_last_good_state(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(mp.NaNStormError) as caught:
        train("underflow", "f16-master,scaling=static:1024", steps=100, threads=1, out=run,
              faults="grad[2.weight]:nan@5-100", max_skips_in_a_row=10)
    error = caught.value
    assert (error.step, error.skipped_in_a_row, error.loss_scale) == (14, 10, 1024.0)
    assert error.gradients == {"2.weight": "nan"}
    assert str(error).startswith("NaN storm at step 14: 10 steps in a row were skipped (loss scale 1024, "
                                 "10 skipped in all); inf/NaN gradients in 2.weight: nan; the weights are finite")
    saved = load_checkpoint(run / "checkpoint-000014.pt")
    assert str(run / "checkpoint-000014.pt") in str(error)
    assert saved["step"] == 14 and [r["applied"] for r in saved["history"] if r["kind"] == "step"] == (
        [True] * 4 + [False] * 10)
    # The last good state is the state after step 4: a run stopped there holds the same weights.
    good = train("underflow", "f16-master,scaling=static:1024", steps=100, threads=1, out=tmp_path / "good",
                 stop_at=4)
    assert good.steps == 4
    ref = load_checkpoint(tmp_path / "good" / "checkpoint-000004.pt")
    for name, tensor in ref["model"].items():
        assert torch.equal(saved["model"][name], tensor), name
    assert all(torch.equal(a, b) for a, b in zip(saved["optimizer"]["masters"], ref["optimizer"]["masters"],
                                                 strict=True))


def test_the_cli_injects_faults_and_a_storm_is_one_line_and_exit_status_1(tmp_path, capsys):
    base = ["train", "--recipe", "underflow", "--policy", "f16-master,scaling=static:1024", "--steps", "30",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a"), "--inject-faults", "grad:inf@3,7;loss:nan@9"]) == 0
    assert "skipped steps 3" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b"), "--inject-faults", "grad[0.bias]:nan@5-30",
                 "--storm-guard", "6"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixprec train: stopped: NaN storm at step 10: 6 steps in a row were skipped")
    assert "0.bias: nan" in err and "checkpoint-000010.pt" in err and "Traceback" not in err
    for option, value in [("--inject-faults", "grad:inf@0"), ("--storm-guard", "-1")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--out", str(tmp_path / "c"), option, value])
        assert exit_info.value.code == 2
        assert f"mixprec train: error: argument {option}: " in capsys.readouterr().err
    # --storm-guard 0: no guard, the run keeps skipping to the end
    assert main([*base, "--out", str(tmp_path / "e"), "--inject-faults", "grad:nan@5-30", "--storm-guard", "0"]) == 0
    assert "skipped steps 26" in capsys.readouterr().out


def test_math_of_the_storm_limit_in_the_docs():
    assert mp.DynamicScaler().storm_limit() == 2 * (24 + 2) and mp.StaticScaler(8.0).storm_limit() == 50
    assert math.isfinite(mp.DynamicScaler(max_scale=math.inf).storm_limit())
