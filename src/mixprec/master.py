"""FP32 master weights for any torch optimizer.

An update smaller than 2^-11 of its weight is lost when it is added in FP16 (half an FP16 ulp); over
many steps those lost updates are the difference between training and stalling. `MasterWeights` keeps
an FP32 copy of every 16-bit parameter, lets the wrapped optimizer step the copies, and rounds the
result back into the model's parameters for the next forward/backward (Micikevicius et al., 2018).

How it fits together:

* The wrapped optimizer's param groups are pointed at the FP32 masters, so its state (Adam moments,
  step counters) is FP32 and attached to the masters; LR schedulers attach to the `MasterWeights`
  (a `torch.optim.Optimizer`), whose ``param_groups`` *are* the inner optimizer's.
* Gradients live where PyTorch puts them: each 16-bit parameter's ``.grad`` is 16-bit, read and
  cleared as usual (``model.zero_grad()``, clipping, DDP); the master holds the same gradient in FP32,
  accumulated in FP32 across micro-batches, and the step consumes it (``release_grads_``). How the two
  stay one gradient: `mixprec.gradients`; what it costs: docs/distributed.md.
* The masters follow the model's weights the same way: before each update a master is kept only
  where it still rounds to its parameter, so weights written after prepare (``load_state_dict``,
  DDP's broadcast of rank 0's weights) are what the optimizer continues from.
* The master -> model copy is one ``torch._foreach_copy_`` per (device, dtype) group.

Modes (a string, so that compact / kahan / stochastic modes can be added as modes of this component):

* ``"fp32"``: FP32 masters for every 16-bit (or emulated) parameter. FP32 parameters (e.g. FP32
  islands such as norms) are their own masters: no copy.
* ``"none"``: no masters; the optimizer steps the 16-bit parameters directly (the paper's "without
  master weights" ablation). With emulation, parameters are rounded back onto the grid after each step.

A param group of the inner optimizer may carry a ``"master_mode"`` key to override ``mode`` for that
group.

Emulation: with ``param_format`` (a `mixprec.Format`), float32 parameters are taken to hold values on
that format's grid (e.g. FP16 values in FP32 storage, as the paper emulated FP16). Incoming gradients
are rounded onto the format first (a real 16-bit parameter's gradient is 16-bit), masters are rounded
back with `mixprec.quantize`. The emulated copy-back runs per tensor: emulation is for studying the
numerics on any machine, not the fast path.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from .formats import F32, FORMATS, Format
from .gradients import GradSlot, put_first, rounding_hook
from .quantize import quantize

__all__ = ["MasterWeights", "MODES", "managed"]

MODES = ("fp32", "none")
_PLANNED_MODES = ("compact", "kahan", "stochastic")
STATE_VERSION = 1
_STEPPED_IN_16_BITS = (torch.float16, torch.bfloat16)  # mode "none", emulated: the dtypes optimizers step in


#: Every MasterWeights with hooks on a model (weakly held): `managed` looks parameters up in them.
_LIVE: weakref.WeakSet[MasterWeights] = weakref.WeakSet()


def managed(params: list[torch.Tensor]) -> list[int]:
    """Positions in ``params`` of those a live `MasterWeights` steps through an FP32 master (or rounds
    back onto their format after each step). `mp.step` refuses a plain optimizer over such parameters:
    one built after ``mp.prepare`` would train the 16-bit weights without masters.

    Syncs: no (a dictionary look-up per parameter, and none while no MasterWeights is in use).

    Example:
        >>> p, q = torch.nn.Parameter(torch.ones(2, dtype=torch.float16)), torch.nn.Parameter(torch.ones(2))
        >>> opt = MasterWeights(torch.optim.SGD([p], lr=0.1))
        >>> managed([q, p])
        [1]
    """
    owners = list(_LIVE)
    if not owners:
        return []
    return [i for i, p in enumerate(params) if any(o._managed.get(id(p)) is p for o in owners)]


def _native_format(dtype: torch.dtype) -> Format | None:
    for fmt in FORMATS.values():
        if fmt.torch_dtype == dtype:
            return fmt
    return None


def _check_mode(mode: Any, where: str) -> str:
    if mode not in MODES:
        planned = ""
        if mode in _PLANNED_MODES:
            planned = f" ({', '.join(_PLANNED_MODES)} are planned, not built yet)"
        raise ValueError(f"{where} must be one of {list(MODES)}, got {mode!r}{planned}")
    return mode


class MasterWeights(torch.optim.Optimizer):
    """Wrap an optimizer built over a model's 16-bit parameters so that it steps FP32 master copies.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters (not yet wrapped).
        mode: ``"fp32"`` (masters) or ``"none"`` (step the 16-bit parameters directly).
        param_format: for emulated training, the format that the float32 parameters' values are on
            (a `mixprec.Format` or its name), or a mapping ``{param: format}`` for per-parameter formats
            (float32 params not in it are FP32). Without it the format is read from each parameter's
            dtype (float16 -> F16, bfloat16 -> BF16; float32 parameters are their own masters).

    Raises:
        ValueError: ``mode="fp32"`` but no parameter is 16-bit or emulated (masters would do nothing);
            ``param_format`` disagrees with a 16-bit parameter's dtype; an unknown mode.

    Example:
        >>> model = torch.nn.Linear(4, 2).half()
        >>> opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> opt.param_groups[0]["params"][0].dtype  # the optimizer now steps FP32 masters
        torch.float32
        >>> model(torch.ones(1, 4, dtype=torch.float16)).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> model.weight.dtype, model.weight.grad is None
        (torch.float16, True)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        mode: str = "fp32",
        param_format: Format | str | Mapping[torch.Tensor, Format | str] | None = None,
    ) -> None:
        if isinstance(optimizer, MasterWeights):
            raise TypeError("this optimizer is already wrapped in MasterWeights: pass the inner one")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"MasterWeights wraps a torch.optim.Optimizer built over the model's parameters, "
                f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.mode = _check_mode(mode, "mode")
        self._formats_by_param: dict[int, Format] | None = None
        if isinstance(param_format, Mapping):
            # Per-parameter formats (e.g. an emulated model with FP32 islands): absent params are FP32.
            self._formats_by_param = {id(p): Format.parse(f) for p, f in param_format.items()}
            self.param_format: Format | None = None
        else:
            self.param_format = None if param_format is None else Format.parse(param_format)
        self.defaults = optimizer.defaults
        # The hook registries torch.optim.Optimizer.__init__ would create (it is not called: the param
        # groups and state belong to the inner optimizer).
        for kind in ("step", "state_dict", "load_state_dict"):
            setattr(self, f"_optimizer_{kind}_pre_hooks", OrderedDict())
            setattr(self, f"_optimizer_{kind}_post_hooks", OrderedDict())

        self._model_params: list[torch.Tensor] = []  # every parameter, in param-group order
        self._slots: list[GradSlot] = []  # one per parameter with an FP32 master
        self._rounded: list[tuple[torch.Tensor, Format]] = []  # mode "none", emulated: re-round after step
        self._hooks: list[Any] = []
        self._trust_fp32 = True
        self._stepping = False  # inside step(): the inner optimizer may step
        self._build(optimizer)

        self._native_copy_groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for slot in self._slots:
            if not slot.emulated:
                models, masters = self._native_copy_groups.setdefault((slot.param.device, slot.param.dtype),
                                                                      ([], []))
                models.append(slot.param)
                masters.append(slot.master)
        self._register_hooks()
        # The parameters no plain optimizer may step while this object is in use (see `managed`).
        self._managed = {id(p): p for p in [s.param for s in self._slots] + [p for p, _ in self._rounded]}
        _LIVE.add(self)

    # ----- construction -----------------------------------------------------------------------------
    def _format_of(self, param: torch.Tensor, index: int) -> tuple[Format | None, bool]:
        """(format of the param's values, whether it is emulated in float32 storage)."""
        native = _native_format(param.dtype)
        if param.dtype == torch.float32:
            fmt = self.param_format
            if self._formats_by_param is not None:
                fmt = self._formats_by_param.get(id(param), F32)
            return (fmt, True) if fmt is not None and fmt != F32 else (None, False)
        if not param.is_floating_point():
            raise ValueError(
                f"parameter {index} has dtype {param.dtype}; MasterWeights needs floating-point parameters")
        if self.param_format is not None and native is not None and self.param_format != native:
            raise ValueError(
                f"parameter {index} is {param.dtype} but param_format is {self.param_format}: "
                f"param_format is for float32 parameters that emulate a narrower format; "
                f"leave it out for {param.dtype} parameters")
        return native, False

    def _build(self, optimizer: torch.optim.Optimizer) -> None:
        index = 0
        replaced: dict[torch.Tensor, torch.Tensor] = {}
        new_groups: list[list[torch.Tensor]] = []
        for g, group in enumerate(optimizer.param_groups):
            mode = _check_mode(group.get("master_mode", self.mode), f"param group {g}'s 'master_mode'")
            stepped = []
            for param in group["params"]:
                fmt, emulated = self._format_of(param, index)
                self._model_params.append(param)
                if mode == "fp32" and fmt is not None and fmt != F32:
                    master = param.detach().to(torch.float32, copy=True)
                    self._slots.append(GradSlot(param, master, fmt, emulated))
                    replaced[param] = master
                    stepped.append(master)
                else:
                    if mode == "none" and emulated:
                        self._rounded.append((param, fmt))
                    stepped.append(param)
                index += 1
            new_groups.append(stepped)
        wants_masters = any(g.get("master_mode", self.mode) == "fp32" for g in optimizer.param_groups)
        if wants_masters and not self._slots:
            dtypes = sorted({str(p.dtype) for p in self._model_params})
            raise ValueError(
                f"MasterWeights(mode='fp32') found no 16-bit parameters (dtypes: {', '.join(dtypes)}): "
                f"FP32 masters of FP32 parameters would do nothing. Use the plain optimizer, cast the "
                f"model to 16 bits first, or pass param_format=mp.F16 (say) to emulate 16-bit "
                f"parameters in FP32 storage")
        # Only now that every check passed, point the inner optimizer at the masters.
        for group, stepped in zip(optimizer.param_groups, new_groups, strict=True):
            if getattr(optimizer, "_params", None) is group["params"]:  # LBFGS keeps its group's list
                optimizer._params = stepped
            group["params"] = stepped
        # Existing optimizer state follows its parameter to the master, in FP32 (like load_state_dict).
        for param, master in replaced.items():
            if param in optimizer.state:
                state = optimizer.state.pop(param)
                optimizer.state[master] = _state_in(torch.float32, state)

    def _register_hooks(self) -> None:
        # Stepping the inner optimizer directly would update the masters and never the model.
        self._hooks.append(self.optimizer.register_step_pre_hook(self._refuse_direct_step))
        for slot in self._slots:
            if slot.param.requires_grad:  # first in PyTorch's order, before hooks users registered earlier
                p = slot.param
                self._hooks += [p.register_hook(slot.accumulate_hook),
                                p.register_post_accumulate_grad_hook(slot.write_back_hook)]
                put_first(p._backward_hooks, self._hooks[-2])
                put_first(p._post_accumulate_grad_hooks, self._hooks[-1])
        for param, fmt in self._rounded:
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(rounding_hook(fmt)))

    def claim(self, params: Any) -> None:
        """Count `params` (a prepared model's other 16-bit parameters, which this optimizer does not step)
        among those `managed` reports: `mp.step` then refuses a plain optimizer over them too."""
        self._managed.update((id(p), p) for p in params)

    def _refuse_direct_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._stepping:
            raise RuntimeError(
                f"this {type(optimizer).__name__} now steps FP32 master copies, not the model: step the "
                f"optimizer that mp.prepare (or MasterWeights) returned, e.g. model, optimizer, scaler = "
                f"mp.prepare(model, optimizer, policy); mp.step(optimizer, scaler)")

    def remove_hooks(self) -> None:
        """Detach the gradient hooks from the model's parameters (e.g. before dropping this object).

        After this, gradients accumulate in 16 bits on the model's parameters and `collect_grads_`
        converts them to FP32 at the step.
        """
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        _LIVE.discard(self)

    # ----- what torch.optim.Optimizer users expect ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (their ``"params"`` are the FP32 masters)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's state, keyed by master tensors."""
        return self.optimizer.state

    @property
    def model_params(self) -> list[torch.Tensor]:
        """The model's parameters, in param-group order."""
        return list(self._model_params)

    @property
    def master_params(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps (FP32 masters, or the params themselves), in order."""
        return [t for group in self.param_groups for t in group["params"]]

    @property
    def grad_slots(self) -> list[GradSlot]:
        """One `GradSlot` per parameter with an FP32 master (used by `mixprec.distributed`)."""
        return list(self._slots)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: add every group to the inner optimizer before wrapping it."""
        raise NotImplementedError(
            "MasterWeights cannot add param groups after construction: add the group to the inner "
            "optimizer first, then wrap it in MasterWeights")

    # ----- the hot path ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_grads_(self, trust_fp32: bool = True) -> list[torch.Tensor]:
        """Settle the gradients the optimizer will step on, and return them (and `sync_masters_`).

        For a parameter with a master: its FP32 gradient, kept where it still rounds to the 16-bit
        ``param.grad`` and taken from ``param.grad`` elsewhere (or wholly, with ``trust_fp32=False``:
        `mp.step` passes that when ranks exchanged gradients without mixprec's reduction, so that only
        what every rank agrees on is used). A parameter whose ``.grad`` is None has no gradient. In mode
        "none", the parameters' own gradients.

        Syncs: no.

        Example:
            >>> model = torch.nn.Linear(2, 1).half()
            >>> opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> model(torch.ones(1, 2, dtype=torch.float16)).sum().backward()
            >>> [g.dtype for g in opt.collect_grads_()], model.weight.grad.dtype
            ([torch.float32, torch.float32], torch.float16)
        """
        self._trust_fp32 = trust_fp32  # the masters are checked against the model the same way
        for slot in self._slots:
            if not slot.settled:  # once per step: after this, mp.step unscales master.grad in place
                trust = trust_fp32 or slot.reduced
                slot.settle_(trust)
                slot.sync_master_(trust)  # in the same pass: the masters the update starts from
                slot.settled = True
        for param, fmt in self._rounded:  # idempotent if the hook already rounded it
            if param.grad is not None:
                param.grad.copy_(quantize(param.grad, fmt))
        return [t.grad for t in self.master_params if t.grad is not None]

    def release_grads_(self) -> None:
        """Drop the FP32 gradients of this step (done by `step` and by `mp.step`, applied or skipped).

        The 16-bit ``param.grad`` stay, as any optimizer leaves them: clear them with ``zero_grad``.
        Without it, the next backward accumulates onto ``param.grad`` as in plain PyTorch.
        """
        for slot in self._slots:
            slot.release_()

    @torch.no_grad()
    def publish_grads_(self, settled: bool = True) -> None:
        """Round the FP32 gradients into the parameters' ``.grad`` (`mp.step` does, once it unscaled and
        clipped them): after the step, ``p.grad`` holds what the optimizer stepped on, unscaled, as
        torch.amp leaves it. With ``settled=False`` (`mp.unscale_`) the next step settles the FP32
        gradients against ``p.grad`` again, taking any edit made in between.

        Syncs: no.
        """
        for models, masters in self._native_copy_groups.values():
            pairs = [(p.grad, m.grad) for p, m in zip(models, masters, strict=True)
                     if p.grad is not None and m.grad is not None]
            if pairs:
                torch._foreach_copy_(*map(list, zip(*pairs, strict=True)))
        for slot in self._slots:
            if slot.emulated:
                slot.publish_()
            slot.settled = settled and slot.settled

    @torch.no_grad()
    def sync_masters_(self) -> None:
        """Keep each master only where it still rounds to its parameter; elsewhere take the parameter.

        Weights written into the model after prepare (``model.load_state_dict``, DDP's broadcast of
        rank 0's weights at construction, an EMA swap) are so what the next update starts from, while
        the masters' extra FP32 bits survive wherever the model was left alone. `collect_grads_` does this
        too, in its pass over the parameters (so `step` and `mp.step` do).

        Syncs: no.
        """
        for slot in self._slots:
            slot.sync_master_(self._trust_fp32 or slot.reduced)

    @torch.no_grad()
    def copy_to_model_(self, release_grads: bool = False) -> None:
        """Round the masters into the model's parameters (done by `step`; call it after editing masters).

        With ``release_grads``, also `release_grads_` in the same pass over the parameters (as `step` does).

        Syncs: no.
        """
        for models, masters in self._native_copy_groups.values():
            torch._foreach_copy_(models, masters)
        for slot in self._slots:
            if slot.emulated:
                slot.param.copy_(quantize(slot.master, slot.fmt))
            if release_grads:
                slot.release_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Settle the FP32 gradients, step the inner optimizer on the masters, round them into the model.

        Without a loss scaler this is the whole update; with one, call ``mp.step(optimizer, scaler)``,
        which unscales, checks and clips the FP32 gradients, then calls this (or skips it on overflow).
        A ``closure`` (for optimizers that re-evaluate the loss, e.g. LBFGS) is run at the masters, rounded
        into the model, and its gradients are taken in FP32; like torch.amp, closures go without loss
        scaling (a policy whose scaling is none, e.g. bf16-master). Returns what the inner step returns.

        Syncs: no (the inner optimizer may: e.g. capturable=False Adam on CUDA does not).

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
            >>> opt = MasterWeights(torch.optim.SGD([p], lr=2.0**-12))
            >>> for _ in range(4):
            ...     (p * 1.0).sum().backward(); opt.step(); opt.zero_grad()
            >>> opt.master_params[0].tolist(), p.tolist()  # 4 updates of 2^-12, each lost in FP16 alone
            ([0.9990234375, 0.9990234375], [0.9990234375, 0.9990234375])
        """
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        self.collect_grads_()  # and the masters follow the model (done already where mp.step collected)
        self._stepping = True
        carried = self._in_16_bits()
        try:
            loss = self.optimizer.step() if closure is None else self.optimizer.step(self._on_masters(closure))
        finally:
            self._stepping = False
            state = self.optimizer.state
            for params, i, param, low in carried:  # back into the FP32 parameter: values on the grid, exactly
                params[i] = param
                param.copy_(low)
                if low in state:
                    state[param] = state.pop(low)
        self.copy_to_model_(release_grads=True)
        for param, fmt in self._rounded:  # formats no optimizer can step in (FP8): rounded after the update
            if fmt.torch_dtype not in _STEPPED_IN_16_BITS:
                param.copy_(quantize(param, fmt))
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return loss

    def _on_masters(self, closure: Any) -> Any:
        """`closure` (which zeroes the gradients, runs forward and backward, returns the loss) evaluated where
        the optimizer asks (LBFGS's line search): at its masters, rounded into the model, their gradients in FP32."""
        def evaluate() -> Any:
            self.copy_to_model_(release_grads=True)
            with torch.enable_grad():
                loss = closure()
            self.collect_grads_()
            return loss
        return evaluate

    def _in_16_bits(self) -> list[tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor]]:
        """Mode "none", emulated: put in the optimizer, for the update, a copy of each parameter whose format
        has a torch dtype (f16, bf16) in that dtype, with its gradient and state, so that the optimizer's
        arithmetic (Adam's eps, its moments) is 16-bit as on a device with the format. The Parameter itself
        is left alone (a new .data would cut it from DDP's hooks). Returns what to put back."""
        formats = {id(p): fmt for p, fmt in self._rounded if fmt.torch_dtype in _STEPPED_IN_16_BITS}
        carried, state = [], self.optimizer.state
        for group in self.optimizer.param_groups if formats else ():
            params = group["params"]
            for i, param in enumerate(params):
                if id(param) in formats:
                    dtype = formats[id(param)].torch_dtype
                    low = param.detach().to(dtype)
                    low.grad = None if param.grad is None else param.grad.to(dtype)
                    if param in state:
                        state[low] = _state_in(dtype, state.pop(param))
                    params[i] = low
                    carried.append((params, i, param, low))
        return carried

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of both the model's parameters and the masters.

        ``model.zero_grad()`` works as well: the FP32 gradients follow the model's 16-bit ones.

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
            >>> opt = MasterWeights(torch.optim.SGD([p], lr=0.1))
            >>> p.sum().backward(); opt.zero_grad()
            >>> p.grad, opt.master_params[0].grad
            (None, None)
        """
        leftover = [p.grad for p in self._model_params if p.grad is not None]
        if set_to_none:
            for p in self._model_params:
                p.grad = None
        elif leftover:
            torch._foreach_zero_(leftover)
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for slot in self._slots:
            slot.reduced = slot.settled = False

    # ----- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """A versioned dict: the FP32 masters and the inner optimizer's state dict.

        Like torch's, it holds references to live tensors: ``torch.save`` it (or deep-copy it) before
        training on. Loads with ``torch.load(weights_only=True)``.

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
            >>> sd = MasterWeights(torch.optim.SGD([p], lr=0.1)).state_dict()
            >>> sd["version"], sd["shapes"], sd["masters"][0].dtype
            (1, [[2]], torch.float32)
        """
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "param_format": self._format_name(),
            "shapes": [list(p.shape) for p in self._model_params],
            "has_master": self._has_master_flags(),
            "masters": [slot.master for slot in self._slots],
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": type(self.optimizer).__name__}

    def _format_name(self) -> str | None:
        if self._formats_by_param is not None:
            return "per-parameter"
        return None if self.param_format is None else self.param_format.name

    def _has_master_flags(self) -> list[bool]:
        copied = {id(slot.param) for slot in self._slots}
        return [id(p) in copied for p in self._model_params]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore masters and optimizer state, then round the masters into the model's parameters.

        Raises:
            ValueError: a different version or mode, or a different set of parameters (count, shapes).

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
            >>> a = MasterWeights(torch.optim.SGD([p], lr=0.1))
            >>> q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
            >>> MasterWeights(torch.optim.SGD([q], lr=0.1)).load_state_dict(a.state_dict()); q.tolist()
            [1.0, 1.0]
        """
        keys = {"version", "mode", "param_format", "shapes", "has_master", "masters", "optimizer"}
        if not isinstance(state_dict, dict) or set(state_dict) - {"optimizer_type"} != keys:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a MasterWeights state dict: expected keys {sorted(keys)}, got {got}")
        if state_dict["version"] != STATE_VERSION:
            raise ValueError(
                f"MasterWeights state dict version {state_dict['version']!r} is not supported; "
                f"this mixprec reads version {STATE_VERSION}")
        if state_dict["mode"] != self.mode:
            raise ValueError(
                f"the state dict was saved with mode={state_dict['mode']!r}, this MasterWeights has "
                f"mode={self.mode!r}: create it with the same mode")
        saved, ours = state_dict["shapes"], [list(p.shape) for p in self._model_params]
        if len(saved) != len(ours):
            raise ValueError(
                f"the state dict holds {len(saved)} parameters, this MasterWeights has {len(ours)}: "
                f"it was saved for a different model or param groups")
        for i, (a, b) in enumerate(zip(saved, ours, strict=True)):
            if a != b:
                raise ValueError(
                    f"parameter {i}: saved shape {tuple(a)}, this MasterWeights has {tuple(b)}: "
                    f"the state dict was saved for a different model")
        if state_dict["has_master"] != self._has_master_flags():
            raise ValueError(
                "the state dict's masters belong to different parameters (their dtypes or the param_format "
                "differ): create the model and MasterWeights as when it was saved")
        ours, theirs = type(self.optimizer).__name__, state_dict.get("optimizer_type", type(self.optimizer).__name__)
        if theirs != ours:  # its state would load silently and fail at the first step (or step wrongly)
            raise ValueError(f"the state dict was saved over a {theirs}, this MasterWeights wraps a {ours}: "
                             f"build the same optimizer as when it was saved")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for slot, saved_master in zip(self._slots, state_dict["masters"], strict=True):
                slot.master.copy_(saved_master)
        self.copy_to_model_()

    def __repr__(self) -> str:
        fmt = "" if self.param_format is None else f", param_format={self.param_format}"
        return f"MasterWeights({self.optimizer!r}, mode={self.mode!r}{fmt})"


def _state_in(dtype: torch.dtype, state: dict[str, Any]) -> dict[str, Any]:
    # Optimizer state follows its parameter's dtype: floating state takes `dtype`, "step" stays as is.
    return {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() and key != "step"
            else value for key, value in state.items()}

