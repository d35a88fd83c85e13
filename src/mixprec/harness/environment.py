"""Where and with what a result was measured: device, versions, commit, date.

Example:
    >>> sorted(environment("cpu"))[:4]
    ['cpu_capability', 'cpu_flags', 'cpu_threads', 'date']
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import mixprec as mp


def environment(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a result depends on besides the code: pass the run's ``threads`` (default: torch's now)."""
    device = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mixprec": mp.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "cpu_threads": threads or torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
    }


#: The CPU features that decide how fast 16-bit (and 8-bit) arithmetic runs on a CPU.
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of the CPU features that matter for 16-bit matmuls this machine has (from /proc/cpuinfo;
    empty where it cannot be read). AMX-BF16 runs bfloat16 matmuls several times faster than FP32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in _FLAGS if f in flags]


def git_commit() -> str | None:
    """The commit of the mixprec checkout (with "-dirty" if its sources changed), or None if not a checkout."""
    root = Path(mp.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
