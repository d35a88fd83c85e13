"""Loss scalers: trajectories against torch's own update kernel, the hysteresis/floor/ceiling rules step by
step, the fused unscale+check, checkpoints and argument errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec import scaling
from mixprec.scaling import LossScaleFloorError, find_nonfinite, unscale_and_check_

INF = float("inf")


def trajectory(scaler: mp.DynamicScaler, overflows: list[bool]) -> list[float]:
    out = []
    for overflow in overflows:
        scaler.update(torch.tensor(float(overflow)))
        out.append(scaler.loss_scale)
    return out


# ----- differential: torch's _amp_update_scale_ (the kernel behind torch.amp.GradScaler.update) -----


@settings(max_examples=150, deadline=None)
@given(
    overflows=st.lists(st.booleans(), min_size=1, max_size=60),
    init_scale=st.floats(min_value=2.0**-20, max_value=2.0**100),
    growth_factor=st.floats(min_value=1.0001, max_value=16.0),
    backoff_factor=st.floats(min_value=0.01, max_value=0.99),
    growth_interval=st.integers(min_value=1, max_value=6),
)
def test_trajectory_equals_torch_update_kernel(
    overflows, init_scale, growth_factor, backoff_factor, growth_interval
):
    init_scale = float(torch.tensor(init_scale, dtype=torch.float32))  # a float32 value, as torch stores it
    ours = mp.DynamicScaler(
        init_scale=init_scale,
        growth_factor=growth_factor,
        backoff_factor=backoff_factor,
        growth_interval=growth_interval,
        hysteresis=1,
        min_scale=0.0,
        max_scale=INF,
    )
    scale = torch.full((), init_scale, dtype=torch.float32)
    tracker = torch.zeros((), dtype=torch.int32)
    theirs = []
    for overflow in overflows:
        found_inf = torch.tensor(float(overflow))
        torch._amp_update_scale_(scale, tracker, found_inf, growth_factor, backoff_factor, growth_interval)
        theirs.append(scale.item())
    assert trajectory(ours, overflows) == theirs


def test_growth_that_would_overflow_float32_keeps_the_scale_like_torch():
    ours = mp.DynamicScaler(init_scale=2.0**127, growth_interval=1, hysteresis=1, min_scale=0, max_scale=INF)
    assert trajectory(ours, [False, False]) == [2.0**127, 2.0**127]


# ----- hysteresis, floor, ceiling, step by step -------------------------------------------------------


def test_hysteresis_absorbs_overflows_until_growth_refills_it():
    s = mp.DynamicScaler(init_scale=64.0, growth_interval=3, hysteresis=2, min_scale=1.0, max_scale=2.0**24)
    steps = [True, False, True, True, False, False, False, True, True]
    expected = [
        64.0,  # hysteresis 2 -> 1: absorbed
        64.0,  # clean (1 of 3); hysteresis is NOT refilled by a clean step
        32.0,  # hysteresis 1 -> 0: back off
        16.0,  # still 0: every overflow backs off until the scale grows again
        16.0,
        16.0,
        32.0,  # third consecutive clean step: grow, and refill hysteresis to 2
        32.0,  # absorbed again
        16.0,
    ]
    assert trajectory(s, steps) == expected


def test_floor_and_ceiling_clamp_the_scale():
    s = mp.DynamicScaler(init_scale=4.0, growth_interval=1, hysteresis=1, min_scale=2.0, max_scale=16.0)
    steps = [True, True, True, False, False, False, False]
    assert trajectory(s, steps) == [2.0, 2.0, 2.0, 4.0, 8.0, 16.0, 16.0]
    assert int(s.skipped_steps) == 3


def test_floor_warns_once_and_keeps_skipping():
    s = mp.DynamicScaler(init_scale=1.0, hysteresis=1, min_scale=1.0)
    with pytest.warns(RuntimeWarning, match="minimum loss scale 1"):
        s.update(torch.tensor(1.0))
        s.observe(True, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        for _ in range(5):
            s.update(torch.tensor(1.0))
            s.observe(True, 1.0)
    assert s.loss_scale == 1.0 and int(s.skipped_steps) == 6


def test_overflow_above_the_floor_does_not_warn():
    s = mp.DynamicScaler(init_scale=8.0, min_scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.observe(True, 8.0)
        s.observe(False, 1.0)


def test_raise_at_min_scale_raises_instead():
    s = mp.DynamicScaler(init_scale=1.0, hysteresis=1, min_scale=1.0, raise_at_min_scale=True)
    s.update(torch.tensor(1.0))
    with pytest.raises(LossScaleFloorError, match="1 skipped so far"):
        s.observe(True, 1.0)


def test_static_and_no_scaler_keep_their_scale_and_count_skips():
    for scaler, value in [(mp.StaticScaler(2.0**10), 1024.0), (mp.NoScaler(), 1.0)]:
        for overflow in [True, False, True]:
            scaler.update(torch.tensor(float(overflow)))
        assert scaler.loss_scale == value
        assert int(scaler.skipped_steps) == 2
        assert scaler.scale(torch.tensor(3.0)).item() == 3.0 * value


# ----- unscale + check --------------------------------------------------------------------------------


def _grads():
    return [
        torch.tensor([2.0, -4.0, 6.0]),
        torch.tensor([8.0, 1.0], dtype=torch.float16),
        torch.tensor([[0.5, 1.5]], dtype=torch.bfloat16),
    ]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [None, INF, -INF, math.nan])
def test_unscale_and_check_fused_and_fallback(monkeypatch, fused, bad):
    if not fused:
        monkeypatch.setattr(scaling, "_FUSED_DEVICE_TYPES", set())
    grads = _grads()
    if bad is not None:
        grads[1][0] = bad
    expected = [g.float() * 0.5 for g in grads]
    found = unscale_and_check_(grads, torch.tensor(0.5))
    assert found.shape == () and found.dtype == torch.float32
    assert found.item() == (0.0 if bad is None else 1.0)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g.float(), e, equal_nan=True, rtol=0, atol=0)


def test_scaler_unscale_uses_its_scale_and_checks_device():
    s = mp.StaticScaler(4.0)
    grads = [torch.tensor([8.0, 12.0])]
    assert s.unscale_and_check_(grads).item() == 0.0
    assert grads[0].tolist() == [2.0, 3.0]
    s.to("meta")
    with pytest.raises(ValueError, match=r"scaler.to\('cpu'\)"):
        s.scale(torch.tensor(1.0))


def test_find_nonfinite_flags_each_tensor():
    grads = _grads()
    grads[0][2] = math.nan
    grads[2][0, 1] = INF
    assert find_nonfinite(grads).tolist() == [True, False, True]


# ----- checkpoints ------------------------------------------------------------------------------------


def test_dynamic_state_dict_round_trips_every_field_and_the_future():
    a = mp.DynamicScaler(
        init_scale=2.0**12,
        growth_factor=4.0,
        backoff_factor=0.25,
        growth_interval=3,
        hysteresis=3,
        min_scale=2.0,
        max_scale=2.0**20,
        raise_at_min_scale=True,
    )
    trajectory(a, [True, False, True, True, False])
    sd = a.state_dict()
    b = mp.DynamicScaler()
    b.load_state_dict(sd)
    assert b.state_dict() == sd
    assert sd["version"] == 1 and sd["kind"] == "DynamicScaler"
    assert sd["skipped_steps"] == 3 and sd["growth_tracker"] == 1 and sd["hysteresis_tracker"] == 0
    future = [False, False, True, True, False, False, False, True]
    assert trajectory(b, future) == trajectory(a, future)


@pytest.mark.parametrize("cls", [mp.NoScaler, mp.StaticScaler])
def test_simple_scalers_round_trip(cls):
    a = cls() if cls is mp.NoScaler else cls(64.0)
    a.update(torch.tensor(1.0))
    b = cls() if cls is mp.NoScaler else cls(2.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


def test_load_state_dict_rejects_wrong_dicts():
    s = mp.DynamicScaler()
    with pytest.raises(ValueError, match="for 'StaticScaler', not 'DynamicScaler'"):
        s.load_state_dict(mp.StaticScaler(2.0).state_dict())
    sd = s.state_dict()
    with pytest.raises(ValueError, match="version 99"):
        s.load_state_dict({**sd, "version": 99})
    with pytest.raises(ValueError, match=r"missing keys \['hysteresis'\]"):
        s.load_state_dict({k: v for k, v in sd.items() if k != "hysteresis"})
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        s.load_state_dict({**sd, "backoff_factor": 2.0})
    with pytest.raises(ValueError, match="got list"):
        s.load_state_dict([1, 2])


# ----- argument errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(growth_factor=1.0), "growth_factor must be a finite number > 1.*got 1.0"),
        (dict(growth_factor=0.5), "growth_factor.*got 0.5"),
        (dict(backoff_factor=1.0), r"backoff_factor must be in \(0, 1\).*got 1.0"),
        (dict(backoff_factor=0.0), "backoff_factor.*got 0.0"),
        (dict(min_scale=8.0, max_scale=4.0, init_scale=4.0), r"min_scale \(8.0\) must be <= max_scale"),
        (dict(init_scale=0.0), "init_scale must be a finite number > 0, got 0.0"),
        (dict(init_scale=-2.0), "init_scale.*got -2.0"),
        (dict(init_scale=INF, max_scale=INF), "init_scale.*got inf"),
        (dict(init_scale=0.5), r"init_scale \(0.5\) must lie in \[min_scale, max_scale\]"),
        (dict(growth_interval=0), "growth_interval must be an integer >= 1.*got 0"),
        (dict(hysteresis=0), "hysteresis must be an integer >= 1.*got 0"),
        (dict(hysteresis=1.5), "hysteresis.*got 1.5"),
        (dict(min_scale=-1.0), "min_scale must be a finite number >= 0.*got -1.0"),
    ],
)
def test_invalid_dynamic_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mp.DynamicScaler(**kwargs)


@pytest.mark.parametrize("scale", [0.0, -1.0, INF, math.nan])
def test_invalid_static_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        mp.StaticScaler(scale)


def test_scale_rejects_non_tensors():
    with pytest.raises(TypeError, match="got float"):
        mp.NoScaler().scale(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hot_path_never_syncs_on_cuda():
    s = mp.DynamicScaler(init_scale=2.0**8, device="cuda")
    grads = [torch.randn(100, device="cuda", dtype=dt) for dt in (torch.float16, torch.float32)]
    loss = torch.randn((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.scale(loss)
        found_inf = s.unscale_and_check_(grads)
        s.update(found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert s.loss_scale == 2.0**8


def test_update_takes_a_python_bool_or_number_as_well_as_a_tensor():
    a, b = mp.DynamicScaler(init_scale=8.0, hysteresis=1), mp.DynamicScaler(init_scale=8.0, hysteresis=1)
    for flag in [True, 0, 1.0, False]:
        a.update(flag)
        b.update(torch.tensor(float(flag)))
        assert a.loss_scale == b.loss_scale
    assert int(a.skipped_steps) == 2
    with pytest.raises(TypeError, match="found_inf must be a tensor or a bool/number"):
        a.update("yes")
    with pytest.raises(ValueError, match="one value"):
        a.update(torch.zeros(3))
