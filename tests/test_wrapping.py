"""mp.prepare(model, None, policy) then mp.prepare_optimizer: the one-call prepare's result, bit for bit."""

from __future__ import annotations

import pytest
import torch

import mixprec as mp


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))


def _train(model, opt, scaler, steps: int = 8) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        with mp.autocast(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        mp.step(opt, scaler, max_grad_norm=1.0)
        for each in opt if isinstance(opt, list) else [opt]:
            each.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("policy", ["f16-master", "f16-master,execution=native", "bf16-compact", "bf16-kahan",
                                    "bf16-sr", "bf16-pure", "f32", "bf16-compact,rule=2:bf16//fp32"])
def test_split_prepare_trains_as_the_one_call_prepare_bitwise(policy):
    one = _model()
    one, one_opt, one_scaler = mp.prepare(one, torch.optim.AdamW(one.parameters(), lr=1e-2), policy)
    two = _model()
    two, none, scaler = mp.prepare(two, None, policy)
    assert none is None
    opt = mp.prepare_optimizer(two, torch.optim.AdamW(two.parameters(), lr=1e-2), scaler)  # built after prepare
    assert type(opt) is type(one_opt) and mp.prepared_state(two).originals is None  # the originals are released
    assert _train(one, one_opt, one_scaler) == _train(two, opt, scaler)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(a, b)
    if isinstance(opt, mp.MasterWeights):
        for a, b in zip(one_opt.grad_slots, opt.grad_slots, strict=True):
            assert torch.equal(one_opt.master_value(a), opt.master_value(b))


def test_the_masters_start_from_the_fp32_originals():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    model, _, scaler = mp.prepare(model, None, "f16-master")
    opt = mp.prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler)
    masters = {id(s.param): opt.master_value(s) for s in opt.grad_slots}
    for p, original in zip(model.parameters(), before, strict=True):
        if id(p) in masters:  # the 16-bit ones: their masters hold the bits the FP16 weights lost
            assert torch.equal(masters[id(p)], original) and not torch.equal(p.float(), original)


def test_prepare_optimizer_refuses_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="needs a prepared model"):
        mp.prepare_optimizer(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    model = _model()
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    with pytest.raises(RuntimeError, match="stepped by an optimizer prepared already"):
        mp.prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler)
    # a scaled step by hand is refused, as after the one-call prepare
    model2 = _model()
    model2, _, scaler2 = mp.prepare(model2, None, "f16-master")
    opt2 = mp.prepare_optimizer(model2, torch.optim.SGD(model2.parameters(), lr=0.1), scaler2)
    with mp.autocast(model2):
        loss = model2(torch.ones(2, 6)).sum()
    scaler2.scale(loss).backward()
    with pytest.raises(RuntimeError, match="scaler.scale"):
        opt2.step()


@pytest.mark.parametrize("policy", ["f16-master", "bf16-compact", "bf16-pure"])
def test_two_optimizers_over_disjoint_parameters_train_as_one_optimizer_over_both(policy):
    # A GAN's shape: two optimizers, one per part, prepared one by one; with the same hyperparameters and one
    # step each after one backward, per-parameter optimizers make exactly the one-optimizer run.
    one = _model()
    one, one_opt, one_scaler = mp.prepare(one, torch.optim.AdamW(one.parameters(), lr=1e-2), policy)
    two = _model()
    two, _, scaler = mp.prepare(two, None, policy)
    first = mp.prepare_optimizer(two, torch.optim.AdamW(two[0].parameters(), lr=1e-2), scaler)
    state = mp.prepared_state(two)
    if policy != "bf16-pure":  # the second part's FP32 originals wait for its optimizer; the first part's are gone
        assert state.originals is not None and set(state.originals) == {id(p) for p in two[2].parameters()}
    second = mp.prepare_optimizer(two, torch.optim.AdamW(two[1:].parameters(), lr=1e-2), scaler)
    assert state.originals is None and len(state.all_master_weights) == 2
    assert len(state.grad_slots) == len(getattr(one_opt, "grad_slots", []))  # every 16-bit weight's master
    assert _train(one, one_opt, one_scaler) == _train(two, [first, second], scaler)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(mp.fp32_state_dict(one).values(), mp.fp32_state_dict(two).values(),
                                                 strict=True))
    with pytest.raises(RuntimeError, match="stepped by an optimizer prepared already"):
        mp.prepare_optimizer(two, torch.optim.SGD(two[0].parameters(), lr=0.1), scaler)
    mp.unprepare(two)


def test_a_second_optimizer_after_the_one_call_prepare_is_refused():
    model = _model()
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model[0].parameters(), lr=0.1), "f16-master")
    with pytest.raises(RuntimeError, match="FP32 values another optimizer's masters would start from are gone"):
        mp.prepare_optimizer(model, torch.optim.SGD(model[2].parameters(), lr=0.1), scaler)
