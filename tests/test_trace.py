"""trace_nonfinite: the first op (and module) whose forward output or backward gradient went non-finite.

Faults are injected where we know the answer: a NaN made by one op in one module's forward, an inf
returned by one custom autograd.Function's backward, an FP16 overflow in an attention's second matmul,
an overflow only the loss scale causes. Then: nothing found on a clean step, the model untouched.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mixprec as mp
from mixprec.numerics.trace import Trace, trace_nonfinite

EXECUTIONS = ["emulated", "native", "emulated-module"]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


class SqrtShift(nn.Module):
    """``sqrt(x - 100)``: NaN wherever x < 100, made by the sqrt from finite inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        return torch.sqrt(h - 100)


class Poisoned(nn.Module):
    """Multiplies by a buffer holding one NaN: the values were bad before the step began."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.ones(8)
        mask[3] = float("nan")
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * self.mask


class InfGrad(torch.autograd.Function):
    """Identity forward; backward returns inf (or NaN): a fault only the backward shows."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


class BadBackward(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(InfGrad.apply(self.linear(x), self.value))


class Attention(nn.Module):
    """``h = x @ q; s = h @ h^T``: |h| fits FP16, the logits |s| (~3e5) do not; s / 1024 would."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.q
        s = h @ h.transpose(-1, -2)
        return s / 1024


class Amplify(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e5


def layers(middle: nn.Module, width: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), middle, nn.Linear(width, width),
                         nn.LayerNorm(width), nn.Linear(width, 1))


def loss_of(model: nn.Module, x: torch.Tensor):
    return lambda: model(x).float().pow(2).mean()


def test_a_nan_made_by_one_op_in_forward_is_located_by_module_and_op():
    model = layers(SqrtShift())
    trace = trace_nonfinite(model, loss_of(model, torch.randn(4, 8)))
    assert isinstance(trace, Trace)
    assert (trace.phase, trace.module, trace.op) == ("forward", "2", "sqrt")
    assert trace.nan > 0 and trace.inf == 0 and trace.inputs_finite
    assert trace.input_dtypes == trace.output_dtypes == ("float32",)
    assert str(trace).startswith(f"forward: first non-finite output at op {trace.op_index} 'sqrt' in module '2'")


def test_a_nan_already_in_a_buffer_is_named_with_the_op_that_read_it():
    model = layers(Poisoned())
    trace = trace_nonfinite(model, loss_of(model, torch.randn(4, 8)))
    assert (trace.phase, trace.module, trace.op) == ("forward", "2", "mul")
    assert trace.parameter == "2.mask" and not trace.inputs_finite
    assert "already in parameter '2.mask'" in str(trace)


def test_a_nan_in_a_parameter_is_named():
    model = layers(nn.ReLU())
    with torch.no_grad():
        model[3].weight[1, 2] = float("nan")
    trace = trace_nonfinite(model, loss_of(model, torch.randn(4, 8)))
    assert (trace.module, trace.op, trace.parameter, trace.inputs_finite) == ("3", "linear", "3.weight", False)


def test_non_finite_values_that_never_reach_the_loss_are_not_reported():
    # A causal mask of -inf that softmax turns into zeros: the step is clean.
    class Masked(nn.Module):
        def forward(self, x):
            s = x @ x.transpose(-1, -2)
            mask = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
            return torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ x

    model = layers(Masked())
    assert trace_nonfinite(model, loss_of(model, torch.randn(2, 5, 8))) is None


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_gradient_made_in_one_modules_backward_is_located(value):
    model = nn.Sequential(nn.Linear(8, 8), BadBackward(value), nn.LayerNorm(8), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    assert torch.isfinite(model(x)).all()  # the forward is clean
    trace = trace_nonfinite(model, loss_of(model, x))
    assert (trace.phase, trace.module) == ("backward", "1")
    # A custom autograd.Function is no torch call a TorchFunctionMode sees: named by its autograd node.
    assert trace.op == "InfGradBackward" and trace.op_index is None
    assert (trace.inf, trace.nan) == ((32, 0) if value == float("inf") else (0, 32))
    assert str(trace).startswith("backward: first non-finite gradient from autograd node 'InfGradBackward' in "
                                 "module '1'")


def attention_model() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(16, 16), Attention(), nn.Linear(6, 1))
    x = torch.randn(2, 6, 16) * 30
    with torch.no_grad():
        h = model[0](x) @ model[1].q
        assert h.abs().max() < 65504 < (h @ h.transpose(-1, -2)).abs().max()
    return model, x


@pytest.mark.parametrize("execution", ["emulated", "native"])
@pytest.mark.parametrize("autocast_in_run", [True, False])
def test_an_fp16_overflow_in_attention_is_located_at_the_second_matmul(execution, autocast_in_run):
    model, x = attention_model()
    mp.prepare(model, None, f"f16-master,execution={execution}")

    def run():
        with mp.autocast(model):
            return model(x).float().pow(2).mean()

    if autocast_in_run:
        trace = trace_nonfinite(model, run)
    else:
        with mp.autocast(model):
            trace = trace_nonfinite(model, lambda: model(x).float().pow(2).mean())
    assert (trace.phase, trace.module, trace.op) == ("forward", "1", "matmul")
    assert trace.input_dtypes == trace.output_dtypes[:1] * 2 == ("float16", "float16") and trace.inf > 0
    # the first matmul (x @ q) came earlier and was finite; its index is below this one's
    assert trace.op_index >= 2
    assert " 'matmul' in module '1' (float16, float16 -> float16; " in str(trace)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_a_module_output_above_fp16s_range_is_located_in_that_module(execution):
    model = layers(Amplify())
    mp.prepare(model, None, f"f16-master,execution={execution}")

    def run():
        with mp.autocast(model):
            return model(torch.randn(4, 8)).float().pow(2).mean()

    trace = trace_nonfinite(model, run)
    assert (trace.phase, trace.module) == ("forward", "2") and trace.inf > 0
    if execution != "emulated-module":  # module emulation computes the mul in FP32, then rounds it
        assert trace.op == "mul"


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_an_overflow_only_the_loss_scale_causes_is_located_in_backward(execution):
    model = layers(nn.ReLU())
    mp.prepare(model, None, f"f16-master,execution={execution}")
    x = torch.randn(4, 8)

    def run():
        with mp.autocast(model):
            return model(x).float().pow(2).mean()

    assert trace_nonfinite(model, run, loss_scale=2.0**10) is None
    trace = trace_nonfinite(model, run, loss_scale=2.0**24)
    assert trace.phase == "backward" and trace.inf + trace.nan > 0
    assert trace.module is not None or trace.op_index is not None
    assert str(trace).startswith("backward: first non-finite gradient")


def test_a_weight_gradient_overflow_names_the_parameter():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    with torch.no_grad():
        model[1].weight.fill_(1e-30)  # the input gradient stays small; the weight gradient does not
    trace = trace_nonfinite(model, lambda: model(torch.full((2, 8), 1e10)).sum(), loss_scale=1e30)
    assert (trace.phase, trace.module, trace.op, trace.parameter) == ("backward", "1", "linear", "1.weight")


def test_a_loss_scale_the_loss_dtype_cannot_hold_is_reported():
    model = nn.Linear(4, 1).half()
    trace = trace_nonfinite(model, lambda: model(torch.ones(2, 4, dtype=torch.float16)).sum(), loss_scale=2.0**17)
    assert (trace.phase, trace.op, trace.op_index) == ("backward", "loss * loss_scale", None)


@pytest.mark.parametrize("policy", [None, "f16-master", "bf16-master,execution=native"])
def test_a_clean_step_gives_none(policy):
    model = layers(nn.GELU())
    x = torch.randn(4, 8)
    if policy is None:
        assert trace_nonfinite(model, loss_of(model, x), loss_scale=1024.0) is None
        return
    mp.prepare(model, None, policy)
    with mp.autocast(model):
        assert trace_nonfinite(model, loss_of(model, x), loss_scale=1024.0) is None


def test_a_tiny_gpt2_clean_step_gives_none_and_a_gelu_overflow_is_found_in_backward():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(1, 100, (2, 16))
    mp.prepare(model, None, "f16-master")

    def run():
        with mp.autocast(model):
            return model(ids, labels=ids).loss

    assert trace_nonfinite(model, run) is None
    # GPT-2's GELU computes tanh(c * (x + 0.044715 * x**3)): with large x, x**3 is inf in FP16 and
    # tanh(inf) = 1 absorbs it (the loss is finite), but pow's backward, 0 * 3 * x**2 = 0 * inf, is NaN.
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(3000.0)
    trace = trace_nonfinite(model, run)
    assert (trace.phase, trace.module, trace.op) == ("backward", "transformer.h.1.mlp.act", "pow")
    assert trace.nan > 0


def snapshot(model: nn.Module, optimizer=None) -> list[tuple[str, torch.Tensor | None]]:
    out = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    out += [(n + ".grad", None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()]
    out += [(n, b.clone()) for n, b in model.named_buffers()]
    if optimizer is not None:
        for i, slot in enumerate(optimizer.grad_slots):
            out.append((f"master{i}", slot.master.detach().clone()))
            out.append((f"master{i}.grad", None if slot.master.grad is None else slot.master.grad.clone()))
            out.append((f"master{i}.settled", torch.tensor(slot.settled)))
    return out


def assert_bitwise_equal(before, after):
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, a), (_, b) in zip(before, after, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), name


def hook_counts(model: nn.Module) -> list[int]:
    counts = []
    for m in model.modules():
        counts += [len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks), len(m._forward_hooks_always_called)]
    for p in model.parameters():
        counts.append(len(p._backward_hooks or {}))
    return counts


@pytest.mark.parametrize("fault", ["backward", "forward", "clean"])
def test_the_model_its_gradients_and_master_gradients_are_left_bitwise_unchanged(fault):
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), BadBackward(float("inf") if fault == "backward" else 1.0),
                          nn.Dropout(0.5), SqrtShift() if fault == "forward" else nn.Identity(), nn.Linear(8, 1))
    model, optimizer, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    x = torch.randn(4, 8)
    with mp.autocast(model):  # a previous backward: gradients (16-bit on the model, FP32 on the masters)
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    model[5].bias.grad = None  # and one parameter without a gradient
    for slot in optimizer.grad_slots:
        if slot.param is model[5].bias:
            slot.master.grad = None
    before, hooks, rng = snapshot(model, optimizer), hook_counts(model), torch.get_rng_state()
    modes = torch._C._len_torch_function_stack()

    def run():
        with mp.autocast(model):
            return model(x).float().pow(2).mean()

    trace = trace_nonfinite(model, run, loss_scale=128.0)
    assert (trace is None) == (fault == "clean")
    if trace is not None:
        assert (trace.phase, trace.module) == (fault, {"backward": "2", "forward": "4"}[fault])
    assert_bitwise_equal(before, snapshot(model, optimizer))
    assert hook_counts(model) == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch._C._len_torch_function_stack() == modes
    assert mp.prepared_state(model).in_autocast is False


def test_hooks_and_modes_are_removed_when_run_raises():
    model = layers(nn.ReLU())
    hooks, modes = hook_counts(model), torch._C._len_torch_function_stack()

    def run():
        model(torch.randn(4, 8))
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        trace_nonfinite(model, run)
    assert hook_counts(model) == hooks
    assert torch._C._len_torch_function_stack() == modes
    assert trace_nonfinite(model, loss_of(model, torch.randn(4, 8))) is None  # still usable


def test_bad_arguments_say_what_was_received():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="loss_scale must be a positive number"):
        trace_nonfinite(model, lambda: model(torch.ones(1, 2)).sum(), loss_scale=0)
    with pytest.raises(TypeError, match="floating tensor, got tuple"):
        trace_nonfinite(model, lambda: (model(torch.ones(1, 2)),))
    with pytest.raises(TypeError, match="zero-argument callable"):
        trace_nonfinite(model, model(torch.ones(1, 2)))


def skipped_step(execution: str) -> tuple[nn.Module, torch.Tensor, mp.StepInfo]:
    """A prepared model, a batch and the StepInfo of a step skipped because its backward overflowed FP16
    (loss scale 2^24): numerics.md's example."""
    model: nn.Module = layers(nn.ReLU())
    model, optimizer, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                          f"f16-master,scaling=dynamic:16777216,execution={execution}")
    assert optimizer is not None
    x = torch.randn(4, 8)
    with mp.autocast(model):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    info = mp.step(optimizer, scaler)
    assert not info.applied
    return model, x, info


@pytest.mark.parametrize("execution", ["emulated", "emulated-module"])
def test_a_replay_outside_autocast_that_finds_nothing_says_so_instead_of_none(execution):
    # The skipped step's replay run outside mp.autocast computes in FP32 and overflows nothing: it used
    # to return None, which reads as "the step was clean".
    model, x, info = skipped_step(execution)
    with pytest.raises(RuntimeError, match=r"outside mp\.autocast\(model\).*with mp\.autocast\(model\): trace ="):
        trace_nonfinite(model, loss_of(model, x), loss_scale=info.loss_scale)
    with mp.autocast(model):  # the replay as the step ran finds the overflow
        trace = trace_nonfinite(model, loss_of(model, x), loss_scale=info.loss_scale)
    assert trace is not None and trace.phase == "backward" and trace.inf > 0
    with mp.autocast(model):  # a sync=False step's info.loss_scale is a 0-dim tensor: the same trace
        assert trace_nonfinite(model, loss_of(model, x), loss_scale=torch.tensor(info.loss_scale)) == trace
    state = mp.prepared_state(model)
    assert state is not None and state.in_autocast is False


def test_a_replay_outside_autocast_that_finds_something_warns_and_returns_it():
    model = layers(SqrtShift())  # its NaN is made in FP32 too
    mp.prepare(model, None, "f16-master")
    with pytest.warns(RuntimeWarning, match=r"outside mp\.autocast\(model\).*may not be where the step did"):
        trace = trace_nonfinite(model, loss_of(model, torch.randn(4, 8)))
    assert trace is not None and (trace.phase, trace.module, trace.op) == ("forward", "2", "sqrt")
    assert trace.input_dtypes == ("float32",)  # what ran: FP32, not the policy's FP16


@pytest.mark.parametrize("policy", [None, "f32", "params=fp16"])
def test_models_whose_forward_autocast_does_not_change_trace_without_it_silently(policy):
    # Not prepared, or prepared with FP32 compute: outside mp.autocast the forward is the step's.
    model = layers(nn.ReLU())
    if policy is not None:
        mp.prepare(model, None, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trace_nonfinite(model, loss_of(model, torch.randn(4, 8)), loss_scale=2.0**10) is None
