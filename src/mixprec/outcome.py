"""What a step reports: `StepInfo` for every step, `NaNStormError` for a run that skipping cannot save.

Parameters are labelled ``"#i (shape 64x32)"`` (i: position among the optimizers' parameters) until a
model gives them names (`StepInfo.named`, `NaNStormError.named`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["StepInfo", "NaNStormError", "label"]


@dataclass(frozen=True)
class StepInfo:
    """What one `step` did.

    Attributes:
        applied: the optimizer stepped (gradients were finite). Step LR schedulers, EMAs and counters
            only when True.
        loss_scale: the loss scale this step's gradients were scaled by.
        grad_norm: total L2 norm of the unscaled gradients (inf/NaN on an overflow), or None when no
            clipping was asked for (pass ``max_grad_norm=float("inf")`` to measure without clipping).
        skipped_steps: steps skipped so far by this scaler, this one included.
        nonfinite: on a skipped step, the parameters whose gradients held inf/NaN on this rank, as
            ``{"#i (shape 64x32)": "inf" | "nan" | "inf, nan"}`` (i: position among the optimizer's
            parameters; `named` gives model names); ``{}`` when none did (the norm overflowed, or another
            rank's gradients did); None on an applied step (nothing is read for it).

    After ``mp.step(..., sync=False)``, ``applied``, ``loss_scale``, ``grad_norm`` and ``skipped_steps``
    are 0-dim tensors on the device (``bool(info.applied)`` reads one, and syncs), ``nonfinite`` is None.
    """

    applied: bool | torch.Tensor
    loss_scale: float | torch.Tensor
    grad_norm: float | torch.Tensor | None
    skipped_steps: int | torch.Tensor = 0
    nonfinite: dict[str, str] | None = None
    _params: tuple = field(default=(), repr=False, compare=False)

    def named(self, model: torch.nn.Module) -> dict[str, str] | None:
        """`nonfinite` with the parameters named as in `model`.

        Example:
            >>> import torch, mixprec as mp
            >>> model = torch.nn.Linear(2, 1)
            >>> model.weight.grad, model.bias.grad = torch.ones(1, 2), torch.tensor([float("inf")])
            >>> info = mp.step(torch.optim.SGD(model.parameters(), lr=0.1), mp.NoScaler())
            >>> info.applied, info.nonfinite, info.named(model)
            (False, {'#1 (shape 1)': 'inf'}, {'bias': 'inf'})
        """
        if self.nonfinite is None:
            return None
        names = {id(p): name for name, p in model.named_parameters()}
        return {names.get(id(p), label): kinds for (label, kinds), p in zip(self.nonfinite.items(), self._params,
                                                                            strict=True)}


class NaNStormError(RuntimeError):
    """`step` stopped a run whose steps keep being skipped, where skipping cannot end it.

    Raised when ``max_skips_in_a_row`` steps in a row had inf/NaN gradients (``reason="storm"``), or as
    soon as the weights themselves hold inf/NaN (``reason="weights"``; every later gradient would too).
    The step that raises was not applied: parameters, masters and optimizer state are those of the last
    applied step, the last good state.

    Attributes:
        reason: ``"storm"`` or ``"weights"``.
        skipped_in_a_row: consecutive skipped steps, the one that raised included.
        skipped_steps: steps the scaler skipped in all.
        loss_scale: the scale the last step's gradients were scaled by.
        gradients: ``{parameter: "inf" | "nan" | "inf, nan"}`` for the gradients that held them.
        weights: the same for the weights (FP32 masters, where a parameter has one).
        step: the training step, where the caller told it (`named`).
        checkpoint: where the caller saved the last good state, if it did (`named`).

    Parameters are labelled ``"#i (shape 64x32)"`` (i: position among the optimizer's parameters) until
    `named` gives them their names in a model.

    Example:
        >>> import mixprec as mp
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> p.grad = torch.tensor([float("nan"), 1.0])
        >>> try:
        ...     mp.step(torch.optim.SGD([p], lr=0.1), mp.NoScaler(), max_skips_in_a_row=1)
        ... except mp.NaNStormError as error:
        ...     print(error.gradients, error.loss_scale)
        {'#0 (shape 2)': 'nan'} 1.0
    """

    def __init__(self, reason: str, skipped_in_a_row: int, skipped_steps: int, loss_scale: float,
                 found: list[tuple[str, int, torch.Tensor, str]], names: dict[int, str] | None = None,
                 step: int | None = None, checkpoint: str | None = None) -> None:
        self._args = (reason, skipped_in_a_row, skipped_steps, loss_scale, found)
        self.reason, self.skipped_in_a_row, self.skipped_steps = reason, skipped_in_a_row, skipped_steps
        self.loss_scale, self.step, self.checkpoint = loss_scale, step, checkpoint
        labels = [(names or {}).get(id(p)) or label(i, p) for _, i, p, _ in found]
        self.gradients, self.weights = ({label: kinds for (w, _, _, kinds), label in zip(found, labels, strict=True)
                                         if w == where} for where in ("gradients", "weights"))
        super().__init__(self._message())

    def named(self, model: torch.nn.Module, step: int | None = None, checkpoint: str | None = None) -> NaNStormError:
        """The same error, with the parameters named as in ``model`` (and the step and checkpoint, if given).

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> error = NaNStormError("storm", 50, 50, 1.0, [("gradients", 1, model.bias, "nan")])
            >>> error.gradients, error.named(model, step=120).gradients
            ({'#1 (shape 1)': 'nan'}, {'bias': 'nan'})
        """
        names = {id(p): name for name, p in model.named_parameters()}
        return NaNStormError(*self._args, names, self.step if step is None else step, checkpoint or self.checkpoint)

    def _message(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.reason == "weights":
            text = (f"the weights of {_listed(self.weights)} hold inf/NaN{at}: every later step would be skipped "
                    f"(their gradients are inf/NaN too). Something other than a step wrote them (a NaN written "
                    f"into a master weight, say), or the optimizer made them from finite gradients (e.g. Adam "
                    f"with eps=0): restore the last good checkpoint")
        else:
            grads = _listed(self.gradients) or "none on the parameters (the unscaled values or their norm overflowed)"
            weights = f"; weights with inf/NaN: {_listed(self.weights)}" if self.weights else "; the weights are finite"
            text = (f"NaN storm{at}: {self.skipped_in_a_row} steps in a row were skipped (loss scale "
                    f"{self.loss_scale:g}, {self.skipped_steps} skipped in all); inf/NaN gradients in {grads}"
                    f"{weights}. A loss scale does not fix this: look for a NaN loss, an inf activation or bad "
                    f"data in these steps (or pass max_skips_in_a_row=None to mp.step to keep skipping)")
        return text + (f". The last good state is saved in {self.checkpoint}" if self.checkpoint else "")


def label(i: int, p: torch.Tensor) -> str:
    return f"#{i} (shape {'x'.join(map(str, p.shape)) or '()'})"


def _listed(found: dict[str, str], most: int = 6) -> str:
    items = [f"{label}: {kinds}" for label, kinds in found.items()]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more
