"""`digits`: a small CNN with BatchNorm on scikit-learn's bundled 8x8 handwritten digits.

The paper's image-classification result in miniature: no loss scaling needed, and mixed precision
lands within FP32's seed-to-seed spread. BatchNorm is there because the paper keeps its statistics
(a large reduction) in FP32; the policy does that by default.

Example:
    >>> r = recipe()
    >>> data = r.make_data()
    >>> tuple(data.train[0].shape[1:]), r.metric
    ((1, 8, 8), 'accuracy')
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Data, Recipe

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the split is part of the task: the same for every training seed


def make_data() -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixels are 0..16; scale to about unit range, as a data loader would.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(len(labels) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Data(
        train=(images[train], labels[train]),
        test=(images[test], labels[test]),
        info={"dataset": "sklearn.datasets.load_digits", "train_rows": len(train), "test_rows": n_test},
    )


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitsCNN(nn.Module):
    """8x8 -> 4x4 -> 2x2 feature maps, then a linear classifier over 10 classes."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(1, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
        )
        self.classifier = nn.Linear(4 * width * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def evaluate(model: nn.Module, data: Data) -> float:
    images, labels = data.test
    predictions = model(images).argmax(dim=1)
    return (predictions == labels).float().mean().item()


def recipe() -> Recipe:
    return Recipe(
        name="digits",
        description="CNN with BatchNorm on scikit-learn's 8x8 handwritten digits; accuracy",
        make_data=make_data,
        make_model=DigitsCNN,
        loss=loss,
        evaluate=evaluate,
        metric="accuracy",
        higher_is_better=True,
        steps=300,
        batch_size=64,
        lr=3e-3,
        optimizer="adam",
        max_grad_norm=1.0,
        warmup_steps=20,
        eval_every=25,
    )
