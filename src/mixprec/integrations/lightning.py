"""mixprec in Lightning, one line: ``Trainer(plugins=[mixprec.integrations.lightning.Precision("f16-master")])``.

The plugin does, inside Lightning's loop, what the README loop does by hand:

    model, optimizer, scaler = mp.prepare(model, optimizer, policy)   # connect(): once per fit/validate/...
    with mp.autocast(model):                                          # forward_context(): every *_step
        loss = ...
    scaler.scale(loss).backward()                                     # pre_backward()
    info = mp.step(optimizer, scaler, max_grad_norm=gradient_clip_val)  # optimizer_step()
    if info.applied: scheduler.step()                                 # step-interval schedulers hold on a skip

Only this module imports Lightning (the ``lightning`` package, or ``pytorch_lightning`` where ``lightning``
is not installed); ``import mixprec`` does not. See docs/integrations.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

import mixprec as mp

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package: same classes under another name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError('mixprec.integrations.lightning needs Lightning: pip install "mixprec[lightning]"') from error

GradClipAlgorithmType = pl.utilities.GradClipAlgorithmType

__all__ = ["Precision"]


class Precision(pl.plugins.Precision):
    """A Lightning precision plugin that trains under a mixprec policy: master weights, loss scaling, `mp.step`.

    Args:
        policy: a `mixprec.Policy` or its string (``"f16-master"``, ``"f16-master,scaling=static:1024"``).
        log_metrics: log ``mixprec/loss_scale`` and ``mixprec/skipped_steps`` with ``LightningModule.log``
            after every optimizer step (values already on the host: no extra sync).

    Attributes:
        policy: the parsed policy.
        scaler: the loss scaler `mp.prepare` built (None until the trainer sets the model up).
        last_step_info: the `mixprec.StepInfo` of the latest optimizer step (None before the first).

    What it changes in Lightning's loop:

    * ``mp.prepare`` runs on the LightningModule and its optimizer when the trainer sets them up, and
      ``mp.unprepare`` when the trainer tears down (the model keeps its rounded weights).
    * ``Trainer(gradient_clip_val=...)`` clips by norm inside `mp.step`, on unscaled gradients;
      ``gradient_clip_algorithm="value"`` raises.
    * Schedulers with ``"interval": "step"`` do not step after a skipped optimizer step (automatic
      optimization). ``trainer.global_step`` still counts every step, applied or skipped.
    * The scaler's state is saved in checkpoints (key ``"Precision"``) and restored on resume.

    Limits: one optimizer; a single-device strategy (under DDP, Lightning wraps the model before the
    optimizers exist, and `mp.prepare` must come before the wrapper); ``on_before_optimizer_step`` sees
    the scaled 16-bit gradients (`mp.step` unscales them); ``trainer.precision`` reads ``"32-true"``
    (Lightning knows only its own strings: ``plugin.policy`` says what runs).

    Example:
        >>> plugin = Precision("f16-master")
        >>> str(plugin.policy) == str(mp.Policy.parse("f16-master")), plugin.scaler
        (True, None)

    With a LightningModule ``module`` and its ``train_loader``::

        trainer = lightning.Trainer(plugins=[Precision("f16-master")], gradient_clip_val=1.0, max_steps=100)
        trainer.fit(module, train_loader)
    """

    def __init__(self, policy: mp.Policy | str, *, log_metrics: bool = True) -> None:
        super().__init__()
        self.policy = mp.Policy.parse(policy)  # an invalid string raises here, before Lightning starts
        self.log_metrics = log_metrics
        self.scaler: mp.LossScaler | None = None
        self.last_step_info: mp.StepInfo | None = None
        self._module: pl.LightningModule | None = None
        self._max_grad_norm: float | None = None  # set by clip_gradients, used by the next mp.step
        self._hold_schedulers = False  # the latest optimizer step was skipped
        self._saved_scaler_state: dict[str, Any] | None = None  # a checkpoint read before setup

    # ----- setup ------------------------------------------------------------------------------------
    def connect(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                lr_schedulers: list[Any]) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], list[Any]]:
        """Prepare the module and its optimizer under the policy (Lightning calls this once per run).

        The optimizer comes back as `mixprec.MasterWeights` when parameters are stored in 16 bits; step-interval
        schedulers come back wrapped so that they hold on skipped steps.
        """
        if not isinstance(model, pl.LightningModule):
            raise TypeError(
                f"mixprec's Lightning plugin prepares the LightningModule itself, but the strategy handed it a "
                f"{type(model).__name__}: mp.prepare must run before a wrapper (DDP, FSDP, DeepSpeed) is applied, "
                f"and Lightning wraps before it builds the optimizers. Use a single-device strategy "
                f"(devices=1), or train with mixprec in your own loop (docs/distributed.md)")
        fitting = _fitting(model)
        if not fitting:
            # validate / test / predict build no optimizer (any here are left from an earlier fit): the model alone.
            optimizers = []
        if len(optimizers) > 1:
            raise ValueError(
                f"mixprec's Lightning plugin supports one optimizer, configure_optimizers returned {len(optimizers)}: "
                f"return one optimizer (several param groups are fine)")
        if mp.prepared_state(model) is not None:
            raise RuntimeError(
                "this LightningModule is already prepared (mp.prepare was called on it): the plugin prepares it "
                "itself; pass the plain module, or call mp.unprepare(module) first")
        optimizer = optimizers[0] if optimizers else None
        _, optimizer, self.scaler = mp.prepare(model, optimizer, self.policy)  # in place: `model` is prepared
        self._module = model
        if self._saved_scaler_state is not None:
            self.scaler.load_state_dict(self._saved_scaler_state)
            self._saved_scaler_state = None
        if fitting and model.automatic_optimization:  # manual optimization: the user steps schedulers
            for config in lr_schedulers:
                if config.interval == "step":
                    config.scheduler = _StepIfApplied(config.scheduler, self)
        return model, [] if optimizer is None else [optimizer], lr_schedulers

    def teardown(self) -> None:
        """Undo `mp.prepare` at the end of a run: hooks removed, the model keeps its (rounded) weights."""
        if self._module is not None and mp.prepared_state(self._module) is not None:
            mp.unprepare(self._module)
        self._module = None
        super().teardown()

    # ----- forward and backward ---------------------------------------------------------------------
    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """``mp.autocast(module)`` around training_step / validation_step / test_step / predict_step."""
        if self._module is None:
            raise RuntimeError("mixprec's Lightning plugin runs a forward before the trainer set the model up")
        with mp.autocast(self._module):
            yield

    def pre_backward(self, tensor: torch.Tensor, module: pl.LightningModule) -> torch.Tensor:  # type: ignore[override]
        """Scale the loss (automatic optimization and ``manual_backward`` alike)."""
        return super().pre_backward(self._scaler().scale(tensor), module)

    # ----- the step ---------------------------------------------------------------------------------
    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: pl.LightningModule,  # type: ignore[override]
                       closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Run the closure (training_step, zero_grad, backward), then ``mp.step``: unscale, check, clip, step or skip.

        Syncs: `mp.step`'s one.
        """
        if kwargs:
            raise TypeError(f"mixprec's optimizer step takes no extra arguments, got {sorted(kwargs)}")
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            # training_step returned None: no backward, nothing to step (as Lightning's own AMP plugin does).
            self._hold_schedulers = False
            return None
        # Lightning's hooks between backward and step (the helper its own AMP plugin calls): on_before_optimizer_step,
        # then configure_gradient_clipping, which reaches clip_gradients below and only records the norm for mp.step.
        self._after_closure(model, optimizer)
        max_grad_norm, self._max_grad_norm = self._max_grad_norm, None
        info = mp.step(optimizer, self._scaler(), max_grad_norm=max_grad_norm)
        self.last_step_info, self._hold_schedulers = info, not info.applied
        if self.log_metrics:
            model.log("mixprec/loss_scale", info.loss_scale, on_step=True, on_epoch=False)
            model.log("mixprec/skipped_steps", float(info.skipped_steps), on_step=True, on_epoch=False)
        return closure_result

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: Any = GradClipAlgorithmType.NORM) -> None:
        """Record the norm to clip to: `mp.step` clips the unscaled gradients (clipping here would see scaled ones)."""
        if clip_val <= 0:
            return
        if gradient_clip_algorithm != GradClipAlgorithmType.NORM:
            raise ValueError(
                f"mixprec clips gradients by their norm, inside mp.step, after unscaling; got "
                f"gradient_clip_algorithm={str(getattr(gradient_clip_algorithm, 'value', gradient_clip_algorithm))!r}"
                f": use gradient_clip_algorithm='norm'")
        self._max_grad_norm = float(clip_val)

    # ----- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state and the policy (Lightning stores it under the key ``"Precision"``)."""
        if self.scaler is None:
            return {}
        return {"policy": str(self.policy), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the loss scaler (now, or when the trainer sets the model up)."""
        if not state_dict:
            return
        if state_dict["policy"] != str(self.policy):
            raise ValueError(
                f"this checkpoint was trained under policy {state_dict['policy']!r}, the plugin has "
                f"{str(self.policy)!r}: resume with the same policy")
        if self.scaler is None:
            self._saved_scaler_state = state_dict["scaler"]
        else:
            self.scaler.load_state_dict(state_dict["scaler"])

    def _scaler(self) -> mp.LossScaler:
        if self.scaler is None:
            raise RuntimeError("mixprec's Lightning plugin has no scaler yet: the trainer has not set the model up")
        return self.scaler


def _fitting(module: pl.LightningModule) -> bool:
    """Whether the module's trainer is fitting (True without a trainer: a direct call builds what it is given)."""
    try:
        return module.trainer.state.fn == "fit"
    except RuntimeError:  # not attached to a Trainer
        return True


class _StepIfApplied:
    """A learning-rate scheduler that does not step after a skipped optimizer step; all else is the scheduler's.

    Lightning steps schedulers after every optimizer step, applied or not; the plugin swaps this in for
    step-interval schedulers (``state_dict``, ``optimizer``, ``get_last_lr``, ... reach the scheduler).
    """

    def __init__(self, scheduler: Any, plugin: Precision) -> None:
        self.scheduler = scheduler
        self._plugin = plugin

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._plugin._hold_schedulers:
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"StepIfApplied({self.scheduler!r})"
