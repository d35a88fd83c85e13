"""Parameters stored in another format than their module computes in (issue 28 item 8).

A 16-bit weight of an FP32 module (``params=f16``: FP32 compute everywhere; a rule ``NAME:fp32/fp16``)
and a BatchNorm computing in FP16 with FP16 weights beside its FP32 running statistics crashed the
first forward with dtype errors, natively and emulated. The paper's recipe: a module computes in its
compute format whatever its weights are stored in (a 16-bit weight is cast up for an FP32 module: the
same value, FP32 arithmetic). Each test runs both execution modes on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.cli import main
from mixprec.execution import emulated, native

pytestmark = pytest.mark.usefixtures("one_thread")

#: policy -> the arithmetic of its reference forward ("fp32", or "fp16": 16-bit activations)
POLICIES = {
    "params=f16": "fp32",
    "params=bf16": "fp32",
    "params=f16,master=fp32": "fp32",
    "f16-pure,rule=4:fp32/fp16": "fp16",  # module "4" (the Linear): FP32 compute, FP16 weights
    "f16-master,rule=type:BatchNorm2d:fp16": "fp16",  # BatchNorm in FP16, its weights FP16
}
EXECUTIONS = ("emulated", "native")


def _model() -> torch.nn.Sequential:
    """The digits recipe's block (a convolution without bias: BatchNorm cancels one) and a classifier."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False),
                               torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(64, 10))


def _prepared(policy: str, execution: str, optimizer: bool = False) -> tuple:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer else None
    return mp.prepare(model, opt, mp.Policy.parse(policy).replace(execution=execution))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 4, 4, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def _half(x: torch.Tensor) -> torch.Tensor:
    """Onto the FP16 grid, kept in FP32 (autograd rounds the gradient onto FP16 too, as a native cast)."""
    return x.half().float()


def _reference(arithmetic: str, weights: list[torch.Tensor], x: torch.Tensor, running: list[torch.Tensor]
               ) -> torch.Tensor:
    """The forward written out op by op in FP32 on the weights' values. "fp16": every activation stored in
    FP16 (inputs of the convolution, outputs of the convolution, of the BatchNorm and of the Linear): a
    16-bit op is its FP32 op on 16-bit values, rounded once (FP32 accumulation). The BatchNorm, in FP32
    (the default island) or in FP16 (the rule), normalises with FP32 statistics and arithmetic either way:
    only its weights' values differ. The FP32 Linear of rule "4" and an FP16 one agree on FP16 inputs."""
    conv_w, bn_w, bn_b, lin_w, lin_b = weights
    store = _half if arithmetic == "fp16" else (lambda t: t)
    y = store(F.conv2d(store(x), conv_w, padding=1))
    y = store(F.batch_norm(y, running[0], running[1], bn_w, bn_b, training=True))
    return store(F.linear(F.relu(y).flatten(1), lin_w, lin_b))


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_forward_equals_the_reference_on_the_weights_values(policy, execution):
    model, _, _ = _prepared(policy, execution)
    originals = [p.detach().clone() for p in _model().parameters()]  # FP32, before prepare rounded them
    weights = [p.detach().float() for p in model.parameters()]
    bn = model[1]
    running = [bn.running_mean.clone(), bn.running_var.clone()]
    x, _ = _batch()
    with mp.autocast(model):
        out = model(x)
    expected = _reference(POLICIES[policy], weights, x, running)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # FP32 arithmetic: the reference's own ops on the same values (a 16-bit weight cast up is exact), so
    # bitwise. FP16 activations: the BatchNorm runs torch's FP16 kernel (natively and emulated, per op),
    # whose FP32 internals may put an output one FP16 ulp from FP32-op-then-round; through the Linear,
    # measured 2^-12 at most: one FP16 ulp at 1 (the outputs' scale). Its FP32 statistics of the same
    # values differ by the kernel's summation order at most.
    loose = POLICIES[policy] == "fp16"
    torch.testing.assert_close(out, expected, rtol=0, atol=2**-10 if loose else 0)
    for updated, reference in zip((bn.running_mean, bn.running_var), running, strict=True):
        torch.testing.assert_close(updated, reference, rtol=1e-6 if loose else 0, atol=1e-7 if loose else 0)
    if not loose:  # the comparison can fail: the FP32 originals (not the stored values) give another result
        wrong = _reference(POLICIES[policy], originals, x, [torch.zeros(4), torch.ones(4)])
        assert not torch.equal(out, wrong)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("policy", [p for p, arithmetic in POLICIES.items() if arithmetic == "fp32"])
def test_weight_gradients_are_the_fp32_gradients_rounded_onto_storage(policy, execution):
    model, _, _ = _prepared(policy, execution)
    formats = mp.prepared_state(model).param_formats
    leaves = [p.detach().float().requires_grad_() for p in model.parameters()]
    bn = model[1]
    running = [bn.running_mean.clone(), bn.running_var.clone()]
    x, y = _batch()
    with mp.autocast(model):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(_reference("fp32", leaves, x, running), y).backward()
    for (name, p), leaf in zip(model.named_parameters(), leaves, strict=True):
        expected = mp.quantize(leaf.grad, formats[name])  # FP32 arithmetic, stored as the weight is
        assert p.grad.dtype == p.dtype
        assert torch.equal(p.grad.float(), expected), name


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_trains_a_few_steps_keeping_the_storage_formats(policy, execution):
    model, opt, scaler = _prepared(policy, execution, optimizer=True)
    formats = mp.prepared_state(model).param_formats
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch()
    losses, applied = [], 0
    for _ in range(4):
        with mp.autocast(model):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        applied += mp.step(opt, scaler).applied
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and applied >= 1
    assert losses[-1] < losses[0]  # one fixed batch: SGD lowers its loss
    for (name, p), old in zip(model.named_parameters(), before, strict=True):
        fmt = formats[name]
        assert torch.isfinite(p).all() and not torch.equal(p, old), name
        if execution == "native":
            assert p.dtype == fmt.torch_dtype, name
        else:
            assert p.dtype == torch.float32 and torch.equal(p, mp.quantize(p, fmt)), name  # on its grid


class _Tied(torch.nn.Module):
    """An embedding and a head sharing one weight (GPT-2's tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens))


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_a_tied_weight_of_an_fp16_and_an_fp32_module(execution):
    torch.manual_seed(0)
    model, _, _ = mp.prepare(_Tied(), None, mp.Policy.parse("f16-pure,rule=head:fp32/fp16").replace(
        execution=execution))
    weight = model.emb.weight.detach().float()
    tokens = torch.tensor([1, 4, 4, 9])
    with mp.autocast(model):
        out = model(tokens)
    # The head computes in FP32 on the FP16 weight's values; its output is stored in FP16 (the activations).
    assert torch.equal(out, _half(F.linear(weight[tokens], weight)))


def test_parameter_dtypes_names_the_casts_each_mode_needs():
    policy = mp.Policy.parse("f16-master,rule=type:BatchNorm2d:fp16")
    for execution, dtype_of, expected in (
        # Native: FP16 tensors; only the BatchNorm's weights change, to its statistics' FP32.
        ("native", native.dtype_of, {"1.weight": torch.float32, "1.bias": torch.float32}),
        # Emulated: FP32 tensors; the 16-bit modules' weights are cast to their carrier, the BatchNorm's not.
        ("emulated", emulated.carrier_of, {n: torch.float16 for n in ("0.weight", "4.weight", "4.bias")}),
    ):
        model, _, _ = _prepared(str(policy), execution)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dtypes = native.parameter_dtypes(model, policy.module_precisions(model), dtype_of)
        assert {name: dtypes[id(p)] for name, p in model.named_parameters() if id(p) in dtypes} == expected


def test_cli_trains_digits_with_an_fp16_batchnorm(tmp_path, capsys):
    assert main(["train", "--recipe", "digits", "--policy", "f16-master,rule=type:BatchNorm2d:fp16",
                 "--steps", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "finished step 2" in capsys.readouterr().out
