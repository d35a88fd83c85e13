"""Putting FP8 matmuls into a prepared model's Linear layers, and their scaling state into checkpoints.

`install` gives each Linear the policy chose (`ModulePrecision.fp8`, see ``explain()``) an `Fp8Layer` and
an `Fp8Forward` as its instance ``forward`` (nn.Linear's class and every other module are untouched;
`unprepare` removes it). `Fp8Histories` is delayed scaling's state, which the model's loss scaler carries:
`mp.step` pushes the step's amaxes (agreed across ranks) through it, and its state dict holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..versions import check_version
from .linear import Fp8Forward, Fp8Layer, commit_
from .recipe import Fp8Recipe

__all__ = ["install", "Fp8Histories"]

STATE_VERSION = 1


class _Restore:
    """A handle that takes a module's instance ``forward`` away again (its class's forward is back)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def install(model: torch.nn.Module, names: list[str], recipe: Fp8Recipe, native: bool, device: torch.device,
            active: Callable[[], bool]) -> tuple[dict[str, Fp8Layer], list[Any]]:
    """FP8 matmuls for the Linear layers `names` of `model` while ``active()``; returns the layers by name
    and the handles that undo it. Raises RuntimeError if one already has an instance forward."""
    modules = dict(model.named_modules())
    taken = [n for n in names if "forward" in vars(modules[n])]
    if taken:
        raise RuntimeError(f"module {taken[0]!r} already has its own instance forward (another tool replaced it): "
                           f"mixprec cannot put FP8 matmuls in it; keep it out with a rule '{taken[0]}:bf16'")
    layers = {n: Fp8Layer(n, recipe, native, device) for n in names}
    handles: list[Any] = []
    for name, layer in layers.items():
        module = modules[name]
        module.forward = Fp8Forward(module, layer, active)
        handles.append(_Restore(module))
    return layers, handles


class Fp8Histories:
    """Delayed scaling's state for a scaler's state dict: every FP8 layer's amax histories by name.

    Example:
        >>> from mixprec.fp8.linear import Fp8Layer
        >>> recipe = Fp8Recipe.parse("delayed:history=2")
        >>> h = Fp8Histories(recipe, {"fc": Fp8Layer("fc", recipe)})
        >>> h.state_dict()["layers"]["fc"]["history"]
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    """

    def __init__(self, recipe: Fp8Recipe, layers: dict[str, Fp8Layer]) -> None:
        self.recipe, self.layers = recipe, layers

    def step_(self, group: Any = None) -> None:
        """Push the step's amaxes onto the histories, agreed across the ranks of `group` (`commit_`): called by
        `mp.step` (every rank calls it), once per optimizer step, whether the step was applied or skipped."""
        commit_(list(self.layers.values()), group)

    def state_dict(self) -> dict[str, Any]:
        """Version, recipe and each layer's histories (plain numbers). Syncs: yes."""
        return {"version": STATE_VERSION, "recipe": str(self.recipe),
                "layers": {name: layer.state_dict() for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every layer's histories; all checked before any is changed."""
        self.check_state_dict(state)
        for name, layer in self.layers.items():
            layer.load_state_dict(state["layers"][name])

    def check_state_dict(self, state: Any) -> None:
        """Raise a ValueError unless `state` is delayed-scaling state of these layers and this history length."""
        if not isinstance(state, dict) or "layers" not in state:
            raise ValueError(f"the 'fp8' entry of this scaler state dict is not FP8 delayed-scaling state: "
                             f"{state!r:.80}")
        check_version(state.get("version"), STATE_VERSION, "FP8 scaling")
        names, mine = set(state["layers"]), set(self.layers)
        if names != mine:
            raise ValueError(f"the checkpoint's FP8 layers {sorted(names - mine)[:3]} are not this model's and "
                             f"{sorted(mine - names)[:3]} are missing from it: resume the same model under the same "
                             f"policy (its FP8 layers are listed by policy.explain(model))")
        saved = Fp8Recipe.parse(state["recipe"])
        if saved.history != self.recipe.history:
            raise ValueError(f"the checkpoint's FP8 recipe {saved} keeps {saved.history} amaxes a tensor, this one "
                             f"({self.recipe}) {self.recipe.history}: resume with fp8={saved}")
