"""Which parameters a live `MasterWeights` manages, so that `mp.step` refuses a plain optimizer over them."""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["managed", "add_live", "discard_live", "live_owners"]

#: Every MasterWeights with hooks on a model (weakly held): `managed` looks parameters up in them.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def add_live(owner: Any) -> None:
    """Count `owner` (a MasterWeights, with a ``_managed`` dict ``{id(param): param}``) among the live ones."""
    _LIVE.add(owner)


def discard_live(owner: Any) -> None:
    """`owner` manages nothing any more (its hooks are removed)."""
    _LIVE.discard(owner)


def live_owners() -> list[Any]:
    """Every MasterWeights with hooks on a model now (e.g. for `mp.trace_nonfinite`, which keeps their FP32
    gradients as they were around its re-run)."""
    return list(_LIVE)


def managed(params: list[torch.Tensor]) -> list[int]:
    """Positions in ``params`` of those a live `MasterWeights` steps through an FP32 master (or rounds
    back onto their format after each step). `mp.step` refuses a plain optimizer over such parameters:
    one built after ``mp.prepare`` would train the 16-bit weights without masters.

    Syncs: no (a dictionary look-up per parameter, and none while no MasterWeights is in use).

    Example:
        >>> from mixprec.master import MasterWeights
        >>> p, q = torch.nn.Parameter(torch.ones(2, dtype=torch.float16)), torch.nn.Parameter(torch.ones(2))
        >>> opt = MasterWeights(torch.optim.SGD([p], lr=0.1))
        >>> managed([q, p])
        [1]
    """
    owners = list(_LIVE)
    if not owners:
        return []
    return [i for i, p in enumerate(params) if any(o._managed.get(id(p)) is p for o in owners)]
