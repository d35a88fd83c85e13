"""`OptimizerWrapper`: a ``torch.optim.Optimizer`` that stands for another one.

`MasterWeights` and the Hugging Face integration's optimizer both wrap an optimizer and change what
``step`` does, while LR schedulers, ``zero_grad`` and checkpoints must see the inner optimizer's param
groups and state. This base forwards those once; subclasses override ``step`` (and what else differs).

Example:
    >>> import torch
    >>> class Counting(OptimizerWrapper):
    ...     steps = 0
    ...     def step(self, closure=None):
    ...         self.steps += 1
    ...         return self.optimizer.step(closure)
    >>> p = torch.nn.Parameter(torch.ones(1))
    >>> opt = Counting(torch.optim.SGD([p], lr=0.5))
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> p.grad = torch.ones(1); opt.step(); scheduler.step()
    >>> opt.steps, p.tolist(), opt.optimizer.param_groups[0]["lr"]
    (1, [0.5], 0.25)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Base for optimizers that wrap another: ``param_groups``, ``state`` and ``defaults`` are the inner's.

    ``torch.optim.Optimizer.__init__`` is not called (the param groups and state belong to the inner
    optimizer); the hook registries it would create are, so ``register_step_pre_hook`` and friends work.
    ``zero_grad``, ``add_param_group``, ``state_dict`` and ``load_state_dict`` go to the inner optimizer
    unless a subclass says otherwise.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap (``self.optimizer``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        for kind in ("step", "state_dict", "load_state_dict"):
            setattr(self, f"_optimizer_{kind}_pre_hooks", OrderedDict())
            setattr(self, f"_optimizer_{kind}_post_hooks", OrderedDict())

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (LR schedulers change them here)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's state."""
        return self.optimizer.state

    def step(self, closure: Any = None) -> Any:
        """The inner optimizer's step (subclasses change this)."""
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The inner optimizer's ``add_param_group``."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer."""
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
