"""`MasterWeights`: wraps an optimizer, keeps each parameter's master in its mode (see `mixprec.master`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..formats import Format
from ..gradients import GradSlot
from ..wrapper import OptimizerWrapper
from .checkpoint import STATE_VERSION, check_state_dict, has_master_flags, slots_in_order
from .direct import DirectSteps
from .fp32 import FP32Masters
from .live import add_live, discard_live
from .modes import check_mode
from .plan import Assignment, Plan, new_group_params, plan_group, plan_optimizer
from .transient import SEPARABLE, TransientMasters

__all__ = ["MasterWeights"]


class MasterWeights(OptimizerWrapper):
    """Wrap an optimizer built over a model's 16-bit parameters so that it steps FP32 master copies.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters (not yet wrapped).
        mode: how each 16-bit parameter keeps its master (a param group's ``"master_mode"`` overrides it):
            ``"fp32"`` (an FP32 copy, the paper), ``"compact"`` (BF16 parameters: the low 16 bits of the
            FP32 master, the same masters in 2 bytes), ``"kahan"`` (a 16-bit compensation buffer),
            ``"stochastic"`` (no copy; the update is rounded stochastically), ``"none"`` (no copy; the
            optimizer steps the 16-bit parameters directly). See docs/loss-scaling-and-masters.md.
        param_format: for emulated training, the format that the float32 parameters' values are on
            (a `mixprec.Format` or its name), or a mapping ``{param: format}`` for per-parameter formats
            (float32 params not in it are FP32). Without it the format is read from each parameter's
            dtype (float16 -> F16, bfloat16 -> BF16; float32 parameters are their own masters).
        seed: mode "stochastic" rounds with a hash of (seed, step, parameter index, element): the same
            seed gives the same bits on any run, resume and number of ranks.
        master_modes: ``{param: mode}`` for parameters whose mode is not `mode` (a policy's rules, e.g.
            ``rule=lm_head:bf16//fp32``); a param group's ``"master_mode"`` overrides both.

    Raises:
        ValueError: a master mode but no parameter is 16-bit or emulated (masters would do nothing);
            ``param_format`` disagrees with a 16-bit parameter's dtype; an unknown mode, or one a
            parameter's format cannot keep ("compact" is for BF16 only).

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
        seed: int = 0,
        master_modes: Mapping[torch.Tensor, str] | None = None,
    ) -> None:
        if isinstance(optimizer, MasterWeights):
            raise TypeError("this optimizer is already wrapped in MasterWeights: pass the inner one")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"MasterWeights wraps a torch.optim.Optimizer built over the model's parameters, "
                f"got {type(optimizer).__name__}")
        super().__init__(optimizer)
        self.mode = check_mode(mode, "mode")
        self._assign = Assignment.parse(param_format, master_modes)
        self.param_format, self._formats_by_param = self._assign.param_format, self._assign.formats_by_param
        self._trust_fp32 = True  # whether the masters are kept where they round to their parameters
        self._masters_agree = False  # synced from the parameters once: equal on every rank from then on
        self._stepping = False  # inside step(): the inner optimizer may step
        # Mode "fp32": a GradSlot per parameter with an FP32 master; "compact", "kahan", "stochastic": one whose
        # master is rebuilt per step; "none", emulated: re-rounded.
        self._fp32, self._low, self._direct = FP32Masters([]), TransientMasters(seed), DirectSteps([])
        self._stores = (self._fp32, self._low)
        # Stepping the inner optimizer directly would update the masters and never the model.
        self._hooks: list[Any] = [optimizer.register_step_pre_hook(self._refuse_direct_step)]
        self._managed: dict[int, torch.Tensor] = {}
        plan, model_params = plan_optimizer(optimizer, self.mode, self._assign)
        self._model_params: list[torch.Tensor] = model_params  # every parameter, in param-group order
        self._take(plan)
        add_live(self)

    def _take(self, plan: Plan) -> None:
        """Keep the planned slots and rounded parameters: their hooks, and count them among those `managed`
        reports."""
        self._fp32.add(plan.fp32)
        self._low.add(plan.low, plan.modes, plan.indices)
        self._direct.rounded += plan.rounded
        slots = plan.fp32 + plan.low
        self._hooks += self._fp32.register_hooks(slots) + self._direct.register_hooks(plan.rounded)
        self._managed.update((id(p), p) for p in [s.param for s in slots] + [p for p, _ in plan.rounded])

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
        discard_live(self)

    # ----- what torch.optim.Optimizer users expect (param_groups, state: the inner optimizer's) ---------
    @property
    def model_params(self) -> list[torch.Tensor]:
        """The model's parameters, in param-group order."""
        return list(self._model_params)

    @property
    def master_params(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer steps (FP32 masters, or the params themselves), in order."""
        return [t for group in self.param_groups for t in group["params"]]

    @property
    def weight_values(self) -> list[torch.Tensor]:
        """`master_params` with a transient master's parameter in its place (finite where the master is)."""
        low = {id(s.master): s.param for s in self._low.slots}
        return [low.get(id(t), t) for t in self.master_params]

    @property
    def grad_slots(self) -> list[GradSlot]:
        """One `GradSlot` per parameter with a master, in any mode (for `mixprec.distributed`); read a master's
        value with `master_value` (a transient one holds none between steps)."""
        return self._fp32.slots + self._low.slots

    def _store(self, slot: GradSlot) -> FP32Masters:  # the store that keeps `slot`'s master
        return self._low if id(slot) in self._low.held else self._fp32

    def master_value(self, slot: GradSlot) -> torch.Tensor:
        """The FP32 master of one of `grad_slots`: an FP32 master where it still rounds to its parameter,
        a transient one rebuilt (a new tensor). Syncs: no."""
        return self._store(slot).value(slot)

    def set_master_(self, slot: GradSlot, value: torch.Tensor) -> None:
        """Make FP32 `value` the master of one of `grad_slots` (and round it into the parameter)."""
        self._store(slot).put_(slot, value)

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds masters between steps: FP32 masters, remainders, compensations."""
        return self._fp32.held_tensors() + self._low.held_tensors()

    def restamp_(self) -> None:
        """The parameters and `held_tensors` were overwritten together (a broadcast): they belong together."""
        self._low.restamp_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group of model parameters (e.g. layers unfrozen later in training).

        The group's parameters get masters as the constructor's do (its ``"master_mode"``, or this
        object's mode); the inner optimizer gets the group with the masters in it, and its options
        (``lr``, ``weight_decay``, ...) and defaults as usual. A new master starts from the parameter's
        value now (in 16 bits once prepared; the FP32 original of a frozen layer is not kept). Nothing
        changes if the group is refused.

        Raises:
            ValueError: a parameter is already in a param group of this optimizer, or an unknown mode.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)).half()
            >>> opt = MasterWeights(torch.optim.SGD(model[0].parameters(), lr=0.1))
            >>> opt.add_param_group({"params": model[1].parameters(), "lr": 0.01})
            >>> [g["lr"] for g in opt.param_groups], opt.param_groups[1]["params"][0].dtype
            ([0.1, 0.01], torch.float32)
        """
        params, mode = new_group_params(param_group, self._model_params)
        stepped, plan = plan_group(params, mode, self.mode, len(self._model_params), self._assign)
        self.optimizer.add_param_group({**param_group, "params": stepped})  # may refuse: nothing is ours yet
        self._model_params += params
        self._take(plan)

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
        # Across ranks without mixprec's DDP hook, the FP32 gradients are this rank's own (not reduced): not
        # trusted. The masters start from the parameters once (DDP gave every rank rank 0's); from then on
        # every rank updates them alike from the same reduced param.grad, so they stay equal and are kept.
        self._trust_fp32 = trust_fp32 or self._masters_agree
        for store in self._stores:
            store.settle_(trust_fp32, self._trust_fp32)
        self._masters_agree = True
        self._direct.round_grads_()
        return [t.grad for t in self.master_params if t.grad is not None]

    def release_grads_(self) -> None:
        """Drop the FP32 gradients of this step (done by `step` and by `mp.step`, applied or skipped).

        The 16-bit ``param.grad`` stay, as any optimizer leaves them: clear them with ``zero_grad``.
        Without it, the next backward accumulates onto ``param.grad`` as in plain PyTorch.
        """
        for store in self._stores:
            store.release_grads_()

    @torch.no_grad()
    def publish_grads_(self, settled: bool = True) -> None:
        """Round the FP32 gradients into the parameters' ``.grad`` (`mp.step` does, once it unscaled and
        clipped them): after the step, ``p.grad`` holds what the optimizer stepped on, unscaled, as
        torch.amp leaves it. With ``settled=False`` (`mp.unscale_`) the next step settles the FP32
        gradients against ``p.grad`` again, taking any edit made in between.

        Syncs: no.
        """
        for store in self._stores:
            store.publish_(settled)

    @torch.no_grad()
    def sync_masters_(self) -> None:
        """Keep each master only where it still rounds to its parameter; elsewhere take the parameter.

        Weights written into the model after prepare (``model.load_state_dict``, DDP's broadcast of
        rank 0's weights at construction, an EMA swap) are so what the next update starts from, while
        the masters' extra FP32 bits survive wherever the model was left alone. `collect_grads_` does this
        too, in its pass over the parameters (so `step` and `mp.step` do).

        Syncs: no.
        """
        for store in self._stores:
            store.sync_(self._trust_fp32)

    @torch.no_grad()
    def copy_to_model_(self, release_grads: bool = False) -> None:
        """Round the masters into the model's parameters (done by `step`; call it after editing masters).

        With ``release_grads``, also `release_grads_` in the same pass over the parameters (as `step` does).

        Syncs: no.
        """
        for store in self._stores:
            store.copy_to_model_(release_grads)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
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
        carried = self._direct.carry_in_16_bits(self.optimizer)  # mode "none", emulated: 16-bit arithmetic
        def run() -> Any:
            return self.optimizer.step() if closure is None else self.optimizer.step(self._on_masters(closure))

        whole = closure is not None or type(self.optimizer) not in SEPARABLE
        try:
            loss = self._low.step_(self.optimizer, run, whole) if self._low.slots else run()
        finally:
            self._stepping = False
            self._direct.put_back(self.optimizer, carried)
        self.copy_to_model_(release_grads=True)
        self._direct.round_after_step_()
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
        for store in self._stores:
            store.forget_step()

    # ----- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A versioned dict: the FP32 masters and the inner optimizer's state dict.

        The masters are FP32 in every mode (a transient master rebuilt: what the optimizer steps), so a
        state dict loads into a MasterWeights of any other master mode. Like torch's, it holds references
        to live tensors (FP32 masters): ``torch.save`` it (or deep-copy it) before training on. Loads with
        ``torch.load(weights_only=True)``.

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
            >>> sd = MasterWeights(torch.optim.SGD([p], lr=0.1)).state_dict()
            >>> sd["version"], sd["shapes"], sd["masters"][0].dtype
            (1, [[2]], torch.float32)
        """
        fmt = "per-parameter" if self._formats_by_param is not None else getattr(self.param_format, "name", None)
        return {
            "version": STATE_VERSION, "mode": self.mode, "param_format": fmt,
            "shapes": [list(p.shape) for p in self._model_params],
            "has_master": has_master_flags(self._model_params, self.grad_slots),
            "masters": [slot.master if self._store(slot) is self._fp32 else self._low.value(slot)
                        for slot in slots_in_order(self._model_params, self.grad_slots)],
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": type(self.optimizer).__name__,
            **({"stochastic": self._low.stochastic_state()} if self._low.steps else {})}


    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore masters and optimizer state, then round the masters into the model's parameters.

        The state dict may come from another master mode ("fp32", "compact", "kahan", "stochastic"): its
        FP32 masters are stored in this one's (e.g. a run resumed with compact masters).

        Raises:
            ValueError: a different version, a different set of parameters (count, shapes), or masters on
                different parameters (one side in mode "none").

        Example:
            >>> p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
            >>> a = MasterWeights(torch.optim.SGD([p], lr=0.1))
            >>> q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
            >>> MasterWeights(torch.optim.SGD([q], lr=0.1)).load_state_dict(a.state_dict()); q.tolist()
            [1.0, 1.0]
        """
        check_state_dict(state_dict, [list(p.shape) for p in self._model_params],
                         has_master_flags(self._model_params, self.grad_slots), self.optimizer)
        if "stochastic" in state_dict and self._low.steps:  # checked first, the stream the masters round with
            self._low.load_stochastic_state(state_dict["stochastic"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        slots = slots_in_order(self._model_params, self.grad_slots)
        with torch.no_grad():
            for slot, saved in zip(slots, state_dict["masters"], strict=True):
                self._store(slot).put_(slot, saved.to(slot.param.device, torch.float32))

    def __repr__(self) -> str:
        fmt = "" if self.param_format is None else f", param_format={self.param_format}"
        return f"MasterWeights({self.optimizer!r}, mode={self.mode!r}{fmt})"
