"""EMA / averaged weights of a prepared model (mixprec.ema, issue 27 item 6).

torch.optim.swa_utils.AveragedModel over a prepared model either raised (built before prepare, native:
FP32 averages beside float16 parameters in one foreach lerp) or averaged in 16 bits (built after),
and mp.autocast refused the wrapper. mp.AveragedModel is torch's class averaging the FP32 masters in
FP32; mp.autocast runs either class's copy under the policy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import mixprec as mp

POLICIES = ["f16-master", "f16-master,execution=native"]  # emulated (auto on a CPU), native
ORDERS = ["before", "after"]  # the AveragedModel built before or after mp.prepare
DECAY = 0.999
W = 1 - DECAY  # the weight torch's EMA lerps by


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def _fp32_by_hand(model: nn.Module, opt: mp.MasterWeights) -> dict[str, torch.Tensor]:
    """The FP32 weights the optimizer holds: each master (checked to round to its parameter), else the
    parameter itself (the FP32 islands, their own masters; no masters: the 16-bit value widened)."""
    masters = {id(slot.param): slot.master for slot in opt.grad_slots}
    weights = {}
    for name, p in model.named_parameters():
        master = masters.get(id(p))
        if master is not None:
            assert torch.equal(master.to(p.dtype) if p.dtype != torch.float32 else mp.quantize(master, mp.F16),
                               p.detach())
        weights[name] = (p if master is None else master).detach().float().clone()
    return weights


def _train(policy: str, order: str, steps: int, make=mp.AveragedModel, lr: float = 0.1, **kwargs):
    """`steps` steps of SGD with an EMA updated after each; returns what the tests compare."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs = kwargs or {"multi_avg_fn": get_ema_multi_avg_fn(DECAY)}
    ema = make(model, **kwargs) if order == "before" else None
    model, opt, scaler = mp.prepare(model, opt, policy)
    ema = ema if ema is not None else make(model, **kwargs)
    g = torch.Generator().manual_seed(1)
    history = []  # the FP32 weights after each step
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        with mp.autocast(model):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        assert mp.step(opt, scaler).applied
        opt.zero_grad()
        ema.update_parameters(model)
        history.append(_fp32_by_hand(model, opt))
    return model, ema, history


def _ema_by_hand(history: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """torch's EMA recurrence in FP32: the first update copies, each later one lerps by 1 - decay."""
    ema = {name: w.clone() for name, w in history[0].items()}
    for weights in history[1:]:
        ema = {name: torch.lerp(e, weights[name], W) for name, e in ema.items()}
    return ema


def _averaged(ema: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in ema.module.named_parameters()}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("policy", [*POLICIES, "f16-pure,execution=native"])
def test_the_ema_is_the_fp32_ema_of_the_masters(policy, order):
    # Before the fix: mp.AveragedModel did not exist, and torch's class built before prepare raised on the
    # second update natively (see the next test); here every step's EMA is checked, bitwise.
    model, ema, history = _train(policy, order, steps=6)
    got, expected = _averaged(ema), _ema_by_hand(history)
    assert all(got[name].dtype == torch.float32 for name in got)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert int(ema.n_averaged) == 6
    # The same recurrence in float64, e + w (m - e): FP32 lerp rounds each update once or twice (<= 1 ulp of
    # |e| each, the old error shrinking by `decay`), so after n updates the FP32 EMA is within 2 n ulps.
    exact = {name: w.double() for name, w in history[0].items()}
    for weights in history[1:]:
        exact = {name: e + W * (weights[name].double() - e) for name, e in exact.items()}
    for name, e in exact.items():
        ulp = torch.finfo(torch.float32).eps * e.abs().max().item()
        assert (got[name].double() - e).abs().max().item() <= 2 * len(history) * ulp


@pytest.mark.parametrize("order", ORDERS)
def test_torchs_averaged_model_over_a_native_model_was_broken_or_stuck(order):
    # The bug as the user hit it, with torch's own class: built before prepare, its second update raises;
    # built after, it runs but averages in float16. mp.AveragedModel, same arguments, does neither.
    if order == "before":
        with pytest.raises(RuntimeError, match="same dtype"):
            _train(POLICIES[1], order, steps=2, make=AveragedModel)
    else:
        _, ema, _ = _train(POLICIES[1], order, steps=2, make=AveragedModel)
        assert all(p.dtype == torch.float16 for p in ema.module[0].parameters())
    _, ema, _ = _train(POLICIES[1], order, steps=2)
    assert all(p.dtype == torch.float32 for p in ema.parameters())


@pytest.mark.parametrize("order", ORDERS)
def test_a_decay_0999_ema_moves_where_a_16_bit_one_stays(order):
    # Small steps (lr 0.01): the weights move by under 0.06 in all, so 0.001 of the distance is under half
    # an FP16 ulp (2^-14 at |w| >= 0.125): a float16 EMA there stays at its first value, the FP32 one moves.
    policy = POLICIES[1]
    _, ema, history = _train(policy, order, steps=8, lr=0.01)
    _, stuck, _ = _train(policy, "after", steps=8, lr=0.01, make=AveragedModel)
    first, last = history[0]["0.weight"], history[-1]["0.weight"]
    assert (last - first).abs().max() < 0.06
    big = first.abs() >= 0.125
    assert big.sum() >= 10
    assert torch.equal(stuck.module[0].weight.float()[big], first.half().float()[big])  # the control: stuck
    moved = ema.module[0].weight.detach()
    assert bool((moved != first)[big].all())  # every one of those moved ...
    assert torch.equal(moved, _ema_by_hand(history)["0.weight"])  # ... as the FP32 EMA of the masters does


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_evaluating_the_ema_under_the_policy_and_in_fp32(policy, order):
    model, ema, history = _train(policy, order, steps=4)
    expected = _ema_by_hand(history)
    x = torch.randn(5, 6)
    # The reference: a model holding the EMA's weights, prepared with the policy (its weights rounded onto
    # FP16 as prepare rounds them), evaluated under mp.autocast.
    reference = _net()
    reference.load_state_dict(expected)
    fp32 = reference(x)
    mp.prepare(reference, None, policy)
    with torch.no_grad(), mp.autocast(reference):
        y_reference = reference(x)
    with torch.no_grad(), mp.autocast(ema, policy):
        y = ema(x)
    assert y.dtype == y_reference.dtype == torch.float32
    assert torch.equal(y, y_reference)
    assert all(torch.equal(_averaged(ema)[name], w) for name, w in expected.items())  # FP32 again on exit
    assert torch.equal(ema(x), fp32)  # outside the block: a plain FP32 model with the EMA's weights
    with pytest.raises(ValueError, match="prepared with"):
        with mp.autocast(ema, "bf16-master"):
            pass


def test_torchs_averaged_model_runs_under_autocast_with_a_warning_or_says_what_to_do():
    # Before the fix both raised "mp.autocast needs a prepared model". Built after prepare, torch's copy
    # carries the policy: it runs, and a 16-bit copy is warned about; built before, it says what to do.
    model, ema, _ = _train(POLICIES[1], "after", steps=2, make=AveragedModel)
    x = torch.randn(5, 6)
    with pytest.warns(UserWarning, match="mp.AveragedModel"), torch.no_grad(), mp.autocast(ema):
        y = ema(x)
    with torch.no_grad(), mp.autocast(model):
        assert y.dtype == model(x).dtype
    _, before, _ = _train(POLICIES[0], "before", steps=2, make=AveragedModel)
    with pytest.raises(RuntimeError, match=r"copy carries no policy.*mp\.AveragedModel\(model"):
        with mp.autocast(before):
            pass
    _, emulated, _ = _train(POLICIES[0], "after", steps=2, make=AveragedModel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an FP32 copy (emulated): no warning
        with torch.no_grad(), mp.autocast(emulated):
            emulated(x)


@pytest.mark.parametrize("policy", POLICIES)
def test_the_ema_state_dict_round_trips_in_fp32(policy):
    model, ema, _ = _train(policy, "after", steps=3)
    saved = ema.state_dict()
    assert saved["module.0.weight"].dtype == torch.float32 and int(saved["n_averaged"]) == 3
    continued = copy.deepcopy(ema)
    continued.update_parameters(model)
    for order in ORDERS:  # a resumed run builds the EMA again, either way, then loads it
        fresh = _net()
        again = mp.AveragedModel(fresh, multi_avg_fn=get_ema_multi_avg_fn(DECAY)) if order == "before" else None
        fresh, _, _ = mp.prepare(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), policy)
        again = again or mp.AveragedModel(fresh, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        again.load_state_dict(saved)  # after prepare natively, a float16 copy would round the FP32 averages
        assert all(torch.equal(again.state_dict()[key], value) for key, value in saved.items())
        again.update_parameters(model)  # and continues as the EMA that was saved
        assert all(torch.equal(a, b) for a, b in zip(continued.parameters(), again.parameters(), strict=True))
    plain = AveragedModel(_net())  # torch's class over an FP32 model takes the same checkpoint
    plain.load_state_dict(saved)
    assert all(torch.equal(plain.state_dict()[key], value) for key, value in saved.items())


def test_a_copy_loads_with_assign_true():
    # A copy has no masters or hooks that new Parameter objects would bypass: load_state_dict(assign=True)
    # is refused on the prepared model only (before: on its copies too, saying masters would be bypassed).
    model, ema, _ = _train(POLICIES[1], "after", steps=2)
    saved = {key: value.clone() for key, value in ema.state_dict().items()}
    ema.load_state_dict(saved, assign=True)
    assert ema.module[0].weight is not None and torch.equal(ema.module[0].weight, saved["module.0.weight"])
    with pytest.raises(RuntimeError, match="assign=True"):
        model.load_state_dict(model.state_dict(), assign=True)


def test_swa_averages_the_masters_too():
    # torch's default averaging (SWA, an equal-weight mean: lerp by 1 / (n + 1)) reads the same FP32 weights.
    # Against the float64 mean of the masters: each of the n lerps rounds within an ulp or two of the
    # largest weight; the mean of their float16 roundings would be up to 2^-11 of it away, far outside.
    _, swa, history = _train(POLICIES[1], "before", steps=4, avg_fn=None)
    for name, got in _averaged(swa).items():
        weights = torch.stack([h[name].double() for h in history])
        mean, bound = weights.mean(0), 2 * len(history) * torch.finfo(torch.float32).eps * weights.abs().max()
        assert (got.double() - mean).abs().max() <= bound
        assert (weights.half().double().mean(0) - mean).abs().max() > bound  # the control: 16-bit inputs
