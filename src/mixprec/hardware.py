"""What a device computes natively and fast: the formats ``execution=auto`` runs natively there, and why.

CUDA: FP16 and BF16 (BF16 where the GPU has it). CPUs: BF16 on those with AMX-BF16 (Intel Sapphire
Rapids and later: a bfloat16 matmul measured 5.8x float32's), FP16 on those with AMX-FP16; elsewhere a
CPU's 16-bit arithmetic is slower than FP32 (FP16 by far: 0.5 GFLOP/s against 39 for a 1024^3 matmul on
an AMD EPYC), so ``auto`` emulates. AVX512-BF16 alone makes bfloat16 matmuls fast too (167 GFLOP/s on
that EPYC, under load) but not yet the whole step, so ``auto`` leaves those CPUs emulated until measured
end to end (``execution=native`` runs natively anywhere torch has the dtype).

FP8 matmuls (`native_fp8`): native on CUDA GPUs with FP8 tensor cores (compute capability 8.9 and up:
Ada, Hopper, Blackwell), through ``torch._scaled_mm``; emulated everywhere else.

``MIXPREC_NATIVE_CPU=0`` makes ``auto`` emulate on every CPU (the same numerics on every machine: the
test suite sets it), ``=1`` treats every CPU as having AMX-BF16 and AMX-FP16.
"""

from __future__ import annotations

import os

import torch

__all__ = ["NATIVE_CPU_ENV", "cpu_features", "native_formats", "native_fp8"]

NATIVE_CPU_ENV = "MIXPREC_NATIVE_CPU"


def cpu_features() -> dict[str, bool]:
    """The CPU's 16-bit instruction sets torch can use: AMX-BF16 (AMX tiles), AMX-FP16, AVX512-BF16."""
    cpu = torch.cpu
    probes = {"amx_bf16": "_is_amx_tile_supported", "amx_fp16": "_is_amx_fp16_supported",
              "avx512_bf16": "_is_avx512_bf16_supported"}
    return {name: bool(getattr(cpu, probe, lambda: False)()) for name, probe in probes.items()}


def native_formats(device: torch.device | str) -> tuple[frozenset[str], str]:
    """(names of the formats ``execution=auto`` runs natively on `device`, why), e.g.
    ``(frozenset({'bf16'}), 'AMX-BF16')``.

    Example:
        >>> native_formats("meta")
        (frozenset(), 'meta: no native 16-bit support in mixprec')
    """
    device = torch.device(device)
    if device.type == "cuda":
        names = {"fp16", "bf16"} if torch.cuda.is_bf16_supported() else {"fp16"}
        return frozenset(names), "CUDA"
    if device.type != "cpu":
        return frozenset(), f"{device.type}: no native 16-bit support in mixprec"
    forced = os.environ.get(NATIVE_CPU_ENV)
    if forced in ("0", "1"):
        return frozenset({"bf16", "fp16"} if forced == "1" else ()), f"{NATIVE_CPU_ENV}={forced}"
    flags = cpu_features()
    names = {"bf16"} if flags["amx_bf16"] else set()
    names |= {"fp16"} if flags["amx_fp16"] else set()
    have = [f for f, on in flags.items() if on]
    why = f"CPU with {', '.join(f.upper().replace('_', '-') for f in have) or 'no 16-bit instructions'}"
    return frozenset(names), why + ("" if names else " (no AMX: 16-bit arithmetic slower than FP32)")


def native_fp8(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` multiplies FP8 natively, why): CUDA with compute capability >= 8.9.

    Example:
        >>> native_fp8("cpu")
        (False, 'cpu: no FP8 matmul units')
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return True, f"CUDA sm_{major}{minor}: FP8 tensor cores"
        return False, f"CUDA sm_{major}{minor}: no FP8 tensor cores (need sm_89+; emulated)"
    return False, f"{device.type}: no FP8 matmul units"
