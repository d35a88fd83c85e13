"""Gradients and weights that cannot be fooled (issue 20): param.grad and the parameter are the truth,
whichever way they are written; the FP32 gradient and master only add bits where they still round to them.

The setup of the issue: Linear(4, 1) without bias, SGD(lr=1), inputs 0.1, loss = sum of 2 outputs, so the
true gradient is 0.2 per element and one step moves each weight by 0.2. Every case failed on main before
the fix (bcda02b) unless said otherwise.
"""

from __future__ import annotations

import pytest
import torch

import mixprec as mp

POLICIES = ["bf16-master", "bf16-master,execution=native", "f16-master,scaling=static:8",
            "f16-master,scaling=static:8,execution=native"]


def _setup(policy: str, lr: float = 1.0):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1, bias=False)
    m, o, s = mp.prepare(m, torch.optim.SGD(m.parameters(), lr=lr), policy)

    def loss():
        with mp.autocast(m):
            return s.scale(m(torch.full((2, 4), 0.1)).float().sum())

    return m, o, s, loss


def _weight(m: torch.nn.Module) -> torch.Tensor:
    return m.weight.detach().float().clone()


def _tol(policy: str) -> float:
    return 2.0**-7 if policy.startswith("bf16") else 2.0**-10  # a gradient of 0.2 in the 16-bit format


@pytest.mark.parametrize("policy", POLICIES)
def test_a_gradient_zeroed_through_data_moves_nothing(policy):  # 1
    m, o, s, loss = _setup(policy)
    w0 = _weight(m)
    loss().backward()
    m.weight.grad.data.zero_()  # .data: no version counter bump
    assert mp.step(o, s).applied
    assert torch.equal(_weight(m), w0)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_gradient_clamped_through_data_is_what_the_step_uses(policy):  # 1
    m, o, s, loss = _setup(policy)
    w0 = _weight(m)
    loss().backward()
    m.weight.grad.data.clamp_(max=0.05 * s.loss_scale)
    mp.step(o, s)
    assert torch.allclose(w0 - _weight(m), torch.full_like(w0, 0.05), atol=2 * _tol(policy))


@pytest.mark.parametrize("policy", POLICIES)
def test_a_tensor_hook_registered_after_prepare_reaches_the_step(policy):  # 2
    m, o, s, loss = _setup(policy)
    w0 = _weight(m)
    m.weight.register_hook(lambda g: g * 0)
    loss().backward()
    assert torch.all(m.weight.grad == 0)
    mp.step(o, s)
    assert torch.equal(_weight(m), w0)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_tensor_hook_halving_the_gradient_halves_the_update(policy):  # 2, with micro-batches
    m, o, s, loss = _setup(policy)
    w0 = _weight(m)
    m.weight.register_hook(lambda g: g / 2)
    loss().backward()
    loss().backward()  # two micro-batches: 0.1 + 0.1
    mp.step(o, s)
    assert torch.allclose(w0 - _weight(m), torch.full_like(w0, 0.2), atol=_tol(policy))


@pytest.mark.parametrize("policy", POLICIES)
def test_a_post_accumulate_hook_sees_the_accumulated_gradient_and_its_edit_counts(policy):  # 2
    m, o, s, loss = _setup(policy)
    seen = []

    def clamp(p):
        seen.append(p.grad.float().max().item() / s.loss_scale)
        p.grad.clamp_(max=0.3 * s.loss_scale)

    m.weight.register_post_accumulate_grad_hook(clamp)
    w0 = _weight(m)
    loss().backward()
    loss().backward()  # the hook sees the sum, 0.4, as in plain PyTorch, and clamps it to 0.3
    assert seen[0] == pytest.approx(0.2, abs=_tol(policy)) and seen[1] == pytest.approx(0.4, abs=2 * _tol(policy))
    mp.step(o, s)
    assert torch.allclose(w0 - _weight(m), torch.full_like(w0, 0.3), atol=2 * _tol(policy))


def test_a_hook_registered_before_prepare_still_runs_in_order():  # hooks users had before prepare
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1, bias=False)
    m.weight.register_hook(lambda g: g * 0)
    m, o, s = mp.prepare(m, torch.optim.SGD(m.parameters(), lr=1.0), "bf16-master")
    w0 = _weight(m)
    with mp.autocast(m):
        m(torch.full((2, 4), 0.1)).float().sum().backward()
    mp.step(o, s)
    assert torch.equal(_weight(m), w0)


@pytest.mark.parametrize("policy", POLICIES)
def test_weights_clamped_through_data_are_where_the_next_step_starts(policy):  # 3
    m, o, s, loss = _setup(policy)
    loss().backward()
    mp.step(o, s)
    o.zero_grad()
    m.weight.data.clamp_(-0.01, 0.01)  # WGAN's weight clipping
    w1 = _weight(m)
    loss().backward()
    mp.step(o, s)
    assert torch.allclose(w1 - _weight(m), torch.full_like(w1, 0.2), atol=_tol(policy))


@pytest.mark.parametrize("policy", POLICIES)
def test_an_ema_swapped_in_through_data_copy_is_kept(policy):  # 3
    m, o, s, loss = _setup(policy, lr=0.0)
    ema = torch.full_like(m.weight, 0.5)
    m.weight.data.copy_(ema)
    loss().backward()
    mp.step(o, s)
    assert torch.all(m.weight == 0.5) and torch.all(o.master_params[0] == 0.5)


@pytest.mark.parametrize("policy", POLICIES)
def test_autograd_grad_never_touches_accumulation(policy):  # 4
    m, o, s, loss = _setup(policy)
    w0 = _weight(m)
    loss().backward()
    before = m.weight.grad.clone()
    (g,) = torch.autograd.grad(loss(), [m.weight])
    assert torch.equal(m.weight.grad, before) and torch.allclose(g.float() / s.loss_scale, torch.full_like(w0, 0.2),
                                                                 atol=_tol(policy))
    mp.step(o, s)
    assert torch.allclose(w0 - _weight(m), torch.full_like(w0, 0.2), atol=_tol(policy))  # was 0.4


@pytest.mark.parametrize("policy", POLICIES)
def test_autograd_grad_between_micro_batches_does_not_leak(policy):  # 4
    m, o, s, loss = _setup(policy)
    w0 = _weight(m)
    loss().backward()
    torch.autograd.grad(loss(), [m.weight])
    loss().backward()
    mp.step(o, s)
    assert torch.allclose(w0 - _weight(m), torch.full_like(w0, 0.4), atol=2 * _tol(policy))


@pytest.mark.parametrize("policy", POLICIES)
def test_after_the_step_every_gradient_is_unscaled(policy):  # 11
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))  # LayerNorm: an FP32 island
    m, o, s = mp.prepare(m, torch.optim.SGD(m.parameters(), lr=0.0), policy)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    x = torch.randn(5, 4)
    with mp.autocast(m):
        s.scale(m(x).float().pow(2).sum()).backward()
    mp.step(o, s)
    ref(x).pow(2).sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad.float(), q.grad, rtol=0.05, atol=0.02), name  # not x8


def test_clip_grad_norm_by_hand_after_unscale_matches_fp32():  # 6
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1, bias=False)
    ref = torch.nn.Linear(4, 1, bias=False)
    ref.load_state_dict(m.state_dict())
    m, o, s = mp.prepare(m, torch.optim.SGD(m.parameters(), lr=1.0), "f16-master,scaling=static:1024")
    x = torch.full((2, 4), 0.1)
    with mp.autocast(m):
        s.scale(m(x).float().sum()).backward()
    mp.unscale_(o, s)
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
    assert norm.item() == pytest.approx(0.4, rel=1e-3)  # the true norm, not 1024x it
    assert mp.step(o, s).applied
    ref(x).sum().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    with torch.no_grad():
        ref.weight -= ref.weight.grad
    assert torch.allclose(m.weight.float(), ref.weight, atol=2.0**-10)  # moved by 0.05 (0.00098 before)


def test_unscale_then_step_skips_on_an_overflow_and_refuses_misuse():
    p = torch.nn.Parameter(torch.ones(2))
    opt, scaler = torch.optim.SGD([p], lr=1.0), mp.DynamicScaler(init_scale=4.0, hysteresis=1)
    scaler.scale((p * torch.tensor([float("inf"), 1.0])).sum()).backward()
    mp.unscale_(opt, scaler)
    with pytest.raises(RuntimeError, match="already called"):
        mp.unscale_(opt, scaler)
    with pytest.raises(RuntimeError, match="other optimizers"):
        mp.step([opt, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)], scaler)
    info = mp.step(opt, scaler)
    assert not info.applied and p.tolist() == [1.0, 1.0] and scaler.loss_scale == 2.0
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    assert mp.step(opt, scaler).applied  # no stale unscale_ state: this one unscales by 2
    assert p.tolist() == [0.0, 0.0]


def test_a_second_optimizer_not_given_to_prepare_is_refused_before_anything_changes():  # 10
    for policy in ("bf16-master", "bf16-master,execution=native", "bf16-pure"):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 1)
        m, a, s = mp.prepare(m, torch.optim.SGD([m.weight], lr=1e-3), policy)
        b = torch.optim.SGD([m.bias], lr=1e-3)
        with mp.autocast(m):
            s.scale(m(torch.ones(2, 4)).float().sum()).backward()
        before = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(RuntimeError, match="stored in 16 bits.*Build one optimizer over every parameter"):
            mp.step([a, b], s)
        assert all(torch.equal(x, p) for x, p in zip(before, m.parameters(), strict=True)), policy


def test_emulated_f16_pure_keeps_adam_in_16_bits_as_native_does():  # 9
    def run(policy):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        m, o, s = mp.prepare(m, torch.optim.Adam(m.parameters(), lr=1e-3), policy)
        x, applied = torch.randn(16, 8), []
        for _ in range(10):
            with mp.autocast(m):
                s.scale(m(x).float().pow(2).mean()).backward()
            try:
                applied.append(mp.step(o, s).applied)
            except mp.NaNStormError as error:  # Adam's eps (1e-8) is 0 in FP16: v underflows, m / 0
                applied.append(error.reason)
                break
            o.zero_grad()
        state = o.state[o.master_params[0]]
        return applied, state["exp_avg_sq"]

    native, emulated = run("f16-pure,execution=native"), run("f16-pure")
    assert native[0] == emulated[0] == [True, False, "weights"]  # emulated trained 10 steps before
    assert native[1].dtype == emulated[1].dtype == torch.float16 and torch.equal(native[1], emulated[1])


# ----- the other write paths and optimizers (issue 20: "widen the net") ------------------------------


def _replace(how: str, m: torch.nn.Module) -> None:
    new = torch.full_like(m.weight, 0.5)
    with torch.no_grad():
        if how == "set_":
            m.weight.set_(new)
        elif how == "copy_":
            m.weight.copy_(new)
        elif how == "swap_tensors":
            torch.utils.swap_tensors(m.weight, torch.nn.Parameter(new))
        else:
            m.load_state_dict({"weight": new})


@pytest.mark.parametrize("how", ["set_", "copy_", "swap_tensors", "load_state_dict"])
@pytest.mark.parametrize("policy", POLICIES[:2])
def test_weights_written_any_way_are_what_the_update_starts_from(how, policy):
    m, o, s, loss = _setup(policy, lr=0.0)
    _replace(how, m)
    loss().backward()
    assert mp.step(o, s).applied
    assert torch.all(m.weight == 0.5) and torch.all(o.master_params[0] == 0.5)


def test_load_state_dict_with_assign_is_refused_before_anything_is_loaded():
    m, o, s, loss = _setup("bf16-master")
    weight = m.weight
    with pytest.raises(RuntimeError, match="assign=True.*load with assign=False"):
        m.load_state_dict({"weight": torch.zeros(1, 4)}, assign=True)
    assert m.weight is weight and torch.all(m.weight != 0)
    mp.unprepare(m)
    m.load_state_dict({"weight": torch.zeros(1, 4)}, assign=True)  # the user's own model again: allowed


def test_sparse_adam_is_refused_by_prepare_with_the_fix():
    m = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="SparseAdam.*use torch.optim.Adam"):
        mp.prepare(m, torch.optim.SparseAdam(m.parameters()), "bf16-master")
    assert m.weight.dtype == torch.float32 and mp.prepared_state(m) is None


@pytest.mark.parametrize("policy", POLICIES[:2])
def test_lbfgs_with_a_closure_steps_the_masters_and_converges(policy):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    m = torch.nn.Linear(4, 1)
    m, o, _ = mp.prepare(m, torch.optim.LBFGS(m.parameters(), lr=1.0, max_iter=20), policy)

    def closure():
        o.zero_grad()
        with mp.autocast(m):
            loss = torch.nn.functional.mse_loss(m(x).float(), y)
        loss.backward()
        return loss

    first = o.step(closure).item()  # LBFGS returns the loss it started its step from
    for _ in range(2):
        o.step(closure)
    assert first > 10 and closure().item() < 1e-3  # 17.8 without the fix: the model never moved
    assert torch.equal(o.master_params[0].to(torch.bfloat16).float(), mp.quantize(o.master_params[0], mp.BF16))
    assert torch.allclose(m.weight.float(), torch.tensor([[1.0, -2.0, 0.5, 3.0]]), atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["bf16-master,execution=native", "f16-master,scaling=static:8,execution=native"])
def test_on_cuda_writes_through_data_are_honoured_without_a_host_sync(policy):
    # On CUDA the by-value check is elementwise (no torch.equal, which would sync): the same answers.
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1, bias=False).cuda()
    m, o, s = mp.prepare(m, torch.optim.SGD(m.parameters(), lr=1.0), policy)
    x = torch.full((2, 4), 0.1, device="cuda")

    def backward():
        with mp.autocast(m):
            s.scale(m(x).float().sum()).backward()

    backward()
    mp.step(o, s)
    o.zero_grad()
    m.weight.data.clamp_(-0.01, 0.01)
    w1 = _weight(m)
    backward()
    m.weight.grad.data.mul_(0.5)  # halves the update
    torch.cuda.set_sync_debug_mode("error")
    try:
        o.collect_grads_()  # the check itself: settle the gradients, follow the weights
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mp.step(o, s)
    assert torch.allclose(w1 - _weight(m), torch.full_like(w1, 0.1), atol=_tol(policy))
