"""The optimizer side of `mixprec.prepare`: wrapping it in `MasterWeights`, now or after the model.

`mixprec.prepare(model, optimizer, policy)` does both at once. Frameworks that wrap the model (DDP, FSDP)
before the optimizer exists (Lightning) prepare the model first, ``mp.prepare(model, None, policy)``,
which keeps each 16-bit parameter's FP32 original, and the optimizer later with `prepare_optimizer`:
the masters start from those originals, so the result is the one-call prepare's, bit for bit.
"""

from __future__ import annotations

import torch

from .formats import F32, Format
from .master import MasterWeights
from .policy import Policy
from .precisions import ModulePrecision, parameter_master_modes
from .scaling import LossScaler
from .state import prepared_state, unwrap
from .step import refuse_unscaled_step

__all__ = ["wrap_optimizer", "prepare_optimizer", "rule_modes"]


def wrap_optimizer(optimizer: torch.optim.Optimizer, policy: Policy, execution: str,
                   formats: list[tuple[torch.nn.Parameter, Format]], modes: dict[int, str],
                   originals: dict[int, torch.Tensor]) -> MasterWeights:
    """`optimizer` in a MasterWeights for `policy`'s master mode (`modes`: per parameter, from rules), its
    masters set to the parameters' FP32 `originals`; the stored parameters claimed (a second, plain
    optimizer over them is refused)."""
    mode = policy.master_mode
    # Emulated: per parameter, FP32 islands stay FP32 (their own masters), the rest emulate their format.
    wrapped = MasterWeights(optimizer, mode=mode, param_format=None if execution == "native" else dict(formats),
                            master_modes={p: modes[id(p)] for p, _ in formats if id(p) in modes})
    with torch.no_grad():
        for slot in wrapped.grad_slots:
            wrapped.set_master_(slot, originals[id(slot.param)].float())
    if mode != "none" or modes or execution == "emulated":  # a second, plain optimizer would step them wrongly
        wrapped.claim(p for p, fmt in formats if fmt != F32 and p.requires_grad)
    return wrapped


def prepare_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: LossScaler | None = None) -> torch.optim.Optimizer:
    """The optimizer to train a model prepared without one (``mp.prepare(model, None, policy)``) with.

    Build `optimizer` over the model's parameters after prepare (their Parameter objects are the same);
    this wraps it as the one-call ``mp.prepare(model, optimizer, policy)`` would have, the masters
    starting from the FP32 weights before prepare rounded them. Give the `scaler` prepare returned, so
    that ``optimizer.step()`` on still-scaled gradients is refused as after the one-call prepare.
    Under DDP: call it before mixprec's gradient hook is registered (before the first ``mp.autocast(ddp)``).
    Several optimizers over disjoint parameters (a GAN's generator and discriminator): call it for each;
    the FP32 originals of parameters not yet given to an optimizer are kept until one is.

    Raises:
        RuntimeError: the model is not prepared, some of the optimizer's parameters are stepped by an
            optimizer prepared already, or the model was prepared with its optimizer in one call.

    Example:
        >>> import mixprec as mp
        >>> model = torch.nn.Linear(2, 2)
        >>> model, _, scaler = mp.prepare(model, None, "f16-master")
        >>> opt = mp.prepare_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler)
        >>> type(opt).__name__, opt.param_groups[0]["params"][0].dtype
        ('MasterWeights', torch.float32)
    """
    inner = unwrap(model)
    state = prepared_state(inner)
    if state is None:
        raise RuntimeError("prepare_optimizer needs a prepared model: model, _, scaler = mp.prepare(model, None, "
                           "policy) first")
    mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
    taken = {id(slot.param) for slot in state.grad_slots} | {
        id(p) for weights in state.all_master_weights for p in weights.model_params}
    if mine & taken:
        raise RuntimeError("parameters of this optimizer are stepped by an optimizer prepared already (by mp.prepare "
                           "or prepare_optimizer): step the optimizer it returned; several optimizers (a GAN's "
                           "generator and discriminator) are prepared one by one, each over its own parameters")
    result: torch.optim.Optimizer = optimizer
    if not state.sharded:
        formats = [(p, state.param_formats[name]) for name, p in inner.named_parameters()]
        narrow = [id(p) for p, fmt in formats if fmt != F32 and id(p) in mine]
        modes = rule_modes(inner, state.policy, state.precisions)
        masters = state.policy.master is not None or any(modes.get(i, "none") != "none" for i in narrow)
        if state.master_weights is not None and state.originals is None and narrow and masters:
            raise RuntimeError("this model was prepared with its optimizer (mp.prepare(model, optimizer, policy)): "
                               "the FP32 values another optimizer's masters would start from are gone. Prepare the "
                               "model alone (mp.prepare(model, None, policy)), then each optimizer with "
                               "mp.prepare_optimizer(model, optimizer, scaler)")
        if narrow:
            result = wrap_optimizer(optimizer, state.policy, state.execution, formats, modes, state.originals or {})
            if state.master_weights is None:
                state.master_weights = result
            else:
                state.more_master_weights.append(result)
    # The FP32 originals of parameters no optimizer steps yet stay for the next one (4 bytes a parameter).
    left = {id(p) for p in inner.parameters()} - mine - taken
    state.originals = {k: v for k, v in (state.originals or {}).items() if k in left} or None
    if scaler is not None:
        state.handles.append(result.register_step_pre_hook(refuse_unscaled_step(scaler)))
    return result


def rule_modes(model: torch.nn.Module, policy: Policy, precisions: list[ModulePrecision]) -> dict[int, str]:
    """The master mode of each parameter whose module a policy rule gives one (by id); empty without such rules."""
    return parameter_master_modes(model, precisions) if any(r.master for r in policy.rules) else {}
