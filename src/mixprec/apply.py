"""Applying a Policy to a model: `prepare` once, then `autocast` around each forward pass.

    model, optimizer, scaler = mp.prepare(model, optimizer, "f16-master")
    with mp.autocast(model):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    mp.step(optimizer, scaler)

Execution is **native** where the device has every format of the policy (CUDA: fp16, bf16; CPU when
asked for with ``execution=native``) and **emulated** elsewhere: per op by default (torch.autocast's
rules, 16-bit values, FP32 arithmetic: `mixprec.execution.emulated`), or at module boundaries with
``execution=emulated-module`` (`mixprec.execution.emulated_module`, the fallback for formats no 16-bit
dtype carries); `mixprec.execution.native` has the native model. The code names each mode by its policy
spelling (`PreparedState.mode`: native, emulated, emulated-module).

What `prepare` does (kept until `unprepare`): stores parameters in their format (native: cast in place,
same Parameter objects; emulated: rounded in place), rounds weight gradients onto it after each
accumulation (emulated), wraps the optimizer in `MasterWeights` when parameters are narrower than FP32,
builds the policy's loss scaler on the model's device, refuses ``optimizer.step()`` on gradients that
scaler scaled (a step pre-hook: `mp.step` unscales them), and keeps copies of `autocast`'s module hooks
that act only while activation checkpointing recomputes a forward in backward. What `autocast` does (only inside it):
torch.autocast and the FP32 islands' casts (native and per-op emulation), the FP32 arithmetic and the
parameter casts of per-op emulation, or the rounding hooks of module emulation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .distributed import register_comm_hook
from .ema import check_averaged, stored_weights
from .execution import emulated, emulated_module, hooks, native
from .formats import F32, Format
from .fp8.install import Fp8Histories
from .fp8.install import install as install_fp8
from .master import MasterWeights
from .policy import Policy
from .scaling import LossScaler
from .state import _STATE_ATTR, PreparedState, is_dtensor, is_sharded, prepared_state, unwrap
from .step import refuse_unscaled_step
from .wrapping import rule_modes, wrap_optimizer

__all__ = ["prepare", "autocast", "unprepare"]

def prepare(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    policy: Policy | str,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None, LossScaler]:
    """Apply `policy` to `model` (in place) and return ``(model, optimizer, scaler)`` to train with.

    Args:
        model: the model, already on its training device.
        optimizer: an optimizer built over the model's parameters (before prepare), or None. It is
            returned wrapped in `MasterWeights` when parameters are stored narrower than FP32 (FP32
            masters, or mode "none" for policies without masters).
        policy: a Policy or its string (``"f16-master"``).
        device: where the model runs; default: the device of its first parameter.

    `model` may be ``torch.compile(model)`` (or be compiled later): the module it wraps is prepared and
    the compiled one returned. Under FSDP2 (``fully_shard`` applied first, e.g. with
    `mixprec.distributed.fully_shard`), FSDP's sharded FP32 parameters are the masters and FSDP casts
    them: prepare leaves the parameters and the optimizer as they are and runs natively. With DDP,
    prepare first, then wrap.

    Raises:
        RuntimeError: the model is already prepared (call `unprepare` first).
        TypeError: the model is already wrapped in DistributedDataParallel (prepare, then wrap).
        ValueError: execution=native on a device without the policy's formats; under FSDP2, a policy
            without masters or execution=emulated.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model, opt, scaler = prepare(model, opt, "f16-master")
        >>> isinstance(opt, MasterWeights), scaler.loss_scale, prepared_state(model).execution
        (True, 65536.0, 'emulated')
    """
    policy = Policy.parse(policy)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        raise TypeError(
            f"prepare got a {type(model).__name__}: prepare the model first, then wrap it, e.g. "
            f"model, opt, scaler = mp.prepare(model, opt, policy); model = DistributedDataParallel(model)")
    given, model = model, unwrap(model)  # torch.compile(model) may come before prepare: prepare what it wraps
    sparse = [repr(name) for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
    if sparse:
        raise ValueError(f"module {', '.join(sparse)} has sparse=True, which makes sparse gradients; mixprec's loss "
                         f"scaling and master weights handle dense ones only: build it with sparse=False")
    unreal = [(n, p.dtype) for n, p in model.named_parameters() if not p.is_floating_point()]
    if unreal:
        raise TypeError(f"parameter {unreal[0][0]!r} has dtype {unreal[0][1]}: mixprec trains real floating-point "
                        f"parameters (stored in FP32, 16 or 8 bits). Keep a complex weight as two real ones "
                        f"(torch.view_as_real) or train this model without mixprec")
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ValueError("SparseAdam steps sparse gradients only, and mixprec's models make dense ones (sparse "
                         "embeddings are refused): use torch.optim.Adam or AdamW")
    if (already := prepared_state(model)) is not None:
        raise RuntimeError(
            f"this {type(model).__name__} is already prepared (policy {already.policy}); "
            f"prepare a model once, or call mp.unprepare(model) first to prepare it again")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    sharded = is_sharded(model)
    execution = _sharded_execution(policy, device) if sharded else policy.resolve_execution(device)
    precisions = policy.module_precisions(model, warn=True)
    rounding = {}  # per-op emulation: worked out (and formats it cannot carry refused) once, here
    if execution == "emulated" and policy.execution != "emulated-module":  # ops produce values in these formats:
        rounding = emulated.sub_carrier_formats([policy.output, *(mp.compute for mp in precisions)])

    # Each parameter's storage format is its module's (the widest of them, for tied weights).
    named = policy.parameter_formats(model, precisions)
    formats = list(named.values())

    fp8_names = [mp.name for mp in precisions if mp.fp8]  # FP8 matmuls: in place first (this may refuse)
    fp8_layers, handles = install_fp8(model, fp8_names, policy.fp8, policy.fp8_execution(device)[0] == "native",
                                      device, functools.partial(_fp8_active, model)) if policy.fp8 else ({}, [])
    kept = None
    if not sharded:  # FSDP2 keeps FP32 shards (the masters) and casts them for compute itself
        modes = rule_modes(model, policy, precisions)
        try:
            optimizer, more, kept = _apply(model, policy, execution, formats, optimizer, modes)
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        handles += more
    state = PreparedState(policy, execution, device, precisions,
                          {name: fmt for name, (_, fmt) in named.items()}, handles=handles,
                          master_weights=optimizer if isinstance(optimizer, MasterWeights) else None,
                          sharded=sharded, rounding=rounding, originals=kept, fp8_layers=fp8_layers)
    if policy.compute != F32 and state.mode != "emulated-module":
        state.autocast_dtype = (native.dtype_of if execution == "native" else emulated.carrier_of)(policy.compute)
    state.handles += _recompute_hooks(model, state)
    state.handles.append(model.register_load_state_dict_pre_hook(_refuse_assign))
    setattr(model, _STATE_ATTR, state)
    scaler = policy.make_scaler(device)
    if fp8_layers and policy.fp8 is not None and policy.fp8.delayed:  # the amax histories go with the scale
        scaler.attach("fp8", Fp8Histories(policy.fp8, fp8_layers))
    if optimizer is not None:  # optimizer.step() by hand on scaled gradients: refused
        state.handles.append(optimizer.register_step_pre_hook(refuse_unscaled_step(scaler)))
    return given, optimizer, scaler


def _refuse_assign(module: torch.nn.Module, state_dict: Any, prefix: str, local_metadata: dict, *args: Any) -> None:
    # load_state_dict(assign=True) would put new Parameter objects in the model, which neither the
    # masters nor the hooks know: refused before anything is loaded (the root's hook runs first).
    state = prepared_state(module)
    if local_metadata.get("assign_to_params_buffers", False) and state is not None and not state.is_copy:
        raise RuntimeError("load_state_dict(..., assign=True) on a prepared model would replace its parameters "
                           "behind their master weights and hooks: load with assign=False (it copies into them "
                           "and the masters follow), or load before mp.prepare")


def _recomputing(state: PreparedState) -> bool:
    """Whether a forward that ran inside `autocast` is being recomputed now, in backward: activation
    checkpointing (torch.utils.checkpoint) restores torch.autocast for it, and none of mixprec's hooks.
    Recognised by the autocast it restores (for policies whose autocast enters none, any forward of the
    model in backward), or by per-op emulation already following the recomputation of an outer module."""
    if torch.compiler.is_compiling() or state.in_autocast:
        return False
    if state.recomputing_in is not None:
        return True
    if torch._C._current_graph_task_id() == -1:  # not inside backward
        return False
    device, dtype = state.device.type, state.autocast_dtype
    return dtype is None or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype)


def _fp8_active(model: torch.nn.Module) -> bool:
    """Whether the FP8 Linear layers of `model` (a prepared model, or a copy of one) compute in FP8 now."""
    state = getattr(model, _STATE_ATTR, None)
    return state is not None and (state.in_autocast or _recomputing(state))


def _forward_hooks(model: torch.nn.Module, state: PreparedState, storage: dict[int, Format],
                   gate: Any = None) -> list[RemovableHandle]:
    """The module hooks a forward inside `autocast` runs with; with `gate`, acting only while it says so."""
    p = state.policy
    if state.mode == "emulated-module":
        return emulated_module.add_forward_rounding(model, state.precisions, storage, p.compute, p.output, gate)
    # Native, or per-op emulation: the native module hooks, in carrier dtypes.
    dtype_of = native.dtype_of if state.execution == "native" else emulated.carrier_of
    return native.add_forward_casts(model, state.precisions, p.compute, p.output, state.device.type, dtype_of, gate)


def _recompute_hooks(model: torch.nn.Module, state: PreparedState) -> list[RemovableHandle]:
    """Kept while prepared: the hooks of `autocast`, acting only while `_recomputing`, so that a forward
    recomputed by activation checkpointing runs as it ran inside `autocast` (same dtypes, same values).

    Per-op emulation also needs OpEmulation: entered before the first hook of the outermost module
    recomputed, left after its last, on every module (its hooks return at once outside a recomputation).
    """
    gate = functools.partial(_recomputing, state)
    handles = _forward_hooks(model, state, _storage_formats(model, state), gate)
    if state.mode != "emulated":
        return handles

    def enter(module: torch.nn.Module, args: Any) -> None:
        if state.recomputing_in is None:
            state.recomputing_in = module, emulated.OpEmulation(state.device.type, state.rounding).__enter__()

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        if state.recomputing_in is not None and state.recomputing_in[0] is module:
            state.recomputing_in[1].__exit__(None, None, None)
            state.recomputing_in = None

    for module in model.modules():  # gated too: outside a recomputation they return at once
        handles.append(module.register_forward_pre_hook(hooks.gated(enter, gate), prepend=True))
        handles.append(module.register_forward_hook(hooks.gated(leave, gate), always_call=True))
    return handles


def _apply(model: torch.nn.Module, policy: Policy, execution: str, formats: list[tuple[torch.nn.Parameter, Format]],
           optimizer: torch.optim.Optimizer | None, modes: dict[int, str]
           ) -> tuple[torch.optim.Optimizer | None, list[RemovableHandle], dict[int, torch.Tensor] | None]:
    """Store the parameters in their formats, wrap the optimizer, add the gradient hooks: all or nothing.

    The masters start from the parameters' values before rounding (the FP32 originals, as in the paper),
    and anything that raises half-way leaves the parameters, their gradients and the optimizer as they were.
    Without an optimizer, a policy with masters keeps the originals for `mixprec.prepare_optimizer`
    (returned third: 4 bytes a parameter until then).
    """
    narrow = [p for p, fmt in formats if fmt != F32]
    # Native casting replaces p.data (keeping a reference is free); emulation rounds in place (copy).
    originals = {id(p): (p.data if execution == "native" else p.detach().clone(), p.grad) for p in narrow}
    handles: list[RemovableHandle] = []
    try:
        if execution == "native":
            native.cast_parameters_(model, formats)
        else:
            hooks.round_parameters_(formats)
        if optimizer is not None and narrow:
            optimizer = wrap_optimizer(optimizer, policy, execution, formats, modes,
                                       {i: data for i, (data, _) in originals.items()})
        if execution == "emulated":
            # MasterWeights rounds the gradients of the parameters it steps; round the others' here.
            stepped = {id(p) for p in optimizer.model_params} if isinstance(optimizer, MasterWeights) else set()
            handles += hooks.add_gradient_rounding(
                (p, fmt) for p, fmt in formats if p.requires_grad and id(p) not in stepped)
    except BaseException:
        with torch.no_grad():
            for p in narrow:
                data, grad = originals[id(p)]
                if execution == "native":
                    p.data = data
                else:
                    p.copy_(data)
                p.grad = grad
        if execution == "native":
            native.flatten_rnns(model)
        for handle in handles:
            handle.remove()
        raise
    keep = optimizer is None and narrow and (policy.master is not None or bool(modes))
    return optimizer, handles, {i: data for i, (data, _) in originals.items()} if keep else None


def _sharded_execution(policy: Policy, device: torch.device) -> str:
    """FSDP2 casts the parameters itself, natively: check that the policy can run that way."""
    if policy.params != F32 and policy.master is None:
        raise ValueError(
            f"policy {policy} has no master weights, but FSDP2 keeps FP32 sharded parameters that take "
            f"the update (masters): use a master-weight policy (e.g. f16-master) or DDP")
    transient = [m for m in (policy.master_mode, *(r.master for r in policy.rules)) if m not in (None, "fp32", "none")]
    if transient:
        raise ValueError(
            f"master={transient[0]} under FSDP2 is not supported: FSDP2 keeps its sharded parameters in "
            f"FP32 and they are the masters (6 bytes a weight with BF16 compute already sharded across ranks); "
            f"use master=fp32 (e.g. bf16-master) with FSDP2, or DDP / one device for master={transient[0]}")
    if policy.execution.startswith("emulated"):
        raise ValueError(f"execution={policy.execution} under FSDP2 is not supported: FSDP2 casts the parameters to "
                         "16 bits natively; use execution=auto or native, or DDP for emulated runs")
    return policy.replace(execution="native").resolve_execution(device)


def unprepare(model: torch.nn.Module) -> None:
    """Remove what `prepare` attached (gradient hooks, those of the `MasterWeights` it created too, the
    prepared mark); parameters keep their values. Prepare again with a new optimizer, or train on plainly.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> _ = prepare(m, None, "f16-pure"); unprepare(m); prepared_state(m) is None
        True
    """
    state = prepared_state(model)
    if state is None:
        raise RuntimeError(f"this {type(model).__name__} is not prepared: nothing to undo")
    if state.in_autocast:
        raise RuntimeError("unprepare inside mp.autocast for the same model: leave the autocast block first")
    for handle in state.handles:
        handle.remove()
    for weights in state.all_master_weights:
        weights.remove_hooks()
    delattr(model, _STATE_ATTR)


def _storage_formats(model: torch.nn.Module, state: PreparedState) -> dict[int, Format]:
    """Each parameter's storage format, by id; in the same pass, check that the parameters are still the
    ones prepare saw (none added, none sharded since)."""
    storage: dict[int, Format] = {}
    added = []
    for name, param in model.named_parameters():
        if name not in state.param_formats:
            added.append(name)
        elif is_dtensor(param) and not state.sharded:
            raise RuntimeError(
                "fully_shard was applied after mp.prepare: the prepared parameters and masters are no longer "
                "the model's. Shard first (e.g. mp.distributed.fully_shard(model, policy)), then mp.prepare")
        else:
            storage[id(param)] = state.param_formats[name]
    if added:
        raise RuntimeError(
            f"parameters {added[:3]} were added to the model after mp.prepare, which gave them no format and "
            f"no master: build the whole model first, or mp.unprepare(model) and prepare it again")
    return storage


@contextlib.contextmanager
def autocast(model: torch.nn.Module, policy: Policy | str | None = None) -> Iterator[None]:
    """Run the forward passes of a prepared model under its policy, inside this block.

    Native: torch.autocast for the compute dtype, FP32 islands and output casts by module hooks.
    Emulated per op: the same, in carrier dtypes, with FP32 arithmetic for matmuls and convolutions.
    Emulated at module boundaries: module hooks round inputs, weights at use, outputs and (in
    backward) their gradients. Outside the block the hooks are gone and no torch setting is changed:
    an emulated model then computes in FP32 on its (rounded) parameters, e.g. for an FP32 evaluation.
    Backward may run after the block: the rounding of gradients is recorded in the graph during the forward,
    and a forward that activation checkpointing (torch.utils.checkpoint, e.g. Hugging Face's
    ``gradient_checkpointing_enable()``) recomputes in backward runs as it did inside the block
    (hooks that `prepare` keeps do that, and nothing else).

    `policy`, if given, must be the one the model was prepared with (a check against mix-ups).
    Every torch setting and hook it changes is restored on exit, also when the block raises.

    `model` may be the DistributedDataParallel wrapping a prepared model: the first such call
    registers mixprec's communication hook (`mixprec.distributed.register_comm_hook`), so that DDP
    reduces gradients as the policy's ``reduce`` says. It may be a copy of a prepared model, e.g. the
    ``AveragedModel`` of an EMA (`mixprec.ema`): inside the block its weights are what the prepared model
    would store for them (an EMA's FP32 averages rounded onto their formats), restored on exit.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> _ = prepare(model, None, "f16-pure")
        >>> with autocast(model):
        ...     y = model(torch.full((1, 3), 0.1))
        >>> bool(y == y.half().float())
        True
    """
    state = prepared_state(model)
    check_averaged(model, state)
    if state is None:
        raise RuntimeError(
            f"mp.autocast needs a prepared model: call model, optimizer, scaler = mp.prepare(model, "
            f"optimizer, {str(policy or 'policy')!r}) first")
    if policy is not None and Policy.parse(policy) != state.policy:
        raise ValueError(f"mp.autocast got policy {Policy.parse(policy)} but the model was prepared with "
                         f"{state.policy}; pass the same policy, or none")
    if state.in_autocast:
        raise RuntimeError("mp.autocast is already open for this model; do not nest it")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        register_comm_hook(model)  # once; a no-op afterwards
    model = unwrap(model)
    storage = _storage_formats(model, state)
    with contextlib.ExitStack() as stack:
        state.in_autocast = True
        stack.callback(setattr, state, "in_autocast", False)
        if state.autocast_dtype is not None:
            stack.enter_context(torch.autocast(state.device.type, dtype=state.autocast_dtype))
        if state.is_copy:  # a copy's weights may be wider than their formats (an EMA's FP32 averages)
            stack.enter_context(stored_weights(model, state))
        for handle in _forward_hooks(model, state, storage):
            stack.callback(handle.remove)
        if state.mode == "emulated":
            stack.enter_context(emulated.OpEmulation(state.device.type, state.rounding))
        yield
