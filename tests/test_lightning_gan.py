"""A GAN (generator + discriminator, two optimizers, manual optimization) through the Lightning plugin: bit for
bit the README loop with two optimizers prepared one by one (mp.prepare_optimizer); the paper's GAN case."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import mixprec as mp  # noqa: E402
from mixprec.integrations.lightning import Precision  # noqa: E402

POLICY = "f16-master,scaling=dynamic:16777216"  # from 2^24: the first steps overflow and are skipped
STEPS, BATCH, NOISE = 8, 16, 8
FAST = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0)


class GAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # Lightning's way to several optimizers
        self.generator = torch.nn.Sequential(torch.nn.Linear(NOISE, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LeakyReLU(0.2),
                                                 torch.nn.Linear(32, 1))

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999)))

    def losses(self, real: torch.Tensor, z: torch.Tensor, part: str) -> torch.Tensor:
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        if part == "discriminator":
            fake = self.generator(z).detach()
            real_logits, fake_logits = self.discriminator(real).float(), self.discriminator(fake).float()
            return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
        logits = self.discriminator(self.generator(z)).float()
        return bce(logits, torch.ones_like(logits))

    def training_step(self, batch, batch_idx):
        real, z = batch
        opt_g, opt_d = self.optimizers()
        for part, opt in (("discriminator", opt_d), ("generator", opt_g)):
            opt.zero_grad()
            self.manual_backward(self.losses(real, z, part))
            opt.step()
            self.steps.append((part, self.trainer.precision_plugin.last_step_info))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 16, generator=g) * 0.5 + 1.0, torch.randn(BATCH, NOISE, generator=g))
            for _ in range(STEPS)]


def fit() -> tuple[GAN, list]:
    torch.manual_seed(0)
    module = GAN()
    module.steps = []
    loader = torch.utils.data.DataLoader(batches(), batch_size=None, shuffle=False)
    trainer = pl.Trainer(plugins=[Precision(POLICY)], max_epochs=1, **FAST)
    trainer.fit(module, loader)
    return module, module.steps


def readme_loop() -> tuple[GAN, list]:
    torch.manual_seed(0)
    module = GAN()
    model, _, scaler = mp.prepare(module, None, POLICY)
    opt_g, opt_d = (mp.prepare_optimizer(model, opt, scaler) for opt in module.configure_optimizers())
    steps = []
    for real, z in batches():
        for part, opt in (("discriminator", opt_d), ("generator", opt_g)):
            opt.zero_grad()
            with mp.autocast(model):
                loss = model.losses(real, z, part)
            scaler.scale(loss).backward()
            steps.append((part, mp.step(opt, scaler)))
    return module, steps


def test_a_gan_with_two_optimizers_fits_as_the_readme_loop_bit_for_bit():
    (fitted, fit_steps), (looped, loop_steps) = fit(), readme_loop()
    assert repr(fit_steps) == repr(loop_steps) and len(fit_steps) == 2 * STEPS
    assert not all(info.applied for _, info in fit_steps)  # the start scale overflowed some steps: skipped
    assert any(info.applied for part, info in fit_steps if part == "generator")
    for (name, a), b in zip(fitted.state_dict().items(), looped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(fitted.generator[0].weight, GAN().generator[0].weight)  # it trained
