"""`Trace`: what `trace_nonfinite` found (the phase, the op, the module, the counts) and how it reads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Trace"]


@dataclass(frozen=True)
class Trace:
    """Where non-finite values first appeared in a step (see `trace_nonfinite`).

    Attributes:
        phase: ``"forward"`` or ``"backward"``.
        module: qualified name of the innermost module running when the op ran (``""``: the model's own
            forward; ``None``: outside the model, e.g. the loss computed in ``run``).
        op: the op's name (``"matmul"``, ``"linear"``, ``"to"``); in backward, for a node no recorded op
            created (a custom ``autograd.Function``), the node's name (``"MyFnBackward"``).
        op_index: the op's position among the forward's ops (calls with floating outputs, in call
            order); None for such a node, or for the loss scaling itself.
        input_dtypes: forward: the op's floating inputs; backward: the gradients the node received.
        output_dtypes: forward: the op's floating outputs; backward: the gradients it produced.
        inf: how many values were infinite (forward: in the op's outputs; backward: in the gradients
            it produced).
        nan: how many were NaN (same tensors).
        parameter: backward: the parameter whose gradient the op made non-finite, if it did; forward:
            the parameter (or buffer) that already held non-finite values when the op read it.
        inputs_finite: False when the op read non-finite values that no recorded op had made (a
            parameter, a buffer, the model's input): the values were bad before the step began.
        fp8_saturated: on a model prepared with an FP8 policy, ``"layer (role)"`` of each FP8 cast that
            saturated in the replayed step (finite values clamped to the format's max), in layer order.

    Example:
        >>> print(Trace("forward", "h.0.attn", "matmul", 17, ("float16",), ("float16",), 12, 0))
        forward: first non-finite output at op 17 'matmul' in module 'h.0.attn' (float16 -> float16; 12 inf, 0 nan)
    """

    phase: str
    module: str | None
    op: str
    op_index: int | None
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    inf: int
    nan: int
    parameter: str | None = None
    inputs_finite: bool = True
    fp8_saturated: tuple[str, ...] = ()

    def __str__(self) -> str:
        saturated = self.fp8_saturated
        return self._where() + (f"; FP8 casts that saturated in this step: {', '.join(saturated)}" if saturated else "")

    def _where(self) -> str:
        where = ("outside the model" if self.module is None else
                 "in the model's own forward" if self.module == "" else f"in module '{self.module}'")
        what = f"op {self.op_index} '{self.op}'" if self.op_index is not None else f"autograd node '{self.op}'"
        dtypes = f"{', '.join(self.input_dtypes) or '-'} -> {', '.join(self.output_dtypes) or '-'}"
        counts = f"({dtypes}; {self.inf} inf, {self.nan} nan)"
        if self.phase == "forward":
            if self.inputs_finite:
                return f"forward: first non-finite output at {what} {where} {counts}"
            source = f"parameter '{self.parameter}'" if self.parameter else "its input"
            return f"forward: {what} {where} read non-finite values already in {source} {counts}"
        if self.op_index is None and self.op == "loss * loss_scale":
            return f"backward: the loss times loss_scale is already non-finite {counts}"
        into = f" into parameter '{self.parameter}'" if self.parameter else ""
        return f"backward: first non-finite gradient{into} from {what} {where} {counts}"
