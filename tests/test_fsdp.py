"""FSDP2 (fully_shard) under a mixprec policy: 2 gloo processes on CPU, started by the test.

FSDP's sharded FP32 parameters are the masters; mp.step unscales, checks and clips the sharded
gradients (their norm summed over the ranks) and every rank takes the same skip decision. The
reference is the same preset under DDP (mixprec's masters, FP32 reduction) in the same processes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mixprec as mp
from helpers import Checkpointed, results, run_workers, step_float, typed_prepare

POLICIES = ["f16-master", "bf16-master"]
KINDS = ("fsdp", "ddp", "fsdp-fault", "fsdp-fault-fused", "fsdp-fault-sync-free", "fsdp-checkpointed")
STEPS = 6
FAULT_STEPS = (2, 4)  # rank 1 writes inf into its own shard of a gradient on these steps
RUN_TIMEOUT_S = 240  # both processes, every policy and kind; no collective times out before it either
TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
# FSDP2 on CPU processes (gloo): runs on torch 2.13, the release tested; torch 2.6's FSDP2 has no CPU streams.
pytestmark = pytest.mark.skipif(TORCH < (2, 13), reason="FSDP2 on CPU: tested on torch >= 2.13 only")


# ----- what each of the 2 processes runs (started by helpers.run_workers; the children never assert) -----


def _poison_own_shard(layer: torch.nn.Module) -> None:
    """inf into this rank's shard only of the layer's (sharded, DTensor) weight gradient."""
    grad: Any = layer.weight.grad
    grad.to_local().view(-1)[0] = float("inf")


def _full_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter gathered whole from its FSDP shards, in FP32."""
    sharded: list[Any] = list(model.parameters())
    return [p.full_tensor().float() for p in sharded]


def _train(policy: str, kind: str, rank: int) -> dict[str, Any]:
    """One run of a kind: FSDP2 (clean, faulty, fused, sync-free, checkpointed) or the DDP reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    if kind == "fsdp-checkpointed":  # the Linear and the LayerNorm island recomputed in backward
        model[0], model[1] = Checkpointed(model[0]), Checkpointed(model[1])
    if kind.startswith("fsdp"):
        mp.distributed.fully_shard(model, policy)  # in place: the same Sequential, sharded
    fused = kind != "ddp" and kind.endswith(("fused", "free"))
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    model, opt, scaler = typed_prepare(model, opt, policy)
    net = model if kind.startswith("fsdp") else torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    applied, norms, read_later = [], [], []
    for step in range(STEPS):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
        with mp.autocast(net):
            loss = torch.nn.functional.mse_loss(net(x).float(), y)
        scaler.scale(loss).backward()
        if kind.startswith("fsdp-fault") and rank == 1 and step in FAULT_STEPS:
            _poison_own_shard(model[0])
        info = mp.step(opt, scaler, max_grad_norm=1.0, sync=kind != "fsdp-fault-sync-free")
        read_later.append(isinstance(info.applied, torch.Tensor))
        applied.append(bool(info.applied))  # sync=False: device tensors, read here to compare
        norms.append(step_float(info.grad_norm))
        opt.zero_grad()
    if kind.startswith("fsdp"):
        weights = _full_weights(model)
    else:
        weights = [p.detach().clone() for group in opt.param_groups for p in group["params"]]  # the masters
    return {"weights": weights, "applied": applied, "norms": norms, "read_later": read_later,
            "optimizer": type(opt).__name__, "scaler": scaler.state_dict()}


def _refusals() -> dict[str, Any]:
    """What prepare says to policies FSDP2 cannot run (nothing half-done), and to sharding after prepare."""
    found: dict[str, Any] = {}
    for bad in ("f16-pure", "f16-master,execution=emulated"):
        model = mp.distributed.fully_shard(torch.nn.Sequential(torch.nn.Linear(8, 16)), "f16-master")
        try:
            mp.prepare(model, None, bad)
            found[bad] = "prepared"
        except ValueError as error:
            found[bad] = str(error)
        found[bad + "|prepared"] = mp.prepared_state(model) is not None
    model = torch.nn.Sequential(torch.nn.Linear(8, 16))
    model, _, _ = mp.prepare(model, None, "f16-master")
    mp.distributed.fully_shard(model, "f16-master")  # in the wrong order
    try:
        with mp.autocast(model):
            pass
        found["shard after prepare"] = "ran"
    except RuntimeError as error:
        found["shard after prepare"] = str(error)
    return found


def _worker(rank: int, policies: list[str]) -> dict[str, Any]:
    """Every policy under every kind, then the refusals: what the tests below compare, by key."""
    found = {f"{policy}|{kind}": _train(policy, kind, rank) for policy in policies for kind in KINDS}
    found.update(_refusals())
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    outcomes = run_workers(_worker, (POLICIES,), workdir=tmp_path_factory.mktemp("fsdp"), timeout_s=RUN_TIMEOUT_S,
                           collective_timeout_s=RUN_TIMEOUT_S)
    return results(outcomes)


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_trains_like_ddp_with_fsdp_shards_as_the_masters(runs, policy):
    fsdp, ddp = runs[0][f"{policy}|fsdp"], runs[0][f"{policy}|ddp"]
    assert fsdp["optimizer"] == "Adam" and ddp["optimizer"] == "MasterWeights"  # no second master copy
    assert fsdp["applied"] == ddp["applied"]
    # Same arithmetic up to where each rounds: FSDP's unsharded 16-bit weights are cast from the FP32
    # shards and its FP32 gradients reduce-scattered; DDP reduces the same 16-bit gradients in FP32.
    # Gradients and updates differ by 16-bit rounding only: allow a few ulps of the weights' format.
    eps = mp.Policy.parse(policy).params.eps
    for a, b in zip(fsdp["weights"], ddp["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps)
    for a, b in zip(fsdp["norms"], ddp["norms"], strict=True):
        if ddp["applied"]:
            assert a == pytest.approx(b, rel=8 * eps)  # the sharded norm is summed over both ranks


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_replicas_agree_and_a_fault_on_one_shard_skips_every_rank(runs, policy):
    for kind in ("fsdp", "fsdp-fault"):
        r0, r1 = runs[0][f"{policy}|{kind}"], runs[1][f"{policy}|{kind}"]
        assert r0["applied"] == r1["applied"]
        assert r0["scaler"] == r1["scaler"]
        for a, b in zip(r0["weights"], r1["weights"], strict=True):
            assert torch.equal(a, b)
    faulty, clean = runs[0][f"{policy}|fsdp-fault"], runs[0][f"{policy}|fsdp"]
    assert [i for i, a in enumerate(faulty["applied"]) if not a] == sorted(
        {2, 4} | {i for i, a in enumerate(clean["applied"]) if not a})
    assert faulty["scaler"]["skipped_steps"] >= 2


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_sync_free_steps_skip_on_every_rank_as_synced_ones(runs, policy):
    # mp.step(sync=False) with fused Adam over the DTensor shards: no host read, the ranks agree on
    # found-inf in the all-reduce and the optimizer skips on the device, bit for bit as the synced step.
    for rank in range(2):
        free, synced = runs[rank][f"{policy}|fsdp-fault-sync-free"], runs[rank][f"{policy}|fsdp-fault-fused"]
        first = free["applied"].index(True)  # steps up to the first applied one create the state: synced
        assert free["read_later"] == [i > first for i in range(6)] and not any(synced["read_later"])
        assert free["applied"] == synced["applied"] and not free["applied"][2] and not free["applied"][4]
        assert free["scaler"] == synced["scaler"]
        assert all(torch.equal(a, b) for a, b in zip(free["weights"], synced["weights"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][f"{policy}|fsdp-fault-sync-free"]["weights"],
                                                  runs[1][f"{policy}|fsdp-fault-sync-free"]["weights"], strict=True))


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_with_activation_checkpointing_trains_as_without_it(runs, policy):
    for rank in range(2):
        checkpointed, plain = runs[rank][f"{policy}|fsdp-checkpointed"], runs[rank][f"{policy}|fsdp"]
        assert checkpointed["applied"] == plain["applied"] and checkpointed["scaler"] == plain["scaler"]
        assert all(torch.equal(a, b) for a, b in zip(checkpointed["weights"], plain["weights"], strict=True))


def test_fsdp2_refuses_policies_it_cannot_run():
    with pytest.raises(ValueError, match="FSDP2 casts parameters .* in fp32, fp16 or bf16"):
        mp.distributed.fsdp_mixed_precision("params=e4m3,compute=e4m3,master=fp32")
    assert mp.distributed.fsdp_mixed_precision("f16-master,reduce=bf16").reduce_dtype == torch.bfloat16


def test_prepare_under_fsdp2_refuses_what_it_cannot_run(runs):
    assert "has no master weights, but FSDP2 keeps FP32 sharded parameters" in runs[0]["f16-pure"]
    assert "execution=emulated under FSDP2 is not supported" in runs[0]["f16-master,execution=emulated"]
    assert not runs[0]["f16-pure|prepared"] and not runs[0]["f16-master,execution=emulated|prepared"]
    assert "fully_shard was applied after mp.prepare" in runs[0]["shard after prepare"]
