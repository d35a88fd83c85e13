"""prepare / autocast: emulation is faithful, native agrees with it, settings and hooks are restored."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec import prepared_state, unprepare


def on_grid(x: torch.Tensor, fmt: mp.Format) -> bool:
    return bool(torch.isfinite(x).all()) and torch.equal(x, mp.quantize(x, fmt))


class Toy(nn.Module):
    """A bit of everything: conv, batch norm, linear, layer norm, an activation, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1, bias=False)  # before BN, as usual
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(32, 16)
        self.ln = nn.LayerNorm(16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x))).flatten(1)
        h = self.fc(h)
        h = h + self.act(self.ln(h))  # a functional residual add between modules
        return self.head(h)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy()
    with torch.no_grad():  # island params off the FP16 grid, to see that they stay FP32
        model.ln.weight.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
    return model


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def capture(model: nn.Module) -> tuple[list, list, list]:
    """Record every module's outputs as stored (a hook after mixprec's) and the gradients that flow
    into each module's backward (a tensor hook on the output as the module produced it, before
    mixprec's hooks: autograd sums the gradients of a tensor used twice before they reach it)."""
    outputs: list[tuple[str, torch.Tensor]] = []
    grads: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        def stored(module, args, output, name=name):
            for t in output if isinstance(output, tuple) else (output,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    outputs.append((name, t.detach()))

        def produced(module, args, output, name=name):
            for t in output if isinstance(output, tuple) else (output,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, name=name: grads.append((name, g)))

        handles.append(module.register_forward_hook(stored))
        handles.append(module.register_forward_hook(produced, prepend=True))
    return outputs, grads, handles


def test_emulated_f16_stores_every_activation_parameter_and_gradient_on_the_grid():
    model = toy()
    x, y = data()
    model, _, scaler = mp.prepare(model, None, "f16-master")
    islands = {id(model.ln.weight), id(model.ln.bias), id(model.bn.weight), id(model.bn.bias)}
    with mp.autocast(model):
        outputs, grads, handles = capture(model)
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    for handle in handles:
        handle.remove()
    assert len(outputs) == 8 and len(grads) == 8  # 7 modules (act twice) + the model itself
    for name, t in outputs:
        assert on_grid(t, mp.F16), f"output of {name!r} is off the fp16 grid"
    for name, g in grads:
        assert on_grid(g, mp.F16), f"gradient of the output of {name!r} is off the fp16 grid"
    for name, p in model.named_parameters():
        if id(p) in islands:  # FP32 islands keep FP32 parameters and gradients
            assert not on_grid(p, mp.F16) or name.endswith("bias"), name
            continue
        assert on_grid(p, mp.F16), f"parameter {name} is off the fp16 grid"
        assert p.grad is not None and on_grid(p.grad, mp.F16), f"gradient of {name} is off the fp16 grid"
    assert not on_grid(model.ln.weight.grad, mp.F16)  # FP32 gradient: island


def test_emulated_master_gradients_are_rounded_and_the_step_keeps_params_on_the_grid():
    model = toy()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, scaler = mp.prepare(model, opt, "f16-master")
    with mp.autocast(model):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    # fc.weight's gradient on the model; its FP32 master's grad, which the step takes from it
    assert on_grid(opt.model_params[0].grad, mp.F16) and on_grid(opt.collect_grads_()[0], mp.F16)
    before = model.ln.weight.detach().clone()
    info = mp.step(opt, scaler)
    assert info.applied
    assert on_grid(model.fc.weight, mp.F16) and on_grid(model.conv.weight, mp.F16)
    assert not on_grid(model.ln.weight, mp.F16) and not torch.equal(model.ln.weight, before)  # FP32 island


def test_f16_mixed_rounds_weights_at_use_not_in_storage():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 5)
    model, _, _ = mp.prepare(model, None, "f16-mixed")
    weight = model.weight
    with mp.autocast(model):
        y = model(x)
    q = lambda t: mp.quantize(t, mp.F16)  # noqa: E731
    assert torch.equal(y, q(F.linear(q(x), q(reference.weight), q(reference.bias))))
    assert model.weight is weight and torch.equal(model.weight, reference.weight)  # storage stays FP32
    y.sum().backward()
    assert on_grid(model.weight.grad, mp.F16)  # the gradient of the FP16 copy, accumulated in FP32
    assert torch.equal(model.weight.grad, q(torch.ones(4, 3).T @ q(x)))


def test_f16_mixed_lstm_uses_rounded_weights_and_restores_its_own():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2)
    rounded = copy.deepcopy(lstm)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(mp.quantize(p, mp.F16))
    x = torch.randn(5, 2, 3)
    params = list(lstm.parameters())
    flat = list(lstm._flat_weights)
    mp.prepare(lstm, None, "f16-mixed")
    with mp.autocast(lstm):
        out, (h, c) = lstm(x)
    expected, _ = rounded(mp.quantize(x, mp.F16))
    assert torch.equal(out, mp.quantize(expected, mp.F16))
    assert all(a is b for a, b in zip(lstm.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(lstm._flat_weights, flat, strict=True))
    assert not torch.equal(lstm.weight_ih_l0, rounded.weight_ih_l0)  # FP32 storage untouched


def test_native_keeps_parameter_objects_so_the_optimizer_still_holds_them():
    model = toy()
    params = list(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, opt, scaler = mp.prepare(model, opt, "bf16-master,execution=native")
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert opt.model_params == params
    assert model.fc.weight.dtype == torch.bfloat16 and model.ln.weight.dtype == torch.float32
    assert model.bn.running_mean.dtype == torch.float32
    x, y = data()
    with mp.autocast(model):
        outputs, _, handles = capture(model)
        out = model(x)
    for handle in handles:
        handle.remove()
    dtypes = {name: t.dtype for name, t in outputs}
    assert out.dtype == torch.float32  # output=fp32: what the loss sees
    assert dtypes["fc"] == dtypes["ln"] == dtypes["bn"] == torch.bfloat16  # islands cast back
    scaler.scale(F.cross_entropy(out, y)).backward()
    assert mp.step(opt, scaler).applied
    assert model.fc.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("preset, fmt", [("bf16-master", mp.BF16), ("f16-master", mp.F16)])
def test_native_and_emulated_agree_on_cpu(preset, fmt):
    results = []
    for execution in ("native", "emulated"):
        model = toy()
        x, y = data()
        model, _, _ = mp.prepare(model, None, f"{preset},execution={execution}")
        with mp.autocast(model):
            out = model(x)
        F.cross_entropy(out, y).backward()
        results.append((out, [p.grad.float() for p in model.parameters()]))
    (out_n, grads_n), (out_e, grads_e) = results
    # The two differ only by where intermediate results are rounded: a few units of the format's eps.
    tol = 8 * fmt.eps
    assert torch.allclose(out_n, out_e, rtol=tol, atol=tol * out_e.abs().max().item())
    for gn, ge in zip(grads_n, grads_e, strict=True):
        assert torch.allclose(gn, ge, rtol=tol, atol=tol * ge.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_native_and_emulated_f16_master_agree_on_cuda():
    results = []
    for execution in ("native", "emulated"):
        model = toy().cuda()
        x, y = (t.cuda() for t in data())
        model, _, _ = mp.prepare(model, None, f"f16-master,execution={execution}")
        assert prepared_state(model).execution == execution
        with mp.autocast(model):
            out = model(x)
        F.cross_entropy(out, y).backward()
        results.append((out.float(), [p.grad.float() for p in model.parameters()]))
    (out_n, grads_n), (out_e, grads_e) = results
    tol = 8 * mp.F16.eps
    assert torch.allclose(out_n, out_e, rtol=tol, atol=tol * out_e.abs().max().item())
    for gn, ge in zip(grads_n, grads_e, strict=True):
        assert torch.allclose(gn, ge, rtol=tol, atol=tol * ge.abs().max().item())


def torch_settings() -> dict:
    settings = {
        "grad": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "autocast_cache": torch.is_autocast_cache_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
    for device in ("cpu", "cuda"):
        settings[f"autocast_{device}"] = torch.is_autocast_enabled(device)
        settings[f"autocast_dtype_{device}"] = torch.get_autocast_dtype(device)
    return settings


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


class Boom(nn.LayerNorm):
    """An FP32 island whose forward raises: the nested autocast must still be left."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.mark.parametrize("execution", ["native", "emulated", "emulated-module"])
@pytest.mark.parametrize("where", ["none", "body", "forward"])
def test_autocast_restores_every_setting_and_hook(execution, where):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    if where == "forward":
        model[1] = Boom(4)
    mp.prepare(model, None, f"bf16-mixed,execution={execution}")
    before, hooks = torch_settings(), hook_counts(model)
    inside = {}
    try:
        with mp.autocast(model):
            inside = torch_settings()
            if where == "body":
                raise KeyError("body")
            try:
                model(torch.randn(3, 4))
            except RuntimeError:
                assert torch_settings() == inside  # the island's nested autocast was left
                raise
    except (KeyError, RuntimeError):
        assert where != "none"
    assert torch_settings() == before and hook_counts(model) == hooks
    assert not prepared_state(model).in_autocast
    if execution == "emulated-module":
        assert inside == before  # module emulation touches no torch setting
    else:  # native and per-op emulation run under torch.autocast (restored on exit)
        assert inside["autocast_cpu"] and inside["autocast_dtype_cpu"] == torch.bfloat16


def test_emulated_model_computes_in_fp32_outside_autocast():
    model, _, _ = mp.prepare(nn.Linear(3, 3), None, "f16-pure")
    x = torch.randn(2, 3) / 3
    with mp.autocast(model):
        inside = model(x)
    outside = model(x)
    assert on_grid(inside, mp.F16) and not on_grid(outside, mp.F16)
    assert torch.equal(outside, F.linear(x, model.weight, model.bias))


def test_preparing_twice_is_a_clear_error_and_unprepare_undoes_it():
    model = toy()
    mp.prepare(model, None, "f16-master")
    with pytest.raises(RuntimeError, match="already prepared.*unprepare"):
        mp.prepare(model, None, "bf16-master")
    unprepare(model)
    assert prepared_state(model) is None
    # gradients are no longer rounded once unprepared
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    assert not on_grid(model.fc.weight.grad, mp.F16)
    model.zero_grad()
    mp.prepare(model, None, "bf16-master")
    assert prepared_state(model).policy == mp.Policy.parse("bf16-master")


def test_misuse_errors():
    model = toy()
    with pytest.raises(RuntimeError, match="needs a prepared model"):
        with mp.autocast(model):
            pass
    mp.prepare(model, None, "f16-master")
    with pytest.raises(ValueError, match="prepared with f16-master"):
        with mp.autocast(model, "bf16-master"):
            pass
    with mp.autocast(model, "f16-master"):
        with pytest.raises(RuntimeError, match="already open"):
            with mp.autocast(model):
                pass
        with pytest.raises(RuntimeError, match="leave the autocast"):
            unprepare(model)
    with pytest.raises(ValueError, match="e4m3 has no native support"):
        mp.prepare(toy(), None, "params=e4m3,compute=e4m3,execution=native")


def test_a_rule_matching_nothing_warns_at_prepare():
    with pytest.warns(UserWarning, match="'decoder.*:fp32' matched no module"):
        mp.prepare(toy(), None, "f16-master,rule=decoder.*:fp32")


def test_prepared_state_tells_what_runs():
    model, _, scaler = mp.prepare(toy(), None, "f16-master,rule=head:fp32")
    state = prepared_state(model)
    assert state.execution == "emulated" and state.device == torch.device("cpu")
    assert state.param_formats["fc.weight"] == mp.F16 and state.param_formats["head.weight"] == mp.F32
    assert state.param_formats["ln.weight"] == mp.F32
    summary = state.summary()
    assert summary["execution"] == "emulated" and summary["param_formats"] == {"fp16": 3, "fp32": 6}
    assert type(scaler).__name__ == "DynamicScaler"


def test_emulated_overflow_is_seen_and_the_step_skipped():
    model = toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, scaler = mp.prepare(model, opt, "f16-master,scaling=static:1e30")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    with mp.autocast(model):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()  # the scaled gradient overflows FP16 on its way into the model
    info = mp.step(opt, scaler)
    assert not info.applied
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class LinearBoom(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not isinstance(self.weight, nn.Parameter)  # the rounded weight is in use
        raise RuntimeError("boom")


@pytest.mark.parametrize("policy", ["f16-mixed,execution=emulated-module", "f16-master"])
def test_weights_swapped_in_at_use_are_restored_when_forward_raises(policy):
    model = LinearBoom(3, 3)
    params = dict(model._parameters)
    mp.prepare(model, None, policy)
    with mp.autocast(model), pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 3))
    assert model._parameters == params and all(isinstance(p, nn.Parameter) for p in model.parameters())


# ----- contracts users rely on: loading weights, re-preparing, all-or-nothing, the right optimizer --------

BOTH = ["f16-master", "f16-master,execution=native"]


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))


def _one_step(model, opt, scaler, seed: int = 0) -> mp.StepInfo:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    with mp.autocast(model):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    info = mp.step(opt, scaler)
    opt.zero_grad()
    return info


@pytest.mark.parametrize("policy", BOTH)
def test_weights_loaded_with_load_state_dict_after_prepare_survive_the_next_step(policy):
    model = _net()
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0), policy + ",scaling=static:1")
    loaded = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    model.load_state_dict(loaded)
    assert _one_step(model, opt, scaler).applied
    assert all(torch.all(v == 3.0) for v in model.state_dict().values())
    assert all(torch.all(m == 3.0) for m in opt.master_params)


@pytest.mark.parametrize("policy", BOTH)
def test_masters_start_from_the_fp32_originals(policy):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 + 2.0**-12)  # below half an FP16 ulp above 1: the FP16 weight is 1.0
    model, opt, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)
    assert torch.all(model.weight == 1.0)
    assert torch.all(opt.master_params[0] == 1.0 + 2.0**-12)


@pytest.mark.parametrize("policy", BOTH)
def test_unprepare_then_prepare_with_a_new_optimizer_trains_like_a_fresh_prepare(policy):
    fresh = _net()
    with torch.no_grad():  # the first prepare rounded the Linear weights for good: start the fresh one there
        for layer in (fresh[0], fresh[2]):
            for p in layer.parameters():
                p.copy_(p.half())
    fresh, fresh_opt, fresh_scaler = mp.prepare(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-2), policy)
    again = _net()
    again, old_opt, _ = mp.prepare(again, torch.optim.Adam(again.parameters(), lr=1e-2), policy)
    mp.unprepare(again)
    again, new_opt, new_scaler = mp.prepare(again, torch.optim.Adam(again.parameters(), lr=1e-2), policy)
    for i in range(3):
        assert _one_step(fresh, fresh_opt, fresh_scaler, i).applied == _one_step(again, new_opt, new_scaler, i).applied
    for a, b in zip(fresh.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(m.grad is None for m in old_opt.master_params)  # the old optimizer's hooks are gone


@pytest.mark.parametrize("policy", BOTH)
def test_a_prepare_that_raises_half_way_changes_nothing(policy):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inner = torch.optim.SGD([{"params": list(model.parameters()), "master_mode": "compact"}], lr=0.1)
    with pytest.raises(ValueError, match="master mode 'compact' .* bf16 parameters only"):  # params are fp16
        mp.prepare(model, inner, policy)
    assert mp.prepared_state(model) is None
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert inner.param_groups[0]["params"] == list(model.parameters())
    model(torch.ones(2, 4)).sum().backward()  # no hook of mixprec's is left on the parameters
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model2, opt2, scaler2 = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)  # and again
    model2.zero_grad()
    assert _one_step(model2, opt2, scaler2).loss_scale > 0


def test_a_parameter_added_after_prepare_is_a_clear_error():
    model = _net()
    model, opt, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    model.append(torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match=r"parameters \['3.weight', '3.bias'\] were added .* after mp.prepare"):
        with mp.autocast(model):
            pass


def test_stepping_the_optimizer_passed_to_prepare_is_a_clear_error():
    model = _net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, scaler = mp.prepare(model, inner, "f16-master,scaling=static:1")
    model(torch.ones(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="step the optimizer that mp.prepare"):
        inner.step()
    assert mp.step(opt, scaler).applied  # the returned one steps, through the same inner optimizer


def test_sparse_embeddings_are_refused_with_the_fix_and_nothing_changed():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"module '0' has sparse=True.*build it with sparse=False"):
        mp.prepare(model, opt, "f16-master")
    assert mp.prepared_state(model) is None and opt.param_groups[0]["params"][0] is model[0].weight
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("policy", ["bf16-master", "bf16-master,execution=native"])
def test_a_deep_copy_of_a_prepared_model_is_its_weights_only(policy):
    # Issue 20 (14): the EMA pattern copied the MasterWeights with its masters and Adam state (6x the
    # parameter bytes), and mp.memory on the copy raised.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    model, opt, scaler = mp.prepare(model, torch.optim.Adam(model.parameters()), policy)
    with mp.autocast(model):
        scaler.scale(model(torch.randn(3, 16)).float().sum()).backward()
    mp.step(opt, scaler)
    opt.zero_grad()
    ema = copy.deepcopy(model)
    state = mp.prepared_state(ema)
    assert state.master_weights is None and state.handles == [] and mp.prepared_state(model).master_weights is opt
    held = mp.memory(ema).held
    assert held["masters"] == held["optimizer_state"] == 0
    assert held["parameters"] == mp.memory(model, opt).held["parameters"]
    assert all(not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None)
               for p in ema.parameters())
    x = torch.randn(3, 16)
    with mp.autocast(ema):
        y_ema = ema(x)
    with mp.autocast(model):
        y = model(x)
    assert torch.equal(y_ema, y)  # the copy runs in the policy's formats
    weights = [p.detach().clone() for p in ema.parameters()]
    with mp.autocast(model):
        scaler.scale(model(x).float().sum()).backward()
    mp.step(opt, scaler)  # training the original leaves the copy alone
    assert all(torch.equal(a, b) for a, b in zip(weights, ema.parameters(), strict=True))
    saved = io.BytesIO()  # torch.save of the whole model: the same light copy, without optimizer state
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert mp.prepared_state(loaded).master_weights is None and mp.memory(loaded).held == held


@pytest.mark.parametrize(("policy", "mode", "emulation"), [
    ("f16-master,execution=native", "native", None),
    ("f16-master", "emulated", "per op"),  # auto on a CPU: emulated, per op
    ("f16-master,execution=emulated", "emulated", "per op"),
    ("f16-master,execution=emulated-module", "emulated-module", "module boundaries"),
    ("f32", "native", None),
])
def test_the_prepared_mode_is_spelled_as_in_policy_strings(policy, mode, emulation):
    model = torch.nn.Linear(2, 2)
    mp.prepare(model, None, policy)
    state = mp.prepared_state(model)
    assert (state.mode, state.emulation) == (mode, emulation)
    assert state.summary()["mode"] == mode and state.execution == ("native" if mode == "native" else "emulated")


def test_complex_parameters_are_refused_by_name_and_nothing_changes():
    model = torch.nn.Linear(2, 2)
    model.weight = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="parameter 'weight' has dtype torch.complex64: mixprec trains real"):
        mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    assert mp.prepared_state(model) is None and model.bias.dtype == torch.float32
