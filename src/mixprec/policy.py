"""Precision policies: which format each part of training uses, as one value with a string form.

A `Policy` says how parameters are stored, which format modules compute in, what the model's outputs
(what the loss sees) are cast to, whether an FP32 master copy takes the update, how the loss is scaled,
whether to run natively or emulated, and per-module `Rule`s. Gradients follow from storage, as they do
natively: a weight gradient has its parameter's format, an activation gradient its activation's format.

Modules the paper keeps in FP32 (normalisation layers, softmax, losses) are *FP32 islands* by default;
user rules come first and can override that (first match wins).

Example:
    >>> p = Policy.parse("f16-master")
    >>> p.params.name, p.compute.name, p.master.name, p.scaling
    ('fp16', 'fp16', 'fp32', 'dynamic')
    >>> Policy.parse(str(p)) == p
    True
    >>> str(Policy.parse("f16-master,rule=lm_head:fp32"))
    'params=fp16,compute=fp16,output=fp32,master=fp32,reduce=fp32,scaling=dynamic,execution=auto,rule=lm_head:fp32'
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .formats import BF16, F16, F32, Format
from .fp8.recipe import GRANULARITIES, Fp8Recipe
from .hardware import native_formats, native_fp8
from .master_modes import DESCRIPTIONS, MODES, TRANSIENT_MODES, master_bytes
from .precisions import DEFAULT_FP32_TYPES, ModulePrecision, Rule, module_precisions, parameter_formats, precision_table
from .scaling import LossScaler, make_scaler, parse_scaling

__all__ = ["Policy", "Rule", "PRESETS", "ModulePrecision", "EXECUTIONS", "DEFAULT_FP32_TYPES"]

EXECUTIONS = ("auto", "native", "emulated", "emulated-module")

#: Formats torch can compute in natively on CUDA (FP8 is emulated for now: future work).
_NATIVE_CUDA = (F16, BF16)


def _fmt(value: Format | str) -> Format:
    return Format.parse(value)


def _fmt_text(fmt: Format | None) -> str:
    return "none" if fmt is None else fmt.spec


def _reduce_text(fmt: Format | str | None) -> str:
    """A resolved `Policy.reduce` as the policy string writes it (a Format once constructed, or None)."""
    return fmt.spec if isinstance(fmt, Format) else "storage"


@dataclass(frozen=True)
class Policy:
    """A precision policy (frozen; build one with `Policy.parse` or the constructor).

    Args:
        params: storage format of parameters (and so of weight gradients).
        compute: format modules compute in and activations (and their gradients) are stored in.
        output: format of the model's outputs, i.e. what the loss is computed in.
        master: how the 16-bit weights keep the master value that takes the update: ``"fp32"`` (an FP32
            copy, the paper), ``"compact"`` (BF16 params: the FP32 master's low 16 bits, exactly FP32
            masters in 2 bytes), ``"kahan"`` (a 16-bit compensation buffer), ``"stochastic"`` (no copy,
            stochastic rounding of the update) or None / ``"none"`` (no master). Read back as a format
            (`F32` for every mode with a master, else None) and `master_mode`.
        reduce: the format gradients are summed in across ranks (DDP), then rounded to each parameter's
            storage format: a `Format` (``"fp32"``, ``"fp16"``, ``"bf16"``), ``"storage"`` (each gradient
            in its parameter's format, as plain DDP does), or ``"auto"`` (the default): ``"fp32"`` when
            the policy keeps FP32 masters or FP32 parameters, else ``"storage"``. Resolved at
            construction; ``None`` stands for ``"storage"``.
        scaling: ``"none"``, ``"static:S"`` (e.g. ``"static:1024"``), ``"dynamic"`` / ``"dynamic:S0"``, or
            ``"auto"`` (the default): ``"dynamic"`` when params or compute is a format with fewer exponent
            bits than FP32 (FP16, FP8: small gradients underflow without scaling), else ``"none"``.
            It is resolved at construction, so ``str(policy)`` always names the concrete choice.
        execution: ``"auto"`` (native where the device has every format, else emulated),
            ``"native"``, ``"emulated"`` (per op: torch.autocast's own rules, FP32 arithmetic, values on
            the formats' grids; see docs/emulation.md) or ``"emulated-module"`` (rounding only where
            tensors cross module boundaries: faster, but blind to overflow inside a module's forward).
        rules: per-module rules, tried in order before the default FP32 islands.
        fp8: an `Fp8Recipe` (or its string, e.g. ``"tensorwise"``, ``"delayed:history=16"``, ``"rowwise"``):
            Linear layers run their matmuls on scaled FP8 operands (see `mixprec.fp8`); None (``"none"``) for
            none. Which layers, and why the others are not, is in ``explain()``.

    Example:
        >>> Policy(params="f16", compute="f16", master="f32", scaling="static:1024") == Policy.parse(
        ...     "params=f16,compute=f16,master=f32,scaling=static:1024")
        True
    """

    params: Format = F32
    compute: Format = F32
    output: Format = F32
    master: Format | None = None  # given as a str too (a mode): resolved to F32 (with master_mode) or None
    reduce: Format | str | None = "auto"
    scaling: str = "auto"
    execution: str = "auto"
    rules: tuple[Rule, ...] = field(default=())
    master_mode: str = ""  # set from `master`: "fp32", "compact", "kahan", "stochastic" or "none"
    fp8: Fp8Recipe | None = None  # given as a str too: resolved to an Fp8Recipe (or None)

    def __post_init__(self) -> None:
        fp8 = self.fp8
        if isinstance(fp8, str):
            fp8 = None if fp8.strip().lower() in ("", "none") else Fp8Recipe.parse(fp8)
        object.__setattr__(self, "fp8", fp8)
        for name in ("params", "compute", "output"):
            object.__setattr__(self, name, _fmt(getattr(self, name)))
        master = self.master
        mode = master.strip().lower() if isinstance(master, str) else "none" if master is None else self.master_mode
        if mode in ("none", *TRANSIENT_MODES):
            master = None if mode == "none" else F32
        elif isinstance(master, str) and master.strip().lower() not in MODES:
            try:
                Format.parse(master)
            except ValueError:
                raise ValueError(f"master={master!r} is not a master mode; valid: "
                                 + "; ".join(f"{m} ({d})" for m, d in DESCRIPTIONS.items())) from None
        object.__setattr__(self, "master", None if master is None else _fmt(master))
        object.__setattr__(self, "master_mode", mode if mode in TRANSIENT_MODES else
                           "fp32" if self.master is not None else "none")
        reduce = self.reduce
        if isinstance(reduce, str) and reduce.strip().lower() == "auto":
            reduce = F32 if self.master is not None or self.params == F32 else None
        elif isinstance(reduce, str) and reduce.strip().lower() == "storage":
            reduce = None
        object.__setattr__(self, "reduce", None if reduce is None else _fmt(reduce))
        scaling = self.scaling
        if isinstance(scaling, str) and scaling.strip().lower() == "auto":
            narrow_range = any(f.exponent_bits < F32.exponent_bits for f in (self.params, self.compute))
            scaling = "dynamic" if narrow_range else "none"
        object.__setattr__(self, "scaling", parse_scaling(scaling))
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        rules = (self.rules,) if isinstance(self.rules, (Rule, str)) else tuple(self.rules)
        object.__setattr__(self, "rules", tuple(r if isinstance(r, Rule) else Rule.parse(r) for r in rules))
        if self.master is not None and self.master != F32:
            raise ValueError(
                f"master={self.master.name} is not supported: master weights are fp32 (master=fp32) or "
                f"absent (master=none)")
        if self.master is not None and self.params == F32:
            raise ValueError(
                "master=fp32 with params=fp32: the parameters already are FP32, a master copy would only "
                "double their memory; use master=none (e.g. the 'f16-mixed' preset) or params=f16/bf16")

    # ----- strings ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Policy) -> Policy:
        """A preset name, ``key=value`` pairs, or a preset followed by overrides, comma-separated.

        Keys: params, compute, output, master, reduce, scaling, execution, fp8, rule (repeatable, in order).

        Example:
            >>> Policy.parse("f16-master,scaling=none") == Policy.parse("f16-master-noscale")
            True
        """
        if isinstance(text, Policy):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a policy is given as a string or a Policy, got {type(text).__name__}")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"empty policy string; valid presets: {', '.join(PRESETS)}")
        fields: dict[str, object] = {}
        rules: list[Rule] = []
        given: dict[str, str] = {}  # key -> the part that set it, to refuse a key given twice
        if "=" not in parts[0]:
            preset = parts.pop(0).lower()
            if preset not in _PRESET_POLICIES:
                raise ValueError(
                    f"unknown policy preset {preset!r}; valid presets: {', '.join(PRESETS)} "
                    f"(or key=value pairs with keys {', '.join(_KEYS)}, e.g. 'params=f16,compute=f16')")
            base = _PRESET_POLICIES[preset]
            # reduce stays "auto" unless given: it follows the (possibly overridden) master and params
            fields = {k: getattr(base, k) for k in _KEYS if k not in ("rule", "reduce")}
            fields["master"] = base._master_text()
            rules = list(base.rules)
        for part in parts:
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in _KEYS:
                raise ValueError(
                    f"unknown policy key in {part!r}; valid keys: {', '.join(_KEYS)}; a preset name may "
                    f"only come first (valid presets: {', '.join(PRESETS)})")
            if key == "rule":
                rules.append(Rule.parse(value.strip()))
                continue
            if key in given:  # the second value would silently replace the first: refuse
                raise ValueError(
                    f"policy key {key!r} is given twice in {text!r} ({given[key]!r} and {part!r}); give each "
                    f"key once (only rule= may repeat; a preset's fields may be overridden once each)")
            given[key] = part
            fields[key] = value.strip()
        return cls(**fields, rules=tuple(rules))  # type: ignore[arg-type]

    def __str__(self) -> str:
        for name, preset in _PRESET_POLICIES.items():
            if preset == self:
                return name
        text = (f"params={self.params.spec},compute={self.compute.spec},output={self.output.spec},"
                f"master={self._master_text()},reduce={_reduce_text(self.reduce)},"
                f"scaling={self.scaling},execution={self.execution}") + (f",fp8={self.fp8}" if self.fp8 else "")
        return text + "".join(f",rule={r}" for r in self.rules)

    def _master_text(self) -> str:
        return self.master_mode if self.master_mode in TRANSIENT_MODES else _fmt_text(self.master)

    def replace(self, **changes: object) -> Policy:
        """A copy with some fields changed, e.g. ``policy.replace(execution="emulated")``."""
        return replace(self, **changes)  # type: ignore[arg-type]

    # ----- what it means ------------------------------------------------------------------------
    @property
    def formats(self) -> tuple[Format, ...]:
        """Every format this policy (rules included) computes or stores in."""
        found = [self.params, self.compute, self.output, *([self.reduce] if isinstance(self.reduce, Format) else []),
                 *(r.compute for r in self.rules),
                 *(r.params for r in self.rules if r.params is not None)]
        return tuple(dict.fromkeys(found))

    @property
    def weight_bytes(self) -> float:
        """Bytes a weight in the default `params` format takes with what keeps its master (optimizer state
        and gradients apart): 6 for bf16-master, 4 for bf16-compact and bf16-kahan, 2 for bf16-sr.

        Example:
            >>> [Policy.parse(p).weight_bytes for p in ("f32", "bf16-master", "bf16-compact", "bf16-sr")]
            [4.0, 6.0, 4.0, 2.0]
        """
        return self.params.bits / 8 + master_bytes(self.master_mode, self.params)

    def resolve_execution(self, device: torch.device | str = "cpu") -> str:
        """``"native"`` or ``"emulated"``: how this policy runs on `device`.

        FP32-only policies are native everywhere. ``auto`` picks native where the device computes every
        format natively and fast (`mixprec.hardware.native_formats`: CUDA's FP16 and BF16, a CPU's BF16
        with AMX-BF16, FP16 with AMX-FP16; FP8 is emulated for now), emulated otherwise; `auto_reason`
        says why. ``native`` on CPU uses torch's CPU autocast; it raises where a format has no torch dtype.

        Example:
            >>> Policy.parse("f16-master").resolve_execution("cpu")
            'emulated'
        """
        device = torch.device(device)
        narrow = [f for f in self.formats if f != F32]
        if not narrow:
            return "native"
        if self.execution.startswith("emulated"):
            return "emulated"
        if self.execution == "auto":
            fast, _ = native_formats(device)
            return "native" if all(f.name in fast for f in narrow) else "emulated"
        missing = [f.name for f in narrow if f not in _NATIVE_CUDA]
        if missing or device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"execution=native on {device}: {', '.join(missing) or 'this device'} has no native support "
                f"in mixprec yet (fp16 and bf16 on cuda or cpu do); use execution=emulated or auto")
        return "native"

    def auto_reason(self, device: torch.device | str = "cpu") -> str:
        """Why ``execution=auto`` runs natively or emulated on `device`: what the device computes fast.

        Example:
            >>> Policy.parse("bf16-master").auto_reason("cuda")
            'CUDA'
        """
        return native_formats(device)[1]

    def fp8_execution(self, device: torch.device | str = "cpu") -> tuple[str, str]:
        """(``"native"`` or ``"emulated"``, why) for this policy's FP8 matmuls on `device`: native with
        torch._scaled_mm on GPUs with FP8 tensor cores for tensorwise, delayed and rowwise scales (not under
        execution=emulated), emulated elsewhere: the same FP8 values and scales, FP32 arithmetic.

        Example:
            >>> Policy.parse("fp8-tensorwise").fp8_execution("cpu")[0]
            'emulated'
        """
        fast, why = native_fp8(device)
        if self.fp8 is None:
            return "native", "no FP8 layers"
        if self.execution.startswith("emulated"):
            return "emulated", f"execution={self.execution}"
        if fast and self.fp8.granularity not in ("tensorwise", "delayed", "rowwise"):
            return "emulated", f"{self.fp8.granularity} scales: torch._scaled_mm takes tensorwise and rowwise ones"
        return ("native" if fast else "emulated"), why

    @property
    def emulation(self) -> str:
        """How this policy is emulated where it is: ``"per op"`` (execution auto or emulated: torch.autocast's
        per-op rules with FP32 arithmetic) or ``"module boundaries"`` (execution=emulated-module).

        Example:
            >>> Policy.parse("f16-master").emulation, Policy.parse("f16-master,execution=emulated-module").emulation
            ('per op', 'module boundaries')
        """
        return "module boundaries" if self.execution == "emulated-module" else "per op"

    def module_precisions(self, model: torch.nn.Module, *, warn: bool = True) -> list[ModulePrecision]:
        """What every module of `model` gets, in `named_modules` order, and why.

        Precedence: a rule matching the module itself, then the default FP32 islands, then a rule that
        matched an ancestor, then the policy's formats. Warns about user rules that match nothing.
        """
        return module_precisions(self, model, warn=warn)

    def parameter_formats(self, model: torch.nn.Module, precisions: list[ModulePrecision] | None = None
                          ) -> dict[str, tuple[torch.nn.Parameter, Format]]:
        """Each parameter's storage format, by its first qualified name (as in named_parameters).

        A parameter owned by several modules (tied embeddings) is stored in the widest of their formats
        (the first one when neither is wider), so that a rule asking for more precision is honoured;
        each module still rounds it onto its own compute format at use.

        Example:
            >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
            >>> {k: f.name for k, (p, f) in Policy.parse("f16-pure").parameter_formats(m).items()}
            {'0.weight': 'fp16', '0.bias': 'fp16', '1.weight': 'fp32', '1.bias': 'fp32'}
        """
        if precisions is None:
            precisions = module_precisions(self, model, warn=False)
        return parameter_formats(model, precisions)

    def explain(self, model: torch.nn.Module, device: torch.device | str | None = None) -> str:
        """A per-module table: parameter format and stored dtype, compute format, master, and why.

        Lists modules that own parameters or that a rule or default island selects. `device` defaults to
        the model's (its first parameter's) device.

        Example:
            >>> print(Policy.parse("f16-master").explain(torch.nn.Sequential(
            ...     torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))))  # doctest: +NORMALIZE_WHITESPACE
            policy f16-master: execution emulated (per op) on cpu, loss scaling dynamic, output fp32, reduce fp32,
            6 B a fp16 weight with its master
            module  type       params  stored as  compute  master  why
            0       Linear     fp16    float32    fp16     fp32    policy default
            1       LayerNorm  fp32    float32    fp32     -       default fp32 island (LayerNorm)
        """
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        execution = self.resolve_execution(device)
        ran = execution if execution == "native" else f"emulated ({self.emulation})"
        ran += f" on {torch.device(device)}"
        if execution == "native" and self.execution == "auto" and any(f != F32 for f in self.formats):
            ran += f" (auto: {self.auto_reason(device)})"  # why this device computes it natively
        header = (f"policy {self}: execution {ran}, loss scaling "
                  f"{self.scaling}, output {self.output.name}, reduce {_reduce_text(self.reduce)}, "
                  f"{self.weight_bytes:g} B a {self.params.name} weight with its master")
        if self.fp8 is not None:
            fp8_ran, why = self.fp8_execution(device)
            how = ": FP8 values, FP32 arithmetic" if fp8_ran == "emulated" else ""
            header += f", fp8 {self.fp8} matmuls {fp8_ran} ({why}{how})"
        return "\n".join([header, *precision_table(self, model, execution)])

    def make_scaler(self, device: torch.device | str | None = None) -> LossScaler:
        """A fresh loss scaler for this policy's `scaling` (see `mixprec.scaling.make_scaler`).

        Example:
            >>> type(Policy.parse("f16-master").make_scaler()).__name__
            'DynamicScaler'
        """
        return make_scaler(self.scaling, device)


_KEYS = ("params", "compute", "output", "master", "reduce", "scaling", "execution", "fp8", "rule")

_PRESET_POLICIES: dict[str, Policy] = {
    "f32": Policy(),
    "f16-mixed": Policy(params=F32, compute=F16, scaling="dynamic"),
    "bf16-mixed": Policy(params=F32, compute=BF16),
    "f16-master": Policy(params=F16, compute=F16, master=F32, scaling="dynamic"),
    "bf16-master": Policy(params=BF16, compute=BF16, master=F32),
    "f16-pure": Policy(params=F16, compute=F16, scaling="none"),
    "bf16-pure": Policy(params=BF16, compute=BF16),
    "f16-master-noscale": Policy(params=F16, compute=F16, master=F32, scaling="none"),
    "bf16-compact": Policy(params=BF16, compute=BF16, master=F32, master_mode="compact"),
    "bf16-kahan": Policy(params=BF16, compute=BF16, master=F32, master_mode="kahan"),
    "bf16-sr": Policy(params=BF16, compute=BF16, master=F32, master_mode="stochastic"),
    **{f"fp8-{g}": Policy(params=BF16, compute=BF16, master=F32, fp8=Fp8Recipe(g))
       for g in GRANULARITIES},
}

#: Preset name -> one-line description.
PRESETS: dict[str, str] = {
    "f32": "everything in FP32: the reference run",
    "f16-mixed": "FP32 params, FP16 compute, dynamic loss scaling (what torch.amp does)",
    "bf16-mixed": "FP32 params, BF16 compute, no loss scaling needed (FP32's range)",
    "f16-master": "the paper: FP16 params, activations and gradients; FP32 masters; dynamic loss scaling",
    "bf16-master": "BF16 params, activations and gradients; FP32 masters; no loss scaling",
    "f16-pure": "FP16 everything, no masters, no loss scaling (ablation: small updates and gradients lost)",
    "bf16-pure": "BF16 everything, no masters, no loss scaling (ablation: small updates lost)",
    "f16-master-noscale": "f16-master without loss scaling (ablation: small gradients flush to zero)",
    "bf16-compact": "bf16-master in 4 bytes a weight, not 6: the FP32 master's low 16 bits beside the BF16 weight",
    "bf16-kahan": "BF16 weights with a BF16 Kahan compensation buffer instead of an FP32 master (4 bytes a weight)",
    "bf16-sr": "BF16 weights without a master, updates rounded stochastically (2 bytes a weight)",
    **{f"fp8-{g}": f"bf16-master with FP8 Linear matmuls (E4M3 forward, E5M2 gradients): {d}"
       for g, d in GRANULARITIES.items()},
}
