"""The Lightning plugin against the README loop: same seed, same batches, same result, bit for bit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import mixprec as mp  # noqa: E402
from mixprec.integrations.lightning import Precision  # noqa: E402

# The default start scale, 2^16, overflows these FP16 gradients until the dynamic scaler has backed off
# (skipped steps), and two batches with infinite targets overflow later on, at any scale.
POLICY = "f16-master"
BATCHES, EPOCHS, CLIP = 10, 2, 1.0
POISONED = (4, 7)  # batch indices whose targets are inf
FAST = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(BATCHES * 8, 1, generator=g)
    for b in POISONED:
        y[b * 8: b * 8 + 8] = float("inf")
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        # The LR changes at every step, so one scheduler step too many shows in every later update.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + s))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ManualRegression(Regression):
    """The same training, written with manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.loss(batch))
        self.clip_gradients(optimizer, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.trainer.precision_plugin.last_step_info.applied:
            self.lr_schedulers().step()


class TinyGPT2(Regression):
    """Real model code: a 2-layer GPT-2 built from a config (no download), next-token loss."""

    def __init__(self) -> None:
        import transformers

        pl.LightningModule.__init__(self)
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        self.net = transformers.GPT2LMHeadModel(config)

    def loss(self, batch):
        (ids,) = batch
        logits = self(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))


def token_loader() -> torch.utils.data.DataLoader:
    ids = torch.randint(0, 100, (BATCHES * 8, 16), generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8, shuffle=False)


def readme_loop(module_class=Regression, data=loader, accumulate: int = 1):
    """The README's loop on the same module class, seed and batches, stepping every `accumulate` batches.

    Returns (model, optimizer, scheduler, scaler, [(lr, StepInfo) per step]).
    """
    torch.manual_seed(0)
    module = module_class()
    config = module.configure_optimizers()
    model, optimizer, scaler = mp.prepare(module, config["optimizer"], POLICY)
    scheduler = config["lr_scheduler"]["scheduler"]
    records = []
    for _ in range(EPOCHS):
        for i, batch in enumerate(data()):
            with mp.autocast(model):
                loss = model.loss(batch) / accumulate
            scaler.scale(loss).backward()
            if (i + 1) % accumulate == 0:
                lr = optimizer.param_groups[0]["lr"]
                info = mp.step(optimizer, scaler, max_grad_norm=CLIP)
                if info.applied:
                    scheduler.step()
                optimizer.zero_grad()
                records.append((lr, info))
    return model, optimizer, scheduler, scaler, records


class Recorder(pl.Callback):
    """The LR each step ran with and the plugin's StepInfo after it, as readme_loop records them."""

    def __init__(self) -> None:
        self.records, self.scaler_at_start = [], None

    def on_train_start(self, trainer, module):
        self.scaler_at_start = trainer.precision_plugin.scaler.state_dict()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.records.append((self._lr, trainer.precision_plugin.last_step_info))


def fit(module_class=Regression, data=loader, epochs=EPOCHS, ckpt_path=None, seed=0, **trainer_kwargs):
    torch.manual_seed(seed)
    module, plugin, recorder = module_class(), Precision(POLICY), Recorder()
    trainer = pl.Trainer(plugins=[plugin], max_epochs=epochs, callbacks=[recorder], **FAST, **trainer_kwargs)
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer, module, recorder


def assert_same_training(trainer, module, records, reference):
    model, optimizer, scheduler, scaler, expected = reference
    # LR, applied, loss scale, gradient norm and skip count at every step (repr: a NaN norm equals a NaN norm)
    assert repr(records) == repr(expected)
    for (name, a), b in zip(module.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name
    ours = trainer.optimizers[0]
    assert isinstance(ours, mp.MasterWeights)
    for a, b in zip(ours.master_params, optimizer.master_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.state.values(), optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert trainer.precision_plugin.scaler.state_dict() == scaler.state_dict()
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == scheduler.last_epoch


def test_fit_matches_the_readme_loop_bitwise_with_skipped_steps_and_held_lr_schedule():
    reference = readme_loop()
    records = reference[-1]
    skipped = [i for i, (_, info) in enumerate(records) if not info.applied]
    assert skipped == [0, 1, 2, 3, 4, 7, 14, 17]  # the start scale backing off, then the inf targets
    assert reference[2].last_epoch == len(records) - len(skipped)  # schedule advanced on applied steps only

    trainer, module, recorder = fit(gradient_clip_val=CLIP)
    assert trainer.global_step == EPOCHS * BATCHES  # Lightning counts every step, applied or skipped
    assert_same_training(trainer, module, recorder.records, reference)
    assert mp.prepared_state(module) is None  # the trainer's teardown unprepared it
    last = records[-1][1]
    assert trainer.callback_metrics["mixprec/loss_scale"].item() == last.loss_scale
    assert trainer.callback_metrics["mixprec/skipped_steps"].item() == last.skipped_steps == len(skipped)
    assert set(mp.integrations.step_logs(last)) <= set(trainer.callback_metrics)  # the keys HF's Trainer logs too
    assert trainer.callback_metrics["mixprec/grad_norm"].item() == pytest.approx(last.grad_norm)


def test_tiny_gpt2_fit_matches_the_readme_loop_bitwise():
    pytest.importorskip("transformers")
    trainer, module, recorder = fit(TinyGPT2, token_loader, gradient_clip_val=CLIP)
    reference = readme_loop(TinyGPT2, token_loader)
    assert_same_training(trainer, module, recorder.records, reference)
    assert any(info.applied for _, info in reference[-1])


def test_manual_optimization_matches_the_readme_loop_bitwise():
    trainer, module, recorder = fit(ManualRegression)
    assert_same_training(trainer, module, recorder.records, readme_loop())


def test_predict_after_fit_runs_under_the_policy():
    trainer, module, _ = fit(epochs=1)
    batch = next(iter(loader()))
    predicted = trainer.predict(module, loader())[0]  # Lightning builds no optimizer: the model alone is prepared
    held = trainer.lr_scheduler_configs[0].scheduler  # the fit's, kept by Lightning: wrapped once, not again
    assert isinstance(held.scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert torch.equal(predicted, predicted.half().float())  # an FP16 result
    assert mp.prepared_state(module) is None  # unprepared at teardown: prepare it again by hand to compare
    mp.prepare(module, None, POLICY)
    with mp.autocast(module):
        assert torch.equal(predicted, module(batch[0]))


def test_gradient_accumulation_matches_the_readme_loop_bitwise():
    # Micro-batch gradients accumulate in FP32 on the masters, under Lightning as in the loop.
    trainer, module, recorder = fit(gradient_clip_val=CLIP, accumulate_grad_batches=2)
    assert recorder.records[0][1] is None  # no step after the first micro-batch
    assert_same_training(trainer, module, recorder.records[1::2], readme_loop(accumulate=2))


def test_checkpoint_saves_and_restores_the_scaler_and_resuming_ends_bitwise_equal(tmp_path):
    path = tmp_path / "half.ckpt"
    trainer, _, _ = fit(epochs=1, gradient_clip_val=CLIP)
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["Precision"]
    assert saved == {"policy": str(mp.Policy.parse(POLICY)), "scaler": trainer.precision_plugin.scaler.state_dict()}
    assert saved["scaler"]["skipped_steps"] > 0

    # Another seed: everything that matters comes from the checkpoint.
    resumed, module, recorder = fit(epochs=EPOCHS, ckpt_path=path, seed=1, gradient_clip_val=CLIP)
    assert recorder.scaler_at_start == saved["scaler"]
    reference = readme_loop()
    assert_same_training(resumed, module, recorder.records, (*reference[:-1], reference[-1][BATCHES:]))


def test_clear_errors():
    with pytest.raises(ValueError, match="Choose one"):  # Lightning refuses two precision settings
        pl.Trainer(precision="16-mixed", plugins=[Precision("f16-master")], **FAST)
    with pytest.raises(ValueError, match="f16-mastr"):
        Precision("f16-mastr")
    with pytest.raises(ValueError, match="gradient_clip_algorithm='norm'"):
        fit(epochs=1, gradient_clip_val=1.0, gradient_clip_algorithm="value")

    plugin = Precision("f16-master")
    with pytest.raises(TypeError, match="on one device or under DDP"):  # e.g. an FSDP wrapper
        plugin.connect(torch.nn.Sequential(Regression()), [], [])
    module = Regression()
    shared = [torch.optim.SGD(module.net[0].parameters(), lr=0.1), torch.optim.SGD(module.parameters(), lr=0.1)]
    with pytest.raises(ValueError, match="share parameters"):
        plugin.connect(module, shared, [])
    assert mp.prepared_state(module) is None  # refused before anything was prepared
    mp.prepare(module, None, "f16-master")
    with pytest.raises(RuntimeError, match="already prepared"):
        plugin.connect(module, [], [])
    with pytest.raises(ValueError, match="same policy"):
        plugin.load_state_dict({"policy": "bf16-master", "scaler": {}})


def test_pytorch_lightning_is_used_where_lightning_is_not_installed():
    pytest.importorskip("pytorch_lightning")
    code = ("import sys; sys.modules['lightning'] = None  # as if not installed\n"
            "import pytorch_lightning as ptl\n"
            "from mixprec.integrations.lightning import Precision\n"
            "trainer = ptl.Trainer(plugins=[Precision('f16-master')], accelerator='cpu', devices=1, logger=False)\n"
            "print(isinstance(trainer.precision_plugin, Precision))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True")


def test_import_mixprec_does_not_import_lightning():
    code = "import sys, mixprec, mixprec.integrations; print([m for m in sys.modules if 'lightning' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_compact_masters_fit_matches_the_readme_loop_bitwise(monkeypatch):
    # A master mode that rebuilds the masters per step trains through the plugin as through the README's loop.
    monkeypatch.setitem(globals(), "POLICY", "bf16-compact,scaling=dynamic")
    reference = readme_loop()
    trainer, module, recorder = fit(gradient_clip_val=CLIP)
    assert_same_training(trainer, module, recorder.records, reference)
    ours, theirs = trainer.optimizers[0], reference[1]
    assert ours.mode == "compact" and ours.grad_slots
    for a, b in zip(ours.grad_slots, theirs.grad_slots, strict=True):
        assert torch.equal(ours.master_value(a), theirs.master_value(b))
