"""FP8 training everywhere training runs: which layers go FP8, resume, skipped steps, evaluation, compile,
activation checkpointing, copies of the model, and DDP (2 gloo ranks) agreeing on delayed-scaling histories."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import mixprec as mp
from helpers import results, run_workers
from mixprec.fp8.linear import Fp8Forward
from mixprec.harness.checkpoints import find_checkpoint
from mixprec.harness.training import train as harness_train
from mixprec.state import prepared_state

FP8_NAMES = {"2", "4"}  # the first (0) and last (6) Linear layers stay in 16 bits


def make_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


def batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step % 4)  # 4 batches a rank, learnt by heart
    x = torch.randn(24, 32, generator=g)
    return x, (x[:, :16] * 3).argmax(dim=1)


def prepared(policy: str, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, mp.LossScaler]:
    model = make_model(seed)
    return mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), policy)  # type: ignore[return-value]


def train(model: Any, opt: Any, scaler: Any, steps: range, rank: int = 0, accumulate: int = 1) -> list[float]:
    losses = []
    for step in steps:
        for micro in range(accumulate):
            x, y = batch(step * accumulate + micro, rank)
            with mp.autocast(model):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y) / accumulate
            scaler.scale(loss).backward()
        mp.step(opt, scaler, max_grad_norm=1.0)
        opt.zero_grad()
        losses.append(loss.item() * accumulate)
    return losses


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mp.distributed.unwrap(model).state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key].float() - b[key].float()).abs().max()}"


@pytest.mark.parametrize("preset", ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "fp8-blockwise", "fp8-mx"])
def test_fp8_trains_close_to_bf16_master_and_differently(preset):
    model, opt, scaler = prepared(preset)
    assert set(prepared_state(model).fp8_layers) == FP8_NAMES
    assert isinstance(model[2].forward, Fp8Forward) and "forward" not in vars(model[0])
    losses = train(model, opt, scaler, range(25))
    ref_model, ref_opt, ref_scaler = prepared("bf16-master")
    ref = train(ref_model, ref_opt, ref_scaler, range(25))
    assert losses[-1] < 0.7 * losses[0]  # it learns
    assert abs(sum(losses[-5:]) - sum(ref[-5:])) < 0.1 * sum(ref[-5:])  # as bf16-master does
    assert not torch.equal(model[2].weight, ref_model[2].weight)  # and the FP8 matmuls did run
    assert torch.equal(params(model)["0.weight"].isfinite(), torch.ones(64, 32, dtype=torch.bool))


def test_outside_autocast_an_fp8_layer_is_a_plain_linear_and_unprepare_takes_the_forward_away():
    model, _, _ = prepared("fp8-tensorwise,execution=emulated")
    x = torch.randn(5, 64)
    plain = torch.nn.functional.linear(x, model[2].weight, model[2].bias)
    assert torch.equal(model[2](x), plain)
    with mp.autocast(model):
        assert not torch.equal(model[2](x.bfloat16()).float(), plain)
    mp.unprepare(model)
    assert "forward" not in vars(model[2]) and torch.equal(model[2](x), plain)


def test_a_rule_forces_or_refuses_fp8_and_a_taken_forward_is_refused():
    model = make_model()
    policy = mp.Policy.parse("fp8-tensorwise,rule=0:e4m3,rule=2:bf16")
    names = {m.name for m in policy.module_precisions(model) if m.fp8}
    assert names == {"0", "4"}
    small = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 10), torch.nn.Linear(10, 16))
    with pytest.raises(ValueError, match="not multiples of 16"):
        mp.Policy.parse("fp8-tensorwise,rule=1:e4m3").module_precisions(small)
    model[2].forward = lambda x: x  # another tool's instance forward
    before = model[4].weight.detach().clone()
    with pytest.raises(RuntimeError, match="instance forward"):
        mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-tensorwise")
    assert prepared_state(model) is None and "forward" not in vars(model[4]) and torch.equal(model[4].weight, before)


def test_delayed_scaling_resumes_bitwise_from_the_scaler_state_dict(tmp_path):
    model, opt, scaler = prepared("fp8-delayed")
    train(model, opt, scaler, range(8))
    whole = params(model), scaler.state_dict()["fp8"]

    model, opt, scaler = prepared("fp8-delayed")
    train(model, opt, scaler, range(4))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, path)
    model, opt, scaler = prepared("fp8-delayed", seed=7)
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    scaler.load_state_dict(saved["scaler"])
    train(model, opt, scaler, range(4, 8))
    assert_same(params(model), whole[0])
    assert scaler.state_dict()["fp8"] == whole[1]
    history = whole[1]["layers"]["2"]["history"]
    assert all(h[0] > 0 for h in history) and history[0][0] != history[0][1]  # amaxes were pushed, step by step


def test_scaler_state_dicts_of_another_fp8_recipe_are_refused():
    _, _, delayed = prepared("fp8-delayed")
    _, _, tensorwise = prepared("fp8-tensorwise")
    with pytest.raises(ValueError, match="delayed-scaling histories"):
        tensorwise.load_state_dict(delayed.state_dict())
    _, _, short = prepared("bf16-master,fp8=delayed:history=4")
    with pytest.raises(ValueError, match="keeps 16 amaxes"):
        short.load_state_dict(delayed.state_dict())
    assert short.state_dict()["fp8"]["layers"]["2"]["history"] == [[0.0] * 4] * 3  # nothing loaded
    before = delayed.state_dict()
    delayed.load_state_dict({k: v for k, v in before.items() if k != "fp8"})  # an older dict: histories kept
    assert delayed.state_dict() == before


def test_a_skipped_step_pushes_no_inf_and_evaluation_records_nothing():
    model, opt, scaler = prepared("bf16-master,fp8=delayed:history=4")
    train(model, opt, scaler, range(2))
    layer = prepared_state(model).fp8_layers["2"]
    x, y = batch(5)
    x[0, 0] = float("inf")
    with mp.autocast(model):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    weights = params(model)
    assert not mp.step(opt, scaler).applied
    opt.zero_grad()
    assert_same(params(model), weights)
    history = layer.history.clone()
    assert history.isfinite().all() and history[0, 1] > 0 and history[0, 2] == 0  # 2 inputs pushed, not the inf
    assert history[1, 2] > 0 and layer.pending.eq(0).all()  # the skipped step's finite weight amax was
    model.eval()
    with torch.no_grad(), mp.autocast(model):
        model(batch(6)[0])
    model.train()
    with mp.autocast(model):  # a forward with grad of a model in eval mode records nothing either
        model.eval()
        model(batch(6)[0])
        model.train()
    assert layer.pending.eq(0).all() and not layer.recorded  # evaluation: nothing recorded
    train(model, opt, scaler, range(6, 8))
    assert layer.history.isfinite().all() and not torch.equal(layer.history, history)
    assert params(model)["2.weight"].isfinite().all()


def test_gradient_accumulation_equals_one_big_batch_in_fp8_values():
    # Accumulating 2 micro-batches: every FP8 matmul sees a micro-batch's own scales; the run trains as well.
    model, opt, scaler = prepared("fp8-tensorwise")
    losses = train(model, opt, scaler, range(12), accumulate=2)
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("preset", ["fp8-tensorwise", "fp8-delayed"])
def test_compiled_fp8_training_equals_eager(preset):
    eager_model, opt, scaler = prepared(preset)
    train(eager_model, opt, scaler, range(3))
    model, opt, scaler = prepared(preset)
    compiled = torch.compile(model, backend="aot_eager")
    train(compiled, opt, scaler, range(3))
    assert_same(params(compiled), params(eager_model))


class Checkpointed(torch.nn.Module):
    def __init__(self, inner: torch.nn.Sequential, recompute: bool) -> None:
        super().__init__()
        self.inner, self.recompute = inner, recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, body, tail = self.inner[:2], self.inner[2:6], self.inner[6:]
        h = head(x)
        h = torch.utils.checkpoint.checkpoint(body, h, use_reentrant=False) if self.recompute else body(h)
        return tail(h)


def test_activation_checkpointing_recomputes_the_fp8_matmuls():
    runs = []
    for recompute in (False, True):
        model = Checkpointed(make_model(), recompute)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt, scaler = mp.prepare(model, opt, "fp8-delayed")
        train(model, opt, scaler, range(3))
        runs.append(params(model))
    assert_same(*runs)


def test_a_copy_of_the_model_computes_in_fp8_inside_its_own_autocast():
    model, opt, scaler = prepared("fp8-tensorwise")
    train(model, opt, scaler, range(2))
    twin = copy.deepcopy(model)
    assert twin[2].forward.module is twin[2]
    x = batch(3)[0]
    with torch.no_grad():
        with mp.autocast(model):
            expected = model(x)
        with mp.autocast(twin):
            got = twin(x)
        plain = twin(x)
    assert torch.equal(got, expected) and not torch.equal(plain, expected)


# ----- DDP: 2 gloo ranks, different data, delayed histories agreed ---------------------------------------------
def ddp_worker(rank: int) -> dict[str, Any]:
    model, opt, scaler = prepared("fp8-delayed")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    train(ddp, opt, scaler, range(3), rank=rank)
    layers = prepared_state(model).fp8_layers
    x, y = batch(3, rank)
    with mp.autocast(ddp):
        scaler.scale(torch.nn.functional.cross_entropy(ddp(x).float(), y)).backward()
    pending = {name: layer.pending.tolist() for name, layer in layers.items()}  # this rank's own, not pushed yet
    mp.step(opt, scaler, max_grad_norm=1.0)  # pushes them, agreed across the ranks
    opt.zero_grad()
    return {"params": params(model), "fp8": scaler.state_dict()["fp8"], "pending": pending,
            "fsdp": fsdp_run(rank, "fp8-delayed"), "fsdp_bf16": fsdp_run(rank, "bf16-master"),
            "ddp_bf16": ddp_run(rank, "bf16-master")}


def fsdp_run(rank: int, policy: str) -> dict[str, Any]:
    """FSDP2: FP32 shards are the masters, FSDP casts them to BF16 for the forward; the FP8 matmuls run on
    the unsharded BF16 weights."""
    model = make_model()
    mp.distributed.fully_shard(model, policy, modules=[model[2], model[4]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, scaler = mp.prepare(model, opt, policy)
    train(model, opt, scaler, range(4), rank=rank)
    sharded: list[Any] = list(model.parameters())
    return {"weights": [p.full_tensor().float() for p in sharded], "fp8": sorted(prepared_state(model).fp8_layers),
            "history": {n: layer.history.tolist() for n, layer in prepared_state(model).fp8_layers.items()}}


def ddp_run(rank: int, policy: str) -> dict[str, Any]:
    model, opt, scaler = prepared(policy)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    train(ddp, opt, scaler, range(4), rank=rank)
    return {"weights": [p.detach().float() for p in model.parameters()]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return results(run_workers(ddp_worker, (), workdir=Path(tmp_path_factory.mktemp("ranks")), timeout_s=180))


def test_ddp_ranks_agree_on_fp8_histories_and_weights(ranks):
    r0, r1 = ranks
    assert_same(r0["params"], r1["params"])
    for name in FP8_NAMES:  # the histories agree (each rank's pending amaxes are its own until pushed)
        assert r0["fp8"]["layers"][name]["history"] == r1["fp8"]["layers"][name]["history"]
        newest = [row[0] for row in r0["fp8"]["layers"][name]["history"]]
        assert newest == [max(a, b) for a, b in zip(r0["pending"][name], r1["pending"][name], strict=True)]
        assert r0["pending"][name] != r1["pending"][name]  # the ranks saw different data
        pushes = [row[:5] for row in r0["fp8"]["layers"][name]["history"]]  # one a step
        assert all(row[3] > 0 and row[4] == 0 for row in pushes)


def test_fsdp2_runs_fp8_layers_on_its_unsharded_weights(ranks):
    r0, r1 = ranks
    fsdp = r0["fsdp"]
    assert fsdp["fp8"] == sorted(FP8_NAMES) and fsdp["history"] == r1["fsdp"]["history"]  # agreed across ranks
    for a, b in zip(fsdp["weights"], r1["fsdp"]["weights"], strict=True):
        assert torch.equal(a, b)
    # As close to the DDP FP8 run as FSDP's bf16-master is to DDP's bf16-master (same data, same steps): FSDP
    # rounds in other places (its FP32 shards are the masters), so the two differ by BF16 roundings, not FP8.
    ddp_fp8 = list(r0["params"].values())
    gap = max((a - b.float()).abs().max().item() for a, b in zip(fsdp["weights"], ddp_fp8, strict=True))
    ref = max((a - b).abs().max().item() for a, b in zip(r0["fsdp_bf16"]["weights"], r0["ddp_bf16"]["weights"],
                                                         strict=True))
    assert gap <= 2 * max(ref, 2.0**-12)  # measured: both 2^-11


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def native_and_emulated_runs(preset: str, device: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list, int]:
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
    runs = {}
    for execution in ("auto", "emulated"):
        model = make_model().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt, scaler = mp.prepare(model, opt, f"{preset},execution={execution}")
        assert all(layer.native == (execution == "auto") for layer in prepared_state(model).fp8_layers.values())
        losses = []
        for step in range(10):
            x, y = (t.to(device) for t in batch(step))
            with mp.autocast(model):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            assert mp.step(opt, scaler, max_grad_norm=1.0).applied
            opt.zero_grad()
            losses.append(loss.item())
        runs[execution] = losses
    return runs["auto"], runs["emulated"], len(calls)


@pytest.mark.parametrize("preset", ["fp8-tensorwise", "fp8-rowwise"])
def test_the_native_path_runs_scaled_mm_and_trains_like_the_emulation_on_cpu(preset, monkeypatch):
    # torch._scaled_mm runs on CPU too: pretend the CPU has FP8 tensor cores to run the native wiring here.
    monkeypatch.setattr(mp.policy, "native_fp8", lambda device: (True, "pretend"))
    native, emulated, calls = native_and_emulated_runs(preset, "cpu", monkeypatch)
    assert calls == 10 * 2 * 3  # 10 steps, 2 FP8 layers, 3 matmuls each
    assert native[-1] < 0.8 * native[0]
    # Same bits and scales: the first forward differs only in summation order and where the inverse scale is
    # applied; a BF16 rounding flipped by that then moves later steps a little (measured: 1.6e-3 at most).
    assert abs(native[0] - emulated[0]) <= 1e-5 * emulated[0]
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(native, emulated, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
@pytest.mark.parametrize("preset", ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise"])
def test_native_fp8_on_cuda_runs_scaled_mm_and_trains_like_the_emulation(preset, monkeypatch):
    native, emulated, calls = native_and_emulated_runs(preset, "cuda", monkeypatch)
    assert calls and native[-1] < 0.8 * native[0]
    # Same FP8 bits and scales; the rest of the model is native BF16 in one run and emulated in the other.
    assert all(abs(a - b) <= 0.05 * abs(b) for a, b in zip(native, emulated, strict=True))


def test_mixprec_train_stopped_and_resumed_under_fp8_delayed_is_the_uninterrupted_run(tmp_path):
    whole = harness_train("gpt", "fp8-delayed", out=tmp_path / "whole", steps=10, threads=1)
    harness_train("gpt", "fp8-delayed", out=tmp_path / "resumed", steps=10, stop_at=4, threads=1)
    resumed = harness_train("gpt", "fp8-delayed", out=tmp_path / "resumed", steps=10, resume=True, threads=1)
    (_, a, _), (_, b, _) = find_checkpoint(tmp_path / "whole"), find_checkpoint(tmp_path / "resumed")
    assert a["scaler"]["fp8"] == b["scaler"]["fp8"] and a["scaler"]["fp8"]["layers"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.history == whole.history
