"""mp.step: skipped steps change nothing, equality with torch.amp.GradScaler, clipping on unscaled grads,
the paper's finding (a) (gradients below 2^-24 need loss scaling), and bitwise-exact resume."""

from __future__ import annotations

import copy
import importlib
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec.scaling import SMALLEST_SCALE as TINY
from mixprec.scaling import LossScaleFloorError

INF = float("inf")


def mlp(dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def batch(i: int, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 4, generator=g).to(dtype), torch.randn(16, 1, generator=g)


def loss_of(model: torch.nn.Module, i: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    x, y = batch(i, dtype)
    return ((model(x).float() - y) ** 2).mean()


def snapshot(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [m.detach().clone() for g in opt.param_groups for m in g["params"]]
    for state in opt.state.values():
        tensors += [v.clone() for v in state.values() if torch.is_tensor(v)]
    return tensors


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)  # compares bits: NaN payloads and -0.0 included

    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(raw(x), raw(y)) for x, y in zip(a, b, strict=True)
    )


# ----- skipped steps ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["injected-inf", "fp16-overflow", "nan-plain-optimizer"])
def test_skipped_step_leaves_params_masters_and_adam_state_bitwise_unchanged(how):
    plain = how == "nan-plain-optimizer"
    model = mlp(torch.float32 if plain else torch.float16)
    dtype = torch.float32 if plain else torch.float16
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = adam if plain else mp.MasterWeights(adam)
    scaler = mp.StaticScaler(2.0**4)
    for i in range(3):
        scaler.scale(loss_of(model, i, dtype)).backward()
        assert mp.step(opt, scaler).applied
        opt.zero_grad()
    before = snapshot(opt, model)
    assert sum(torch.is_tensor(v) for s in opt.state.values() for v in s.values()) == 3 * 4  # step, m, v

    if how == "fp16-overflow":  # a real overflow: the scaled gradients exceed FP16's 65504
        scaler.scale(loss_of(model, 3) * 2.0**40).backward()
    else:
        scaler.scale(loss_of(model, 3, dtype)).backward()
        grads = [p.grad for p in model.parameters()]  # what users, DDP and clipping see
        grads[1][0] = math.nan if plain else INF
    info = mp.step(opt, scaler, max_grad_norm=1.0)
    assert not info.applied and info.skipped_steps == 1 and not math.isfinite(info.grad_norm)
    assert bitwise_equal(snapshot(opt, model), before)
    assert int(scaler.skipped_steps) == 1


def test_overflowing_grads_are_unscaled_but_not_clipped():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([8.0, INF, 4.0])
    info = mp.step(opt, mp.StaticScaler(4.0), max_grad_norm=0.5)
    assert p.grad.tolist() == [2.0, INF, 1.0] and info.grad_norm == INF and not info.applied


def test_clipping_uses_the_unscaled_gradients():
    torch.manual_seed(0)
    p, ref = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    grad = torch.randn(5) * 3
    p.grad, ref.grad = grad * 2.0**10, grad.clone()
    info = mp.step(torch.optim.SGD([p], lr=1.0), mp.StaticScaler(2.0**10), max_grad_norm=1.0)
    norm = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    torch.optim.SGD([ref], lr=1.0).step()
    assert info.applied and info.grad_norm == pytest.approx(norm.item(), rel=1e-6)
    torch.testing.assert_close(p.detach(), ref.detach())


@pytest.mark.parametrize("scaler", [mp.NoScaler(), mp.StaticScaler(2.0**8)], ids=["none", "static"])
def test_no_and_static_scalers_step_and_skip(scaler):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    s = scaler.loss_scale
    p.grad = torch.tensor([2.0, 2.0]) * s
    assert mp.step(opt, scaler).applied and p.tolist() == [0.0, 0.0]
    p.grad = torch.tensor([math.nan, 1.0])
    info = mp.step(opt, scaler)
    assert (info.applied, info.loss_scale, info.skipped_steps, info.grad_norm) == (False, s, 1, None)
    assert p.tolist() == [0.0, 0.0] and scaler.loss_scale == s


# ----- errors -------------------------------------------------------------------------------------


def test_stepping_without_gradients_says_call_backward_first():
    model = mlp()
    for opt in (torch.optim.SGD(mlp(torch.float32).parameters(), lr=1.0), mp.MasterWeights(
        torch.optim.SGD(model.parameters(), lr=1.0)
    )):
        with pytest.raises(RuntimeError, match=r"no gradients: call scaler.scale\(loss\).backward\(\) before"):
            mp.step(opt, mp.DynamicScaler())


def test_bad_max_grad_norm():
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0.*got -1.0"):
        mp.step(torch.optim.SGD([p], lr=1.0), mp.NoScaler(), max_grad_norm=-1.0)


def test_step_info_is_frozen():
    with pytest.raises(AttributeError):
        mp.StepInfo(applied=True, loss_scale=1.0, grad_norm=None).applied = False


# ----- the floor through mp.step ----------------------------------------------------------------------


def test_at_the_floor_mp_step_keeps_skipping_and_warns_once():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = mp.DynamicScaler(init_scale=2.0, hysteresis=1, min_scale=1.0)
    infos = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            p.grad = torch.tensor([INF, 1.0])
            infos.append(mp.step(opt, scaler))
    assert [i.loss_scale for i in infos] == [2.0, 1.0, 1.0, 1.0]
    assert [i.skipped_steps for i in infos] == [1, 2, 3, 4] and not any(i.applied for i in infos)
    assert len([w for w in caught if "minimum loss scale" in str(w.message)]) == 1
    assert p.tolist() == [1.0, 1.0]

    strict = mp.DynamicScaler(init_scale=1.0, min_scale=1.0, hysteresis=1, raise_at_min_scale=True)
    p.grad = torch.tensor([INF, 1.0])
    with pytest.raises(LossScaleFloorError):
        mp.step(opt, strict)


# ----- differential: torch.amp.GradScaler on a real optimizer -----------------------------------------


@settings(max_examples=20, deadline=None)
@given(overflows=st.lists(st.booleans(), min_size=1, max_size=12), interval=st.integers(1, 3))
def test_scale_trajectory_and_params_equal_torch_grad_scaler(overflows, interval):
    ours_model, theirs_model = mlp(torch.float32), mlp(torch.float32)
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.05, momentum=0.9)
    theirs_opt = torch.optim.SGD(theirs_model.parameters(), lr=0.05, momentum=0.9)
    ours = mp.DynamicScaler(init_scale=2.0**4, growth_interval=interval, hysteresis=1, min_scale=TINY, max_scale=INF)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=interval)
    for i, overflow in enumerate(overflows):
        ours.scale(loss_of(ours_model, i, torch.float32)).backward()
        theirs.scale(loss_of(theirs_model, i, torch.float32)).backward()
        if overflow:
            next(ours_model.parameters()).grad[0, 0] = INF
            next(theirs_model.parameters()).grad[0, 0] = INF
        info = mp.step(ours_opt, ours)
        theirs.step(theirs_opt)
        theirs.update()
        assert info.applied is not overflow
        assert ours.loss_scale == theirs.get_scale()
        ours_opt.zero_grad()
        theirs_opt.zero_grad()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        assert torch.equal(a, b)


def _two_optimizers(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    params = list(model.parameters())  # matrices with SGD, the rest with Adam (Muon + AdamW, say)
    return (torch.optim.SGD([p for p in params if p.dim() == 2], lr=0.05, momentum=0.9),
            torch.optim.Adam([p for p in params if p.dim() != 2], lr=1e-2))


@settings(max_examples=20, deadline=None)
@given(overflows=st.lists(st.sampled_from(["none", "both", "a", "b"]), min_size=1, max_size=10),
       interval=st.integers(1, 3))
def test_two_optimizers_one_scaler_follow_torch_grad_scaler_step_by_step(overflows, interval):
    # torch.amp: scaler.step(a); scaler.step(b); scaler.update(). mixprec: mp.step([a, b], scaler).
    ours_model, theirs_model = mlp(torch.float32), mlp(torch.float32)
    ours_opts, theirs_opts = _two_optimizers(ours_model), _two_optimizers(theirs_model)
    ours = mp.DynamicScaler(init_scale=2.0**4, growth_interval=interval, hysteresis=1, min_scale=TINY, max_scale=INF)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=interval)
    for i, overflow in enumerate(overflows):
        ours.scale(loss_of(ours_model, i, torch.float32)).backward()
        theirs.scale(loss_of(theirs_model, i, torch.float32)).backward()
        for model in (ours_model, theirs_model):
            weight, bias = list(model.parameters())[:2]  # weight: optimizer a's, bias: b's
            if overflow in ("both", "a"):
                weight.grad[0, 0] = INF
            if overflow in ("both", "b"):
                bias.grad[0] = INF
        before = [p.detach().clone() for p in ours_model.parameters()]
        info = mp.step(list(ours_opts), ours)
        for opt in theirs_opts:
            theirs.step(opt)
        theirs.update()
        assert info.applied is (overflow == "none")
        assert ours.loss_scale == theirs.get_scale()  # one update per iteration, from either overflow
        if overflow in ("none", "both"):
            for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
                assert torch.equal(a, b)
        else:
            # The one difference, by design: torch steps the optimizer whose gradients were finite; mixprec
            # skips the whole step (no half-updated model), then continues from torch's state re-synced.
            assert all(torch.equal(a, b) for a, b in zip(before, ours_model.parameters(), strict=True))
            with torch.no_grad():
                for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
                    a.copy_(b)
            for mine, its in zip(ours_opts, theirs_opts, strict=True):
                mine.load_state_dict(copy.deepcopy(its.state_dict()))  # torch shares "step" tensors otherwise
        for opt in (*ours_opts, *theirs_opts):
            opt.zero_grad()


def test_a_second_step_after_one_backward_is_an_error_that_names_the_fix():
    model = mlp(torch.float32)
    opt_a, opt_b = _two_optimizers(model)
    scaler = mp.DynamicScaler(init_scale=2.0**4, growth_interval=1)
    scaler.scale(loss_of(model, 0, torch.float32)).backward()
    assert mp.step(opt_a, scaler).applied
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step them together: mp.step\(\[optimizer_a, optimizer_b\], scaler\)"):
        mp.step(opt_b, scaler)  # its gradients were scaled by 16, the scale is now 32
    with pytest.raises(RuntimeError, match="already called since the last scaler.scale"):
        mp.step(opt_a, scaler)  # the same update twice
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    scaler.scale(loss_of(model, 1, torch.float32)).backward()  # a new backward: fine again
    assert mp.step([opt_a, opt_b], scaler).applied


def test_a_norm_beyond_16_bits_does_not_zero_the_gradients():
    # f16-pure natively: FP16 gradients, each finite, whose total norm (> 65504) overflows FP16. The norm is
    # computed in FP32, so the step clips and applies, and Adam's weights stay finite.
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    model, opt, scaler = mp.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-3), "f16-pure,execution=native")
    for p in model.parameters():
        p.grad = torch.full_like(p, 2000.0)  # norm = 2000 * sqrt(4160) ~ 1.3e5 > 65504
    info = mp.step(opt, scaler, max_grad_norm=1.0)
    assert info.applied and info.grad_norm == pytest.approx(2000.0 * 4160**0.5, rel=1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(p.grad, torch.zeros_like(p.grad)) for p in model.parameters())


def test_a_norm_that_overflows_fp32_skips_the_step():
    p = torch.nn.Parameter(torch.ones(4))
    opt, scaler = torch.optim.Adam([p], lr=1e-3), mp.NoScaler()
    p.grad = torch.full((4,), 3e38)  # finite, but the norm is not
    info = mp.step(opt, scaler, max_grad_norm=1.0)
    assert not info.applied and math.isinf(info.grad_norm) and opt.state == {}
    assert torch.equal(p.detach(), torch.ones(4))


# ----- the paper's finding (a) -------------------------------------------------------------------------


def _tiny_regression(scaler: mp.LossScaler | None, steps: int = 60) -> tuple[torch.Tensor, list[float]]:
    """Linear regression whose loss is multiplied by 2^-28, so every weight gradient is below 2^-25:
    in FP16 they all round to zero. Emulated FP16 weights (FP32 storage) with FP32 masters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([0.5, -1.0, 0.25, 2.0])
    w = torch.nn.Parameter(torch.zeros(4))
    lr = 0.1 * 2.0**28  # undoes the 2^-28 in the update, not in the gradients' magnitude
    if scaler is None:  # the FP32 reference
        opt: torch.optim.Optimizer = torch.optim.SGD([w], lr=lr)
    else:
        opt = mp.MasterWeights(torch.optim.SGD([w], lr=lr), param_format=mp.F16)
    losses = []
    for _ in range(steps):
        loss = ((x @ w - y) ** 2).mean() * 2.0**-28
        losses.append(loss.item() * 2.0**28)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            mp.step(opt, scaler)
        opt.zero_grad()
    return w.detach(), losses


def test_gradients_below_fp16_range_need_loss_scaling():
    w32, fp32 = _tiny_regression(None)
    w_none, unscaled = _tiny_regression(mp.NoScaler())
    w_static, static = _tiny_regression(mp.StaticScaler(2.0**16))
    w_dynamic, dynamic = _tiny_regression(mp.DynamicScaler(init_scale=2.0**24, growth_interval=10))
    assert fp32[-1] < 1e-3 * fp32[0]  # FP32 trains
    assert unscaled[-1] == unscaled[0] and torch.equal(w_none, torch.zeros(4))  # FP16 grads all flushed
    for w, losses in [(w_static, static), (w_dynamic, dynamic)]:
        assert losses[-1] < 1e-3 * losses[0]
        torch.testing.assert_close(w, w32, rtol=0, atol=4 * 2.0**-10)  # within FP16 rounding of FP32


# ----- resume -----------------------------------------------------------------------------------------


def _objects(seed: int):
    model = mlp(torch.float16, seed=seed)
    opt = mp.MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    scaler = mp.DynamicScaler(init_scale=2.0**10, growth_interval=2, hysteresis=2)
    return model, opt, sched, scaler


def _train(model, opt, sched, scaler, steps: range) -> None:
    for i in steps:
        scaler.scale(loss_of(model, i)).backward()
        if i % 4 == 1:  # an overflow now and then, to exercise the hysteresis and skipping
            next(model.parameters()).grad[0, 0] = INF
        if mp.step(opt, scaler, max_grad_norm=1.0).applied:
            sched.step()
        opt.zero_grad()


def test_save_load_continue_is_bitwise_identical_to_an_uninterrupted_run():
    k, n = 5, 11
    straight = _objects(seed=0)
    _train(*straight, range(n))

    first = _objects(seed=0)
    _train(*first, range(k))
    model, opt, sched, scaler = first
    buffer = io.BytesIO()
    states = {"model": model, "opt": opt, "sched": sched, "scaler": scaler}
    torch.save({name: obj.state_dict() for name, obj in states.items()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)

    model2 = mlp(torch.float16, seed=123)  # fresh objects, different initial values
    model2.load_state_dict(ckpt["model"])
    opt2 = mp.MasterWeights(torch.optim.AdamW(model2.parameters(), lr=0.5))
    opt2.load_state_dict(ckpt["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=9, gamma=0.1)
    sched2.load_state_dict(ckpt["sched"])
    scaler2 = mp.DynamicScaler()
    scaler2.load_state_dict(ckpt["scaler"])
    _train(model2, opt2, sched2, scaler2, range(k, n))

    assert int(scaler2.skipped_steps) == int(straight[3].skipped_steps) == 3
    assert scaler2.state_dict() == straight[3].state_dict()
    assert bitwise_equal(snapshot(opt2, model2), snapshot(straight[1], straight[0]))


# ----- an optimizer built after prepare (issue 15) --------------------------------------------------------


@pytest.mark.parametrize("policy", ["f16-master", "f16-pure"])
def test_an_optimizer_built_after_prepare_is_refused(policy):
    model = mlp(torch.float32)
    model, _, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)
    late = torch.optim.SGD(model.parameters(), lr=0.1)  # over the 16-bit parameters, with no masters
    with mp.autocast(model):
        loss = loss_of(model, 0, torch.float32)
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"plain SGD over parameter #0 \(shape \(8, 4\)\) and 3 more that "
                                           r"mp.prepare stored in 16 bits.*Build one optimizer"):
        mp.step(late, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    mp.unprepare(model)  # after unprepare the parameters are the user's again: a plain optimizer is fine
    assert mp.step(late, mp.NoScaler()).applied


def test_a_plain_optimizer_where_prepare_made_no_masters_is_fine():
    model = mlp(torch.float32)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-mixed")
    assert not isinstance(opt, mp.MasterWeights)  # FP32 parameters: nothing to master
    scaler.scale(loss_of(model, 0, torch.float32)).backward()
    assert mp.step(opt, scaler).applied


# ----- the NaN-storm guard ---------------------------------------------------------------------------------


def test_a_nan_storm_stops_with_a_diagnosis_and_the_last_good_state():
    model = mlp(torch.float32)
    model, opt, scaler = mp.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-2), "f16-master")
    scaler = mp.StaticScaler(2.0**8)
    for i in range(3):  # some clean steps first, so that Adam has state
        scaler.scale(loss_of(model, i, torch.float32)).backward()
        assert mp.step(opt, scaler).applied
        opt.zero_grad()
    good = snapshot(opt, model)
    for i in range(5):
        scaler.scale(loss_of(model, 3 + i, torch.float32)).backward()
        model[2].bias.grad[0] = math.nan  # a NaN made in backward, at every step: no loss scale helps
        if i < 4:
            assert not mp.step(opt, scaler, max_skips_in_a_row=5).applied
            opt.zero_grad()
    with pytest.raises(mp.NaNStormError) as caught:
        mp.step(opt, scaler, max_skips_in_a_row=5)
    error = caught.value
    assert (error.reason, error.skipped_in_a_row, error.skipped_steps, error.loss_scale) == ("storm", 5, 5, 256.0)
    assert error.gradients == {"#3 (shape 1)": "nan"} and error.weights == {}
    assert "NaN storm: 5 steps in a row were skipped (loss scale 256, 5 skipped in all)" in str(error)
    named = error.named(model, step=8, checkpoint="run/checkpoint-000008.pt")
    assert named.gradients == {"2.bias": "nan"}
    assert str(named).startswith("NaN storm at step 8: ") and "saved in run/checkpoint-000008.pt" in str(named)
    assert bitwise_equal(snapshot(opt, model), good)  # the storm's steps changed nothing


def test_a_start_up_descent_from_the_ceiling_does_not_trip_the_default_guard():
    # The default DynamicScaler, started at its ceiling 2^24, on gradients that overflow at any scale above 1:
    # 25 skips in a row (2 absorbed by the hysteresis, then 2^24 -> 1), then clean steps at 1.
    p = torch.nn.Parameter(torch.ones(2))
    opt, scaler = torch.optim.SGD([p], lr=0.0), mp.DynamicScaler(init_scale=2.0**24)
    infos = []
    for _ in range(30):
        p.grad = torch.tensor([2.0**127, 1.0]) * scaler.loss_scale  # overflows float32 above a scale of 1
        infos.append(mp.step(opt, scaler))
    assert [i.applied for i in infos] == [False] * 25 + [True] * 5 and scaler.storm_limit() == 52
    # Overflowing at the floor is a storm: it stops after 52 skips in a row, never spinning or crashing.
    with warnings.catch_warnings(), pytest.raises(mp.NaNStormError, match="52 steps in a row"):
        warnings.simplefilter("ignore")  # the floor's warning
        for _ in range(52):
            p.grad = torch.tensor([INF, 1.0])
            mp.step(opt, scaler)
    assert scaler.skipped_in_a_row == 52


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "never"])
def test_bad_max_skips_in_a_row(value):
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"max_skips_in_a_row must be an integer >= 1, 'auto' \(the scaler's "
                                         r"storm_limit\(\), 50 here\) or None \(never stop\), got"):
        mp.step(torch.optim.SGD([p], lr=0.1), mp.NoScaler(), max_skips_in_a_row=value)
    assert p.tolist() == [1.0, 1.0]


def test_clean_steps_do_no_extra_work_for_the_guards(monkeypatch):
    # The weights are checked only on the step after a skipped one, in the same single read.
    step_module = importlib.import_module("mixprec.step")  # mp.step is the function
    calls = {"find_nonfinite": 0, "reads": 0}
    real_find, real_read = step_module.find_nonfinite, step_module._read_together

    def counting_find(*args):
        calls["find_nonfinite"] += 1
        return real_find(*args)

    def counting_read(*args):
        calls["reads"] += 1
        return real_read(*args)

    monkeypatch.setattr(step_module, "find_nonfinite", counting_find)
    monkeypatch.setattr(step_module, "_read_together", counting_read)
    p = torch.nn.Parameter(torch.ones(2))
    opt, scaler = torch.optim.SGD([p], lr=0.1), mp.StaticScaler(4.0)
    for grad in [[1.0, 1.0], [1.0, 1.0], [INF, 1.0], [1.0, 1.0], [1.0, 1.0]]:
        p.grad = torch.tensor(grad)
        mp.step(opt, scaler)
    # The skipped step names its overflowing gradients (StepInfo.nonfinite), the step after it checks the
    # weights: two checks, both around the skip; the clean steps before and after do none.
    assert calls == {"find_nonfinite": 2, "reads": 5}


# ----- provenance of a skipped step ------------------------------------------------------------------

def test_a_skipped_step_names_the_parameters_whose_gradients_overflowed(monkeypatch):
    step_module = importlib.import_module("mixprec.step")  # mp.step is the function

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    "f16-master,scaling=static:128")
    calls = []
    real = step_module._diagnose
    monkeypatch.setattr(step_module, "_diagnose", lambda *a, **k: calls.append(1) or real(*a, **k))

    def one_step(fault: bool) -> mp.StepInfo:
        with mp.autocast(model):
            loss = model(torch.ones(2, 3)).float().sum()
        scaler.scale(loss).backward()
        if fault:
            model[2].weight.grad[0, 1] = float("nan")
        info = mp.step(opt, scaler)
        opt.zero_grad()
        return info

    clean = one_step(False)
    assert clean.applied and clean.nonfinite is None and clean.named(model) is None and not calls
    info = one_step(True)
    assert not info.applied and len(calls) == 1
    assert info.nonfinite == {"#2 (shape 2x4)": "nan"} and info.named(model) == {"2.weight": "nan"}


@pytest.mark.parametrize("policy", ["f16-master", "f16-mixed"])
def test_optimizer_step_by_hand_on_scaled_gradients_is_refused_and_changes_nothing(policy):
    # A loop (or a framework) calling optimizer.step() after scaler.scale(loss).backward() would step on
    # gradients 2^16 times too large, with no inf/NaN check: the optimizer prepare returned refuses.
    model = mlp(torch.float32)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)
    with mp.autocast(model):
        loss = loss_of(model, 0, torch.float32)
    scaler.scale(loss).backward()
    before = snapshot(opt, model)
    refused = r"still multiplied by the loss scale \(65536\).*mp.step\(optimizer, scaler\)"
    with pytest.raises(RuntimeError, match=refused):
        opt.step()
    assert bitwise_equal(snapshot(opt, model), before)
    mp.step(opt, scaler)  # the right way still works, and later steps with it too
    opt.zero_grad()
    with mp.autocast(model):
        loss = loss_of(model, 1, torch.float32)
    scaler.scale(loss).backward()
    mp.step(opt, scaler)


def test_optimizer_step_by_hand_without_loss_scaling_is_plain_pytorch():
    model = mlp(torch.float32)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-master")
    with mp.autocast(model):
        loss = loss_of(model, 0, torch.float32)
    scaler.scale(loss).backward()  # a NoScaler: the gradients are the loss's own
    before = snapshot(opt, model)
    opt.step()
    assert not bitwise_equal(snapshot(opt, model), before)


def test_a_first_step_on_gradients_scale_never_made_warns_once():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = mp.DynamicScaler()
    (p * 2.0).sum().backward()  # not scaler.scale(loss): the update would be 65536 times too small
    with pytest.warns(UserWarning, match="scaler.scale\\(loss\\) was never called, but this scaler's scale is not 1"):
        mp.step(opt, scaler)
    opt.zero_grad()
    (p * 2.0).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a scaler used by hand-scaled gradients is not nagged
        mp.step(opt, scaler)
        for quiet in (mp.NoScaler(), mp.StaticScaler(1.0)):  # nothing to be wrong about
            opt.zero_grad()
            (p * 2.0).sum().backward()
            mp.step(opt, quiet)


def _prepared_linear():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    return mp.prepare(m, torch.optim.AdamW(m.parameters(), lr=1e-2), "f16-master")


def _one_step(model, step_with, scaler):
    with mp.autocast(model):
        loss = model(torch.ones(4, 3)).square().mean()
    scaler.scale(loss).backward()
    return mp.step(step_with, scaler, max_grad_norm=1.0)


@pytest.mark.parametrize("framework", ["accelerate", "lightning"])
def test_mp_step_sees_through_accelerate_and_lightning_optimizer_wrappers(framework):
    model, opt, scaler = _prepared_linear()
    ref_model, ref_opt, ref_scaler = _prepared_linear()
    if framework == "accelerate":
        accelerate = pytest.importorskip("accelerate")
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
        wrapped = accelerate.Accelerator(cpu=True).prepare(opt)
        AcceleratorState._reset_state(reset_partial_state=True)
    else:
        pytest.importorskip("lightning")
        from lightning.pytorch.core.optimizer import LightningOptimizer
        wrapped = LightningOptimizer(opt)
    assert wrapped is not opt and wrapped.optimizer is opt
    for _ in range(3):
        info, ref = _one_step(model, wrapped, scaler), _one_step(ref_model, ref_opt, ref_scaler)
        assert info.applied == ref.applied and info.grad_norm == ref.grad_norm
        opt.zero_grad()
        ref_opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters(), strict=True))
