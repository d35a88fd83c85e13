"""What a recipe is: data, a model, a loss, a metric and default hyperparameters.

A recipe is plain data (a frozen dataclass of functions and numbers), so your own task is one
``Recipe(...)`` away; see docs/experiments.md.

Example:
    >>> import torch
    >>> data = Data(train=(torch.arange(10.0),), test=(torch.arange(3.0),))
    >>> data.batch(step=0, batch_size=4, seed=0)[0].shape
    torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Data:
    """A task's tensors: rows of ``train`` are drawn in seeded batches, ``test`` is held out.

    ``info`` is recorded in results (e.g. a corpus hash), so a number can be traced to its data.
    """

    train: Batch
    test: Batch
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {len(t) for t in self.train}
        if len(sizes) != 1:
            raise ValueError(f"Data.train tensors must have the same number of rows, got {sorted(sizes)}")

    @property
    def train_size(self) -> int:
        return len(self.train[0])

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The training rows for ``step``: a pure function of (seed, step).

        Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch), so resuming
        at step k needs nothing but k: no sampler state to save, and no drift between runs.
        """
        n = self.train_size
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} rows)")
        per_epoch = n // batch_size  # drop the ragged tail: every batch has the same shape
        epoch, index = divmod(step, per_epoch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
        rows = order[index * batch_size : (index + 1) * batch_size]
        return tuple(t[rows] for t in self.train)


def _adam(params: Iterable[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, eps=recipe.eps)


def _adamw(params: Iterable[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, eps=recipe.eps)


def _sgd(params: Iterable[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], Recipe], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
}


@dataclass(frozen=True)
class Recipe:
    """A training task with its defaults. Every run of it is reproducible from a seed.

    The seed sets the model's initial weights (``make_model`` is called under ``torch.manual_seed``)
    and the batch order; the data itself is the same for every seed, so seeds measure the spread of
    training, not of the split.

    Fields:
        make_data: () -> Data, built once per comparison and shared by its runs.
        make_model: () -> nn.Module in FP32, on CPU; the training loop moves and prepares it.
        loss: (model, batch) -> scalar loss; runs inside ``mp.autocast``.
        evaluate: (model, data) -> the metric on ``data.test``; runs in eval mode, without grad,
            inside ``mp.autocast``.

    Example:
        >>> from mixprec.recipes import get_recipe
        >>> get_recipe("digits").metric
        'accuracy'
    """

    name: str
    description: str
    make_data: Callable[[], Data]
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module, Data], float]
    metric: str = "loss"
    higher_is_better: bool = False
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"  # a key of OPTIMIZERS, or give make_optimizer
    weight_decay: float = 0.0
    momentum: float = 0.9
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0  # linear warmup, then cosine decay to 10% of lr
    eval_every: int = 50
    make_optimizer: Callable[[Iterable[nn.Parameter], Recipe], torch.optim.Optimizer] | None = None

    def __post_init__(self) -> None:
        if self.make_optimizer is None and self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)} "
                "(or pass make_optimizer)"
            )
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Recipe.{name} must be >= 1, got {getattr(self, name)}")

    def build_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``params`` (FP32 model parameters, before ``mp.prepare``)."""
        make = self.make_optimizer or OPTIMIZERS[self.optimizer]
        return make(params, self)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """LR multiplier at ``step``: linear warmup, then cosine from 1 down to 0.1 at ``total_steps``."""
        import math

        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
