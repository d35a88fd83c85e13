"""FP8 against references mixprec did not write: torchao.float8's scales, saturating casts and emulated
Float8Linear (bitwise), torchao's MX cast, torch's float8 dtypes and torch._scaled_mm (the native path, on
CPU), plus pure-Python models of blockwise tiles and delayed scaling, non-finite inputs and recipe spellings."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from mixprec.fp8.linear import ROLES, Fp8Layer, commit_, fp8_linear
from mixprec.fp8.recipe import Fp8Recipe
from mixprec.fp8.scales import on_grid, scaled_cast

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
DTYPES = [pytest.param(E4M3, id="e4m3"), pytest.param(E5M2, id="e5m2")]
INF = float("inf")


@pytest.fixture(scope="module")
def ao():
    """torchao's float8 pieces (the file still passes where torchao is missing: these tests skip)."""
    pytest.importorskip("torchao.float8")
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.config import Float8LinearConfig, ScalingGranularity
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated
    return dict(convert=convert_to_float8_training, Config=Float8LinearConfig, G=ScalingGranularity,
                tensor_to_scale=tensor_to_scale, saturated=to_fp8_saturated)


def wide(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Columns spanning six decades: a per-row/per-block scale differs from the tensor's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ----- scales and casts against torchao ----------------------------------------------------------------
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dt", DTYPES)
def test_tensorwise_and_rowwise_casts_equal_torchaos(ao, dt, pow2):
    x = wide()
    c = scaled_cast(x, dt, "tensorwise", 1, pow2=pow2)
    s = ao["tensor_to_scale"](x, dt, round_scales_to_power_of_2=pow2).reshape(1, 1)
    assert torch.equal(c.scale, s)
    assert torch.equal(u8(c.bits), u8(ao["saturated"](x * s, dt)))
    for d in (0, 1):
        c = scaled_cast(x, dt, "rowwise", d, pow2=pow2)
        s = ao["tensor_to_scale"](x, dt, scaling_granularity=ao["G"].AXISWISE, axiswise_dim=d,
                                  round_scales_to_power_of_2=pow2)
        assert c.scale.shape == s.shape and torch.equal(c.scale, s)
        assert torch.equal(u8(c.bits), u8(ao["saturated"](x * s, dt)))
        assert len(c.scale.unique()) > 1  # the rows really have scales of their own


@pytest.mark.parametrize("dt", DTYPES)
def test_mx_cast_equals_torchaos_to_mx(ao, dt):
    to_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor").to_mx
    x = wide()
    x[3, 32:64] = 0.0  # an all-zero block: torchao floors its E8M0 scale at 2**-126
    c = scaled_cast(x, dt, "mx", 1, block=32)
    biased, data = to_mx(x, dt, 32)
    assert torch.equal(u8(c.bits), u8(data))
    e8m0 = torch.exp2(u8(biased).to(torch.float32) - 127)
    assert torch.equal(torch.clamp(e8m0, min=torch.finfo(torch.float32).tiny), 1.0 / c.scale)
    nonzero = torch.ones_like(e8m0, dtype=torch.bool)
    nonzero[3, 1] = False
    assert torch.equal(e8m0[nonzero], (1.0 / c.scale)[nonzero])


# ----- fp8_linear against torchao's emulated Float8Linear ----------------------------------------------
def run_linear(forward, lin: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    y = forward(x)
    y.backward(grad)
    return y, x.grad, lin.weight.grad, lin.bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise:pow2:e4m3"])
def test_fp8_linear_is_bitwise_torchaos_float8linear(ao, recipe, dtype):
    torch.manual_seed(1)
    base = ao["Config"](emulate=True)
    cfg = base if recipe == "tensorwise" else dataclasses.replace(ao["Config"].from_recipe_name("rowwise"),
                                                                  emulate=True)
    lin = torch.nn.Linear(64, 32).to(dtype)
    ref = ao["convert"](torch.nn.Sequential(copy.deepcopy(lin)), config=cfg)
    assert type(ref[0]).__name__ == "Float8Linear"
    x, grad = torch.randn(2, 8, 64, dtype=dtype), torch.randn(2, 8, 32, dtype=dtype)
    layer = Fp8Layer("l", Fp8Recipe.parse(recipe))
    ours = run_linear(lambda t: fp8_linear(t, lin.weight, layer, lin.bias), lin, x, grad)
    theirs = run_linear(ref, ref[0], x, grad)
    for name, a, b in zip(("out", "grad_x", "grad_w", "grad_b"), ours, theirs, strict=True):
        assert a.dtype == b.dtype == dtype, name
        assert torch.equal(a, b), name
    assert not torch.equal(ours[0], torch.nn.functional.linear(x, lin.weight, lin.bias))  # FP8 rounding happened


# ----- native (torch._scaled_mm) against emulated --------------------------------------------------------
# Both paths multiply the same FP8 bits with the same scales; only the accumulation order and where 1/scale
# is applied differ (emulated: to each operand before an FP32 mm; _scaled_mm: to the FP32 accumulator).
# Measured on CPU (K=64, M in 13, 16, 40): max |native - emulated| / max |emulated| <= 2.9e-7 in FP32 with
# plain scales, exactly 0 with pow2 scales (dividing by a power of two is exact); in BF16 outputs the FP32
# difference can flip one rounding: <= 1.7e-3 measured, bounded by one BF16 ulp of the max, 2**-7.
NATIVE_BOUND = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7 + 1e-5}
NATIVE_BOUND_POW2 = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7 + 1e-6}


@pytest.mark.parametrize("m", [16, 13])  # 13 tokens: the contraction dim of grad_w is padded to 16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["tensorwise", "tensorwise:pow2", "rowwise", "rowwise:pow2", "delayed"])
def test_native_scaled_mm_matches_emulated(recipe, dtype, m):
    torch.manual_seed(2)
    w0 = (torch.randn(32, 64) * 0.1).to(dtype)
    x, grad = torch.randn(m, 64, dtype=dtype) * 3, torch.randn(m, 32, dtype=dtype)
    results = []
    for native in (False, True):
        w = w0.clone().requires_grad_()
        xi = x.clone().requires_grad_()
        y = fp8_linear(xi, w, Fp8Layer("l", Fp8Recipe.parse(recipe), native=native))
        y.backward(grad)
        results.append((y, xi.grad, w.grad))
    bound = (NATIVE_BOUND_POW2 if "pow2" in recipe else NATIVE_BOUND)[dtype]
    for name, a, b in zip(("out", "grad_x", "grad_w"), *results, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape, name
        rel = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
        assert rel <= bound, (name, rel)


def test_native_path_really_calls_scaled_mm(monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, w = torch.randn(13, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
    fp8_linear(x, w, Fp8Layer("l", Fp8Recipe.parse("rowwise"), native=True)).sum().backward()
    assert calls == [(13, 64), (13, 32), (32, 16)]  # forward, grad_x, grad_w (13 tokens padded to 16)


# ----- blockwise against a tile-by-tile reference ------------------------------------------------------
def ref_tiles(x: torch.Tensor, tile: tuple[int, int], dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(scales, dequantized, bits); per tile: scale = fmax / amax in float64 rounded to float32, bits = the
    saturating cast of x * scale."""
    a, fmax = x.numpy().astype(np.float32), torch.finfo(dt).max
    (r, c), (b0, b1) = a.shape, tile
    scales = np.zeros((-(-r // b0), -(-c // b1)), np.float32)
    scaled = np.empty_like(a)
    for i in range(0, r, b0):
        for j in range(0, c, b1):
            block = a[i:i + b0, j:j + b1]
            s = np.float32(fmax / max(float(np.abs(block).max()), 1e-12))
            scales[i // b0, j // b1] = s
            scaled[i:i + b0, j:j + b1] = np.clip(block * s, -fmax, fmax)
    bits = torch.from_numpy(scaled).to(dt)
    full = np.repeat(np.repeat(scales, b0, 0), b1, 1)[:r, :c]
    return torch.from_numpy(scales), bits.to(torch.float32) / torch.from_numpy(full), bits


@pytest.mark.parametrize("dt", DTYPES)
def test_blockwise_tiles_match_the_reference_with_ragged_edges(dt):
    x = wide(5, 300, seed=3)  # 300 = 128 + 128 + 44
    w = wide(200, 300, seed=4).flip(1)
    w[128:, 256:] = 0.0  # an all-zero (ragged) weight tile: the EPS floor
    cases = [(x, 1, False, (1, 128)), (x.t().contiguous(), 0, False, (128, 1)), (w, 1, True, (128, 128)),
             (w.t(), 0, True, (128, 128))]
    for t, dim, weight, tile in cases:
        c = scaled_cast(t, dt, "blockwise", dim, weight=weight, block=128)
        scales, deq, bits = ref_tiles(t.contiguous(), tile, dt)
        assert c.block == tile and torch.equal(c.scale, scales), tile
        assert torch.equal(u8(c.bits), u8(bits)), tile
        assert torch.equal(c.dequantize(), deq), tile
    assert len(scaled_cast(x, dt, "blockwise", 1, block=128).scale.unique()) == 15


def test_blockwise_linear_forward_and_backward_match_reference_tiles():
    torch.manual_seed(5)
    x, w, g = wide(5, 300, seed=6), wide(200, 300, seed=7) * 1e-3, torch.randn(5, 200)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr, Fp8Layer("l", Fp8Recipe.parse("blockwise")))
    y.backward(g)
    expected = {
        "out": ref_tiles(x, (1, 128), E4M3)[1] @ ref_tiles(w.t().contiguous(), (128, 128), E4M3)[1],
        "grad_x": ref_tiles(g, (1, 128), E5M2)[1] @ ref_tiles(w, (128, 128), E4M3)[1],
        "grad_w": ref_tiles(g.t().contiguous(), (1, 128), E5M2)[1] @ ref_tiles(x, (128, 1), E4M3)[1],
    }
    for name, got in (("out", y), ("grad_x", xr.grad), ("grad_w", wr.grad)):
        ref = expected[name]
        # same operands, only the mm order may differ: measured 1.1e-7 (out), 0 (grads)
        assert ((got - ref).abs().max() <= 1e-6 * ref.abs().max()).item(), name


# ----- delayed scaling against a pure-Python model -----------------------------------------------------
class DelayedModel:
    """Histories most recent first; scale = fmax / amax_used / 2**margin, amax_used = max(history) ('max') or
    history[0] ('recent'), or the tensor's own amax while nothing was pushed; non-finite amaxes not pushed."""

    def __init__(self, recipe: Fp8Recipe) -> None:
        self.r = recipe
        self.history = {role: [0.0] * recipe.history for role in ROLES}
        self.pending = dict.fromkeys(ROLES, 0.0)

    def scale(self, role: str, amax: float) -> float:
        h = self.history[role]
        past = max(h) if self.r.algo == "max" else h[0]
        used = past if past > 0 else amax
        fmax = torch.finfo(E5M2 if role == "grad" and self.r.grad_format == "e5m2" else E4M3).max
        s = float(np.float32(fmax / max(used, 1e-12)))
        if self.r.pow2 and s > 0:
            s = 2.0 ** math.floor(math.log2(s))
        return s / 2.0**self.r.margin

    def commit(self) -> None:
        for role in ROLES:
            if math.isfinite(self.pending[role]) and self.pending[role] > 0:  # 0: not cast since the last push
                self.history[role] = [self.pending[role]] + self.history[role][:-1]
            self.pending[role] = 0.0


def with_amax(a: float, seed: int) -> torch.Tensor:
    t = torch.rand(4, 8, generator=torch.Generator().manual_seed(seed)) * (0.5 * a if math.isfinite(a) else 1.0)
    t[1, 2] = -a
    return t


# Per step, per role: the amaxes of that role's casts (input cast twice: the max is recorded).
STEPS = [
    {"input": [2.0, 3.0], "weight": [0.5], "grad": [10.0]},
    {"input": [1.0], "weight": [0.25], "grad": [INF]},  # an overflowing gradient: not pushed
    {"input": [4.0, 0.75], "weight": [0.75], "grad": [1e-3]},
    {"input": [0.5], "weight": [8.0], "grad": [2.0]},
    {"input": [6.0], "weight": [0.125], "grad": [0.25]},
]


@pytest.mark.parametrize("spec", ["delayed:history=3:margin=1", "delayed:history=2:algo=recent:pow2:e4m3",
                                  "delayed:history=4:margin=2:pow2"])
def test_delayed_scaling_follows_the_model(spec):
    recipe = Fp8Recipe.parse(spec)
    layer, model = Fp8Layer("l", recipe), DelayedModel(recipe)
    seed, seen = 0, set()
    for step in STEPS:
        layer.recording = True
        for role, amaxes in step.items():
            for a in amaxes:
                seed += 1
                t = with_amax(a, seed)
                got = layer.cast(t, role, 1)
                want = model.scale(role, a)
                model.pending[role] = max(model.pending[role], a)
                assert got.scale.shape == (1, 1) and got.scale.item() == want, (spec, role, a)
                seen.add(want)
                fmax, scaled = torch.finfo(got.bits.dtype).max, t * want
                nan = torch.full_like(scaled, math.nan)
                ref = torch.where(scaled.isinf(), nan, torch.clamp(scaled, -fmax, fmax))  # an inf becomes NaN
                torch.testing.assert_close(got.bits.float(), ref.to(got.bits.dtype).float(), rtol=0, atol=0,
                                           equal_nan=True)  # a NaN's sign bit is not compared
        commit_([layer])
        model.commit()
        expected = torch.tensor([model.history[role] for role in ROLES], dtype=torch.float32)
        assert torch.equal(layer.history, expected), (spec, layer.history, expected)
        assert not layer.pending.any()
    assert INF not in layer.history and len(seen) > 3  # the inf was left out; scales did change

    before = layer.history.clone()  # evaluation: nothing recorded, scales still from the history
    layer.recording = False
    got = layer.cast(with_amax(100.0, 99), "input", 1)
    assert got.scale.item() == model.scale("input", 100.0)
    assert not layer.recorded and not layer.pending.any()
    commit_([layer])
    assert torch.equal(layer.history, before)


# ----- non-finite inputs --------------------------------------------------------------------------------
def overflowed_output(recipe: str, native: bool, warm: bool) -> torch.Tensor:
    torch.manual_seed(8)
    layer = Fp8Layer("l", Fp8Recipe.parse(recipe), native=native)
    w = torch.randn(32, 64)
    if warm:  # one committed step first: the delayed scales come from a (finite) history
        layer.recording = True
        fp8_linear(torch.randn(4, 64), w, layer)
        commit_([layer])
        assert layer.history[0, 0] > 0
        layer.recording = True
    x = torch.randn(4, 64)
    x[1, 3] = INF
    return fp8_linear(x, w, layer)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("recipe", ["tensorwise", "tensorwise:pow2", "rowwise", "blockwise", "mx", "delayed"])
def test_an_inf_input_gives_a_nonfinite_output(recipe, native):
    y = overflowed_output(recipe, native, warm=False)
    assert not torch.isfinite(y[1]).any()  # the row with the inf: no finite garbage
    assert not torch.isfinite(y).all()


@pytest.mark.parametrize("native", [False, True])
def test_an_inf_input_gives_a_nonfinite_output_with_a_delayed_history(native):
    y = overflowed_output("delayed", native, warm=True)
    assert not torch.isfinite(y).all()


# ----- recipe spellings --------------------------------------------------------------------------------
CANONICAL = ["tensorwise", "tensorwise:pow2", "tensorwise:e4m3", "delayed", "delayed:history=4:e4m3",
             "delayed:history=8:margin=2:algo=recent:pow2", "rowwise:pow2", "rowwise:pow2:e4m3", "blockwise",
             "blockwise:block=64", "mx", "mx:block=16:e4m3"]


@pytest.mark.parametrize("text", CANONICAL)
def test_recipe_round_trips(text):
    r = Fp8Recipe.parse(text)
    assert str(r) == text and Fp8Recipe.parse(str(r)) == r and Fp8Recipe.parse(r) is r


@pytest.mark.parametrize("text, canonical", [
    (" Delayed : margin=1 : history=4 ", "delayed:history=4:margin=1"), ("rowwise:e5m2", "rowwise"),
    ("blockwise:block=128", "blockwise"), ("mx:pow2", "mx"), ("delayed:history=16:algo=max", "delayed"),
    ("TENSORWISE:E4M3:POW2", "tensorwise:pow2:e4m3"), ("mx:block=32", "mx")])
def test_recipe_other_spellings_normalise(text, canonical):
    r = Fp8Recipe.parse(text)
    assert str(r) == canonical and Fp8Recipe.parse(canonical) == r


def test_recipe_fields_and_mx_forces_pow2():
    r = Fp8Recipe.parse("delayed:history=4:margin=3:algo=recent:e4m3")
    assert (r.granularity, r.history, r.margin, r.algo, r.grad_format, r.pow2) == ("delayed", 4, 3, "recent",
                                                                                    "e4m3", False)
    assert Fp8Recipe.parse("blockwise").block == 128 and Fp8Recipe.parse("mx").block == 32
    assert Fp8Recipe.parse("mx").pow2 and Fp8Recipe(granularity="mx", pow2=False).pow2
    assert not Fp8Recipe.parse("rowwise").pow2 and Fp8Recipe.parse("tensorwise").block == 0


@pytest.mark.parametrize("text, message", [
    ("colwise", "unknown FP8 scaling 'colwise'.*tensorwise.*mx"), ("delayed:history=0", "1..1024 steps"),
    ("delayed:history=2000", "1..1024 steps"), ("delayed:margin=9", "0..8 powers of two"),
    ("blockwise:block=3", "power of two, got block=3"), ("tensorwise:history=4", "delayed scaling only"),
    ("rowwise:margin=1", "delayed scaling only"), ("rowwise:fast", "unknown FP8 recipe option 'fast'"),
    ("delayed:margin=-1", "unknown FP8 recipe option"), ("delayed:algo=mean", "'max' or 'recent'"),
    ("tensorwise:block=32", "blockwise and mx scaling only"), ("", "an FP8 recipe is a granularity"),
])
def test_recipe_errors_are_clear(text, message):
    with pytest.raises(ValueError, match=message):
        Fp8Recipe.parse(text)
    with pytest.raises(ValueError, match="e5m2 \\(hybrid\\) or e4m3"):
        Fp8Recipe(grad_format="e3m4")


def test_a_role_not_cast_since_the_last_push_pushes_nothing():
    # A training forward without a backward (e.g. a probe) casts input and weight only: the gradient's
    # history keeps its entries rather than taking a 0 that would drop its "recent" amax.
    layer = Fp8Layer("l", Fp8Recipe.parse("delayed:history=2:algo=recent"))
    layer.recording = True
    for role in ROLES:
        layer.cast(torch.full((2, 16), 3.0), role, 1)
    commit_([layer])
    layer.cast(torch.full((2, 16), 5.0), "input", 1)
    commit_([layer])
    assert layer.history.tolist() == [[5.0, 3.0], [3.0, 0.0], [3.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_rounding_onto_the_grid_in_fp32_is_torchs_cast_bit_for_bit(dtype):
    # Every FP8 value, the midpoints between neighbours (ties to even) and the FP32 numbers either side of
    # them, signed zeros, FP32 subnormals, values beyond the max, and a million values over 18 decades.
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    inf = torch.tensor(math.inf)
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(1_000_000, generator=g) * 10 ** torch.empty(1_000_000).uniform_(-12, 6, generator=g)
    x = torch.cat([grid, -grid, mids, -mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), wide,
                   torch.tensor([0.0, -0.0, 1e-40, -1e-45, 500.0, -470.0, 1e6, -1e30])])
    top = torch.finfo(dtype).max
    expected = torch.clamp(x, -top, top).to(dtype).float()
    assert torch.equal(on_grid(x, dtype).view(torch.int32), expected.view(torch.int32))
    assert on_grid(torch.tensor([math.inf, -math.inf, math.nan]), dtype)[:2].tolist() == [top, -top]  # saturated
    assert on_grid(torch.tensor([math.nan]), dtype).isnan().all()
    # In a scaled cast, an inf in the input is NaN (the step skips); a finite value whose product with a
    # (delayed) scale overflows FP32 saturates.
    cast = scaled_cast(torch.tensor([[math.inf, 1e30, 1.0]]), dtype, "tensorwise", 1, scale=torch.tensor([[1e10]]))
    assert cast.values[0, 0].isnan() and cast.values[0, 1:].tolist() == [top, top]
