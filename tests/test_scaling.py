"""Loss scalers: trajectories against torch's own update kernel, the hysteresis/floor/ceiling rules step by
step, the fused unscale+check, checkpoints and argument errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec import nonfinite, scaling
from mixprec.scaling import SMALLEST_SCALE as TINY
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
        min_scale=TINY,  # the smallest floor a float32 scale allows: 1/scale stays finite
        max_scale=INF,
    )
    scale = torch.full((), init_scale, dtype=torch.float32)
    tracker = torch.zeros((), dtype=torch.int32)
    theirs = []
    for overflow in overflows:
        found_inf = torch.tensor(float(overflow))
        torch._amp_update_scale_(scale, tracker, found_inf, growth_factor, backoff_factor, growth_interval)
        scale.clamp_(min=TINY)  # torch's kernel has no floor; below 2^-126 it goes on to subnormals and 0
        theirs.append(scale.item())
    assert trajectory(ours, overflows) == theirs


def test_growth_that_would_overflow_float32_keeps_the_scale_like_torch():
    ours = mp.DynamicScaler(init_scale=2.0**127, growth_interval=1, hysteresis=1, min_scale=TINY, max_scale=INF)
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
        monkeypatch.setattr(nonfinite, "_FUSED_DEVICE_TYPES", set())
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


# ----- sparse gradients, against torch.amp.GradScaler (torch's test_grad_scaling_unscale_sparse cases) -----

SPARSE = {  # name: (indices, values, dtype) of a 2x3 sparse COO gradient, scaled by 4
    "plain": ([[0, 1, 1], [2, 0, 2]], [16.0, 32.0, 64.0], torch.float32),
    "inf": ([[0, 1, 1], [2, 0, 2]], [16.0, 32.0, INF], torch.float32),
    "nan": ([[0, 1, 1], [2, 0, 2]], [16.0, 32.0, math.nan], torch.float32),
    "duplicates": ([[0, 1, 0], [2, 0, 2]], [16.0, 32.0, 64.0], torch.float32),  # left uncoalesced, as torch does
    "fp16": ([[0, 1, 1], [2, 0, 2]], [16.0, 32.0, 64.0], torch.float16),
    "fp16 duplicates summing past 65504": ([[0, 1, 0], [2, 0, 2]], [64000.0, 32.0, 64000.0], torch.float16),
}


def _sgd_with_a_sparse_grad(case: str) -> tuple[torch.nn.Parameter, torch.optim.SGD]:
    indices, values, dtype = SPARSE[case]
    p = torch.nn.Parameter(torch.ones(2, 3, dtype=dtype))
    p.grad = torch.sparse_coo_tensor(torch.tensor(indices), torch.tensor(values), (2, 3), dtype=dtype)
    return p, torch.optim.SGD([p], lr=1.0)


@pytest.mark.parametrize("case", list(SPARSE))
def test_sparse_gradients_step_as_torch_grad_scaler_steps_them(case):
    p, optimizer = _sgd_with_a_sparse_grad(case)
    grad = p.grad
    info = mp.step(optimizer, mp.StaticScaler(4.0))
    assert p.grad is grad  # unscaled (and coalesced) in place: the tensor the optimizer read

    q, reference = _sgd_with_a_sparse_grad(case)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # its lazy initialisation (the gradients were set by hand, already scaled)
    if q.dtype == torch.float16:  # GradScaler.step refuses FP16 gradients; torch's own test unscales them so
        found = scaler._unscale_grads_(reference, torch.full((1,), 0.25), torch.zeros(1), True)[q.device]
        applied = found.item() == 0
        if applied:
            reference.step()
    else:
        scaler.step(reference)
        scaler.update()
        applied = scaler.get_scale() == 4.0  # not backed off
    assert info.applied == applied == (case in {"plain", "duplicates", "fp16"})
    assert torch.equal(p, q)
    torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense(), equal_nan=True, rtol=0, atol=0)
    assert p.grad.is_coalesced() == q.grad.is_coalesced()


def test_a_sparse_embedding_trains_as_under_torch_grad_scaler():
    def train(ours: bool) -> torch.Tensor:
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(10, 4, sparse=True)
        optimizer = torch.optim.SGD(embedding.parameters(), lr=0.5)
        scaler = mp.StaticScaler(1024.0) if ours else torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            scaler.scale(embedding(torch.tensor([[1, 2, 2, 7]])).square().sum()).backward()
            if ours:
                assert mp.step(optimizer, scaler).applied
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()
        return embedding.weight.detach()

    assert torch.equal(train(ours=True), train(ours=False))


def test_find_nonfinite_reads_a_sparse_gradients_values():
    grads = [torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor(v), (3,)) for v in ([1.0, INF], [1.0, 2.0])]
    assert find_nonfinite(grads).tolist() == [True, False]


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
        (dict(init_scale=0.0), r"init_scale must be a finite number > 0 .*in \[2\^-126 .*got 0.0"),
        (dict(init_scale=-2.0), "init_scale.*got -2.0"),
        (dict(init_scale=INF, max_scale=INF), "init_scale.*got inf"),
        (dict(init_scale=0.5), r"init_scale \(0.5\) must lie in \[min_scale, max_scale\]"),
        (dict(growth_interval=0), "growth_interval must be an integer >= 1.*got 0"),
        (dict(hysteresis=0), "hysteresis must be an integer >= 1.*got 0"),
        (dict(hysteresis=1.5), "hysteresis.*got 1.5"),
        (dict(min_scale=-1.0), "min_scale must be a finite number > 0.*got -1.0"),
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


# ----- scales validated as float32 stores them (issue 15) ------------------------------------------------


@pytest.mark.parametrize("make, stored", [
    (lambda: mp.StaticScaler(1e-50), "0.0"),  # stored as 0.0: 1/S is inf, the weights became NaN
    (lambda: mp.StaticScaler(1e-45), "1.401298464324817e-45"),  # a float32 subnormal: 1/S is inf
    (lambda: mp.StaticScaler(1e39), "inf"),  # every step was skipped
    (lambda: mp.DynamicScaler(init_scale=1e39, max_scale=INF), "inf"),
    (lambda: mp.DynamicScaler(min_scale=0), None),  # the scale collapsed to 0 after ~166 overflows
    (lambda: mp.DynamicScaler(min_scale=1e-40, init_scale=1.0), "9.99994610111476e-41"),
])
def test_scales_are_checked_as_float32_stores_them(make, stored):
    with pytest.raises(ValueError, match=r"must be a finite number > 0 that float32 stores as a normal number, "
                                         r"i\.e\. in \[2\^-126 \(1\.18e-38\), 3\.4e\+38\]") as error:
        make()
    if stored is not None:
        assert f"float32 stores as {stored}" in str(error.value)


def test_loading_a_scale_float32_cannot_hold_is_refused():
    sd = mp.StaticScaler(8.0).state_dict()
    with pytest.raises(ValueError, match="got 1e-45, which float32 stores as"):
        mp.StaticScaler(1.0).load_state_dict({**sd, "scale": 1e-45})
    sd = mp.DynamicScaler().state_dict()
    with pytest.raises(ValueError, match="min_scale must be a finite number > 0.*got 0.0"):
        mp.DynamicScaler().load_state_dict({**sd, "min_scale": 0.0})


def test_the_extremes_float32_holds_are_accepted():
    largest = scaling.LARGEST_SCALE
    assert mp.StaticScaler(TINY).loss_scale == TINY and mp.StaticScaler(largest).loss_scale == largest
    assert mp.DynamicScaler(init_scale=TINY, min_scale=TINY).loss_scale == TINY


def test_a_static_scale_from_a_policy_string_is_checked_as_stored():
    for choice in ["static:1e-50", "static:1e-45", "static:1e39", "dynamic:1e39"]:
        with pytest.raises(ValueError, match=r"float32.*1\.18e-38"):  # at parse time, or by the scaler
            mp.prepare(torch.nn.Linear(2, 2), None, f"f16-master,scaling={choice}")


@pytest.mark.parametrize("fused", [True, False])
def test_a_gradient_that_overflows_when_unscaled_is_an_overflow(monkeypatch, fused):
    # S = 2^-100: a finite scaled gradient of 2^40 is 2^140 once unscaled, beyond float32. The check used to
    # run before the 1/S multiply only, so the step applied inf.
    if not fused:
        monkeypatch.setattr(nonfinite, "_FUSED_DEVICE_TYPES", set())
    grads = [torch.tensor([2.0**40, 1.0]), torch.tensor([1.0], dtype=torch.float16)]
    found = mp.StaticScaler(2.0**-100).unscale_and_check_(grads)
    assert float(found) == 1.0 and math.isinf(grads[0][0])
    clean = [torch.tensor([2.0**-110, 1.0])]
    assert float(mp.StaticScaler(2.0**-100).unscale_and_check_(clean)) == 0.0
    assert clean[0].tolist() == [2.0**-10, 2.0**100]


def test_at_the_lowest_floor_an_overflow_still_skips_and_never_writes_inf():
    # The min_scale=0 case of issue 15, with the smallest floor allowed: ~170 overflows in a row drive the
    # scale to 2^-126, where 1/S = 2^126 turns any gradient above 4 into inf. mp.step must skip, not apply.
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = mp.DynamicScaler(init_scale=2.0**16, hysteresis=1, min_scale=TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the floor's warning
        for _ in range(150):
            p.grad = torch.tensor([INF, 1.0])
            mp.step(opt, scaler, max_skips_in_a_row=None)
        assert scaler.loss_scale == TINY
        p.grad = torch.tensor([8.0, 1.0])  # finite, but 8 * 2^126 is not
        info = mp.step(opt, scaler, max_skips_in_a_row=None)
    assert not info.applied and p.tolist() == [1.0, 1.0]


# ----- the scaler state machine against a pure-Python model (hypothesis) ----------------------------------


def model_scaler(options: dict, init_scale: float, overflows: list[bool]) -> list[tuple[float, int, int, int]]:
    """DynamicScaler's rules in plain Python floats (the scale rounded to float32 after each change, as it is
    stored): hysteresis counts down on overflows and backs off once it is 0; clean steps count up to
    growth_interval, then grow and refill the hysteresis; the scale is clamped to [min_scale, max_scale], and
    a growth to inf keeps the scale."""
    def f32(x: float) -> float:
        return float(np.float32(x)) if abs(x) < 3.5e38 else math.copysign(INF, x)

    scale, growth, hyst, skipped = init_scale, 0, options["hysteresis"], 0
    out = []
    for overflow in overflows:
        if overflow:
            skipped += 1
            growth, hyst = 0, max(hyst - 1, 0)
            if hyst == 0:
                scale = max(f32(scale * options["backoff_factor"]), options["min_scale"])
        else:
            growth += 1
            if growth >= options["growth_interval"]:
                grown = min(f32(scale * options["growth_factor"]), options["max_scale"])
                scale = grown if math.isfinite(grown) else scale
                growth, hyst = 0, options["hysteresis"]
        out.append((f32(scale), growth, hyst, skipped))
    return out


@settings(max_examples=200, deadline=None)
@given(
    overflows=st.lists(st.booleans(), min_size=1, max_size=80),
    init_exp=st.integers(-20, 30),
    growth_factor=st.sampled_from([1.5, 2.0, 4.0, 1.0001]),
    backoff_factor=st.sampled_from([0.5, 0.25, 0.9, 0.125]),
    growth_interval=st.integers(1, 5),
    hysteresis=st.integers(1, 4),
    min_exp=st.integers(-30, 0),
    max_exp=st.one_of(st.integers(0, 40), st.just(None)),
)
def test_dynamic_scaler_follows_its_rules_step_by_step(overflows, init_exp, growth_factor, backoff_factor,
                                                       growth_interval, hysteresis, min_exp, max_exp):
    min_scale = 2.0**min_exp
    max_scale = INF if max_exp is None else 2.0**max(max_exp, min_exp)
    init_scale = min(max(2.0**init_exp, min_scale), max_scale)
    options = dict(growth_factor=growth_factor, backoff_factor=backoff_factor, growth_interval=growth_interval,
                   hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale)
    scaler = mp.DynamicScaler(init_scale=init_scale, **options)
    expected = model_scaler(options, init_scale, overflows)
    in_a_row = 0
    for overflow, (scale, growth, hyst, skipped) in zip(overflows, expected, strict=True):
        before = scaler.loss_scale
        scaler.update(torch.tensor(float(overflow)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the floor's warning
            scaler.observe(overflow, before)
        in_a_row = in_a_row + 1 if overflow else 0
        sd = scaler.state_dict()
        assert (sd["scale"], sd["growth_tracker"], sd["hysteresis_tracker"], sd["skipped_steps"]) == (
            scale, growth, hyst, skipped)
        assert min_scale <= sd["scale"] <= max_scale and math.isfinite(sd["scale"])  # invariants
        assert scaler.skipped_in_a_row == in_a_row


@settings(max_examples=50, deadline=None)
@given(hysteresis=st.integers(1, 4), backoff_exp=st.integers(1, 3), min_exp=st.integers(-20, 4),
       span=st.integers(0, 40), start_exp=st.integers(0, 40))
def test_a_start_up_descent_never_reaches_the_storm_limit(hysteresis, backoff_exp, min_exp, span, start_exp):
    # From anywhere up to the ceiling, overflowing on every step until the floor takes fewer consecutive
    # skips than storm_limit(): a healthy start-up or recovery never trips the NaN-storm guard.
    min_scale, max_scale = 2.0**min_exp, 2.0 ** (min_exp + span)
    init = min(2.0 ** (min_exp + start_exp), max_scale)
    s = mp.DynamicScaler(init_scale=init, backoff_factor=2.0**-backoff_exp, hysteresis=hysteresis,
                         min_scale=min_scale, max_scale=max_scale)
    skips = 0
    while s.loss_scale > min_scale or skips < hysteresis:
        s.update(True)
        skips += 1
    assert skips < s.storm_limit() and s.storm_limit() >= scaling.STORM_SKIPS


def test_empty_tensors_are_finite_and_unscale_to_nothing():
    # A rank's FSDP shard of a small parameter can be empty: torch's inf-norm refuses those.
    grads = [torch.ones(0), torch.tensor([2.0, INF]), torch.ones(0, dtype=torch.float16)]
    assert find_nonfinite(grads).tolist() == [False, True, False]
    assert float(mp.StaticScaler(0.5).unscale_and_check_(grads)) == 1.0 and grads[1][0] == 4.0
    assert float(unscale_and_check_([torch.ones(0)], torch.tensor(2.0), check_unscaled=True)) == 0.0


def test_a_sparse_gradient_is_clipped_by_the_norm_of_its_dense_form():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    grad = torch.sparse_coo_tensor(torch.tensor([[0, 1, 0], [2, 0, 2]]), torch.tensor([12.0, 16.0, 12.0]), (2, 3))
    p.grad = grad
    info = mp.step(torch.optim.SGD([p], lr=1.0), mp.StaticScaler(4.0), max_grad_norm=1.0)
    dense = grad.to_dense()  # unscaled: 6 at (0, 2) (two entries), 4 at (1, 0): norm sqrt(52)
    assert info.applied and info.grad_norm == pytest.approx(52**0.5)
    assert torch.allclose(p.detach(), -torch.tensor([[0, 0, 6.0], [4.0, 0, 0]]) / (52**0.5 + 1e-6))
    assert torch.allclose(dense, torch.tensor([[0, 0, 6.0], [4.0, 0, 0]]) / (52**0.5 + 1e-6))


# ----- checkpoints written before the skip record moved out of the scaler --------------------------

#: What the scalers' state_dict() gave (version 1) when the skip counters lived in the scaler itself
#: (mixprec at e71ef5a), for the same sequence of updates as `_replay` below.
OLD_STATE_DICTS = [
    {"version": 1, "kind": "StaticScaler", "scale": 1024.0, "skipped_steps": 4, "skipped_in_a_row": 2},
    {"version": 1, "kind": "DynamicScaler", "scale": 1024.0, "skipped_steps": 3, "skipped_in_a_row": 0,
     "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "hysteresis": 2, "min_scale": 1.0,
     "max_scale": 16777216.0, "raise_at_min_scale": False, "growth_tracker": 3, "hysteresis_tracker": 0,
     "warned_at_floor": False},
    {"version": 1, "kind": "NoScaler", "scale": 1.0, "skipped_steps": 1, "skipped_in_a_row": 1},
]


def _replay(kind: str) -> mp.LossScaler:
    scaler, flags = {"StaticScaler": (mp.StaticScaler(1024.0), (1, 1, 0, 1, 1)),
                     "DynamicScaler": (mp.DynamicScaler(init_scale=2.0**12), (1, 0, 0, 1, 1, 0, 0, 0)),
                     "NoScaler": (mp.NoScaler(), (1,))}[kind]
    for flag in flags:
        scaler.update(torch.tensor(float(flag)))
    return scaler


@pytest.mark.parametrize("old", OLD_STATE_DICTS, ids=lambda d: d["kind"])
def test_old_scaler_checkpoints_load_and_the_keys_stay_the_same(old):
    replayed = _replay(old["kind"])
    assert replayed.state_dict() == old and list(replayed.state_dict()) == list(old)  # same keys, same order
    fresh = type(replayed)(**({"scale": 8.0} if old["kind"] == "StaticScaler" else {}))
    fresh.load_state_dict(dict(old))
    assert fresh.state_dict() == old
    assert (fresh.skipped_in_a_row, int(fresh.skipped_steps)) == (old["skipped_in_a_row"], old["skipped_steps"])
    # The restored record carries on counting as the replayed one does.
    for scaler in (fresh, replayed):
        scaler.update(torch.tensor(1.0))
    assert fresh.state_dict() == replayed.state_dict()


@pytest.mark.parametrize("key, value, message", [
    ("hysteresis_tracker", 99, r"hysteresis_tracker \(99\) must be <= hysteresis \(2\)"),
    ("growth_tracker", 2000, r"growth_tracker \(2000\) must be < growth_interval \(2000\)"),
    ("warned_at_floor", "no", "warned_at_floor must be True or False, got 'no'"),
    ("skipped_in_a_row", 3, r"skipped_in_a_row \(3\) cannot exceed skipped_steps \(0\)"),
    ("version", "1", "version must be the integer 1, got the str '1'"),
    ("kind", None, "has no 'kind'"),
])
def test_a_dynamic_state_dict_out_of_its_own_ranges_is_refused_and_changes_nothing(key, value, message):
    # Issue 28: these loaded silently (hysteresis_tracker=99 let 99 overflows pass without backing off).
    scaler = mp.DynamicScaler(init_scale=8.0, hysteresis=2)
    state = {**scaler.state_dict(), key: value}
    if value is None:
        del state[key]
    target = mp.DynamicScaler(init_scale=4.0, hysteresis=3)
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert target.state_dict() == before
