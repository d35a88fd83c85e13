"""DDP without mixprec's communication hook (mp.autocast(ddp.module)): the masters still keep their bits.

Each update here is 2^-13 of a weight of 1.0, a quarter of FP16's half ulp below 1: lost in FP16, kept by a
master. Before the fix the masters were reset to the parameters at every step under DDP without the hook
(its FP32 gradients are untrusted there, and the masters went with them), and the weights never moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixprec as mp
from helpers import results, run_workers

STEPS, LR = 16, 2.0**-13


def worker(rank: int, policy: str, hook: bool) -> dict[str, list[float]]:
    torch.manual_seed(rank)  # different initial weights: DDP gives every rank rank 0's
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 + rank)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), policy)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for _ in range(STEPS):
        with mp.autocast(ddp if hook else ddp.module):
            loss = ddp(torch.ones(1, 4)).sum()
        scaler.scale(loss).backward()
        mp.step(opt, scaler)
        opt.zero_grad()
    return {"weight": model.weight.float().flatten().tolist(),
            "master": torch.cat([opt.master_value(s).flatten() for s in opt.grad_slots]).tolist()}


@pytest.mark.parametrize("policy", ["f16-master,scaling=none", "params=bf16,compute=bf16,master=compact",
                                    "f16-master,scaling=none,execution=native"])
def test_masters_keep_small_updates_under_ddp_without_mixprecs_hook(tmp_path: Path, policy):
    expected = 1.0 - STEPS * LR  # exact in FP32; FP16 rounds it to 0.998046875 too, BF16 to 0.99609375
    runs = {}
    for hook in (True, False):
        outcomes = run_workers(worker, (policy, hook), workdir=tmp_path / str(hook), timeout_s=120)
        r0, r1 = results(outcomes)
        assert r0 == r1  # replicas equal, masters included
        runs[hook] = r0
    assert runs[True] == runs[False]
    assert runs[False]["master"] == [expected] * 4  # every update of 2^-13 kept (before: 1 - 2^-13)
