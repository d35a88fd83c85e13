"""execution=auto on CPUs: native where the CPU has the 16-bit instructions (faked here), emulated elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mixprec as mp
from mixprec import hardware


@pytest.fixture
def cpu(monkeypatch):
    """Fake the CPU's features (the decision is tested, not the speed): cpu({"amx_bf16"})."""
    monkeypatch.delenv(hardware.NATIVE_CPU_ENV, raising=False)

    def fake(*present: str) -> None:
        flags = {name: name in present for name in ("amx_bf16", "amx_fp16", "avx512_bf16")}
        monkeypatch.setattr(hardware, "cpu_features", lambda: flags)
    return fake


def test_auto_runs_bf16_natively_on_an_amx_bf16_cpu_and_emulates_fp16(cpu):
    cpu("amx_bf16", "avx512_bf16")
    assert hardware.native_formats("cpu") == (frozenset({"bf16"}), "CPU with AMX-BF16, AVX512-BF16")
    assert mp.Policy.parse("bf16-master").resolve_execution("cpu") == "native"
    assert mp.Policy.parse("bf16-mixed").resolve_execution("cpu") == "native"
    assert mp.Policy.parse("f16-master").resolve_execution("cpu") == "emulated"  # no AMX-FP16
    assert mp.Policy.parse("bf16-master,execution=emulated").resolve_execution("cpu") == "emulated"  # forced
    model = torch.nn.Linear(4, 2)
    model, opt, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-master")
    assert mp.prepared_state(model).execution == "native" and model.weight.dtype == torch.bfloat16
    header = mp.Policy.parse("bf16-master").explain(torch.nn.Linear(2, 2)).splitlines()[0]
    assert "execution native on cpu (auto: CPU with AMX-BF16, AVX512-BF16)" in header


def test_auto_emulates_on_a_cpu_without_amx(cpu):
    cpu("avx512_bf16")
    fast, why = hardware.native_formats("cpu")
    assert fast == frozenset() and why == "CPU with AVX512-BF16 (no AMX: 16-bit arithmetic slower than FP32)"
    assert mp.Policy.parse("bf16-master").resolve_execution("cpu") == "emulated"
    assert mp.Policy.parse("bf16-master,execution=native").resolve_execution("cpu") == "native"  # forced
    cpu("amx_bf16", "amx_fp16")
    assert mp.Policy.parse("f16-master").resolve_execution("cpu") == "native"


def test_the_environment_variable_decides_for_every_cpu(cpu, monkeypatch):
    cpu("amx_bf16")
    monkeypatch.setenv(hardware.NATIVE_CPU_ENV, "0")
    assert mp.Policy.parse("bf16-master").resolve_execution("cpu") == "emulated"
    monkeypatch.setenv(hardware.NATIVE_CPU_ENV, "1")
    assert mp.Policy.parse("f16-master").resolve_execution("cpu") == "native"


def test_the_real_cpu_is_read_without_error():
    flags = hardware.cpu_features()
    assert set(flags) == {"amx_bf16", "amx_fp16", "avx512_bf16"} and all(isinstance(v, bool) for v in flags.values())
    # the suite runs with MIXPREC_NATIVE_CPU=0 (conftest.py), inherited by the processes it starts
    out = subprocess.run([sys.executable, "-c", "import mixprec as mp; print(mp.Policy.parse('bf16-master')"
                          ".resolve_execution('cpu'))"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "emulated"
