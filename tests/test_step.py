"""mp.step: skipped steps change nothing, equality with torch.amp.GradScaler, clipping on unscaled grads,
the paper's finding (a) (gradients below 2^-24 need loss scaling), and bitwise-exact resume."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
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
    ours = mp.DynamicScaler(init_scale=2.0**4, growth_interval=interval, hysteresis=1, min_scale=0, max_scale=INF)
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
    ours = mp.DynamicScaler(init_scale=2.0**4, growth_interval=interval, hysteresis=1, min_scale=0, max_scale=INF)
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
