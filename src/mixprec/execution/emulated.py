"""Per-op emulated execution: torch.autocast's own per-op rules, FP32 arithmetic, 16-bit values.

Emulation on a device without fast 16-bit arithmetic (a CPU) must still do what native execution
does op by op: a matmul whose result exceeds 65504 gives inf, a loss computed inside forward is FP32,
the gradient of a 16-bit tensor is 16-bit. So it *is* native execution, with three changes:

* Rules: the real ``torch.autocast`` for the device runs, with each format's *carrier* dtype
  (`carrier_of`: float16 or bfloat16, whichever holds every value of the format). Which ops run in
  16 bits, which are forced to FP32 and which promote are torch's decisions, not a copy of its lists.
  FP32 islands and rules are the native module hooks (`mixprec.execution.native`), with carrier dtypes.
* Arithmetic: the ops a CPU runs slowly in 16 bits (`FP32_ARITHMETIC`: matmuls, convolutions,
  attention; all in torch.autocast's lower-precision lists) get their inputs rounded onto the carrier
  (as autocast would cast them), computed in FP32 (FP32 accumulation, as tensor cores do), and their
  output rounded back; in backward the same graph computes the input gradients in FP32 and rounds
  them onto the carrier. Every other op runs natively on the 16-bit tensors.
* Parameters stay FP32 tensors holding values on their storage format's grid (prepare rounds them;
  the FP32 masters and gradient hooks are shared with module emulation). While their module, or any
  module containing it, runs forward they are replaced by a cast to the carrier of their module's
  compute format (`mixprec.execution.native.add_parameter_casts`, one rule for both modes), so every op
  sees the dtype a native parameter is used in, also a parent reading a child's weight itself; an FP32
  module (or a BatchNorm, whose weights follow its FP32 statistics) uses them as they are. The cast's
  backward turns the 16-bit weight gradient into p.grad's FP32, and what the forward writes into the
  cast in place (Embedding's max_norm) is written back into the parameter.

Formats narrower than their carrier (FP8, custom formats) are tracked by dtype: every floating tensor
an op returns in that carrier dtype is rounded onto the format's grid, in forward and (its gradient)
in backward; an in-place result (``relu_``, ``+=``, ``F.relu(x, inplace=True)``) in place. Two such
formats sharing one carrier in one policy are refused.

What it cannot see: ops inside a Python function that is itself overridable and calls them (e.g. the
linears inside ``F.multi_head_attention_forward``) are not re-routed to FP32 arithmetic nor rounded
onto sub-carrier formats; they run natively in the carrier dtype (right values, slower on CPU).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..formats import BF16, F16, F32, Format
from .hooks import cast, map_floats, round_chain

_CARRIERS = ((torch.float16, F16), (torch.bfloat16, BF16))

#: Functions computed in FP32 on 16-bit inputs (each is in torch.autocast's lower-precision list on
#: CPU and CUDA, so native execution casts their floating inputs to the autocast dtype).
FP32_ARITHMETIC: frozenset[Callable] = frozenset({
    torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm,
    torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm, torch.Tensor.addbmm,
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, torch.nn.functional.scaled_dot_product_attention,
    # Recurrent layers: cuDNN and oneDNN run them on 16-bit inputs and weights with FP32 accumulation.
    torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu,
    torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell,
})


def _fits(fmt: Format, host: Format) -> bool:
    """Whether every value of `fmt` is exactly a value of `host`."""
    return (fmt.mantissa_bits <= host.mantissa_bits and fmt.max <= host.max
            and fmt.min_subnormal >= host.min_subnormal)


def carrier_of(fmt: Format) -> torch.dtype:
    """The torch dtype that carries `fmt`'s values in per-op emulation: its own dtype if torch has one
    (float32, float16, bfloat16), else the first of float16, bfloat16 holding all of its values.

    Raises:
        ValueError: the format fits in neither (e.g. more than 10 mantissa bits and a wider range than
            FP16's): per-op emulation cannot carry it; module emulation can.

    Example:
        >>> from mixprec.formats import E4M3
        >>> carrier_of(E4M3)
        torch.float16
    """
    if fmt == F32:
        return torch.float32
    for dtype, host in _CARRIERS:
        if fmt == host:
            return dtype
    for dtype, host in _CARRIERS:
        if _fits(fmt, host):
            return dtype
    raise ValueError(
        f"format {fmt.name} ({fmt.exponent_bits} exponent, {fmt.mantissa_bits} mantissa bits) fits in neither "
        f"float16 nor bfloat16, which carry a format's values in per-op emulation; use "
        f"execution=emulated-module (rounding at module boundaries) for it")


def sub_carrier_formats(formats: Iterable[Format]) -> dict[torch.dtype, Format]:
    """The formats values are computed in that are narrower than their carrier, by carrier dtype: the
    dtype stands for the format, and outputs in it are rounded onto the format's grid.

    Raises ValueError if one carrier would have to stand for two formats (a tensor's dtype is all
    per-op emulation knows of its format)."""
    by_carrier: dict[torch.dtype, set[Format]] = {}
    for fmt in formats:
        by_carrier.setdefault(carrier_of(fmt), set()).add(fmt)
    by_carrier.pop(torch.float32, None)
    for dtype, group in by_carrier.items():
        if len(group) > 1:
            raise ValueError(
                f"formats {' and '.join(sorted(f.name for f in group))} would both be carried as "
                f"{str(dtype).replace('torch.', '')} in per-op emulation, which knows a tensor's format by its "
                f"dtype; compute in one of them, or use execution=emulated-module")
    return {dtype: fmt for dtype, (fmt,) in by_carrier.items() if fmt not in (F16, BF16)}


@functools.cache
def _inplace_position(func: Callable) -> int | None:
    """Where `func` takes an ``inplace`` flag positionally (F.relu, F.dropout, ...), or None."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    return names.index("inplace") if "inplace" in names else None


def _in_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether `func` writes its result into its input: ``relu_``, ``__iadd__``, or ``F.relu(x, inplace=True)``
    (torch.nn.functional passes the flag as a keyword; by position too, for other callers)."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__") or name.startswith("__i"):
        return True
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    position = _inplace_position(func)
    return position is not None and len(args) > position and bool(args[position])


class OpEmulation(TorchFunctionMode):
    """The torch-function mode that gives FP32 arithmetic to `FP32_ARITHMETIC` functions and rounds the
    outputs of every function onto the sub-carrier formats (active inside `mp.autocast` only)."""

    def __init__(self, device_type: str, rounding: dict[torch.dtype, Format]) -> None:
        super().__init__()
        self.device_type, self.rounding = device_type, rounding

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dtype = self._arithmetic_dtype(args, kwargs) if func in FP32_ARITHMETIC else None
        if dtype is None:
            out = func(*args, **kwargs)
        else:
            def to_fp32(x: torch.Tensor) -> torch.Tensor:
                return x.to(dtype).float()  # onto the 16-bit grid (as autocast's cast), then FP32

            with torch.autocast(self.device_type, enabled=False):
                out = func(*map_floats(args, to_fp32), **map_floats(kwargs, to_fp32))
            out = map_floats(out, lambda y: y.to(dtype))
        return self._round(func, out, args, kwargs) if self.rounding else out

    def _arithmetic_dtype(self, args: tuple, kwargs: dict) -> torch.dtype | None:
        """The 16-bit dtype native execution would compute this call in, or None (leave it as it is)."""
        dtypes: set[torch.dtype] = set()

        def note(x: torch.Tensor) -> torch.Tensor:
            dtypes.add(x.dtype)
            return x

        map_floats((args, kwargs), note)
        if not dtypes or torch.float64 in dtypes:
            return None
        if torch.is_autocast_enabled(self.device_type):
            return torch.get_autocast_dtype(self.device_type)
        return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16} else None

    def _round(self, func: Callable, out: Any, args: tuple, kwargs: dict) -> Any:
        """Round every floating output in a sub-carrier dtype onto its format: new tensors with the
        gradient rounded too; an in-place result in place; a view (values already rounded) not at all."""
        inputs: set[int] = set()

        def note(x: torch.Tensor) -> torch.Tensor:
            inputs.add(x.untyped_storage().data_ptr())
            return x

        map_floats(args, note)

        def round_one(y: torch.Tensor) -> torch.Tensor:
            fmt = self.rounding.get(y.dtype)
            if fmt is None:
                return y
            if y.untyped_storage().data_ptr() not in inputs:
                return cast(y, (fmt,), (fmt,))
            if _in_place(func, args, kwargs):
                # Through .data: no version bump, so an op that saved its result for backward (relu_,
                # elu_) still runs it, on the rounded values (natively its result is in the format).
                y.data.copy_(round_chain(y.data, (fmt,)))
            return y

        return map_floats(out, round_one)
