"""Per-op emulation against the reference nobody here wrote: native execution on CPU (torch's CPU
autocast running real float16 / bfloat16 kernels, slowly).

Models are transformers' GPT-2, Llama, T5 and BERT from tiny configs with the loss computed inside
forward (``labels=``), a CNN with BatchNorm, a two-layer LSTM, and an attention whose logits overflow
FP16 inside one module's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import mixprec as mp
from mixprec import prepared_state
from mixprec.execution.emulated import carrier_of, sub_carrier_formats

transformers = pytest.importorskip("transformers")

STEPS = 20
Task = tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tokens(rows: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def gpt2() -> Task:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0))
    ids = _tokens()
    return model, lambda m: m(ids, labels=ids).loss


def llama() -> Task:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    ids = _tokens()
    return model, lambda m: m(ids, labels=ids).loss


def t5() -> Task:
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1))
    ids, labels = _tokens(), _tokens(seed=2)[:, :8].contiguous()
    return model, lambda m: m(input_ids=ids, labels=labels).loss


def bert() -> Task:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3))
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 100, (16, 12), generator=g), torch.randint(0, 3, (16,), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0  # padding: BERT's additive mask
    return model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss


class LossInForward(nn.Module):
    """Wraps a network so that forward returns the loss (as transformers' models do)."""

    def __init__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("x", x)
        self.register_buffer("y", y)

    def forward(self) -> torch.Tensor:
        return F.cross_entropy(self.net(self.x), self.y)


def cnn() -> Task:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    return LossInForward(net, torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)), \
        lambda m: m()


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def lstm() -> Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return LossInForward(Recurrent(), torch.randn(16, 10, 6, generator=g), torch.randint(0, 4, (16,), generator=g)), \
        lambda m: m()


class Attention(nn.Module):
    """``h = x @ q; s = h @ h^T``: the logits overflow FP16 inside this one module (|s| up to ~4e6),
    while what it returns (s / 128) fits. Rows of x are scaled so only some logits overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.q
        s = h @ h.transpose(-1, -2)
        return s / 128


def attention_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 6, 16, generator=g) * torch.tensor([1.0, 2, 4, 8, 16, 32]).view(1, 6, 1)


MODELS = {"gpt2": gpt2, "llama": llama, "t5": t5, "bert": bert, "cnn": cnn, "lstm": lstm}


# ----- op by op: the same ops in the same dtypes ------------------------------------------------------

class Recorder(TorchFunctionMode):
    """Records (function, dtypes of its floating outputs) of every torch call the model's code makes."""

    IGNORED = {"to", "float", "half", "__get__", "__set__"}  # casts and attribute reads: how, not what

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        flat = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if flat and name not in self.IGNORED:
            self.calls.append((name, tuple(o.dtype for o in flat)))
            self.outputs += flat
        return out


def record(make: Callable[[], Task], policy: str) -> Recorder:
    model, loss_fn = make()
    mp.prepare(model, None, policy)
    with mp.autocast(model), Recorder() as recorder:
        loss_fn(model)
    return recorder


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", ["f16-master", "bf16-master"])
def test_every_op_runs_in_the_dtype_native_execution_runs_it_in(name, policy):
    native = record(MODELS[name], policy + ",execution=native")
    emulated = record(MODELS[name], policy)
    assert len(native.calls) >= 5
    assert emulated.calls == native.calls
    low = {"f16-master": torch.float16, "bf16-master": torch.bfloat16}[policy]
    assert sum(low in dtypes for _, dtypes in native.calls) >= 3  # it did exercise 16-bit ops
    assert native.calls[-1][1] == (torch.float32,)  # the loss computed inside forward is FP32


def test_formats_without_a_torch_dtype_round_every_op_output_onto_their_grid():
    e4m3_compute = "params=fp16,compute=e4m3,output=fp32,master=fp32,scaling=dynamic:256"
    recorder = record(gpt2, e4m3_compute)
    carried = [t for t in recorder.outputs if t.dtype == torch.float16]
    assert len(carried) > 20
    for t in carried:
        assert torch.equal(t.float(), mp.quantize(t.float(), mp.E4M3))
    assert not all(torch.equal(t, mp.quantize(t, mp.E4M3)) for t in recorder.outputs if t.dtype == torch.float32)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(x)
        h += 0.3  # in place, on the float16 carrier
        h.mul_(1.7)
        return h, h.view(-1)[::3]


def test_in_place_results_are_rounded_in_place_and_views_share_them():
    model = InPlace()
    mp.prepare(model, None, "params=fp16,compute=e4m3,output=e4m3,scaling=none")
    with mp.autocast(model):
        h, view = model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    assert h.dtype == torch.float16
    assert torch.equal(h.float(), mp.quantize(h.float(), mp.E4M3))
    assert torch.equal(view, h.reshape(-1)[::3])


def test_carriers_and_the_formats_they_cannot_carry():
    assert carrier_of(mp.F16) == torch.float16 and carrier_of(mp.BF16) == torch.bfloat16
    assert carrier_of(mp.E4M3) == carrier_of(mp.E5M2) == torch.float16
    assert carrier_of(mp.Format("e6m3", 6, 3)) == torch.bfloat16  # FP16's range is too small
    with pytest.raises(ValueError, match="e8m10.*neither float16 nor bfloat16.*emulated-module"):
        carrier_of(mp.Format("e8m10", 8, 10))
    with pytest.raises(ValueError, match="e4m3 and e5m2 would both be carried as float16"):
        sub_carrier_formats([mp.E4M3, mp.E5M2])
    with pytest.raises(ValueError, match="e5m2 and fp16 would both be carried as float16"):
        mp.prepare(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), None,
                   "params=fp16,compute=fp16,master=fp32,rule=1:e5m2")
    mp.prepare(nn.Linear(2, 2), None, "params=fp16,compute=fp16,rule=x:e8m10,execution=emulated-module")


# ----- training: the same skips, the same losses -------------------------------------------------------

def train(make: Callable[[], Task], policy: str) -> list[tuple[float, bool, torch.dtype]]:
    model, loss_fn = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt, scaler = mp.prepare(model, opt, policy)
    history = []
    for _ in range(STEPS):
        with mp.autocast(model):
            loss = loss_fn(model)
        scaler.scale(loss).backward()
        info = mp.step(opt, scaler)
        opt.zero_grad()
        history.append((loss.item(), info.applied, loss.dtype))
    return history


# The tolerance on the losses, derived. Both runs round the same ops' inputs and outputs onto the same
# 16-bit grid (the test above checks that op by op); they differ only in the order FP32 accumulates a
# dot product's terms (oneDNN's blocking vs a float32 matmul): a reordered FP32 sum of n terms moves
# by at most n * 2^-24 of its magnitude, which after rounding onto the 16-bit grid leaves the two
# results equal or one 16-bit ulp apart (eps relative: 2^-10 for FP16, 2^-7 for BF16). The loss, a mean
# over many such values, then differs by at most eps relative at step 1 (all flips pushing one way:
# a generous bound); from step to step the optimizer carries each step's difference forward, to first
# order additively, so after step k (1-based) the bound is k * eps relative. The measured gaps are 10 to
# 100 times smaller (FP16: <= 3e-4 over the 20 steps); module-boundary emulation exceeds it (below).
def loss_tolerance(policy: str, step: int) -> float:
    eps = (mp.BF16 if policy.startswith("bf16") else mp.F16).eps
    return step * eps


# f16 starts at a loss scale of 2^24 so that the first steps' scaled gradients overflow FP16: which
# steps skip is then decided by 16-bit values (an emulation in FP32 would skip none).
POLICIES = ["f16-master,scaling=dynamic:16777216", "bf16-master"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", POLICIES)
def test_training_makes_the_skip_decisions_and_losses_of_native_execution(name, policy):
    native = train(MODELS[name], policy + ",execution=native")
    emulated = train(MODELS[name], policy)
    assert [a for _, a, _ in emulated] == [a for _, a, _ in native]
    assert all(dtype == torch.float32 for _, _, dtype in native + emulated)  # the loss from forward
    for step, ((ours, _, _), (theirs, _, _)) in enumerate(zip(emulated, native, strict=True), start=1):
        assert abs(ours - theirs) <= loss_tolerance(policy, step) * abs(theirs), step
    if policy.startswith("f16"):
        assert not native[0][1]  # the 2^24 start did overflow: the check above compared real skips


def test_module_boundary_emulation_fails_the_same_check():
    """The check above can fail: rounding only at module boundaries rounds the loss computed in forward
    onto FP16 (its gradient, the loss scale, overflows), so it skips where native execution does not."""
    native = train(gpt2, "f16-master,execution=native")
    module = train(gpt2, "f16-master,execution=emulated-module")
    assert [a for _, a, _ in native][:2] == [True, True] and [a for _, a, _ in module][:2] == [False, False]


def test_lstm_with_fp32_weights_and_fp16_compute_runs_emulated():
    """torch.amp's recipe on an LSTM: CPU autocast fails in oneDNN here, cuDNN runs it; emulation
    computes it as cuDNN does (16-bit inputs and weights, FP32 arithmetic)."""
    history = train(lstm, "f16-mixed")
    assert all(applied for _, applied, _ in history[1:]) and history[-1][0] < history[0][0]


# ----- overflow inside one module ------------------------------------------------------------------

def overflow_run(policy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = Attention()
    mp.prepare(model, None, policy)
    x = attention_input().requires_grad_()
    with mp.autocast(model):
        out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() * weights).sum().mul(2.0**8).backward()
    return out.detach(), x.grad, model.q.grad


def test_overflow_inside_a_module_is_inf_exactly_where_native_execution_has_it():
    native = overflow_run("f16-mixed,execution=native")
    emulated = overflow_run("f16-mixed")
    module = overflow_run("f16-mixed,execution=emulated-module")
    out = native[0]
    assert 0 < (~torch.isfinite(out)).sum() < out.numel()  # some logits overflowed, not all
    for ours, theirs in zip(emulated, native, strict=True):
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    finite = torch.isfinite(out)
    assert torch.allclose(emulated[0][finite], out[finite], rtol=2 * mp.F16.eps)
    assert torch.isfinite(module[0]).all()  # what module-boundary emulation misses


def test_explain_and_state_name_the_emulation():
    model = nn.Linear(2, 2)
    text = mp.Policy.parse("f16-master").explain(model)
    assert "execution emulated (per op) on cpu" in text.splitlines()[0]
    assert "execution emulated (module boundaries)" in mp.Policy.parse(
        "f16-master,execution=emulated-module").explain(model).splitlines()[0]
    mp.prepare(model, None, "f16-master")
    assert prepared_state(model).summary()["emulation"] == "per op"


# ----- parameters read outside their module's forward, written in place ----------------------------

class ReadsChildWeight(nn.Module):
    """nanoGPT's position embedding: the parent adds a child's weight itself, never calling the child.
    Token 1 at position 0 sums to 40000 + 30000, above FP16's 65504."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(4, 8), nn.Embedding(6, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.tok(ids) + self.pos.weight[:ids.shape[-1]]) / 4


def child_weight_run(policy: str, overflow: bool) -> tuple[torch.Tensor, bool, list[torch.Tensor]]:
    model = ReadsChildWeight()
    if overflow:
        with torch.no_grad():
            model.tok.weight[1, 0], model.pos.weight[0, 0] = 40000.0, 30000.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, scaler = mp.prepare(model, opt, policy + ",scaling=static:1")
    with mp.autocast(model):
        out = model(torch.tensor([[1, 2, 3, 1, 0]]))
    scaler.scale(out.float().pow(2).mean()).backward()  # an inf in `out` makes the gradients inf
    applied = mp.step(opt, scaler).applied
    return out.detach(), applied, [p.detach().float() for p in model.parameters()]


@pytest.mark.parametrize("overflow", [False, True])
def test_a_child_weight_read_by_its_parent_is_16_bit_as_natively(overflow):
    native = child_weight_run("f16-master,execution=native", overflow)
    emulated = child_weight_run("f16-master", overflow)
    assert torch.equal(emulated[0], native[0])  # the FP16 add: rounded, and inf above 65504
    assert emulated[1] == native[1] == (not overflow)  # overflow: both skip the step
    for ours, theirs in zip(emulated[2], native[2], strict=True):
        assert torch.equal(ours, theirs)


class InPlaceActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.linear(x), 0.3, inplace=True)
        h = F.elu(h * 1.3, 0.7, inplace=True)
        h = F.hardtanh(h * 1.1, -2.2, 2.2, inplace=True)
        return F.relu(h - 0.1, inplace=True) * 1.0  # multiplying by one rounds nothing: the relu's output


@pytest.mark.parametrize("fmt", [mp.E4M3, mp.F16])
def test_in_place_functionals_round_their_result_onto_the_grid(fmt):
    model = InPlaceActivations()
    mp.prepare(model, None, f"params=fp16,compute={fmt.name},output={fmt.name},scaling=none")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with mp.autocast(model), Recorder() as recorder:
        model(x).sum().backward()
    in_place = [t for (name, _), t in zip(recorder.calls, recorder.outputs, strict=True)
                if name in ("leaky_relu", "elu", "hardtanh", "relu")]
    assert len(in_place) == 4
    for t in in_place:
        assert torch.equal(t.float(), mp.quantize(t.float(), fmt))
    assert torch.isfinite(model.linear.weight.grad).all()


def embedding_after_forward(policy: str | None) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(10)  # row norms about 30
    ids = torch.tensor([[1, 2, 5, 2]])
    if policy is None:
        model(ids)
    else:
        mp.prepare(model, None, policy)
        with mp.autocast(model):
            model(ids)
    return model[0].weight.detach().float()


def test_embedding_max_norm_renormalises_the_parameter_as_natively():
    fp32, native = embedding_after_forward(None), embedding_after_forward("f16-master,execution=native")
    emulated = embedding_after_forward("f16-master")
    norms = emulated.norm(dim=1)
    assert (norms[[1, 2, 5]] <= 1 + mp.F16.eps).all() and (norms[[0, 3]] > 10).all()  # the rows looked up
    assert torch.equal(emulated, native)
    assert torch.allclose(emulated, fp32, rtol=mp.F16.eps, atol=0)
