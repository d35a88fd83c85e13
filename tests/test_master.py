"""MasterWeights: FP32 masters that the optimizer steps, FP32 gradient accumulation, param groups, LR
schedulers, emulation, checkpoints, errors, and the paper's finding (b): updates below 2^-11 of the weight
stall without masters."""

from __future__ import annotations

import io

import pytest
import torch

import mixprec as mp


def fp16_params(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).half()) for s in shapes]


def test_optimizer_steps_fp32_masters_and_state_follows():
    (p,) = fp16_params((3, 2))
    inner = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    inner.step()  # existing fp16 state must follow the param to its master, as FP32
    opt = mp.MasterWeights(inner)
    (master,) = opt.master_params
    assert isinstance(opt, torch.optim.Optimizer)
    assert master.dtype == torch.float32 and torch.equal(master, p.float()) and master is not p
    assert opt.param_groups is inner.param_groups and opt.param_groups[0]["params"] == [master]
    assert p not in opt.state and opt.state[master]["exp_avg"].dtype == torch.float32
    assert opt.model_params == [p]


def test_param_groups_with_different_lr_and_weight_decay_match_fp32_reference():
    params = fp16_params((4, 3), (3,), (2, 2), seed=1)
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]

    def groups(ps):
        return [{"params": ps[:2], "lr": 0.1, "weight_decay": 0.01}, {"params": ps[2:], "lr": 0.3}]

    opt = mp.MasterWeights(torch.optim.AdamW(groups(params), lr=0.5, weight_decay=0.5))
    ref_opt = torch.optim.AdamW(groups(ref), lr=0.5, weight_decay=0.5)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, r in zip(params, ref, strict=True):
            grad = torch.randn(p.shape, generator=g).half()
            p.grad, r.grad = grad, grad.float()  # set by hand: collected without the backward hook
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for master, r, p in zip(opt.master_params, ref, params, strict=True):
        assert torch.equal(master, r)  # the masters took exactly the FP32 update
        assert torch.equal(p, r.half())  # and the model holds them rounded


def test_lr_scheduler_attaches_and_reaches_the_inner_optimizer():
    (p,) = fp16_params((2,))
    inner = torch.optim.SGD([p], lr=1.0)
    opt = mp.MasterWeights(inner)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        p.sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert inner.param_groups[0]["lr"] == 0.25 == sched.get_last_lr()[0]


def test_grad_accumulation_over_micro_batches_is_fp32():
    (p,) = [torch.nn.Parameter(torch.ones(4, dtype=torch.float16))]
    small = 2.0**-11  # 1 + 2^-11 is a tie in FP16 and rounds back to 1: the bit is lost in 16 bits
    plain = torch.nn.Parameter(p.detach().clone())
    for w in (plain,):
        (w * 1.0).sum().backward()
        (w * small).sum().backward()
    assert plain.grad.tolist() == [1.0] * 4  # the 16-bit accumulation lost it

    opt = mp.MasterWeights(torch.optim.SGD([p], lr=1.0))
    (p * 1.0).sum().backward()
    assert p.grad.dtype == torch.float16 and p.grad.tolist() == [1.0] * 4  # visible where PyTorch puts it
    (p * small).sum().backward()
    (grad,) = opt.collect_grads_()
    assert grad.dtype == torch.float32 and grad.tolist() == [1.0 + small] * 4
    # Two more: 1 + 3 * 2^-11 rounds to 1 + 2^-9 in FP16, which the 16-bit sum (stuck at 1) never reaches;
    # param.grad shows the rounding of the FP32 sum.
    (p * small).sum().backward()
    (p * small).sum().backward()
    assert opt.collect_grads_()[0].tolist() == [1.0 + 3 * small] * 4
    assert p.grad.tolist() == [1.0 + 2.0**-9] * 4


def test_zero_grad_clears_model_and_master_grads():
    (p,) = fp16_params((3,))
    opt = mp.MasterWeights(torch.optim.SGD([p], lr=1.0))
    p.sum().backward()
    p.grad = torch.ones_like(p)  # a leftover 16-bit grad as well
    opt.zero_grad(set_to_none=False)
    # the FP32 gradient exists only between micro-batches; what the step takes is zero either way
    assert p.grad.abs().sum() == 0 and (opt.master_params[0].grad is None or opt.master_params[0].grad.abs().sum() == 0)
    assert [g.abs().sum().item() for g in opt.collect_grads_()] == [0.0]
    opt.release_grads_()
    opt.zero_grad()
    assert p.grad is None and opt.master_params[0].grad is None


def test_fp32_params_are_their_own_masters_next_to_fp16_ones():
    half, full = torch.nn.Parameter(torch.ones(2).half()), torch.nn.Parameter(torch.ones(2))
    opt = mp.MasterWeights(torch.optim.SGD([half, full], lr=0.5))
    assert opt.master_params[1] is full and opt.master_params[0] is not half
    (half.float().sum() + full.sum()).backward()
    opt.step()
    assert half.tolist() == [0.5, 0.5] and full.tolist() == [0.5, 0.5]


# ----- emulation ----------------------------------------------------------------------------------


def test_emulated_fp16_rounds_grads_and_copies_masters_back_on_the_grid():
    w = torch.nn.Parameter(torch.ones(3))  # FP32 storage holding FP16 values
    opt = mp.MasterWeights(torch.optim.SGD([w], lr=1.0), param_format=mp.F16)
    x = torch.tensor([1e-8, 1.0 + 2.0**-13, 3.0])  # 1e-8 flushes to 0 in FP16; the middle rounds to 1
    (w * x).sum().backward()
    (grad,) = opt.collect_grads_()
    assert grad.tolist() == [0.0, 1.0, 3.0]
    opt.step()
    (master,) = opt.master_params
    assert master.tolist() == [1.0, 0.0, -2.0]
    opt.optimizer.param_groups[0]["lr"] = 2.0**-13
    master.grad = torch.ones(3)
    opt.step()
    assert torch.equal(w, master.half().float()) and not torch.equal(w, master)


def test_per_parameter_formats_leave_fp32_islands_alone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = mp.MasterWeights(torch.optim.SGD([a, b], lr=2.0**-13), param_format={a: "fp16"})
    assert opt.master_params[1] is b and opt.master_params[0] is not a
    (a.sum() + b.sum()).backward()
    opt.step()
    assert a.tolist() == [1.0, 1.0] and b.tolist() == [1.0 - 2.0**-13] * 2


# ----- the paper's finding (b) -------------------------------------------------------------------------


def _small_update_run(mode: str | None, native: bool, steps: int = 300) -> torch.Tensor:
    """Pull w from 1.0 towards 1.25 with updates of ~2^-14, below FP16's half-ulp 2^-11 at 1.0."""
    target = torch.full((8,), 1.25)
    if mode is None:  # the FP32 reference
        w = torch.nn.Parameter(torch.ones(8))
        opt: torch.optim.Optimizer = torch.optim.SGD([w], lr=2.0**-12)
    elif native:
        w = torch.nn.Parameter(torch.ones(8, dtype=torch.float16))
        opt = mp.MasterWeights(torch.optim.SGD([w], lr=2.0**-12), mode=mode)
    else:
        w = torch.nn.Parameter(torch.ones(8))
        opt = mp.MasterWeights(torch.optim.SGD([w], lr=2.0**-12), mode=mode, param_format=mp.F16)
    for _ in range(steps):
        (0.5 * (w.float() - target) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    return w.detach().float()


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native-fp16"])
def test_updates_below_half_ulp_stall_without_masters_and_match_fp32_with_them(native):
    fp32 = _small_update_run(None, native)
    without = _small_update_run("none", native)
    with_masters = _small_update_run("fp32", native)
    assert (fp32 - 1.0).min() > 16 * 2.0**-10  # FP32 moved by over 16 FP16 ulps
    assert torch.equal(without, torch.ones(8))  # 16-bit weights: every update lost, bitwise stalled
    assert torch.allclose(with_masters, fp32, rtol=0, atol=2.0**-10)  # within one FP16 ulp of FP32


# ----- checkpoints ------------------------------------------------------------------------------------


def test_state_dict_round_trips_into_fresh_objects_through_weights_only_load():
    params = fp16_params((3, 2), (2,), seed=3)
    opt = mp.MasterWeights(torch.optim.Adam(params, lr=1e-2))
    for _ in range(2):
        sum((p.float() ** 2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)

    fresh = fp16_params((3, 2), (2,), seed=4)
    opt2 = mp.MasterWeights(torch.optim.Adam(fresh, lr=0.5))
    opt2.load_state_dict(sd)
    for a, b in zip(opt.master_params, opt2.master_params, strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])
    for a, b in zip(params, fresh, strict=True):
        assert torch.equal(a, b)  # the model got the loaded masters, rounded
    assert opt2.param_groups[0]["lr"] == 1e-2


def test_state_dict_for_different_params_is_rejected():
    opt = mp.MasterWeights(torch.optim.SGD(fp16_params((3, 2), (2,)), lr=1.0))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="holds 2 parameters, this MasterWeights has 1"):
        mp.MasterWeights(torch.optim.SGD(fp16_params((3, 2)), lr=1.0)).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"parameter 0: saved shape \(3, 2\), this MasterWeights has \(2, 3"):
        mp.MasterWeights(torch.optim.SGD(fp16_params((2, 3), (2,)), lr=1.0)).load_state_dict(sd)
    with pytest.raises(ValueError, match="mode='fp32'"):
        mp.MasterWeights(torch.optim.SGD(fp16_params((3, 2), (2,)), lr=1.0), mode="none").load_state_dict(sd)
    with pytest.raises(ValueError, match="version 7"):
        opt.load_state_dict({**sd, "version": 7})
    with pytest.raises(ValueError, match="not a MasterWeights state dict"):
        opt.load_state_dict(torch.optim.SGD(fp16_params((1,)), lr=1.0).state_dict())


# ----- errors -----------------------------------------------------------------------------------------


def test_masters_over_fp32_params_explain_why():
    with pytest.raises(ValueError, match="fp32 masters of FP32 parameters would do nothing.*param_format"):
        mp.MasterWeights(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0))
    # mode="none" over FP32 is just the plain optimizer, allowed (the FP32 baseline through one wrapper)
    mp.MasterWeights(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0), mode="none")


def test_bad_mode_format_and_optimizer_are_rejected():
    params = fp16_params((2,))
    with pytest.raises(ValueError, match=r"mode must be one of \['fp32', 'compact', 'kahan', 'stochastic', 'none'\], "
                                         r"got 'kahn': fp32: an FP32 master copy"):
        mp.MasterWeights(torch.optim.SGD(params, lr=1.0), mode="kahn")
    with pytest.raises(ValueError, match="parameter 0 is fp16, but master mode 'compact' .* bf16 parameters only"):
        mp.MasterWeights(torch.optim.SGD(params, lr=1.0), mode="compact")
    assert params[0].grad is None and params[0].dtype == torch.float16
    with pytest.raises(ValueError, match="torch.float16 but param_format is bf16"):
        mp.MasterWeights(torch.optim.SGD(params, lr=1.0), param_format=mp.BF16)
    with pytest.raises(TypeError, match="got list"):
        mp.MasterWeights(params)
    inner = torch.optim.SGD(params, lr=1.0)
    with pytest.raises(TypeError, match="already wrapped"):
        mp.MasterWeights(mp.MasterWeights(inner))
    assert inner.param_groups[0]["params"][0].dtype == torch.float32  # the first wrap did happen
    bad = torch.optim.SGD(fp16_params((2,)), lr=1.0)
    with pytest.raises(ValueError, match="param_format"):
        mp.MasterWeights(bad, param_format="bf16")
    assert bad.param_groups[0]["params"][0].dtype == torch.float16  # a failed wrap changes nothing


# ----- gradients where PyTorch puts them (every way users read and clear them) -------------------------

PRESETS_WITH_MASTERS = ["f16-master", "f16-master,execution=native", "bf16-master", "bf16-master,execution=native"]


def _prepared(policy: str, lr: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return mp.prepare(model, opt, policy)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)


def _backward(model, scaler, i: int) -> None:
    x, y = _batch(i)
    with mp.autocast(model):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()


@pytest.mark.parametrize("policy", PRESETS_WITH_MASTERS)
def test_every_way_of_clearing_gradients_gives_the_same_trajectory(policy):
    finals = {}
    for clear in ["optimizer", "model", "optimizer-zeros", "model-zeros"]:
        model, opt, scaler = _prepared(policy)
        norms = []
        for i in range(6):
            _backward(model, scaler, i)
            norms.append(mp.step(opt, scaler, max_grad_norm=10.0).grad_norm)
            target = opt if clear.startswith("optimizer") else model
            target.zero_grad(set_to_none=not clear.endswith("zeros"))
        finals[clear] = ([p.detach().clone() for p in model.parameters()], norms)
    ref_params, ref_norms = finals["optimizer"]
    for params, norms in finals.values():
        assert norms == ref_norms
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))


def test_model_zero_grad_does_not_let_gradients_pile_up():
    # The report: lr=0, static scale 1, the same batch each step, cleared with model.zero_grad().
    model, opt, scaler = _prepared("f16-master,scaling=static:1", lr=0.0)
    norms = []
    for _ in range(3):
        _backward(model, scaler, 0)
        norms.append(mp.step(opt, scaler, max_grad_norm=1e9).grad_norm)
        model.zero_grad()
    assert norms[0] == norms[1] == norms[2] > 0


@pytest.mark.parametrize("policy", PRESETS_WITH_MASTERS)
def test_gradients_are_visible_on_the_model_in_its_format(policy):
    model, opt, scaler = _prepared(policy + ",scaling=static:8")
    _backward(model, scaler, 0)
    fmt = mp.Policy.parse(policy).params
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        if name.startswith(("0.", "2.")):
            assert torch.equal(p.grad.float(), mp.quantize(p.grad.float(), fmt)), name  # on the 16-bit grid
    # torch's clip_grad_norm_ over the model finds every gradient (it found none before)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert torch.isfinite(norm) and norm > 0


@pytest.mark.parametrize("policy", ["f16-master", "bf16-master,execution=native"])
def test_changing_the_models_gradients_before_mp_step_changes_the_update(policy):
    # What a user (or HF Trainer) does to model.parameters()' gradients is what the update uses: here
    # they are zeroed in place, so Adam's first step must not move (the FP32 copy must not win).
    for clip in (False, True):
        model, opt, scaler = _prepared(policy + ",scaling=static:8", seed=1)
        before = [m.detach().clone() for m in opt.master_params]
        _backward(model, scaler, 0)
        if clip:
            for p in model.parameters():
                p.grad.zero_()
        info = mp.step(opt, scaler)
        moved = any(not torch.equal(a, b) for a, b in zip(before, opt.master_params, strict=True))
        assert info.applied and moved != clip


@pytest.mark.parametrize("policy", ["f16-master", "bf16-master,execution=native"])
def test_micro_batch_accumulation_keeps_fp32_precision_through_prepare(policy):
    model, opt, scaler = _prepared(policy + ",scaling=static:1")
    fmt = mp.Policy.parse(policy).params
    p = model[0].weight
    # 4 micro-batches whose weight gradients are exact 16-bit values: 1, then three times 2^-11 relative.
    small = fmt.eps / 2  # half an ulp at 1.0: lost in a 16-bit sum, kept in FP32
    for g in (1.0, small, small, small):
        (p.float().sum() * g).backward()
    grads = opt.collect_grads_()
    master_grad = grads[0]
    assert master_grad.dtype == torch.float32 and torch.all(master_grad == 1.0 + 3 * small)
    assert torch.equal(p.grad, master_grad.to(p.dtype) if p.dtype != torch.float32 else mp.quantize(master_grad, fmt))


def test_weights_loaded_after_prepare_are_what_the_optimizer_continues_from():
    model, opt, scaler = _prepared("f16-master,scaling=static:1", lr=0.0)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    _backward(model, scaler, 0)
    assert mp.step(opt, scaler).applied
    assert torch.all(model[0].weight == 3.0) and torch.all(opt.master_params[0] == 3.0)


@pytest.mark.parametrize("policy", ["bf16-master", "f16-master,scaling=static:8"])
def test_a_nan_written_into_a_weight_is_reported_by_name(policy):
    # Issue 15: with bf16 nothing was said at all, and every later step was skipped. Now the step after the
    # first skipped one checks the weights (in its one sync) and names the parameter.
    model, opt, scaler = _prepared(policy)
    for i in range(2):
        _backward(model, scaler, i)
        assert mp.step(opt, scaler).applied
        opt.zero_grad()
    model[0].weight.data[3, 1] = float("nan")  # through .data: no version counter sees it (issue 20)
    infos = []
    with pytest.raises(mp.NaNStormError) as caught:
        for i in range(2, 10):
            _backward(model, scaler, i)
            infos.append(mp.step(opt, scaler))
            opt.zero_grad()
    # step 3 skips (the NaN weight makes its gradients NaN), step 4 checks the weights and says why
    assert [info.applied for info in infos] == [False]
    error = caught.value.named(model)
    assert error.reason == "weights" and error.weights == {"0.weight": "nan"}
    assert str(error).startswith("the weights of 0.weight: nan hold inf/NaN: every later step would be skipped")


def test_a_value_written_into_a_master_alone_gives_way_to_the_parameter():
    # The parameter is the weight; its master only adds bits where it still rounds to it (issue 20): a NaN
    # written into the master alone never reaches the model (write masters with copy_to_model_ after).
    model, opt, scaler = _prepared("bf16-master")
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        opt.master_params[0][3, 1] = float("nan")
    opt.sync_masters_()
    assert torch.equal(mp.quantize(opt.master_params[0], mp.BF16), before)  # emulated: FP32 storage


# ----- add_param_group: layers unfrozen later (issue 27) ----------------------------------------------
def _unfreeze_model(policy: str, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    dtype = torch.bfloat16 if policy.startswith("bf16") else torch.float16
    with torch.no_grad():  # values already on the policy's grid: a master made later starts from the same bits
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def _train(model, opt, scaler, steps: range) -> list[bool]:
    applied = []
    for i in steps:
        _backward(model, scaler, i)
        applied.append(mp.step(opt, scaler, max_grad_norm=10.0).applied)
        opt.zero_grad()
    return applied


@pytest.mark.parametrize("policy", [*PRESETS_WITH_MASTERS, "bf16-pure", "bf16-pure,execution=native"])
def test_a_group_added_after_prepare_trains_as_if_it_had_been_there_from_the_start(policy):
    ref = _unfreeze_model(policy)
    ref_opt = torch.optim.Adam([{"params": ref[0].parameters()}, {"params": ref[2].parameters(), "lr": 0.01}], lr=0.1)
    ref, ref_opt, ref_scaler = mp.prepare(ref, ref_opt, policy)
    model = _unfreeze_model(policy)
    model, opt, scaler = mp.prepare(model, torch.optim.Adam(model[0].parameters(), lr=0.1), policy)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    if "master" in policy:
        assert all(p.dtype == torch.float32 for p in opt.param_groups[1]["params"])  # masters, FP32
    assert _train(ref, ref_opt, ref_scaler, range(6)) == _train(model, opt, scaler, range(6))
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_opt.master_params, opt.master_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["f16-master,scaling=static:64", "bf16-master,execution=native"])
def test_gradual_unfreezing_trains_the_layer_from_then_on_and_resumes(policy):
    model = _unfreeze_model(policy)
    model[0].requires_grad_(False)
    model, opt, scaler = mp.prepare(model, torch.optim.Adam(model[2].parameters(), lr=0.1), policy)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    assert all(_train(model, opt, scaler, range(3)))
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters(), strict=True))
    model[0].requires_grad_(True)
    opt.add_param_group({"params": model[0].parameters(), "lr": 0.05})
    assert all(_train(model, opt, scaler, range(3, 6)))
    assert not any(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters(), strict=True))
    # A checkpoint after unfreezing loads into a fresh run set up the same way, and both continue alike.
    buffer = io.BytesIO()  # through a file, as a checkpoint: state_dict() tensors are the live ones
    torch.save((opt.state_dict(), scaler.state_dict(), model.state_dict()), buffer)
    buffer.seek(0)
    sd, scaler_sd, weights = torch.load(buffer, weights_only=True)
    fresh = _unfreeze_model(policy, seed=1)
    fresh[0].requires_grad_(False)
    fresh, fresh_opt, fresh_scaler = mp.prepare(fresh, torch.optim.Adam(fresh[2].parameters(), lr=0.1), policy)
    fresh[0].requires_grad_(True)
    fresh_opt.add_param_group({"params": fresh[0].parameters(), "lr": 0.05})
    fresh.load_state_dict(weights)
    fresh_opt.load_state_dict(sd)
    fresh_scaler.load_state_dict(scaler_sd)
    assert _train(model, opt, scaler, range(6, 9)) == _train(fresh, fresh_opt, fresh_scaler, range(6, 9))
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_group_with_a_parameter_already_stepped_is_refused_and_changes_nothing():
    model, opt, scaler = _prepared("f16-master,scaling=static:64")
    before = (len(opt.param_groups), len(opt.model_params), len(opt.master_params), dict(opt._managed))
    with pytest.raises(ValueError, match="already in a param group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2).half()), model[0].weight]})
    with pytest.raises(TypeError, match="a dict with 'params'"):
        opt.add_param_group([model[0].weight])
    with pytest.raises(ValueError, match="master_mode"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2).half())], "master_mode": "fp64"})
    assert (len(opt.param_groups), len(opt.model_params), len(opt.master_params), dict(opt._managed)) == before
    assert all(_train(model, opt, scaler, range(2)))
