"""mixprec: mixed precision training for PyTorch.

16-bit (and 8-bit) weights, activations and gradients, FP32 master weights, loss scaling and FP32
accumulation (Micikevicius et al., "Mixed Precision Training", ICLR 2018), run natively on GPUs and
emulated bit-exactly anywhere.

Example:
    >>> import mixprec as mp
    >>> mp.F16.max
    65504.0
"""

from . import distributed, numerics
from .apply import autocast, prepare, unprepare
from .ema import AveragedModel
from .formats import BF16, E4M3, E5M2, F16, F32, FORMATS, Format
from .fp8.recipe import Fp8Recipe
from .fp32_view import fp32_state_dict
from .master import MasterWeights
from .memory import MemoryReport, memory
from .numerics import Diagnosis, Fp8Stats, TensorStats, Trace, Watch, doctor, trace_nonfinite, watch
from .policy import PRESETS, Policy, Rule
from .quantize import quantize
from .scaling import DynamicScaler, LossScaleFloorError, LossScaler, NoScaler, StaticScaler
from .state import PreparedState, prepared_state
from .step import NaNStormError, StepInfo, step, unscale_
from .wrapper import OptimizerWrapper
from .wrapping import prepare_optimizer

__version__ = "0.1.0"

__all__ = [
    "AveragedModel",
    "fp32_state_dict",
    "prepare_optimizer",
    "BF16",
    "E4M3",
    "E5M2",
    "F16",
    "F32",
    "FORMATS",
    "PRESETS",
    "DynamicScaler",
    "Format",
    "LossScaleFloorError",
    "LossScaler",
    "MasterWeights",
    "MemoryReport",
    "Diagnosis",
    "TensorStats",
    "Fp8Stats",
    "Trace",
    "Watch",
    "doctor",
    "numerics",
    "trace_nonfinite",
    "watch",
    "NaNStormError",
    "NoScaler",
    "OptimizerWrapper",
    "Policy",
    "Rule",
    "Fp8Recipe",
    "StaticScaler",
    "StepInfo",
    "PreparedState",
    "autocast",
    "distributed",
    "prepare",
    "prepared_state",
    "quantize",
    "memory",
    "step",
    "unscale_",
    "unprepare",
]
