"""`tiny-updates`: updates smaller than 2^-11 of their weights, lost when added in FP16.

The paper's first reason for FP32 master weights: FP16 has 10 mantissa bits, so when
|weight| / |update| >= 2^11 the sum rounds back to the weight and the update is lost.

Task: fine-tune "pretrained" weights. A linear model starts at weights W0 with magnitudes in
[4, 8) and must learn a small correction (targets come from W0 + delta, delta ~ N(0, 0.1^2), plus
noise). Adam's steps are about its learning rate, 2^-11, i.e. 2^-13 to 2^-14 of each weight, and
never more than ~3x the learning rate: below half an FP16 ulp at these magnitudes (2^-9). With
16-bit weights alone every update rounds away and the error stays where it started; with FP32
master weights the updates accumulate exactly as in FP32. Metric: mean squared error on held-out
inputs (noise floor 0.01; lower is better).

Example:
    >>> r = recipe()
    >>> r.lr == 2**-11
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Data, Recipe

IN_FEATURES, OUT_FEATURES = 32, 8
DATA_SEED = 99
NOISE = 0.1


def _pretrained_weight() -> torch.Tensor:
    generator = torch.Generator().manual_seed(DATA_SEED)
    magnitude = torch.rand(OUT_FEATURES, IN_FEATURES, generator=generator) * 4 + 4  # in [4, 8)
    sign = torch.where(torch.rand(OUT_FEATURES, IN_FEATURES, generator=generator) < 0.5, -1.0, 1.0)
    return magnitude * sign


def make_data(train_rows: int = 4096, test_rows: int = 1024) -> Data:
    generator = torch.Generator().manual_seed(DATA_SEED + 1)
    target = _pretrained_weight() + 0.1 * torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    x = torch.randn(train_rows + test_rows, IN_FEATURES, generator=generator)
    y = x @ target.T + NOISE * torch.randn(len(x), OUT_FEATURES, generator=generator)
    return Data(
        train=(x[:train_rows], y[:train_rows]),
        test=(x[train_rows:], y[train_rows:]),
        info={"generator": "seeded linear teacher near the pretrained weights", "data_seed": DATA_SEED},
    )


def make_model() -> nn.Module:
    model = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    with torch.no_grad():
        model.weight.copy_(_pretrained_weight())  # the same start for every seed: it is "pretrained"
    return model


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).float(), y)


def evaluate(model: nn.Module, data: Data) -> float:
    x, y = data.test
    return F.mse_loss(model(x).float(), y).item()


def recipe() -> Recipe:
    return Recipe(
        name="tiny-updates",
        description="updates below 2^-11 of the weights: f16 needs FP32 master weights; MSE",
        make_data=make_data,
        make_model=make_model,
        loss=loss,
        evaluate=evaluate,
        metric="mse",
        higher_is_better=False,
        steps=1000,
        batch_size=64,
        lr=2.0**-11,
        optimizer="adam",
        eps=1e-4,  # Adam's default 1e-8 is 0 in FP16: with 16-bit state (f16-pure) it would divide by zero
        max_grad_norm=None,
        eval_every=25,
    )
