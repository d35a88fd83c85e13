"""mixprec in the Hugging Face Trainer and in Accelerate, one line each.

Trainer: ``Trainer(policy="f16-master", model=model, args=args, train_dataset=ds)`` — a subclass of
``transformers.Trainer`` that does, inside the Trainer's loop, what the README loop does by hand:

    model, optimizer, scaler = mp.prepare(model, optimizer, policy)   # create_optimizer(): once
    with mp.autocast(model):                                          # compute_loss_context_manager()
        loss = model(**batch).loss
    scaler.scale(loss).backward()                                     # a gradient hook on the loss
    info = mp.step(optimizer, scaler, max_grad_norm=args.max_grad_norm)  # the Trainer's optimizer.step()
    if info.applied: lr_scheduler.step()                              # accelerate's optimizer_step_was_skipped

Accelerate: ``model, optimizer, scaler = prepare_accelerated(accelerator, model, optimizer, policy)``,
then the README loop with ``accelerator.backward(scaler.scale(loss))``.

Only this module imports transformers and accelerate; ``import mixprec`` does not, and transformers is
imported only when ``Trainer`` is first used. See docs/integrations.md.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

import mixprec as mp

from . import step_logs

__all__ = ["Trainer", "check_accelerator", "prepare_accelerated"]  # noqa: F822 (Trainer: see __getattr__)

_INSTALL = 'pip install "mixprec[hf]"'


def check_accelerator(accelerator: Any) -> None:
    """Raise unless `accelerator` leaves mixed precision to mixprec.

    ``Accelerator(mixed_precision="fp16" | "bf16" | "fp8")`` would run torch.autocast and its own loss
    scaler on top of mixprec's policy (two scalers, casts that fight): mixprec needs ``"no"``. DeepSpeed,
    FSDP and Megatron-LM bring their own mixed precision and optimizer wrappers and are not supported.

    Raises:
        ValueError: ``accelerator.mixed_precision`` is not ``"no"``, or a distributed type mixprec does not
            support (DDP and a single device are supported).

    Example:
        >>> from accelerate import Accelerator
        >>> check_accelerator(Accelerator(cpu=True, mixed_precision="no"))  # fine: returns None
    """
    mixed = str(accelerator.mixed_precision)
    if mixed != "no":
        raise ValueError(
            f"the Accelerator does mixed precision itself (mixed_precision={mixed!r}), and so does mixprec's "
            f"policy: create it with Accelerator(mixed_precision='no') (also check ACCELERATE_MIXED_PRECISION "
            f"and the mixed_precision of your `accelerate config`), and let the policy choose the formats")
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        raise ValueError(
            f"mixprec does not run under Accelerate's {kind} (it wraps the optimizer and does mixed precision "
            f"its own way); supported: a single device or multi-GPU DDP (for FSDP2 use "
            f"mixprec.distributed.fully_shard, see docs/distributed.md)")


def prepare_accelerated(
    accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, policy: mp.Policy | str, *objects: Any
) -> tuple[Any, ...]:
    """`check_accelerator`, then ``mp.prepare`` and ``accelerator.prepare`` in the order that works.

    The order matters: ``mp.prepare`` needs the bare model on its training device (its FP32 masters and
    loss scaler are created where the parameters are, and it refuses a DDP-wrapped model), and
    Accelerate wraps the model (DDP) and the optimizer. So: move the model to ``accelerator.device``,
    ``mp.prepare``, then ``accelerator.prepare(model, optimizer, *objects)``. The loss scaler is registered
    for checkpointing, so ``accelerator.save_state`` / ``load_state`` save and restore it with the rest.

    Returns:
        ``(model, optimizer, scaler, *objects)``: the model as Accelerate prepared it (pass it to
        ``mp.autocast``), mixprec's optimizer (the `mixprec.MasterWeights` inside Accelerate's wrapper:
        pass it to ``mp.step``; Accelerate still holds it, e.g. for ``save_state``), the loss scaler, and
        `objects` (data loaders, ...) as ``accelerator.prepare`` returned them.

    Raises:
        ValueError: see `check_accelerator`.

    Example:
        >>> from accelerate import Accelerator
        >>> accelerator = Accelerator(cpu=True)
        >>> model = torch.nn.Linear(4, 2)
        >>> model, opt, scaler = prepare_accelerated(accelerator, model, torch.optim.AdamW(model.parameters()),
        ...                                          "f16-master")
        >>> type(opt).__name__, scaler.loss_scale
        ('MasterWeights', 65536.0)
        >>> with mp.autocast(model):
        ...     loss = model(torch.ones(3, 4)).mean()
        >>> accelerator.backward(scaler.scale(loss))
        >>> mp.step(opt, scaler, max_grad_norm=1.0).applied
        True
    """
    check_accelerator(accelerator)
    if accelerator.device_placement:
        model.to(accelerator.device)  # before mp.prepare: the masters and the scaler go where the model is
    model, prepared, scaler = mp.prepare(model, optimizer, policy)
    model, wrapped, *objects = accelerator.prepare(model, prepared, *objects)
    accelerator.register_for_checkpointing(scaler)
    # Accelerate's AcceleratedOptimizer.step would step without unscaling or checking: hand back the
    # optimizer inside it, the one mp.step takes.
    return (model, getattr(wrapped, "optimizer", wrapped), scaler, *objects)


class _StepOptimizer(mp.OptimizerWrapper):
    """The optimizer a framework steps: ``step()`` is ``mp.step(optimizer, scaler, max_grad_norm)``.

    It stands where the Trainer keeps its optimizer. It tells Accelerate that it is prepared already, so
    that Accelerate registers it as it is (not inside an AcceleratedOptimizer, whose step would skip the
    unscaling) and reads its ``step_was_skipped``: that is what the Trainer checks before stepping the
    LR scheduler. Param groups and state are the mixprec optimizer's (schedulers attach here).
    """

    _is_accelerate_prepared = True

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: mp.LossScaler, max_grad_norm: float | None) -> None:
        super().__init__(optimizer)
        self.scaler, self.max_grad_norm = scaler, max_grad_norm
        self.last_info: mp.StepInfo | None = None
        self.loss_was_scaled = False  # set by the Trainer's hook on the loss, checked and cleared by step()

    @property
    def step_was_skipped(self) -> bool:
        """Whether the latest step was skipped on an overflow (Accelerate's name for it)."""
        return self.last_info is not None and not self.last_info.applied

    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise ValueError("mixprec's optimizer step takes no closure")
        if not self.loss_was_scaled:
            # Unscaled gradients would be divided by the loss scale at the step: a silent, tiny update.
            raise RuntimeError(
                "the loss was not scaled before backward: a compute_loss override in a subclass of "
                "mixprec.integrations.hf.Trainer must return super().compute_loss(...)'s loss (or pass "
                "compute_loss_func=... to the Trainer instead of overriding compute_loss)")
        self.loss_was_scaled = False
        self.last_info = mp.step(self.optimizer, self.scaler, max_grad_norm=self.max_grad_norm)

    def state_dict(self) -> dict[str, Any]:
        # The scaler travels with the optimizer: Trainer checkpoints (and resumes) it without knowing.
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.scaler.load_state_dict(state_dict["scaler"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r}, max_grad_norm={self.max_grad_norm})"


# The Trainer methods overridden below that are not part of transformers' documented API: checked at
# construction, so that a transformers without them fails loudly instead of clipping scaled gradients.
_PRIVATE_HOOKS = {"_clip_grad_norm": ["self", "model"], "_get_grad_norm": ["self", "model", "grad_norm"]}


def _check_trainer_arguments(args: Any, policy: mp.Policy) -> None:
    """Refuse TrainingArguments that ask the Trainer for mixed precision of its own, and a transformers
    without the private Trainer methods the mixprec Trainer overrides."""
    import transformers  # imported already: the Trainer class subclasses it

    flags = [f for f in ("fp16", "bf16", "fp16_full_eval", "bf16_full_eval") if getattr(args, f, False)]
    if flags:
        raise ValueError(
            f"TrainingArguments({', '.join(f + '=True' for f in flags)}) asks the Trainer to do mixed "
            f"precision itself, and mixprec's policy {policy} does it already: drop "
            f"{' and '.join(flags)} from the TrainingArguments")
    for name, expected in _PRIVATE_HOOKS.items():
        method = getattr(transformers.Trainer, name, None)
        found = None if method is None else list(inspect.signature(method).parameters)
        if found != expected:
            shown = f"no Trainer.{name}" if found is None else f"Trainer.{name}({', '.join(found)})"
            raise RuntimeError(
                f"this transformers ({transformers.__version__}) has {shown}, which "
                f"mixprec.integrations.hf.Trainer overrides as {name}({', '.join(expected)}) to keep the Trainer "
                f"from clipping scaled gradients; use a transformers version where it is so (tested: 5.24, 5.25)")


# For the type checker the base is anything (transformers.Trainer comes after it in the MRO at run time).
_TrainerBase: Any = object


# The mixprec Trainer is `class Trainer(_TrainerMethods, transformers.Trainer)`, built by `_trainer_class` on
# first use; its docstring is this one.
class _TrainerMethods(_TrainerBase):
    """A ``transformers.Trainer`` that trains under a mixprec policy: master weights, loss scaling, `mp.step`.

    Args:
        policy: a `mixprec.Policy` or its string (``"f16-master"``), keyword only; every other
            argument is ``transformers.Trainer``'s. Pass the bare model (not yet ``mp.prepare``-d).

    Attributes:
        policy: the parsed policy.
        scaler: the loss scaler (None until training sets the optimizer up).
        last_step_info: the `mixprec.StepInfo` of the latest optimizer step (None before the first).

    What it changes in the Trainer's loop:

    * ``create_optimizer`` builds the Trainer's optimizer as usual, then ``mp.prepare(model, optimizer,
      policy)`` wraps it (FP32 masters); the LR scheduler is built over the result.
    * The forward and loss run inside ``mp.autocast`` (also in evaluation, once the model is prepared);
      the gradient of the loss is multiplied by the loss scale in backward (the logged loss is unscaled).
    * The optimizer step is ``mp.step``: unscale and check, clip to ``args.max_grad_norm`` (on the
      unscaled gradients; the Trainer's own clipping is off), step or skip, update the scale. The LR
      scheduler does not advance on a skipped step; ``state.global_step`` counts every step.
    * Training logs gain ``mixprec/loss_scale``, ``mixprec/skipped_steps`` and ``mixprec/grad_norm`` (the keys
      every integration logs); the Trainer's ``grad_norm`` is the unscaled norm.
    * The scaler's state is saved and restored with the optimizer's in Trainer checkpoints.

    Raises:
        ValueError: ``args.fp16`` / ``args.bf16`` (or their ``*_full_eval``) are set, or the Trainer's
            Accelerator does mixed precision or DeepSpeed / FSDP (see `check_accelerator`).

    Example (``model`` a ``transformers`` model whose forward returns a loss, ``ds`` a dataset)::

        args = TrainingArguments("out", max_steps=1000, max_grad_norm=1.0, logging_steps=10)
        trainer = mixprec.integrations.hf.Trainer(policy="f16-master", model=model, args=args,
                                                  train_dataset=ds)
        trainer.train()
        trainer.state.log_history[-2]    # {"loss": ..., "mixprec/loss_scale": 65536.0, ...}
    """

    optimizer: Any  # the Trainer's; a _StepOptimizer once create_optimizer ran

    def __init__(self, model: Any = None, args: Any = None, *more: Any, policy: mp.Policy | str,
                 **kwargs: Any) -> None:
        self.policy = mp.Policy.parse(policy)  # an invalid string raises here, before any set-up
        self.scaler: mp.LossScaler | None = None
        _check_trainer_arguments(args, self.policy)
        super().__init__(model, args, *more, **kwargs)
        check_accelerator(self.accelerator)  # e.g. ACCELERATE_MIXED_PRECISION=fp16 in the environment

    @property
    def last_step_info(self) -> mp.StepInfo | None:
        return self.optimizer.last_info if isinstance(self.optimizer, _StepOptimizer) else None

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if isinstance(self.optimizer, _StepOptimizer):  # a second train(): already prepared
            return self.optimizer
        # Before accelerator.prepare (which may wrap the model in DDP): mp.prepare takes the bare model.
        _, optimizer, self.scaler = mp.prepare(self.model, super().create_optimizer(model), self.policy)
        assert optimizer is not None  # an optimizer in, an optimizer out
        # No clipping asked for: measure the norm anyway (for the logs), as the Trainer does.
        clip = (self.args.max_grad_norm or 0) > 0
        self.optimizer = _StepOptimizer(optimizer, self.scaler, self.args.max_grad_norm if clip else float("inf"))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.optimizer is not None and not isinstance(self.optimizer, _StepOptimizer):
            # accelerate wrapped our optimizer after all: its step would skip mp.step's unscaling.
            raise RuntimeError(
                f"the Trainer's optimizer is a {type(self.optimizer).__name__}, not mixprec's: this "
                f"accelerate version wraps already-prepared optimizers; mixprec's Trainer cannot run on it")
        return scheduler

    def compute_loss_context_manager(self) -> Any:
        stack = super().compute_loss_context_manager()
        if mp.prepared_state(self.model) is not None:  # before the first train(): FP32, as built
            ddp = isinstance(self.model_wrapped, torch.nn.parallel.DistributedDataParallel)
            # The DDP wrapper, so that mp.autocast installs mixprec's gradient reduction hook on it.
            stack.enter_context(mp.autocast(self.model_wrapped if ddp else self.model))
        return stack

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if isinstance(self.optimizer, _StepOptimizer) and loss.requires_grad:
            # scaler.scale(loss).backward(), with the loss the Trainer logs left unscaled: the gradient
            # flowing into the loss is multiplied by S (the same product, 1.0 * S, as d(loss * S)).
            loss.register_hook(self._scale_gradient)
        return result

    def _scale_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        self.optimizer.loss_was_scaled = True
        return self.optimizer.scaler.scale(grad)  # self.scaler, typed

    # The Trainer clips and measures the gradients before optimizer.step(), where they are still
    # scaled (clipping by a norm S times too large, and a 16-bit norm may overflow): mp.step does both.
    def _clip_grad_norm(self, model: Any) -> None:
        return None

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> None:
        return None

    def log(self, logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        info = self.last_step_info
        if info is not None and "loss" in logs:  # a training log (evaluation logs have eval_loss)
            logs = {**logs, **step_logs(info)}
            if info.grad_norm is not None:  # the Trainer's own key, with the unscaled norm
                logs["grad_norm"] = info.grad_norm
        super().log(logs, *args, **kwargs)


@functools.cache
def _trainer_class() -> type:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"mixprec.integrations.hf.Trainer needs transformers: {_INSTALL}") from error

    class Trainer(_TrainerMethods, transformers.Trainer):
        __doc__ = _TrainerMethods.__doc__

    Trainer.__module__, Trainer.__qualname__ = __name__, "Trainer"  # pickles as mixprec.integrations.hf.Trainer
    return Trainer


def __getattr__(name: str) -> Any:
    # `Trainer` subclasses transformers.Trainer, so it is built on first use: Accelerate users of this
    # module need not have transformers installed, nor pay for importing it.
    if name == "Trainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
