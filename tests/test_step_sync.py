"""mp.step's host syncs: exactly one read per synced step, none with sync=False; and sync=False (the
optimizer skips an overflowing step on the device) trains bit for bit as the synced step does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mixprec as mp

INF = float("inf")


class HostReads(TorchDispatchMode):
    """Counts the ways a tensor's value reaches the host: item/bool/float/int (``_local_scalar_dense``),
    data-dependent shapes (nonzero, masked_select), and tolist (not dispatched: patched by the fixture)."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.READS):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted(self):
        reads.calls.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    return reads


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
}


def setup(make_optimizer, masters: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if masters:
        model = model.half()
    opt = make_optimizer(model.parameters())
    if masters:
        opt = mp.MasterWeights(opt)
    return model, opt, mp.DynamicScaler(init_scale=2.0**8, growth_interval=3, hysteresis=1)


def backward(model, scaler, i: int, poison: bool) -> None:
    g = torch.Generator().manual_seed(i)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 4, generator=g).to(dtype), torch.randn(16, 1, generator=g)
    loss = ((model(x).float() - y) ** 2).mean()
    if poison:  # inf/NaN gradients in the first layer only, as an overflowing activation gradient makes them
        hidden = model[1](model[0](x))
        hidden.register_hook(lambda grad: torch.full_like(grad, INF))
        loss = loss + (hidden.float() * 0).sum()
    scaler.scale(loss).backward()


def state_of(model, opt, scaler=None) -> list[torch.Tensor]:
    """Weights, masters, optimizer state (and the scaler's numbers)."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [t.detach().clone() for g in opt.param_groups for t in g["params"]]
    for state in opt.state.values():
        tensors += [v.clone() for v in state.values() if torch.is_tensor(v)]
    numbers = [] if scaler is None else [v for _, v in sorted(scaler.state_dict().items())]
    return tensors + [torch.tensor(float(v)) for v in numbers if isinstance(v, (int, float))]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                       y.reshape(-1).view(torch.uint8))
                                    for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("masters", [True, False], ids=["fp16+masters", "fp32"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sync_free_steps_train_bit_for_bit_as_synced_ones(name, masters):
    # Overflows on the very first step (state not created yet: that step is synced), on a later one, and
    # two in a row; clipping on.
    poisoned = {0, 3, 6, 7}
    runs = {}
    for sync in (True, False):
        model, opt, scaler = setup(OPTIMIZERS[name], masters)
        history = []
        for i in range(10):
            backward(model, scaler, i, poison=i in poisoned)
            before = state_of(model, opt)
            info = mp.step(opt, scaler, max_grad_norm=1.0, sync=sync)
            opt.zero_grad()
            applied = bool(info.applied)
            if not applied:  # a skipped step changes no weight, master or optimizer state
                assert same_bits(state_of(model, opt), before)
            history.append((applied, float(info.loss_scale), str(float(info.grad_norm)), int(info.skipped_steps)))
        runs[sync] = history, state_of(model, opt, scaler)
    assert [h[0] for h in runs[True][0]] == [i not in poisoned for i in range(10)]
    assert runs[False][0] == runs[True][0]
    assert same_bits(runs[False][1], runs[True][1])


def test_a_synced_step_reads_the_host_once_and_a_sync_free_one_never(host_reads):
    model, opt, scaler = setup(OPTIMIZERS["adamw"], masters=True)
    counts = []
    for i, (sync, poison) in enumerate([(True, False), (False, False), (False, True), (False, False),
                                        (True, False), (True, True), (True, False)]):
        backward(model, scaler, i, poison)
        host_reads.calls.clear()
        with host_reads:
            info = mp.step(opt, scaler, max_grad_norm=1.0, sync=sync)
            opt.zero_grad()
        counts.append(len(host_reads.calls))
        assert isinstance(info.applied, bool) == sync
    # Synced: the one read; after a skip (the weights are checked too) still one; a skipped synced step
    # reads more, to name the overflowing parameters (StepInfo.nonfinite): the cold path.
    assert counts[:5] == [1, 0, 0, 0, 1] and counts[6] == 1 and counts[5] > 1


def test_a_first_step_is_synced_even_with_sync_false():
    # Its optimizer state does not exist yet: skipped on the device, torch's fused SGD would leave its
    # momentum buffers uninitialised.
    model, opt, scaler = setup(OPTIMIZERS["sgd-momentum"], masters=True)
    backward(model, scaler, 0, poison=True)
    info = mp.step(opt, scaler, sync=False)
    assert info.applied is False and all(len(s) == 0 for s in opt.state.values())
    opt.zero_grad()
    backward(model, scaler, 1, poison=False)
    assert mp.step(opt, scaler, sync=False).applied is True  # still the first step that creates state
    opt.zero_grad()
    backward(model, scaler, 2, poison=False)
    assert isinstance(mp.step(opt, scaler, sync=False).applied, torch.Tensor)


def test_the_storm_guard_counts_sync_free_skips_and_fires_at_the_next_synced_step():
    model, opt, scaler = setup(OPTIMIZERS["adam"], masters=True)
    scaler = mp.StaticScaler(2.0**8)
    backward(model, scaler, 0, poison=False)
    mp.step(opt, scaler)
    opt.zero_grad()
    for i in range(1, 4):
        backward(model, scaler, i, poison=True)
        assert not bool(mp.step(opt, scaler, max_skips_in_a_row=4, sync=False).applied)
        opt.zero_grad()
    assert scaler.known_skipped_in_a_row is None and scaler.skipped_in_a_row == 3
    backward(model, scaler, 4, poison=True)
    with pytest.raises(mp.NaNStormError, match="4 steps in a row") as caught:
        mp.step(opt, scaler, max_skips_in_a_row=4)
    assert caught.value.skipped_in_a_row == 4 and list(caught.value.gradients)[:2] == ["#0 (shape 8x4)", "#1 (shape 8)"]


def test_the_run_of_skips_is_saved_with_the_scaler():
    scaler = mp.StaticScaler(4.0)
    for flag in (1.0, 0.0, 1.0, 1.0):
        scaler.update(torch.tensor(flag))
    state = scaler.state_dict()
    assert state["skipped_in_a_row"] == 2 and state["skipped_steps"] == 3
    restored = mp.StaticScaler(1.0)
    restored.load_state_dict(state)
    assert restored.skipped_in_a_row == 2 and int(restored.skipped_in_a_row_tensor) == 2
    older = {k: v for k, v in state.items() if k != "skipped_in_a_row"}  # written before it was saved
    restored.load_state_dict(older)
    assert restored.skipped_in_a_row == 0 and int(restored.skipped_steps) == 3


def test_sync_false_refuses_an_optimizer_that_cannot_skip_on_the_device():
    model, opt, scaler = setup(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True), masters=True)
    backward(model, scaler, 0, poison=False)
    before = state_of(model, opt, scaler)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"sync=False.*got Adam.*fused=True"):
        mp.step(opt, scaler, sync=False)
    assert same_bits(state_of(model, opt, scaler), before)  # nothing touched: step it synced instead
    assert same_bits([p.grad for p in model.parameters()], grads)
    assert mp.step(opt, scaler).applied
    with pytest.raises(TypeError, match="sync must be True or False, got str 'no'"):
        mp.step(opt, scaler, sync="no")


def test_sync_free_steps_of_two_optimizers_sharing_one_backward():
    runs = {}
    for sync in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).half()
        a = mp.MasterWeights(torch.optim.AdamW(model[0].parameters(), lr=1e-2, fused=True))
        b = mp.MasterWeights(torch.optim.SGD(model[2].parameters(), lr=1e-2, momentum=0.9, fused=True))
        scaler = mp.DynamicScaler(init_scale=2.0**8, hysteresis=1)
        for i in range(6):
            backward(model, scaler, i, poison=i == 3)
            mp.step([a, b], scaler, max_grad_norm=1.0, sync=sync)
            a.zero_grad(), b.zero_grad()
        runs[sync] = [copy.deepcopy(t) for t in state_of(model, a, scaler) + state_of(model, b, scaler)]
    assert same_bits(runs[False], runs[True])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_sync_free_steps_never_wait_for_the_device():
    # torch's sync debug mode raises at any host sync (item, nonzero, a blocking copy to the host).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    # A scale no clean step overflows at: the first step is applied and creates the state, so every later
    # step can skip on the device.
    model, opt, scaler = mp.prepare(model, opt, "f16-master,execution=native,scaling=dynamic:1024")
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 1, device="cuda")
    applied = []
    for i in range(6):
        with mp.autocast(model):
            loss = torch.nn.functional.mse_loss(model(x).float(), y) * (1e30 if i == 3 else 1.0)
        scaler.scale(loss).backward()
        if i == 0:  # the first step creates the optimizer state: synced
            applied.append(mp.step(opt, scaler, max_grad_norm=1.0, sync=False).applied)
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                applied.append(mp.step(opt, scaler, max_grad_norm=1.0, sync=False).applied)
                opt.zero_grad()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    assert [bool(a) for a in applied] == [True, True, True, False, True, True]


@pytest.mark.parametrize("policy", ["f16-master,execution=native", "bf16-master,execution=native", "f16-master",
                                    "f16-master,execution=emulated-module", "f32"])
def test_the_whole_loop_reads_the_host_once_per_step_or_never(host_reads, policy):
    # Forward under mp.autocast, backward through the gradient hooks, mp.step, zero_grad: the step's read
    # is the only one (native, per-op and module emulation alike), and sync=False leaves none.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model, opt, scaler = mp.prepare(model, opt, policy + ",scaling=dynamic:256")
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    counts = []
    for sync in (True, True, False, True, False, False):
        host_reads.calls.clear()
        with host_reads:
            with mp.autocast(model):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            info = mp.step(opt, scaler, max_grad_norm=1.0, sync=sync)
            opt.zero_grad()
        assert bool(info.applied)
        counts.append(len(host_reads.calls))
    assert counts == [1, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("policy", ["f16-master", "bf16-master", "f16-master,execution=emulated-module",
                                    "f16-mixed,execution=native", "f16-pure"])
def test_sync_free_steps_under_prepare_train_bit_for_bit_as_synced_ones(policy):
    # The same through mp.prepare: emulated masters (rounded copy-back), module emulation, FP32 params with
    # 16-bit compute (no masters), 16-bit params without masters.
    runs = {}
    for sync in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        model, opt, scaler = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                                        policy + ",scaling=dynamic:256")
        applied = []
        for i in range(8):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
            with mp.autocast(model):
                loss = ((model(x).float() - y) ** 2).mean() * (INF if i in (3, 4) else 1.0)
            scaler.scale(loss).backward()
            applied.append(bool(mp.step(opt, scaler, max_grad_norm=1.0, sync=sync).applied))
            opt.zero_grad()
        runs[sync] = applied, state_of(model, opt, scaler)
    assert runs[True][0] == [i not in (3, 4) for i in range(8)] and runs[False][0] == runs[True][0]
    assert same_bits(runs[False][1], runs[True][1])
