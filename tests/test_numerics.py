"""mp.watch and mp.doctor: exact statistics on known values, training left bitwise unchanged, and
recommendations that, used, train."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec.cli import main
from mixprec.harness.training import train
from mixprec.numerics.watch import EXPONENTS
from mixprec.recipes import get_recipe
from mixprec.report.doctor import write_doctor_report


def _values() -> torch.Tensor:
    """Every edge of FP16's rounding, and a spread of random magnitudes over FP32's whole range."""
    f16 = mp.F16
    edges = [0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, -65520.0, 1e38,
             2.0**-25, np.nextafter(np.float32(2.0**-25), np.float32(1)), 2.0**-24, -(2.0**-26),
             f16.min_normal - 2.0**-25, np.nextafter(np.float32(f16.min_normal - 2.0**-25), np.float32(0)),
             f16.min_normal, 1e-45, 3.4e38, 1.0, -3.0]
    g = torch.Generator().manual_seed(0)
    spread = torch.exp2(torch.empty(4000).uniform_(-150, 128, generator=g)) * torch.sign(torch.randn(4000, generator=g))
    return torch.cat([torch.tensor(edges, dtype=torch.float32), spread.float()])


def _expected(x: torch.Tensor, fmt: mp.Format) -> dict[str, int]:
    """Counts from mp.quantize itself: what rounding to nearest onto fmt does to each finite value."""
    finite = torch.isfinite(x)
    q = mp.quantize(torch.where(finite, x, torch.zeros_like(x)), fmt).abs()
    over = (q > fmt.max) if fmt.has_inf else (x.abs() >= fmt.max + 2.0 ** (fmt.max_exponent - fmt.mantissa_bits - 1))
    return {"overflow": int((finite & over).sum()),
            "subnormal": int((finite & (q > 0) & (q < fmt.min_normal)).sum()),
            "underflow": int((finite & (x != 0) & (q == 0)).sum())}


def test_statistics_of_known_values_are_exact():
    x = _values()
    with mp.watch(nn.Identity(), formats=mp.FORMATS.values(), kinds=["activation"]) as w:
        w.model(x)
    s = w.stats()["", "activation"]
    a = x.abs()
    finite = torch.isfinite(a)
    assert (s.count, s.zeros, s.nonfinite) == (x.numel(), int((a == 0).sum()), int((~finite).sum()))
    assert s.amax == a[finite].max().item()
    nonzero = a[finite & (a > 0)].double().numpy()
    expected = np.bincount(np.floor(np.log2(nonzero)).astype(int) - EXPONENTS[0], minlength=len(EXPONENTS))
    assert np.array_equal(s.histogram, expected)
    for fmt in mp.FORMATS.values():
        assert s.formats[fmt.name] == _expected(x, fmt), fmt.name
    assert s.formats["fp16"]["overflow"] == int((finite & (a >= 65520)).sum())  # 65519.99 rounds to 65504


def test_custom_formats_are_exact_too():
    x = _values()
    custom = mp.Format("e3m2", 3, 2)
    with mp.watch(nn.Identity(), formats=[custom], kinds=["activation"]) as w:
        w.model(x)
    assert w.stats()["", "activation"].formats["e3m2"] == _expected(x, custom)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


def test_every_kind_is_what_the_module_saw():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 4)
    seen = {}

    def capture(module, args, out):
        seen["act"] = out.detach().clone()
        out.register_hook(lambda g: seen.update(grad=g.clone()))

    model.fc.register_forward_hook(capture)
    with mp.watch(model, formats=["fp16"]) as w:
        model(x).sum().backward()
    stats = w.stats()
    for kind, tensor in (("activation", seen["act"]), ("activation_grad", seen["grad"]),
                         ("weight", torch.cat([model.fc.weight.flatten(), model.fc.bias])),
                         ("weight_grad", torch.cat([model.fc.weight.grad.flatten(), model.fc.bias.grad]))):
        s = stats["fc", kind]
        assert s.count == tensor.numel() and s.amax == tensor.abs().max().item(), kind
    assert ("", "activation") in stats and ("out", "weight_grad") in stats


def _train(model, steps, watched):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, scaler = mp.prepare(model, opt, "f16-master")
    g = torch.Generator().manual_seed(1)
    w = mp.watch(model) if watched else None
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        with mp.autocast(model):
            loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        mp.step(opt, scaler)
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], w


def test_watch_leaves_training_bitwise_unchanged_and_removes_its_hooks():
    torch.manual_seed(0)
    model = Net()
    plain, _ = _train(copy.deepcopy(model), 6, watched=False)
    counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    watched, w = _train(model, 6, watched=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    assert w.stats()["fc", "activation"].count == 6 * 8 * 3
    w.remove()
    mp.unprepare(model)  # prepare keeps hooks of its own (for activation checkpointing) until then
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == counts
    before = w.stats()["fc", "activation"].count
    model(torch.randn(2, 4)).sum().backward()
    assert w.stats()["fc", "activation"].count == before  # removed: nothing more is seen


def test_watch_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown kinds.*valid: activation"):
        mp.watch(Net(), kinds=["activations"])
    with pytest.raises(ValueError, match="no module.*matches modules='nope'"):
        mp.watch(Net(), modules="nope")


# ----- the doctor ------------------------------------------------------------------------------------

def _recipe_batches(recipe, steps: int, seed: int = 0):
    data = recipe.make_data()
    return [data.batch(step, recipe.batch_size, seed) for step in range(steps)]


def test_underflow_recipe_gets_a_loss_scale_that_trains():
    recipe = get_recipe("underflow")
    torch.manual_seed(0)
    model = recipe.make_model()
    d = mp.doctor(model, _recipe_batches(recipe, 3), recipe.loss, optimizer=recipe.build_optimizer(model.parameters()))
    fp16 = d.scale_ranges["fp16"]
    assert fp16.lost_unscaled > 0.5 and 0 < fp16.k_min <= fp16.k_max  # most gradients flush to zero unscaled
    assert d.policy.startswith("f16-master,scaling=dynamic:")
    steps = 150
    used = train(recipe, d.policy, steps=steps)
    static = train(recipe, f"f16-master,scaling=static:{2 ** fp16.k_min}", steps=steps)  # the range's low end
    unscaled = train(recipe, "f16-master-noscale", steps=steps)
    reference = train(recipe, "f32", steps=steps)
    assert unscaled.final_metric > 0.9 * unscaled.initial_metric  # stalls (the recipe's point)
    for run in (used, static):
        assert run.final_metric < 0.5 * run.initial_metric
        assert abs(run.final_metric - reference.final_metric) < 0.05 * reference.final_metric


class Hot(nn.Module):
    """An activation above 65504 in one module: the one the doctor must name."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.hot = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(self.hot(h) * 1e-3)


def test_a_module_whose_activations_overflow_fp16_gets_a_rule_or_bf16():
    torch.manual_seed(0)
    model = Hot()
    with torch.no_grad():
        model.hot.weight.mul_(1e5)
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    d = mp.doctor(model, batches, lambda m, x: m(x).pow(2).mean())
    assert d.wider["fp16"] == ["hot"] and d.wider["bf16"] == []
    assert d.policy.startswith("f16-master") and d.policy.endswith(",rule=hot:fp32")
    assert any("hot" in e for e in d.evidence)
    policy = mp.Policy.parse(d.policy)
    model, _, _ = mp.prepare(model, None, policy)
    with mp.autocast(model):
        y = model(batches[0])
    assert torch.isfinite(y).all()  # used, the recommendation computes what FP16 alone would overflow


def test_digits_recommendation_matches_fp32_within_its_spread():
    recipe = get_recipe("digits")
    torch.manual_seed(0)
    model = recipe.make_model()
    d = mp.doctor(model, _recipe_batches(recipe, 3), recipe.loss, optimizer=recipe.build_optimizer(model.parameters()))
    assert d.policy.startswith("f16-master")
    references = [train(recipe, "f32", seed=s).final_metric for s in range(3)]
    used = train(recipe, d.policy, seed=0).final_metric
    spread = max(references) - min(references)
    assert min(references) - spread <= used <= max(references) + spread, (used, references)


def test_doctor_refuses_what_it_cannot_diagnose():
    with pytest.raises(ValueError, match="no batches"):
        mp.doctor(Net(), [], lambda m, x: m(x).sum())
    with pytest.raises(ValueError, match="FP32 loss of batch 0.*does not train in FP32"):
        mp.doctor(Net(), [torch.full((2, 4), math.nan)], lambda m, x: m(x).sum())


def test_cli_doctor_writes_the_report_and_prints_json(tmp_path, capsys):
    assert main(["doctor", "--recipe", "underflow", "--batches", "2", "--out", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["policy"].startswith("f16-master") and printed["recipe"] == "underflow"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["activation.png", "activation_grad.png", "diagnosis.json", "report.md", "weight.png",
                     "weight_grad.png"]
    report = (tmp_path / "report.md").read_text()
    assert printed["policy"] in report and "![activation_grad](activation_grad.png)" in report
    assert json.loads((tmp_path / "diagnosis.json").read_text())["scale_ranges"]["fp16"]["k_min"] > 0


def test_the_doctor_summary_quotes_the_shares_its_tables_show(tmp_path):
    # Gradients around FP16's smallest subnormal: many flush, some in the binade below it round up.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    d = mp.doctor(model, batches, lambda m, x: m(x).pow(2).mean() * 2.0**-18)
    act, wgt = d.totals["activation_grad"], d.totals["weight_grad"]
    # Every share is of the non-zero values, and the unscaled flush share is the exact round-to-nearest count.
    for kind, stats in d.totals.items():
        assert d.shares["fp16"][kind] == {k: v / stats.nonzero for k, v in stats.formats["fp16"].items()}
    fp16 = d.scale_ranges["fp16"]
    both = (act.formats["fp16"]["underflow"] + wgt.formats["fp16"]["underflow"]) / (act.nonzero + wgt.nonzero)
    assert fp16.lost_unscaled == both and 0.1 < both < 0.99
    pct = {k: f"{100 * d.shares['fp16'][k]['underflow']:.3g}%" for k in ("activation_grad", "weight_grad")}
    (summary,) = [e for e in d.evidence if e.startswith("gradients:")]
    assert summary.startswith(f"gradients: {100 * both:.3g}% of the non-zero gradient values flush")
    assert f"activation gradients {pct['activation_grad']}, weight gradients {pct['weight_grad']}" in summary

    report = write_doctor_report(d, tmp_path, "test").read_text()
    assert summary in report and "non-zero values" in report
    lost = [line for line in report.split("## Values lost")[1].split("## ")[0].splitlines() if line.startswith("|")]
    columns = lost[0].strip("| ").split(" | ")
    fp16_row = next(line for line in lost if line.startswith("| fp16 |")).strip("| ").split(" | ")
    for kind, title in (("activation_grad", "activation gradients"), ("weight_grad", "weight gradients")):
        assert fp16_row[columns.index(title)].endswith(f"/ {pct[kind]}")  # overflow / subnormal / underflow
    # The loss-scale table: every row as many cells as its header, no "(empty)" outside the cells.
    assert d.scale_ranges["e4m3"].empty
    scales = report.split("## Loss scales")[1].split("## ")[0]
    table = [line for line in scales.splitlines() if line.startswith("|")]
    assert "(empty)" not in report and len({line.count("|") for line in table}) == 1
    e4m3 = next(line for line in table if line.startswith("| e4m3 |"))
    r = d.scale_ranges["e4m3"]
    assert f"none: 2^{r.k_min} needed to flush <= 0.1%, 2^{r.k_max} the most without overflow" in e4m3
    assert f"| {100 * both:.3g}% |" in next(line for line in table if line.startswith("| fp16 |"))
