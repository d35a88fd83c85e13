"""What a policy gives each module of a model: the walk over the model, per-module rules, the explain table.

`Policy` (in `mixprec.policy`) is the value; this module reads a model with it: `module_precisions`
(what each module computes in and stores its parameters in, and why), `parameter_formats` (each
parameter's storage format, tied weights included) and `precision_table` (the rows of ``explain()``).

Example:
    >>> import mixprec as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    >>> [(m.name, m.compute.name, m.reason) for m in module_precisions(mp.Policy.parse("f16-master"), model)]
    [('', 'fp16', 'policy default'), ('0', 'fp16', 'policy default'), ('1', 'fp32', 'default fp32 island (LayerNorm)')]
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .formats import E4M3, E5M2, F32, Format
from .fp8.recipe import Fp8Recipe
from .master_modes import DESCRIPTIONS, MODES

__all__ = ["Rule", "ModulePrecision", "DEFAULT_FP32_TYPES", "module_precisions", "parameter_formats",
           "parameter_master_modes", "precision_table"]

#: Module type-name globs that run in FP32 by default (the paper: large reductions stay in FP32).
DEFAULT_FP32_TYPES: tuple[str, ...] = (
    "*BatchNorm*", "*LayerNorm", "*GroupNorm", "*RMSNorm", "*InstanceNorm*", "LocalResponseNorm",
    "Softmax", "LogSoftmax", "Softmin", "*Loss",
)


@dataclass(frozen=True)
class Rule:
    """Per-module precision: modules matching `match` compute in `compute` (first matching rule wins).

    `match` is a glob tried against the module's qualified name and its class names (the class and its
    bases): ``"lm_head"``, ``"encoder.layer.0.*"``, ``"*Norm"``. Prefix ``"name:"`` or ``"type:"`` to try
    only one of them. `params` is the storage format of the matched modules' own parameters; None means
    FP32 when `compute` is FP32 (an FP32 island) and the policy's params format otherwise. `master` is
    the master mode of those parameters ("fp32", "compact", "kahan", "stochastic", "none"); None means
    the policy's. A rule that names a module also applies to its children, unless they are default FP32
    islands or match a rule.

    Example:
        >>> Rule.parse("type:Embedding:fp32") == Rule("type:Embedding", F32)
        True
        >>> str(Rule("lm_head", "bf16", "fp32")), str(Rule.parse("embed:bf16//kahan"))
        ('lm_head:bf16/fp32', 'embed:bf16//kahan')
    """

    match: str
    compute: Format = F32
    params: Format | None = None
    master: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match.strip() or any(c in self.match for c in ",="):
            raise ValueError(
                f"a rule's match must be a non-empty glob without ',' or '=', got {self.match!r}")
        if self.match != self.match.strip():  # a policy string strips it: str(policy) would not parse back
            raise ValueError(f"a rule's match must not start or end with whitespace, got {self.match!r}: "
                             f"use {self.match.strip()!r}")
        object.__setattr__(self, "compute", Format.parse(self.compute))
        if self.params is not None:
            object.__setattr__(self, "params", Format.parse(self.params))
        if self.master is not None and self.master not in MODES:
            raise ValueError(f"a rule's master mode must be one of {list(MODES)}, got {self.master!r}: "
                             + "; ".join(f"{m}: {d}" for m, d in DESCRIPTIONS.items()))

    def matches(self, name: str, module: torch.nn.Module) -> bool:
        """Whether this rule selects `module` (qualified name `name`)."""
        kind, _, pattern = self.match.partition(":") if self.match.startswith(("name:", "type:")) else (
            "", "", self.match)
        if kind in ("", "name") and fnmatch.fnmatchcase(name, pattern):
            return True
        return kind in ("", "type") and any(
            fnmatch.fnmatchcase(cls.__name__, pattern) for cls in type(module).__mro__)

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``"MATCH:COMPUTE"``, ``"MATCH:COMPUTE/PARAMS"`` or ``"MATCH:COMPUTE/PARAMS/MASTER"`` (PARAMS may be
        empty: the default), e.g. ``"lm_head:fp32"``, ``"embed:bf16//kahan"``."""
        match, sep, formats = text.rpartition(":")
        if not sep or not match or formats.count("/") > 2:
            raise ValueError(
                f"a rule is written MATCH:COMPUTE, MATCH:COMPUTE/PARAMS or MATCH:COMPUTE/PARAMS/MASTER (e.g. "
                f"'lm_head:fp32', 'type:Embedding:bf16/fp32' or 'embed:bf16//kahan'), got {text!r}")
        compute, params, master = (formats.split("/") + ["", ""])[:3]
        return cls(match, Format.parse(compute), Format.parse(params) if params else None, master or None)

    def __str__(self) -> str:
        text = f"{self.match}:{self.compute.spec}" + (f"/{self.params.spec}" if self.params else "")
        return text + (("" if self.params else "/") + f"/{self.master}" if self.master else "")


@dataclass(frozen=True)
class ModulePrecision:
    """What a policy assigns to one module: read by explain(), mp.prepare and the reports."""

    name: str
    type_name: str
    params: Format  # storage format of the module's own parameters
    compute: Format  # format the module computes in (FP32 for islands)
    has_params: bool
    reason: str  # "policy default" | "default fp32 island (LayerNorm)" | "rule 1 (lm_head:fp32)" | ...
    master: str = "none"  # the master mode of its own parameters (a rule's, else the policy's)
    fp8: str = ""  # the FP8 recipe its matmuls run under (an FP8 Linear), else ""


class PolicyFormats(Protocol):
    """The fields of a `Policy` the walk reads."""

    @property
    def params(self) -> Format: ...
    @property
    def compute(self) -> Format: ...
    @property
    def master(self) -> Format | None: ...
    @property
    def master_mode(self) -> str: ...
    @property
    def rules(self) -> tuple[Rule, ...]: ...
    @property
    def fp8(self) -> Fp8Recipe | None: ...


def module_precisions(policy: PolicyFormats, model: torch.nn.Module, *, warn: bool = True) -> list[ModulePrecision]:
    """What every module of `model` gets under `policy`, in `named_modules` order, and why.

    Precedence: a rule matching the module itself, then the default FP32 islands, then a rule that
    matched an ancestor, then the policy's formats. Warns about user rules that match nothing.
    """
    rule_hits = [0] * len(policy.rules)
    inherited: dict[str, tuple[Format, Format, str, str]] = {}
    result = []
    for name, module in model.named_modules():
        own = next((i for i, r in enumerate(policy.rules) if r.matches(name, module)), None)
        island = next((p for p in DEFAULT_FP32_TYPES if any(
            fnmatch.fnmatchcase(c.__name__, p) for c in type(module).__mro__)), None)
        parent = inherited.get(name.rpartition(".")[0]) if name else None
        if own is not None:
            rule_hits[own] += 1
            rule = policy.rules[own]
            params = rule.params or (F32 if rule.compute == F32 else policy.params)
            chosen = (params, rule.compute, f"rule {own + 1} ({rule})", rule.master or policy.master_mode)
            inherited[name] = chosen
        elif island is not None:
            chosen = (F32, F32, f"default fp32 island ({type(module).__name__})", policy.master_mode)
        elif parent is not None:
            chosen = (parent[0], parent[1], f"{parent[2]} via parent", parent[3])
            inherited[name] = parent
        else:
            chosen = (policy.params, policy.compute, "policy default", policy.master_mode)
        has_params = any(p is not None for p in module._parameters.values())
        result.append(ModulePrecision(name, type(module).__name__, chosen[0], chosen[1], has_params,
                                      chosen[2], chosen[3]))
    if policy.fp8 is not None:
        result = _fp8_layers(policy, model, result)
    if warn:
        for rule, hits in zip(policy.rules, rule_hits, strict=True):
            if hits == 0:
                warnings.warn(f"policy rule {str(rule)!r} matched no module of {type(model).__name__}; "
                              f"check the name/type glob (see policy.explain(model))", stacklevel=4)
    return result


def _fp8_layers(policy: PolicyFormats, model: torch.nn.Module, found: list[ModulePrecision]) -> list[ModulePrecision]:
    """Which Linear layers an FP8 policy runs in FP8, and why the others are not.

    A rule (or an ancestor's) computing in an FP8 format (``e4m3``) asks for FP8 matmuls: its Linear layers
    get them, and its modules compute the rest in the policy's compute format. Otherwise every nn.Linear
    whose forward is nn.Linear's gets them except the first and last Linear layers (the most sensitive,
    as in torchao's and Transformer Engine's recipes), layers whose dims are not multiples of 16 (FP8
    tensor cores need them) and modules in FP32. Raises ValueError for a rule's layer that cannot be FP8."""
    by_name = dict(model.named_modules())
    linears = [mp.name for mp in found if isinstance(by_name[mp.name], torch.nn.Linear)]
    ends = {linears[0]: "first", linears[-1]: "last"} if linears else {}
    recipe = str(policy.fp8)
    result = []
    for mp in found:
        module, asked = by_name[mp.name], mp.compute in (E4M3, E5M2)
        if asked:  # the matmuls in FP8 (below), everything else in the policy's compute format
            mp = replace(mp, compute=policy.compute, params=mp.params if mp.params != mp.compute else policy.params)
        if not isinstance(module, torch.nn.Linear):
            result.append(mp)
            continue
        parent = by_name[mp.name.rpartition(".")[0]] if mp.name else None
        why = _not_fp8(module, mp, policy.compute) or (
            "MultiheadAttention uses its weight in its own function, not through its forward"
            if isinstance(parent, torch.nn.MultiheadAttention) else None)
        if why and asked:
            raise ValueError(f"{mp.reason} asks for FP8 matmuls in {mp.name!r}, but {why}: "
                             f"drop that module from the rule (e.g. a rule '{mp.name}:{policy.compute.spec}' first)")
        ruled = mp.reason.startswith("rule")  # a rule in another format than FP8 keeps the layer out
        if why is None and not asked and (ruled or mp.name in ends):
            why = "" if ruled else f"the {ends[mp.name]} Linear layer"
        if why is None:
            mp = replace(mp, fp8=recipe, reason=f"{mp.reason}; fp8 {recipe}")
        elif why and mp.compute != F32:
            mp = replace(mp, reason=f"{mp.reason}; not fp8: {why}")
        result.append(mp)
    return result


def _not_fp8(module: torch.nn.Linear, mp: ModulePrecision, default: Format) -> str | None:
    """Why this Linear cannot run its matmuls in FP8 (None: it can)."""
    if mp.compute == F32 and default != F32:
        return "it computes in FP32"
    if type(module).forward is not torch.nn.Linear.forward:
        return f"{type(module).__name__} has its own forward (mixprec replaces nn.Linear's only)"
    if module.in_features % 16 or module.out_features % 16:
        return f"its dims {module.in_features}x{module.out_features} are not multiples of 16"
    return None


def parameter_formats(model: torch.nn.Module, precisions: list[ModulePrecision]
                      ) -> dict[str, tuple[torch.nn.Parameter, Format]]:
    """Each parameter's storage format, by its first qualified name (as in named_parameters).

    A parameter owned by several modules (tied embeddings) is stored in the widest of their formats
    (the first one when neither is wider), so that a rule asking for more precision is honoured;
    each module still rounds it onto its own compute format at use.
    """
    by_name = dict(model.named_modules())
    found: dict[int, tuple[str, torch.nn.Parameter, Format]] = {}
    for mp in precisions:
        for pname, p in by_name[mp.name]._parameters.items():
            if p is None:
                continue
            if id(p) not in found:
                found[id(p)] = (f"{mp.name}.{pname}" if mp.name else pname, p, mp.params)
                continue
            name, _, fmt = found[id(p)]
            wider = mp.params.exponent_bits >= fmt.exponent_bits and mp.params.mantissa_bits >= fmt.mantissa_bits
            if wider:
                found[id(p)] = (name, p, mp.params)
    return {name: (p, fmt) for name, p, fmt in found.values()}


def parameter_master_modes(model: torch.nn.Module, precisions: list[ModulePrecision]) -> dict[int, str]:
    """Each parameter's master mode, by id: its module's; a parameter several modules own (tied weights)
    takes "fp32" if one of them asks for it, else the first one's."""
    by_name = dict(model.named_modules())
    modes: dict[int, str] = {}
    for mp in precisions:
        for p in by_name[mp.name]._parameters.values():
            if p is not None and (id(p) not in modes or mp.master == "fp32"):
                modes[id(p)] = mp.master
    return modes


def precision_table(policy: PolicyFormats, model: torch.nn.Module, execution: str) -> list[str]:
    """The lines of ``Policy.explain``'s table: per module, parameter format and stored dtype, compute
    format, master, and why; `execution` is how the policy runs ("native" or "emulated")."""
    rows = [("module", "type", "params", "stored as", "compute", "master", "why")]
    precisions = module_precisions(policy, model, warn=True)
    storage = {id(p): fmt for p, fmt in parameter_formats(model, precisions).values()}
    by_name = dict(model.named_modules())
    for mp in precisions:
        selected = mp.reason != "policy default" and not mp.reason.endswith("via parent")
        if not (mp.has_params or selected):
            continue
        own = {storage[id(p)] for p in by_name[mp.name]._parameters.values() if p is not None}
        params, reason = (own.pop() if len(own) == 1 else mp.params), mp.reason
        if own or params != mp.params:  # a weight shared with another module (tied embeddings)
            reason += f"; shared weight stored in {'/'.join(sorted(f.name for f in {params, *own}))}"
        stored = "float32" if execution == "emulated" or params == F32 else str(
            params.torch_dtype).replace("torch.", "")
        master = "-" if not mp.has_params or mp.master == "none" or params == F32 else mp.master
        rows.append((mp.name or "(root)", mp.type_name, params.name if mp.has_params else "-",
                     stored if mp.has_params else "-", f"fp8/{mp.compute.name}" if mp.fp8 else mp.compute.name,
                     master, reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines
