"""`underflow`: activation gradients that live in [2^-27, 2^-24), as in the paper's SSD run.

The paper found that a detector's activation gradients mattered in [2^-27, 2^-24), where FP16
has nothing but zero and a few subnormals: without loss scaling the run diverged, with a scale of
8 it matched FP32. This task puts its gradients in the same band on purpose.

Task: regress a fixed random teacher network's 32 outputs with an L1 loss, weighted by 2^-14.5
(think of one small term of a multi-task loss). The L1 gradient has the same magnitude for every
element, LOSS_WEIGHT / (batch * 32) = 2^-25.5, so the gradient that enters the network at its output
is below half of FP16's smallest subnormal (2^-24) and rounds to zero: every gradient behind it,
activation and weight alike, is zero, and training stalls at its initial error. In FP32, or in FP16
with loss scaling (2^16 moves the band to [2^-11, 2^-8)), it trains normally. Weight gradients
themselves sum over the batch and are larger (about 2^-22): what underflows is the *activation*
gradient, as in the paper.

The optimizer is SGD with learning rate BASE_LR / LOSS_WEIGHT: in exact arithmetic that is the same
training as the unweighted loss with BASE_LR, so the weight only moves where the gradients sit on
the number line. Metric: mean absolute error on held-out inputs (lower is better).

Example:
    >>> r = recipe()
    >>> r.metric, r.optimizer
    ('mae', 'sgd')
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Data, Recipe

IN_FEATURES, HIDDEN, OUT_FEATURES = 32, 64, 32
BATCH_SIZE = 64
LOSS_WEIGHT = 2.0**-14.5  # output gradient = LOSS_WEIGHT / (BATCH_SIZE * OUT_FEATURES) = 2^-25.5
BASE_LR = 0.05
DATA_SEED = 1234  # the teacher and inputs are the task: fixed for every training seed


def make_data(train_rows: int = 4096, test_rows: int = 1024) -> Data:
    generator = torch.Generator().manual_seed(DATA_SEED)
    teacher = nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.Tanh(), nn.Linear(64, OUT_FEATURES))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        x = torch.randn(train_rows + test_rows, IN_FEATURES, generator=generator)
        y = teacher(x)
        y = y / y.std()  # unit-scale targets
    return Data(
        train=(x[:train_rows], y[:train_rows]),
        test=(x[train_rows:], y[train_rows:]),
        info={"generator": "seeded random teacher MLP", "data_seed": DATA_SEED, "loss_weight": LOSS_WEIGHT},
    )


def make_model() -> nn.Module:
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, OUT_FEATURES),
    )
    # He init in fan-out mode keeps the backward pass's gradient magnitudes layer to layer, so the
    # hidden activation gradients sit in the same band as the output gradient.
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return LOSS_WEIGHT * F.l1_loss(model(x).float(), y)


def evaluate(model: nn.Module, data: Data) -> float:
    x, y = data.test
    return (model(x).float() - y).abs().mean().item()


def recipe() -> Recipe:
    return Recipe(
        name="underflow",
        description="activation gradients in [2^-27, 2^-24): f16 needs loss scaling; MAE",
        make_data=make_data,
        make_model=make_model,
        loss=loss,
        evaluate=evaluate,
        metric="mae",
        higher_is_better=False,
        steps=300,
        batch_size=BATCH_SIZE,
        lr=BASE_LR / LOSS_WEIGHT,
        optimizer="sgd",
        momentum=0.9,
        max_grad_norm=None,  # a norm threshold would have to be rescaled by LOSS_WEIGHT too
        eval_every=25,
    )
