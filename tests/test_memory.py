"""mp.memory: bytes by category counted from real tensors, held and in the policy's formats, to the byte."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch import nn

import mixprec as mp

W, B = 256 * 256, 256  # Linear(256, 256): weight and bias elements
N = W + B
ADAM_STEPS = 2 * 4  # Adam keeps one FP32 scalar `step` tensor per parameter (weight, bias)


def _linear_after_one_step(policy: str | None, micro_batches: int = 1):
    """Linear(256, 256) with Adam: one step taken, then `micro_batches` backwards (gradients present; with
    masters, an FP32 sum of them from the second on)."""
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = None
    if policy is not None:
        model, optimizer, scaler = mp.prepare(model, optimizer, policy)
    x = torch.randn(4, 256)

    def backward():
        with mp.autocast(model) if policy is not None else torch.enable_grad():
            loss = model(x).float().square().mean()
        loss.backward()

    backward()
    if policy is not None:
        mp.step(optimizer, scaler)
    else:
        optimizer.step()
    optimizer.zero_grad()
    for _ in range(micro_batches):
        backward()
    return model, optimizer


def test_unprepared_fp32_model_with_adam():
    model, optimizer = _linear_after_one_step(None)
    report = mp.memory(model, optimizer)
    expected = {"parameters": 4 * N, "masters": 0, "gradients": 4 * N,
                "optimizer_state": 2 * 4 * N + ADAM_STEPS, "activations": 0}
    assert report.held == report.formats == expected
    assert report.execution is None and report.peak is None


def test_f32_policy_is_the_unprepared_count():
    model, optimizer = _linear_after_one_step("f32")
    assert mp.memory(model, optimizer).held == mp.memory(*_linear_after_one_step(None)).held


def test_f16_master_emulated_holds_fp32_tensors_and_counts_the_fp16_formats():
    model, optimizer = _linear_after_one_step("f16-master", micro_batches=2)
    report = mp.memory(model, optimizer)
    assert report.execution == "emulated"
    # Emulation: FP16 values in float32 storage (4 bytes held, 2 in the format); the gradient on the model
    # likewise, plus the FP32 sum of the micro-batches on the master; masters and Adam's moments are FP32.
    assert report.held == {"parameters": 4 * N, "masters": 4 * N, "gradients": (4 + 4) * N,
                           "optimizer_state": 2 * 4 * N + ADAM_STEPS, "activations": 0}
    assert report.formats == {"parameters": 2 * N, "masters": 4 * N, "gradients": (2 + 4) * N,
                              "optimizer_state": 2 * 4 * N + ADAM_STEPS, "activations": 0}


@pytest.mark.parametrize("policy", ["f16-master,execution=native", "bf16-master,execution=native"])
def test_16_bit_masters_native_on_cpu_hold_what_the_formats_take(policy):
    model, optimizer = _linear_after_one_step(policy, micro_batches=2)
    report = mp.memory(model, optimizer)
    assert report.execution == "native" and model.weight.dtype != torch.float32
    assert report.held == report.formats == {"parameters": 2 * N, "masters": 4 * N, "gradients": (2 + 4) * N,
                                             "optimizer_state": 2 * 4 * N + ADAM_STEPS, "activations": 0}
    # after one backward only the 16-bit gradient exists: the step makes its FP32 form (issue 20)
    assert mp.memory(*_linear_after_one_step(policy)).held["gradients"] == 2 * N


def test_bf16_master_emulated_matches_bf16_master_native_in_formats():
    emulated = mp.memory(*_linear_after_one_step("bf16-master"))
    native = mp.memory(*_linear_after_one_step("bf16-master,execution=native"))
    assert emulated.execution == "emulated" and emulated.formats == native.held


def test_without_masters_the_moments_take_the_parameters_format():
    model, optimizer = _linear_after_one_step("f16-pure")
    report = mp.memory(model, optimizer)
    assert report.formats == {"parameters": 2 * N, "masters": 0, "gradients": 2 * N,
                              "optimizer_state": 2 * 2 * N + ADAM_STEPS, "activations": 0}
    native = mp.memory(*_linear_after_one_step("f16-pure,execution=native"))
    assert native.held == report.formats  # torch's Adam keeps FP16 moments for FP16 parameters


def test_the_inner_optimizer_or_none_still_finds_the_masters():
    model, optimizer = _linear_after_one_step("f16-master")
    whole = mp.memory(model, optimizer)
    assert mp.memory(model, optimizer.optimizer).formats == whole.formats  # the inner one: same state, masters
    assert mp.memory(model).formats == whole.formats  # none: the prepared model's own MasterWeights


def test_gradients_and_state_count_what_exists_now():
    model = nn.Linear(256, 256)
    model, optimizer, _ = mp.prepare(model, torch.optim.Adam(model.parameters()), "f16-master")
    report = mp.memory(model)  # the prepared model's own MasterWeights: its masters
    assert report.formats["masters"] == 4 * N and report.held["gradients"] == report.held["optimizer_state"] == 0
    model, optimizer = _linear_after_one_step("f16-master")
    optimizer.zero_grad()
    assert mp.memory(model, optimizer).held["gradients"] == 0


def test_fp32_islands_stay_fp32_in_the_formats():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model, optimizer, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    report = mp.memory(model, optimizer)
    assert report.formats["parameters"] == 20 * 2 + 8 * 4  # Linear in FP16, LayerNorm an FP32 island
    assert report.formats["masters"] == report.held["masters"] == 20 * 4  # the island is its own master


def test_tied_parameters_count_once():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    model[1].weight = model[0].weight
    assert mp.memory(model).held["parameters"] == 10 * 6 * 4


@pytest.mark.parametrize("policy", [None, "f16-master"])
def test_a_meta_model_counts_what_the_same_model_on_cpu_holds(policy):
    # Every meta tensor's storage has data_ptr 0: counted by address, all but the first would vanish.
    def count(device: str) -> mp.MemoryReport:
        with torch.device(device):
            model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000))
            x = torch.ones(8, 1000)
        optimizer = torch.optim.Adam(model.parameters())
        if policy is not None:
            model, optimizer, _ = mp.prepare(model, optimizer, policy)
        model(x).sum().backward()
        if policy is None:
            optimizer.step()  # Adam's moments
            optimizer.zero_grad()
            model(x).sum().backward()
        return mp.memory(model, optimizer, run=lambda: model(x).sum())

    meta, cpu = count("meta"), count("cpu")
    assert meta.held == cpu.held and meta.formats == cpu.formats
    assert meta.held["parameters"] == 2 * (1000 * 1000 + 1000) * 4
    assert meta.held["activations"] == 2 * 8 * 1000 * 4  # each Linear's input (the second's: ReLU's output)


def test_a_sparse_gradient_counts_its_indices_and_values():
    model = nn.Embedding(10, 4, sparse=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.tensor([1, 2, 2])).sum().backward()  # three rows looked up: an uncoalesced gradient of 3 rows
    optimizer.step()  # SGD's first momentum buffer: a copy of the gradient, sparse too
    report = mp.memory(model, optimizer)
    assert report.held["gradients"] == report.formats["gradients"] == 3 * 8 + 3 * 4 * 4  # int64 indices, values
    assert report.held["optimizer_state"] == report.held["gradients"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(5, 8)


def test_activations_are_the_tensors_saved_for_backward():
    model = _mlp()
    report = mp.memory(model, run=lambda: model(X).sum())
    # The first Linear saves its input (5 x 8; its weight is not needed: X needs no gradient); ReLU saves
    # its output (5 x 16), which the second Linear saves too (one storage, counted once) with its weight
    # (a parameter, not an activation); sum saves nothing.
    assert report.held["activations"] == report.formats["activations"] == (5 * 8 + 5 * 16) * 4
    assert report.held["parameters"] == (8 * 16 + 16 + 16 * 4 + 4) * 4


def test_activations_native_fp16_and_emulated_formats_agree():
    def count(policy: str) -> mp.MemoryReport:
        model = _mlp()
        mp.prepare(model, None, policy)

        def run():
            with mp.autocast(model):
                return model(X).sum()
        return mp.memory(model, run=run)

    native = count("f16-master,execution=native")
    assert native.held["activations"] == native.formats["activations"] == (5 * 8 + 5 * 16) * 2
    for emulation in ("f16-master", "f16-master,execution=emulated-module"):
        emulated = count(emulation)
        # Emulation holds FP32 copies (for the FP32 arithmetic, of the weight cast at use): more bytes held,
        # each source counted once in the formats, and copies of parameters not at all.
        assert emulated.formats["activations"] == native.held["activations"], emulation
        assert emulated.held["activations"] > native.held["activations"], emulation


@pytest.mark.parametrize("policy", [None, "f16-master"])
def test_run_counts_under_no_grad_and_its_graph_is_released(policy):
    model = _mlp()
    if policy is not None:
        mp.prepare(model, None, policy)
    refs = []

    def run(fail=False):
        with mp.autocast(model) if policy is not None else torch.enable_grad():
            hidden = torch.relu(model[0](X))
            refs.append(weakref.ref(hidden))
            if fail:
                raise RuntimeError("boom")
            return model[2](hidden).sum()

    with torch.no_grad():
        report = mp.memory(model, run=run)
    assert report.formats["activations"] == (5 * 8 + 5 * 16) * (4 if policy is None else 2)
    with pytest.raises(RuntimeError, match="boom"):
        mp.memory(model, run=lambda: run(fail=True))
    assert [ref() for ref in refs] == [None, None]  # nothing of either forward is kept


def test_report_prints_a_table_and_is_json_ready():
    model = _mlp()
    model, optimizer, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    report = mp.memory(model, optimizer)
    text = str(report)
    for word in ("held", "formats", *mp.memory.__globals__["CATEGORIES"], "total"):
        assert word in text
    assert f"{sum(report.held.values()):,}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["held"] == report.held and data["execution"] == "emulated" and data["peak"] is None


def test_bad_arguments_say_what_was_received():
    model = _mlp()
    with pytest.raises(TypeError, match="torch.nn.Module.*got Tensor"):
        mp.memory(X)
    with pytest.raises(TypeError, match=r"run=lambda: loss_fn\(model\(x\), y\).*got Sequential, NoneType, Tensor"):
        mp.memory(model, run=model(X))  # a forward's result, not a callable doing one
    with pytest.raises(TypeError, match="torch.optim.Optimizer or None.*got Sequential, list"):
        mp.memory(model, list(model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_native_counts_and_peak():
    torch.manual_seed(0)
    model = nn.Linear(256, 256).cuda()
    model, optimizer, _ = mp.prepare(model, torch.optim.Adam(model.parameters()), "f16-master")
    x = torch.randn(64, 256, device="cuda")

    def run():
        with mp.autocast(model):
            return model(x).float().square().mean()

    report = mp.memory(model, optimizer, run=run)
    assert report.execution == "native" and report.held == report.formats
    assert report.held["parameters"] == 2 * N and report.held["masters"] == 4 * N
    assert report.held["activations"] >= 64 * 256 * 2  # at least the FP16 input the Linear saves
    assert report.peak is not None and report.peak >= sum(report.held.values()) - report.held["activations"]
