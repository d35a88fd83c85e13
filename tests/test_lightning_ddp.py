"""The Lightning plugin under DDP (strategy="ddp", 2 gloo processes on CPU): each rank's fit equals the README
loop under DDP on the same half of the data, bit for bit, and the ranks agree on weights, masters and skips."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import results, run_workers

pl = pytest.importorskip("lightning.pytorch")

import mixprec as mp  # noqa: E402
from mixprec.integrations.lightning import Precision  # noqa: E402

# f16-master from 2^16: the first steps overflow (skipped on both ranks), then one poisoned batch on rank 1
# only overflows that step everywhere.
POLICIES = ("f16-master", "fp8-delayed")
BATCHES, BATCH, CLIP = 6, 8, 1.0


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                       torch.nn.LayerNorm(32), torch.nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).float(), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * BATCHES * BATCH, 16, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True)
    y[37] = float("inf")  # one sample: the step of the batch it lands in overflows on one rank only
    return torch.utils.data.TensorDataset(x, y)


def snapshot(module: torch.nn.Module, optimizer: Any, scaler: mp.LossScaler, infos: list) -> dict[str, Any]:
    masters = [optimizer.master_value(s).clone() for s in optimizer.grad_slots] if hasattr(optimizer, "grad_slots") \
        else []
    return {"weights": {k: v.detach().clone() for k, v in module.state_dict().items()}, "masters": masters,
            "applied": [bool(i.applied) for i in infos], "scaler": scaler.state_dict()}


def plugin_fit(rank: int, policy: str, epochs: int = 1, accumulate: int = 1, folder: Path | None = None,
               resume: Path | None = None) -> dict[str, Any]:
    torch.manual_seed(1 if resume else 0)  # a resumed fit's weights all come from the checkpoint
    module, infos, batches = Net(), [], []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            batches.append([t.clone() for t in batch])  # what Lightning's DistributedSampler gave this rank

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accumulate == 0:  # an optimizer step
                infos.append(trainer.precision_plugin.last_step_info)

        def on_train_end(self, trainer, module):
            self.state = snapshot(module, trainer.optimizers[0], trainer.precision_plugin.scaler, infos)
            self.kind = type(trainer.strategy.model).__name__

    record = Record()
    callbacks: list[Any] = [record]
    if folder is not None:  # a checkpoint after every epoch (rank 0 writes it)
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=folder, filename="{epoch}", every_n_epochs=1,
                                                      save_top_k=-1))
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[Precision(policy)],
                         max_epochs=epochs, accumulate_grad_batches=accumulate, gradient_clip_val=CLIP, logger=False,
                         enable_progress_bar=False, enable_checkpointing=folder is not None,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, loader, ckpt_path=resume)
    return {**record.state, "wrapper": record.kind, "batches": batches}


def readme_ddp(policy: str, batches: list, accumulate: int = 1) -> dict[str, Any]:
    """The README loop under DDP on the batches Lightning gave this rank, stepping every `accumulate`
    micro-batches (no_sync for the others, as Lightning does)."""
    torch.manual_seed(0)
    module = Net()
    model, optimizer, scaler = mp.prepare(module, module.configure_optimizers(), policy)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    infos = []
    for i, (x, y) in enumerate(batches):
        last = (i + 1) % accumulate == 0
        with contextlib.nullcontext() if last else ddp.no_sync(), mp.autocast(ddp):
            loss = torch.nn.functional.mse_loss(ddp(x).float(), y) / accumulate
            scaler.scale(loss).backward()
        if last:
            infos.append(mp.step(optimizer, scaler, max_grad_norm=CLIP))
            optimizer.zero_grad()
    return snapshot(module, optimizer, scaler, infos)


def worker(rank: int, folder: str) -> dict[str, Any]:
    # As torchrun would start it: Lightning sees the rank in the environment and launches no processes; the
    # process group (gloo) is already up.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    found = {}
    for policy in POLICIES:
        fit = plugin_fit(rank, policy)
        batches = fit.pop("batches")
        found[policy] = {"fit": fit, "loop": readme_ddp(policy, batches),
                         "poisoned": [bool(y.isinf().any()) for _, y in batches]}
    accumulated = plugin_fit(rank, "f16-master", accumulate=2)
    found["accumulate"] = {"fit": accumulated, "loop": readme_ddp("f16-master", accumulated.pop("batches"), 2)}
    whole = plugin_fit(rank, "f16-master", epochs=2, folder=Path(folder))  # writes epoch=0.ckpt on the way
    resumed = plugin_fit(rank, "f16-master", epochs=2, resume=Path(folder) / "epoch=0.ckpt")
    found["resume"] = {"whole": whole, "resumed": resumed}
    return found


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return results(run_workers(worker, (str(folder),), workdir=Path(tmp_path_factory.mktemp("lightning-ddp")),
                               timeout_s=300))


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["weights"].keys() == b["weights"].keys()
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
            and len(a["masters"]) == len(b["masters"])
            and all(torch.equal(x, y) for x, y in zip(a["masters"], b["masters"], strict=True))
            and a["applied"] == b["applied"] and a["scaler"] == b["scaler"])


@pytest.mark.parametrize("policy", POLICIES)
def test_lightning_ddp_fit_is_the_readme_loop_under_ddp_bit_for_bit(ranks, policy):
    for rank, found in enumerate(ranks):
        fit, loop = found[policy]["fit"], found[policy]["loop"]
        assert fit["wrapper"] == "DistributedDataParallel", rank
        assert same(fit, loop), f"rank {rank}: the plugin's DDP fit is not the README loop under DDP"


@pytest.mark.parametrize("policy", POLICIES)
def test_lightning_ddp_ranks_agree_and_skip_together(ranks, policy):
    a, b = ranks[0][policy]["fit"], ranks[1][policy]["fit"]
    assert same(a, b)
    poisoned = [p or q for p, q in zip(ranks[0][policy]["poisoned"], ranks[1][policy]["poisoned"], strict=True)]
    assert sum(poisoned) == 1 and ranks[0][policy]["poisoned"] != ranks[1][policy]["poisoned"]  # one rank's batch
    assert len(a["applied"]) == BATCHES and not a["applied"][poisoned.index(True)]  # skipped on both ranks
    if policy == "f16-master":
        assert a["masters"] and not all(a["applied"][:3])  # FP32 masters; the start scale overflowed first
    else:
        assert a["scaler"]["fp8"]["layers"].keys() == {"net.2"}  # FP8 histories, agreed across the ranks


def test_lightning_ddp_accumulation_is_the_readme_loop_with_no_sync(ranks):
    for rank, found in enumerate(ranks):
        fit, loop = found["accumulate"]["fit"], found["accumulate"]["loop"]
        assert len(fit["applied"]) == BATCHES // 2 and same(fit, loop), rank


def test_lightning_ddp_resumes_from_its_checkpoint_bit_for_bit(ranks):
    for rank, found in enumerate(ranks):
        whole, resumed = found["resume"]["whole"], found["resume"]["resumed"]
        assert whole["weights"].keys() == resumed["weights"].keys()
        assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"]), rank
        assert all(torch.equal(a, b) for a, b in zip(whole["masters"], resumed["masters"], strict=True))
        assert whole["scaler"] == resumed["scaler"] and len(resumed["applied"]) == BATCHES  # the second epoch
