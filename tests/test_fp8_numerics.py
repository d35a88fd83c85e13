"""Seeing FP8: mp.watch counts a prepared FP8 model's casts (exactly, as scaled_cast gives them), names the
layer whose cast saturated (also in mp.trace_nonfinite), and mp.doctor recommends FP8 where it is safe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mixprec as mp
from mixprec.fp8.scales import FP8_DTYPES, amax_to_scale, expand, scaled_cast
from mixprec.numerics.fp8_casts import Fp8Survey
from mixprec.report.doctor import write_doctor_report
from mixprec.state import prepared_state

SATURATES_FROM = {"e4m3": 464.0, "e5m2": 61440.0}  # max + half an ulp: rounding alone would stay in range
# The casts one step of an FP8 Linear makes, in order: forward x @ W^T, then grad_x = g @ W, grad_W = g^T @ x.
STEP_CASTS = [("input", 1), ("weight", 0), ("grad", 1), ("weight", 0), ("grad", 1), ("input", 0)]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))  # FP8: "2"


def prepared(model: nn.Module, policy: str) -> tuple[nn.Module, torch.optim.Optimizer, mp.LossScaler]:
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01), policy)
    assert opt is not None
    return model, opt, scaler


def train_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: mp.LossScaler, x: torch.Tensor) -> None:
    with mp.autocast(model):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    mp.step(opt, scaler)
    opt.zero_grad()


def recorder(seen: list[tuple[str, torch.Tensor]]):
    """An observer of one's own (set before the watch): what every cast was given, in order."""
    def observe(name, role, t, scaled):
        seen.append((role, t.detach().clone()))
    return observe


def direct(casts: list[tuple[str, torch.Tensor]], granularity: str) -> dict[str, dict[str, float]]:
    """Per role, the counts straight from scaled_cast on the same tensors, with the dims of STEP_CASTS."""
    found: dict[str, dict[str, float]] = {}
    for (role, t), (expected_role, dim) in zip(casts, STEP_CASTS, strict=True):
        assert role == expected_role
        fmt = "e5m2" if role == "grad" else "e4m3"
        c = scaled_cast(t, FP8_DTYPES[fmt], granularity, dim, weight=role == "weight",
                        block={"blockwise": 128, "mx": 32}.get(granularity, 0), pow2=granularity == "mx")
        x = t.float()
        scaled = (x * expand(c.scale, c.block, tuple(x.shape))).abs()
        row = found.setdefault(role, {"count": 0, "nonzero": 0, "saturated": 0, "flushed": 0, "amax": 0.0,
                                      "scale_min": math.inf, "scale_max": -math.inf})
        row["count"] += x.numel()
        row["nonzero"] += int((x != 0).sum())
        row["saturated"] += int((scaled >= SATURATES_FROM[fmt]).sum())
        row["flushed"] += int(((x != 0) & (c.dequantize() == 0)).sum())
        row["amax"] = max(row["amax"], x.abs().max().item())
        row["scale_min"] = min(row["scale_min"], c.scale.min().item())
        row["scale_max"] = max(row["scale_max"], c.scale.max().item())
    return found


def as_direct(stats: mp.numerics.Fp8Stats) -> dict[str, float]:
    return {"count": stats.count, "nonzero": stats.nonzero, "saturated": stats.saturated, "flushed": stats.flushed,
            "amax": stats.amax, "scale_min": stats.scale_min, "scale_max": stats.scale_max}


def outlier_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    x[0, 0] = 1e6  # one token's feature: a tensorwise scale maps it onto 448 and almost all the rest onto 0
    return x, torch.randn(64, 32, generator=g)


@pytest.mark.parametrize("granularity", ["rowwise", "mx"])
def test_watch_counts_every_cast_exactly_as_scaled_cast_and_gives_the_observers_back(granularity):
    model, opt, scaler = prepared(nn.Sequential(nn.Linear(32, 32)), f"fp8-{granularity},rule=0:e4m3")
    layer = prepared_state(model).fp8_layers["0"]
    seen: list[tuple[str, torch.Tensor]] = []
    mine = layer.observer = recorder(seen)
    x, g = outlier_batch()
    x.requires_grad_()  # so that grad_x is computed too: all six casts
    with mp.watch(model, formats=["bf16"]) as w:
        with mp.autocast(model):
            (model(x).float() * g).sum().backward()
    assert layer.observer is mine and len(seen) == 6  # chained to, then given back
    stats = w.fp8_stats()
    assert w.fp8_stats() == stats and set(stats) == {("0", "input"), ("0", "weight"), ("0", "grad")}
    expected = direct(seen, granularity)
    for role, want in expected.items():
        assert as_direct(stats["0", role]) == want, role
        assert stats["0", role].casts == 2 and stats["0", role].format == ("e5m2" if role == "grad" else "e4m3")
    assert stats["0", "input"].flushed > 0
    if granularity == "mx":  # MX's power-of-two scales put a block's amax anywhere in [256, 512): some clamp
        assert sum(s.saturated for s in stats.values()) > 0
    with mp.autocast(model):  # after the watch its counts stay as they were
        model(x).sum().backward()
    assert len(seen) == 12 and w.fp8_stats() == stats
    mp.unprepare(model)


def test_an_outlier_flushes_most_values_under_tensorwise_and_few_under_rowwise():
    shares = {}
    for granularity in ("tensorwise", "rowwise"):
        model, _, _ = prepared(make_model(), f"fp8-{granularity},rule=name:0:e4m3")
        assert set(prepared_state(model).fp8_layers) == {"0", "2"}
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        x[0, 0] = 1e6
        with mp.watch(model, kinds=["activation"], formats=["bf16"]) as w:
            with mp.autocast(model):
                model(x).float().sum().backward()
        shares[granularity] = w.fp8_stats()["0", "input"].share()
        assert all(layer.observer is None for layer in prepared_state(model).fp8_layers.values())
    assert shares["tensorwise"]["flushed"] > 0.5  # 1e6 onto 448: |x| < 2.2 goes below E4M3's smallest subnormal
    assert 0 < shares["rowwise"]["flushed"] < 0.05  # only the outlier's row (forward) and column (grad_W)
    assert shares["tensorwise"]["saturated"] == shares["rowwise"]["saturated"] == 0


def test_a_delayed_scale_behind_a_growing_amax_saturates_and_the_watch_and_the_trace_name_the_layer():
    model, opt, scaler = prepared(make_model(), "fp8-delayed")
    layer = prepared_state(model).fp8_layers["2"]
    for step in range(3):
        train_step(model, opt, scaler, torch.randn(8, 16, generator=torch.Generator().manual_seed(step)))
    seen: list[tuple[str, torch.Tensor]] = []
    layer.observer = recorder(seen)
    x = 100 * torch.randn(8, 16, generator=torch.Generator().manual_seed(9))  # the input's amax jumps 100x
    history = layer.history.clone()  # what this step's scales come from (mp.step pushes its amaxes after it)
    with mp.watch(model, kinds=["activation"]) as w:
        train_step(model, opt, scaler, x)
    saturated = w.fp8_saturated()
    assert saturated and saturated[0].layer == "2" and "2 (input, e4m3, delayed)" in str(saturated[0])
    inputs = [t for role, t in seen if role == "input"]
    assert len(inputs) == 2 and layer.history[0, 1] == history[0, 0]  # the step pushed its amaxes
    scale = amax_to_scale(history[0].amax(), torch.float8_e4m3fn)
    expected = sum(int((t.float().abs() * scale >= 464).sum()) for t in inputs)
    stats = w.fp8_stats()["2", "input"]
    assert stats.saturated == expected > 0 and stats.scale_min == stats.scale_max == scale.item()
    assert all(s.layer == "2" for s in saturated)

    layer.observer = None
    state = layer.history.clone(), layer.pending.clone(), layer.recorded
    with mp.autocast(model):  # a non-finite loss, and a layer behind the jump: the trace says both
        trace = mp.trace_nonfinite(model, lambda: model(x * 3).float().sum() * torch.tensor(math.inf))
    assert trace is not None and trace.phase == "forward" and "2 (input)" in trace.fp8_saturated
    assert str(trace).endswith("FP8 casts that saturated in this step: " + ", ".join(trace.fp8_saturated))
    assert torch.equal(layer.history, state[0]) and torch.equal(layer.pending, state[1])  # left as it was
    assert layer.recorded == state[2] and layer.observer is None


def test_the_survey_casts_an_unprepared_linear_as_an_fp8_layer_would():
    model = nn.Sequential(nn.Linear(32, 32))
    x, g = outlier_batch()
    with Fp8Survey(model, ["tensorwise", "blockwise"]) as survey:
        (model(x) * g).sum().backward()
    stats = survey.stats()
    w = model[0].weight.detach()
    for granularity in ("tensorwise", "blockwise"):
        casts = [("input", x), ("weight", w.t()), ("grad", g), ("weight", w), ("grad", g.t()), ("input", x)]
        for role, want in direct(casts, granularity).items():
            assert as_direct(stats["0", role, granularity]) == want, (granularity, role)
    assert stats["0", "input", "tensorwise"].share()["flushed"] > 0.5
    model(x).sum().backward()  # removed: nothing more is counted
    assert survey.stats() == stats


class Offset(nn.Module):
    """A hot channel, as LLM activations have: feature 0 of what the next layer reads is 1e5 larger."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tensor([1e5] + [0.0] * (x.shape[-1] - 1))


def doctor_batches() -> list[torch.Tensor]:
    return [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_the_doctor_recommends_fp8_where_it_is_safe_and_rules_out_the_layer_that_is_not(tmp_path):
    torch.manual_seed(0)
    safe = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 16))
    d = mp.doctor(safe, doctor_batches(), lambda m, x: m(x).pow(2).mean())
    assert d.fp8_policy == "fp8-tensorwise" and d.policy.startswith("f16-master")  # the 16-bit advice as before
    assert [(v.layer, v.fp8, v.default) for v in d.fp8_layers] == [
        ("0", False, "the first Linear layer"), ("2", True, ""), ("4", True, ""), ("6", False, "the last Linear layer")]

    torch.manual_seed(0)
    hot = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), Offset(), nn.Linear(32, 32),
                        nn.LayerNorm(32), nn.Linear(32, 16))
    d = mp.doctor(hot, doctor_batches(), lambda m, x: m(x).pow(2).mean())
    verdicts = {v.layer: v for v in d.fp8_layers}
    assert not any(verdicts["5"].safe.values()) and verdicts["5"].worst["tensorwise"] == "input"
    assert verdicts["5"].shares["tensorwise"]["flushed"] > 0.1 and verdicts["2"].safe["tensorwise"]
    assert d.fp8_policy == "fp8-tensorwise,rule=name:5:bf16"
    policy = mp.Policy.parse(d.fp8_policy)
    fp8 = {m.name for m in policy.module_precisions(hot) if m.fp8}
    assert fp8 == {v.layer for v in d.fp8_layers if v.fp8} == {"2"}
    assert any(e.startswith("kept in BF16 by a rule: 5 (tensorwise flushes") for e in d.fp8_evidence)
    text = str(d)
    assert f"recommended FP8 policy: {d.fp8_policy}" in text and "0 / 0 safe" in text
    report = write_doctor_report(d, tmp_path, "hot channel").read_text()
    assert "## FP8 matmuls" in report and f"Recommended FP8 policy: `{d.fp8_policy}`" in report
    assert "| `5` | no: kept in BF16 by a rule |" in report and "| `2` | yes |" in report
    assert d.to_dict()["fp8_policy"] == d.fp8_policy and len(d.to_dict()["fp8_stats"]) == 4 * 3 * 4

    model, opt, scaler = prepared(hot, d.fp8_policy)  # used: those layers run FP8, and nothing saturates there
    with mp.watch(model, kinds=["activation"]) as w:
        train_step(model, opt, scaler, doctor_batches()[0])
    assert set(prepared_state(model).fp8_layers) == {"2"} and not w.fp8_saturated()
    assert w.fp8_stats()["2", "input"].share()["flushed"] <= 0.001


def test_no_fp8_advice_without_layers_fp8_would_run_and_none_asked():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    d = mp.doctor(model, doctor_batches(), lambda m, x: m(x).pow(2).mean())
    assert d.fp8_policy is None and "FP8 not recommended" in d.fp8_evidence[-1]
    assert [v.default for v in d.fp8_layers] == ["the first Linear layer", "its dims 32x10 are not multiples of 16"]
    d = mp.doctor(model, doctor_batches(), lambda m, x: m(x).pow(2).mean(), fp8=False)
    assert d.fp8_policy is None and not d.fp8_layers and "FP8" not in str(d)
    with mp.watch(model, fp8=True) as w:  # an unprepared model: no FP8 casts to count
        model(torch.randn(2, 16))
    assert w.fp8_stats() == {} and w.fp8_saturated() == []
