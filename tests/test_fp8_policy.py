"""FP8 as a policy: the fp8= key and the fp8-* presets, which Linear layers get FP8 matmuls and why, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import mixprec as mp
from mixprec.cli import main
from mixprec.fp8.recipe import GRANULARITIES


class LoRALinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.Linear(64, 10), LoRALinear(64, 64), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))


def test_fp8_policies_parse_back_and_presets_are_bf16_master_plus_fp8():
    for g in GRANULARITIES:
        preset = mp.Policy.parse(f"fp8-{g}")
        assert str(preset) == f"fp8-{g}" and preset.fp8.granularity == g
        assert preset.replace(fp8=None) == mp.Policy.parse("bf16-master")
    for text in ("bf16-master,fp8=delayed:history=8:margin=1:algo=recent", "f16-master,fp8=rowwise:pow2:e4m3",
                 "fp8-blockwise,fp8=blockwise:block=64", "bf16-compact,fp8=tensorwise,rule=head:bf16"):
        policy = mp.Policy.parse(text)
        assert mp.Policy.parse(str(policy)) == policy and policy.fp8 is not None
    assert mp.Policy.parse("fp8-tensorwise,fp8=none") == mp.Policy.parse("bf16-master")
    assert mp.Policy.parse("f16-master,fp8=tensorwise").scaling == "dynamic"  # FP16 still needs loss scaling
    with pytest.raises(ValueError, match="unknown FP8 scaling 'colwise'"):
        mp.Policy.parse("bf16-master,fp8=colwise")
    with pytest.raises(ValueError, match="given twice"):
        mp.Policy.parse("bf16-master,fp8=tensorwise,fp8=rowwise")


def test_which_linear_layers_get_fp8_and_why():
    rows = {m.name: m for m in mp.Policy.parse("fp8-rowwise").module_precisions(model())}
    assert [n for n, m in rows.items() if m.fp8] == ["2", "6"]
    assert rows["2"].fp8 == "rowwise" and rows["2"].compute == mp.BF16
    assert rows["0"].reason.endswith("not fp8: the first Linear layer")
    assert rows["7"].reason.endswith("not fp8: the last Linear layer")
    assert rows["3"].reason.endswith("not fp8: its dims 64x10 are not multiples of 16")
    assert "LoRALinear has its own forward" in rows["4"].reason
    table = mp.Policy.parse("fp8-rowwise").explain(model())
    assert "fp8/bf16" in table and "fp8 rowwise matmuls emulated (cpu: no FP8 matmul units" in table


def test_rules_ask_for_fp8_or_keep_a_layer_out():
    policy = mp.Policy.parse("fp8-tensorwise,rule=0:e4m3,rule=6:bf16")
    rows = {m.name: m for m in policy.module_precisions(model())}
    assert [n for n, m in rows.items() if m.fp8] == ["0", "2"]
    assert rows["0"].compute == mp.BF16 and rows["0"].params == mp.BF16  # e4m3 asks for FP8 matmuls only
    assert rows["6"].reason == "rule 2 (6:bf16)"
    with pytest.raises(ValueError, match="LoRALinear has its own forward"):
        mp.Policy.parse("fp8-tensorwise,rule=4:e4m3").module_precisions(model())
    fp32 = {m.name: m for m in mp.Policy.parse("fp8-tensorwise,rule=2:fp32").module_precisions(model())}
    assert not fp32["2"].fp8 and fp32["2"].compute == mp.F32
    # Without fp8=, a rule's e4m3 keeps its old meaning: values rounded onto E4M3, no scaled matmuls.
    plain = {m.name: m for m in mp.Policy.parse("bf16-master,rule=2:e4m3").module_precisions(model())}
    assert plain["2"].compute == mp.E4M3 and not plain["2"].fp8


def test_fp8_execution_is_native_only_where_fp8_matmuls_are(monkeypatch):
    assert mp.Policy.parse("fp8-tensorwise").fp8_execution("cpu") == ("emulated", "cpu: no FP8 matmul units")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert mp.Policy.parse("fp8-rowwise").fp8_execution("cuda")[0] == "native"
    assert mp.Policy.parse("fp8-mx").fp8_execution("cuda")[0] == "emulated"
    assert mp.Policy.parse("fp8-tensorwise,execution=emulated").fp8_execution("cuda")[0] == "emulated"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert mp.Policy.parse("fp8-tensorwise").fp8_execution("cuda") == (
        "emulated", "CUDA sm_80: no FP8 tensor cores (need sm_89+; emulated)")


def test_cli_lists_fp8_presets_and_explains_a_recipe(capsys):
    assert main(["policies", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fp8-delayed"]["fp8"] == "delayed" and rows["bf16-master"]["fp8"] is None
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "fp8/bf16" in out and max(len(line) for line in out.splitlines()) <= 80
    assert main(["policies", "fp8-tensorwise", "--recipe", "gpt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("head "))
    assert "not fp8: the last Linear layer" in head
    assert sum("fp8 tensorwise" in line for line in lines) >= 6
    assert main(["policies", "--recipe", "gpt"]) == 2
    assert "name the policy too" in capsys.readouterr().err


def test_multihead_attention_out_proj_is_not_claimed_as_fp8():
    # nn.MultiheadAttention reads out_proj.weight inside F.multi_head_attention_forward: out_proj.forward never
    # runs, so an FP8 forward there would be a claim explain() could not keep.
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(32, 64), "attn": torch.nn.MultiheadAttention(64, 4),
                                 "b": torch.nn.Linear(64, 64), "c": torch.nn.Linear(64, 32)})
    rows = {m.name: m for m in mp.Policy.parse("fp8-tensorwise").module_precisions(model)}
    assert not rows["attn.out_proj"].fp8 and "MultiheadAttention uses its weight" in rows["attn.out_proj"].reason
    assert [n for n, m in rows.items() if m.fp8] == ["b"]
    with pytest.raises(ValueError, match="MultiheadAttention uses its weight"):
        mp.Policy.parse("fp8-tensorwise,rule=attn.out_proj:e4m3").module_precisions(model)
