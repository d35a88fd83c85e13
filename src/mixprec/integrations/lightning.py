"""mixprec in Lightning, one line: ``Trainer(plugins=[mixprec.integrations.lightning.Precision("f16-master")])``.

The plugin does, inside Lightning's loop, what the README loop does by hand:

    model, _, scaler = mp.prepare(model, None, policy)                # convert_module(): before any DDP wrapper
    optimizer = mp.prepare_optimizer(model, optimizer, scaler)        # connect(): once the optimizer exists
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

from . import step_logs

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
        log_metrics: log ``mixprec/loss_scale``, ``mixprec/skipped_steps`` and ``mixprec/grad_norm`` (when
            clipping) with ``LightningModule.log`` after every optimizer step (values already on the host: no
            extra sync).

    Attributes:
        policy: the parsed policy.
        scaler: the loss scaler `mp.prepare` built (None until the trainer sets the model up).
        last_step_info: the `mixprec.StepInfo` of the latest optimizer step (None before the first).

    What it changes in Lightning's loop:

    * ``mp.prepare`` runs on the LightningModule and ``mp.prepare_optimizer`` on its optimizer when the trainer
      sets them up, and ``mp.unprepare`` when the trainer tears down (the model keeps its rounded weights).
    * ``Trainer(gradient_clip_val=...)`` clips by norm inside `mp.step`, on unscaled gradients;
      ``gradient_clip_algorithm="value"`` raises.
    * Schedulers with ``"interval": "step"`` do not step after a skipped optimizer step (automatic
      optimization). ``trainer.global_step`` still counts every step, applied or skipped.
    * The scaler's state is saved in checkpoints (key ``"Precision"``) and restored on resume.

    Strategies: one device, or DDP (``strategy="ddp"``, any number of devices or nodes): the module is
    prepared before Lightning wraps it (`convert_module`), its optimizer once Lightning builds it (`connect`),
    and mixprec's gradient reduction is registered on the DDP wrapper; every rank agrees on each skip.

    Several optimizers (a GAN's generator and discriminator, with manual optimization, as Lightning asks) are
    prepared one by one, each over its own parameters; ``optimizer.step()`` runs `mp.step` for that optimizer.

    Limits: no FSDP or DeepSpeed strategy (they shard parameters their own way);
    ``on_before_optimizer_step`` sees the scaled 16-bit gradients (`mp.step` unscales them);
    ``trainer.precision`` reads ``"32-true"`` (Lightning knows only its own strings: ``plugin.policy`` says
    what runs).

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
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Prepare the LightningModule under the policy, on its device, before the strategy wraps it (DDP) or
        builds the optimizer: the first half of a split ``mp.prepare`` (Lightning calls this once per run)."""
        if not isinstance(module, pl.LightningModule):
            raise TypeError(f"mixprec's Lightning plugin prepares the LightningModule, but the strategy handed it a "
                            f"{type(module).__name__}")
        if mp.prepared_state(module) is not None:
            raise RuntimeError(
                "this LightningModule is already prepared (mp.prepare was called on it): the plugin prepares it "
                "itself; pass the plain module, or call mp.unprepare(module) first")
        device = _root_device(module)
        if device is not None:
            module.to(device)  # the strategy would move it next: the masters and the scaler go where it trains
        _, _, self.scaler = mp.prepare(module, None, self.policy)
        self._module = module
        if self._saved_scaler_state is not None:
            self.scaler.load_state_dict(self._saved_scaler_state)
            self._saved_scaler_state = None
        return module

    def connect(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                lr_schedulers: list[Any]) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], list[Any]]:
        """Prepare the optimizer for the module `convert_module` prepared (``mp.prepare_optimizer``), and under
        DDP register mixprec's gradient reduction on the wrapper (Lightning calls this once the optimizers exist).

        The optimizer comes back as `mixprec.MasterWeights` when parameters are stored in 16 bits; step-interval
        schedulers come back wrapped so that they hold on skipped steps.
        """
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        module = model.module if ddp else model
        if not isinstance(module, pl.LightningModule):
            raise TypeError(
                f"mixprec's Lightning plugin trains a LightningModule on one device or under DDP "
                f"(strategy='ddp'), but the strategy handed it a {type(model).__name__}: FSDP and DeepSpeed "
                f"strategies shard the parameters their own way; use DDP, or mixprec's FSDP2 support in your own "
                f"loop (docs/distributed.md)")
        fitting = _fitting(module)
        if not fitting:
            # validate / test / predict build no optimizer (any here are left from an earlier fit): the model alone.
            optimizers = []
        _check_disjoint(optimizers)  # before anything is prepared
        if self._module is not module:  # called without convert_module (a direct call): prepare it now
            self.convert_module(module)
        # Each optimizer over its own parameters (a GAN's generator and discriminator: manual optimization).
        prepared = [mp.prepare_optimizer(module, optimizer, self.scaler) for optimizer in optimizers]
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            mp.distributed.register_comm_hook(model)  # the policy's reduce format (FP32 sums of the gradients)
        if fitting and module.automatic_optimization:  # manual optimization: the user steps schedulers
            for config in lr_schedulers:
                if config.interval == "step":
                    config.scheduler = _StepIfApplied(config.scheduler, self)
        return model, prepared, lr_schedulers

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
            for key, value in step_logs(info).items():  # the keys every integration logs
                model.log(key, value, on_step=True, on_epoch=False)
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


def _check_disjoint(optimizers: list[torch.optim.Optimizer]) -> None:
    """Several optimizers must step disjoint parameters (each gets its own masters)."""
    seen: set[int] = set()
    for n, optimizer in enumerate(optimizers):
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if mine & seen:
            raise ValueError(f"configure_optimizers returned optimizers that share parameters (optimizer {n} steps "
                             f"some an earlier one steps): mixprec gives each optimizer the masters of its own "
                             f"parameters; give each parameter to one optimizer (several param groups are fine)")
        seen |= mine


def _root_device(module: pl.LightningModule) -> torch.device | None:
    """The device the module's trainer trains it on (None without a trainer: leave it where it is)."""
    try:
        return torch.device(module.trainer.strategy.root_device)
    except RuntimeError:  # not attached to a Trainer
        return None


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
