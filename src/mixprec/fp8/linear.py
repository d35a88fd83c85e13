"""FP8 Linear layers: the three matmuls of ``y = x W^T + b`` on scaled FP8 operands, FP32 accumulation.

Forward ``x @ W^T``: x and W cast onto E4M3 with scales along the contraction dimension (in_features).
Backward: the output gradient cast onto the recipe's gradient format (E5M2 in the hybrid recipe), then
``grad_x = g @ W`` (contracted over out_features) and ``grad_W = g^T @ x`` (over the tokens), each operand
scaled along its own contraction dimension, as torchao.float8 does. The bias is added outside the FP8
matmul, in the output's dtype. The output and grad_x come back in the input's dtype (the layer's 16-bit
compute dtype inside mp.autocast), grad_W in the weight's.

Execution: *emulated* (anywhere): the operands' FP8 values (``bits / scale``) multiplied in FP32, as
torchao's ``emulate=True``: an emulated run saturates and underflows where a native one does; *native*
(CUDA with FP8 tensor cores, sm_89+; tensorwise, delayed and rowwise scales): ``torch._scaled_mm``
with the same bits and scales (inverse scales applied after FP32 accumulation).

`Fp8Layer` holds one layer's scaling state: delayed scaling's amax histories (input, weight, grad) and
the amaxes seen since they were last pushed (`pending`: the max over a step's micro-batches), which
`commit_` agrees across ranks (one all-reduce of every layer's 3 numbers) and pushes once a step, from
`mp.step`; a non-finite amax (an overflowing step) is not pushed. Evaluation (no grad, or
``model.eval()``) records nothing.

Example:
    >>> from mixprec.fp8.recipe import Fp8Recipe
    >>> layer = Fp8Layer("fc", Fp8Recipe.parse("tensorwise"))
    >>> x, w = torch.randn(4, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    >>> y, exact = fp8_linear(x, w, layer), x @ w.t()
    >>> y.shape, bool((y - exact).abs().max() < 0.15 * exact.abs().max())  # E4M3: 3 mantissa bits
    (torch.Size([4, 16]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .recipe import Fp8Recipe
from .scales import FP8_DTYPES, Scaled, amax_to_scale, scaled_cast

__all__ = ["Fp8Layer", "fp8_linear", "Fp8Forward", "commit_", "ROLES", "NATIVE_GRANULARITIES"]

#: The operands a layer scales, in the order of its history rows.
ROLES = ("input", "weight", "grad")
#: Granularities torch._scaled_mm takes on CUDA (the others run emulated there too).
NATIVE_GRANULARITIES = ("tensorwise", "delayed", "rowwise")
_PAD = 16  # _scaled_mm wants the contraction and output dims in multiples of 16


class Fp8Layer:
    """One FP8 Linear's recipe, execution and scaling state.

    Args:
        name: the module's qualified name (state dicts and reports use it).
        recipe: how its operands are scaled.
        native: compute with ``torch._scaled_mm`` (the caller checks the device can).
        device: where the delayed-scaling state lives.
    """

    def __init__(self, name: str, recipe: Fp8Recipe, native: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.name, self.recipe, self.native = name, recipe, native
        self.recording = False  # set by each forward: a training forward records amaxes
        self.recorded = False  # pending holds amaxes not pushed yet (host flag: no sync)
        self.history = torch.zeros(len(ROLES), recipe.history if recipe.delayed else 0, device=device)
        self.pending = torch.zeros(len(ROLES), device=device)
        self.observer: Callable[[str, str, torch.Tensor, Scaled], None] | None = None  # mp.watch's

    def cast(self, t: torch.Tensor, role: str, dim: int) -> Scaled:
        """`t` (2-D, contracted along `dim`) cast onto its role's FP8 format with the recipe's scales."""
        r = self.recipe
        dtype = FP8_DTYPES[r.grad_format if role == "grad" else r.forward_format]
        scale = self._delayed_scale(t, role, dtype) if r.delayed else None
        scaled = scaled_cast(t, dtype, r.granularity, dim, weight=role == "weight", block=r.block, pow2=r.pow2,
                             scale=scale)
        if self.observer is not None:
            self.observer(self.name, role, t, scaled)
        return scaled

    def _delayed_scale(self, t: torch.Tensor, role: str, dtype: torch.dtype) -> torch.Tensor:
        i = ROLES.index(role)
        amax = t.detach().abs().amax().to(torch.float32)
        if self.recording:
            self.pending[i] = torch.maximum(self.pending[i], amax)
            self.recorded = True
        history = self.history[i]
        past = history.amax() if self.recipe.algo == "max" else history[0]
        used = torch.where(past > 0, past, amax)  # nothing pushed yet: this tensor's own amax
        return (amax_to_scale(used, dtype, self.recipe.pow2) / 2.0**self.recipe.margin).reshape(1, 1)

    def push_(self, amaxes: torch.Tensor) -> None:
        """Push one amax per role onto the histories (a non-finite one, or 0 for a role not cast since the
        last push, is left out); clear `pending`."""
        rolled = torch.cat([amaxes[:, None], self.history[:, :-1]], dim=1)
        pushed = torch.isfinite(amaxes) & (amaxes > 0)
        self.history.copy_(torch.where(pushed[:, None], rolled, self.history))
        self.pending.zero_()
        self.recorded = False

    def matmul(self, a: torch.Tensor, a_role: str, b: torch.Tensor, b_role: str, out_dtype: torch.dtype,
               dims: tuple[int, int] = (1, 0)) -> torch.Tensor:
        """``a @ b`` on FP8 operands: `a` (M, K) and `b` (K, N) cast along K, accumulated in FP32."""
        qa, qb = self.cast(a, a_role, dims[0]), self.cast(b, b_role, dims[1])
        with torch.autocast(a.device.type, enabled=False):
            if self.native and self.recipe.granularity in NATIVE_GRANULARITIES:
                return _scaled_mm(qa, qb, out_dtype)
            return torch.mm(qa.dequantize(), qb.dequantize()).to(out_dtype)

    # ----- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain numbers: the histories, the pending amaxes and whether they hold any. Syncs: yes."""
        return {"history": self.history.tolist(), "pending": self.pending.tolist(), "recorded": self.recorded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = torch.tensor(state["history"], dtype=torch.float32)
        if history.shape != self.history.shape or len(state["pending"]) != len(ROLES):
            raise ValueError(f"FP8 layer {self.name!r}: the checkpoint's amax history has shape "
                             f"{tuple(history.shape)}, this recipe ({self.recipe}) keeps {tuple(self.history.shape)}; "
                             f"resume with the recipe that wrote it")
        self.history.copy_(history)
        self.pending.copy_(torch.tensor(state["pending"], dtype=torch.float32))
        self.recorded = bool(state["recorded"])


def _padded(bits: torch.Tensor, dim: int) -> torch.Tensor:
    extra = -bits.shape[dim] % _PAD
    if not extra:
        return bits
    shape = list(bits.shape)
    shape[dim] = extra
    return torch.cat([bits, torch.zeros(shape, dtype=bits.dtype, device=bits.device)], dim=dim)


def _scaled_mm(qa: Scaled, qb: Scaled, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm on the cast operands: a row-major, b column-major, the contraction dim padded
    with zeros to a multiple of 16, the inverse scales applied after FP32 accumulation."""
    a = _padded(qa.bits, 1).contiguous()
    b = _padded(qb.bits, 0).t().contiguous().t()
    out: torch.Tensor = torch._scaled_mm(a, b, scale_a=(1.0 / qa.scale).reshape(qa.scale.shape[0], -1),
                                         scale_b=(1.0 / qb.scale).reshape(-1, qb.scale.shape[-1]),
                                         out_dtype=out_dtype)
    return out


class _Fp8Linear(torch.autograd.Function):
    """``x @ w.T`` with FP8 operands forward and backward; gradients in their inputs' dtypes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, layer: Fp8Layer) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.layer, ctx.recording = layer, layer.recording
        return layer.matmul(x, "input", w.t(), "weight", x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        layer: Fp8Layer = ctx.layer
        recording, layer.recording = layer.recording, ctx.recording
        try:
            grad_x = layer.matmul(grad, "grad", w, "weight", x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = layer.matmul(grad.t(), "grad", x, "input", w.dtype) if ctx.needs_input_grad[1] else None
        finally:
            layer.recording = recording
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, layer: Fp8Layer,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with FP8 matmuls under `layer`'s recipe; x may have any leading dims.

    Inside torch.autocast the input is first cast to the autocast dtype (what F.linear would compute in).
    Syncs: no."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    flat = x.reshape(-1, x.shape[-1])
    with torch._C.DisableTorchFunction():  # per-op emulation's mode has nothing to do in here: skip its Python
        out: torch.Tensor = _Fp8Linear.apply(flat, weight, layer)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias.to(out.dtype)


class Fp8Forward:
    """The forward `mixprec.prepare` gives an FP8 Linear (an instance attribute; its class is untouched):
    FP8 matmuls while `active` says so (inside mp.autocast, or a recomputation of it), nn.Linear's own
    forward otherwise. A training forward (grad enabled, ``module.training``) records amaxes."""

    def __init__(self, module: torch.nn.Linear, layer: Fp8Layer, active: Callable[[], bool]) -> None:
        self.module, self.layer, self.active = module, layer, active

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        module = self.module
        if not self.active():
            return torch.nn.Linear.forward(module, input)
        self.layer.recording = torch.is_grad_enabled() and module.training
        return fp8_linear(input, module.weight, self.layer, module.bias)


def commit_(layers: Sequence[Fp8Layer], group: Any = None) -> None:
    """Push every layer's pending amaxes onto its histories, agreed across the ranks of `group` first (one
    all-reduce MAX of 3 numbers a layer, when torch.distributed is initialised). Call it at the same point
    on every rank (mixprec does: in `mp.step`, through the scaler). Syncs: no."""
    if not layers or not any(layer.recorded for layer in layers):
        return
    pending = torch.stack([layer.pending for layer in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(pending, op=dist.ReduceOp.MAX, group=group)
    for layer, amaxes in zip(layers, pending, strict=True):
        layer.push_(amaxes)
