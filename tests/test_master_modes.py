"""Master modes that cost less than an FP32 copy (compact, kahan, stochastic): their numerics, against FP32.

The settings (DDP, resume, skips, compile, closures) are in test_master_modes_settings.py.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import mixprec as mp
from mixprec.master import compact, kahan, stochastic
from mixprec.master.transient import TransientMasters


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


# ----- compact: the FP32 master, every bit, in a BF16 parameter and an int16 remainder ------------------

def test_compact_split_and_join_give_back_every_fp32_bit_pattern():
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130 + 2**-134]).view(torch.int32)  # subnormal too
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.1754942e-38,
                            math.inf, -math.inf]).view(torch.int32)
    masters = torch.cat([patterns, ties, special]).view(torch.float32)
    bits = masters.view(torch.int32)
    number = ~masters.isnan()
    for storage in (torch.bfloat16, torch.float32):  # native BF16, and BF16 values emulated in FP32 storage
        param = torch.empty(masters.shape, dtype=storage)
        rem = compact.remainder_for(param)
        compact.split_(masters, param, rem)
        back = compact.join(param, rem)
        # The parameter is the master rounded to nearest even, bit for bit what an FP32 master's copy-back gives.
        assert torch.equal(_bits(param.float())[number], _bits(masters.to(torch.bfloat16).float())[number])
        # Every master comes back exactly, but the tie above an even BF16 value (in magnitude), which 16 bits
        # cannot tell from the tie below it: it comes back one FP32 ulp nearer to its (same) parameter.
        lost = number & ((bits & 0x1FFFF) == 0x8000)  # low 16 bits 0x8000 and the parameter's last bit 0
        assert lost[-15:-11].tolist() == [True, False, True, True] and 0 < int(lost.sum()) < 20
        assert torch.equal(_bits(back)[number & ~lost], bits[number & ~lost])
        assert torch.equal(_bits(back)[lost], bits[lost] - 1)
        assert torch.equal(back[lost].to(torch.bfloat16), masters[lost].to(torch.bfloat16))
        assert back[~number].isnan().all() and param[~number].isnan().all()  # NaN stays NaN


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _train(policy: str, steps: int, overflow_at: tuple[int, ...] = (), lr: float = 3e-3):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model, opt, scaler = mp.prepare(model, opt, policy)
    g = torch.Generator().manual_seed(1)
    applied = []
    for i in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)
        with mp.autocast(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
        if i in overflow_at:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        applied.append(mp.step(opt, scaler, max_grad_norm=1.0).applied)
        opt.zero_grad()
    return model, opt, applied


@pytest.mark.parametrize("execution", ["emulated", "native"])
def test_compact_trains_bitwise_as_fp32_masters_over_many_steps_with_skips(execution):
    policy = f"params=bf16,compute=bf16,scaling=dynamic,execution={execution}"
    overflows = (3, 40, 41, 90)
    ref, ref_opt, ref_applied = _train(policy + ",master=fp32", 120, overflows)
    low, low_opt, low_applied = _train(policy + ",master=compact", 120, overflows)
    assert ref_applied == low_applied and ref_applied.count(False) == len(overflows)
    for (name, p), q in zip(ref.named_parameters(), low.parameters(), strict=True):
        assert torch.equal(p, q), name
    for a, b in zip(ref_opt.grad_slots, low_opt.grad_slots, strict=True):
        assert torch.equal(_bits(ref_opt.master_value(a)), _bits(low_opt.master_value(b)))
    for a, b in zip(ref_opt.state.values(), low_opt.state.values(), strict=True):  # Adam moments too
        assert all(torch.equal(a[k], b[k]) for k in a)


# ----- kahan and stochastic keep the updates bf16-pure loses ------------------------------------------

def _tiny_updates(mode: str, steps: int = 256, n: int = 4096) -> torch.Tensor:
    """SGD with a gradient of 1 and lr 2^-12 on weights 1.0: each update is 2^-12 relative, an eighth of
    BF16's half ulp (2^-9 just below 1), so a plain BF16 update rounds it away."""
    w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = mp.MasterWeights(torch.optim.SGD([w], lr=2.0**-12), mode=mode, seed=3)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
        opt.zero_grad()
    return w.detach().float()


def test_kahan_and_stochastic_keep_updates_that_bf16_pure_loses():
    expected = 1.0 - 256 * 2.0**-12  # FP32 reference: 0.9375, exact in FP32
    assert torch.equal(_tiny_updates("none"), torch.ones(4096))  # bf16-pure stalls
    assert torch.equal(_tiny_updates("fp32"), torch.full((4096,), expected))
    # Kahan: master = param + compensation. Each compensation is a multiple of 2^-12 below 2^-9 in size,
    # 4 significant bits, exact in BF16's 8; so every split is exact and the result is FP32's, bit for bit.
    assert torch.equal(_tiny_updates("kahan"), torch.full((4096,), expected))
    # Stochastic: unbiased per step; the final error of one weight is a sum of 256 independent roundings,
    # each of mean 0 and |error| < one ulp (2^-8 below 1), so its std is <= sqrt(256) * 2^-8 / 2 = 2^-5. The
    # mean of 4096 independent weights has std <= 2^-5 / 64 ~ 4.9e-4: 6 sigma is 2.9e-3 (the stall is 0.0625).
    sr = _tiny_updates("stochastic")
    assert abs(sr.mean().item() - expected) < 6 * 2.0**-5 / 64
    assert sr.std().item() < 2.0**-5 * 1.5  # spread as derived, not a stuck or runaway weight


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.full((100_000,), 1.0 + 0.3 * 2.0**-7)  # 0.3 of the way from 1 to the next BF16 value
    param = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic.split_(x, param, mp.BF16, stochastic.noise(x.shape, seed=0, index=0, step=torch.tensor(0)))
    up = (param.float() > 1.0).double().mean().item()
    assert set(param.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(up - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x.numel())  # binomial bound, 5 sigma
    again = torch.empty_like(param)
    stochastic.split_(x, again, mp.BF16, stochastic.noise(x.shape, 0, 0, torch.tensor(0)))
    assert torch.equal(_bits(again), _bits(param))  # same seed, step, parameter: same bits
    other = torch.empty_like(param)
    stochastic.split_(x, other, mp.BF16, stochastic.noise(x.shape, 0, 0, torch.tensor(1)))
    assert not torch.equal(_bits(other), _bits(param))  # the next step draws new bits
    fp16 = torch.empty_like(x, dtype=torch.float16)  # FP16 parameters work the same way
    y = torch.full((100_000,), 1.0 + 0.7 * 2.0**-10)
    stochastic.split_(y, fp16, mp.F16, stochastic.noise(y.shape, 0, 0, torch.tensor(0)))
    assert abs((fp16.float() > 1.0).double().mean().item() - 0.7) < 5 * math.sqrt(0.21 / y.numel())


def test_kahan_split_skipped_on_the_device_keeps_both_buffers():
    p, c = torch.empty(3, dtype=torch.bfloat16), torch.empty(3, dtype=torch.bfloat16)
    kahan.split_(torch.tensor([1.0 + 2.0**-12, 2.0, -3.0 - 2.0**-10]), p, c, None)
    before = (p.clone(), c.clone())
    kahan.split_(torch.tensor([5.0, 5.0, 5.0]), p, c, None, keep=torch.tensor(True))
    assert torch.equal(p, before[0]) and torch.equal(c, before[1])
    assert kahan.join(p, c).tolist() == [1.0 + 2.0**-12, 2.0, -3.0 - 2.0**-10]


# ----- checkpoints: FP32 masters in every mode, loading across modes ----------------------------------

def _round_trip(sd: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("source,target", [("fp32", "compact"), ("compact", "fp32"), ("compact", "kahan"),
                                           ("kahan", "stochastic"), ("stochastic", "compact")])
def test_a_state_dict_loads_into_another_master_mode(source, target):
    model = _mlp().to(torch.bfloat16)
    opt = mp.MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-2), mode=source)
    x = torch.randn(4, 12).to(torch.bfloat16)
    for _ in range(5):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    saved = _round_trip(opt.state_dict())
    assert all(m.dtype == torch.float32 for m in saved["masters"])
    other = _mlp(seed=7).to(torch.bfloat16)
    opt2 = mp.MasterWeights(torch.optim.AdamW(other.parameters(), lr=1e-2), mode=target)
    opt2.load_state_dict(saved)
    values = [opt2.master_value(s) for s in opt2.grad_slots]
    if target in ("fp32", "compact"):  # these hold any FP32 master exactly
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(saved["masters"], values, strict=True))
    else:  # within one BF16 ulp of the master (kahan: much closer; stochastic: one of its two neighbours)
        for a, b in zip(saved["masters"], values, strict=True):
            assert ((a - b).abs() <= a.abs() * 2.0**-7 + 1e-30).all()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):  # the model follows
        assert ((a.float() - b.float()).abs() <= a.float().abs() * 2.0**-7 + 1e-30).all()
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the next steps run from there
    other(x).float().pow(2).mean().backward()
    opt2.step()
    assert all(torch.isfinite(p).all() for p in other.parameters())


def test_stochastic_state_is_checked_when_loaded():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = mp.MasterWeights(torch.optim.SGD([w], lr=0.1), mode="stochastic", seed=5)
    sd = opt.state_dict()
    assert sd["stochastic"] == {"seed": 5, "step": 0}
    before = w.detach().clone()
    with pytest.raises(ValueError, match="'stochastic' entry must be"):
        opt.load_state_dict({**sd, "stochastic": {"seed": 5, "step": -1}})
    assert torch.equal(w, before)


# ----- memory: chunks bound the FP32 values alive during the step --------------------------------------

def test_transient_masters_are_stepped_in_chunks_no_larger_than_the_largest_parameter():
    sizes = [(40, 25), (10,), (10,), (20, 25), (30, 20), (7,)]  # largest: 1000 elements
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in sizes]
    inner = torch.optim.Adam(params, lr=1e-3)
    opt = mp.MasterWeights(inner, mode="compact")
    alive: list[int] = []

    def count(optimizer, args, kwargs):
        alive.append(sum(t.numel() for g in optimizer.param_groups for t in g["params"]
                         if t.untyped_storage().nbytes() > 4))

    inner.register_step_pre_hook(count)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert sum(alive) == sum(p.numel() for p in params) and max(alive) <= 1000 and len(alive) >= 2
    assert all(m.untyped_storage().nbytes() == 4 for m in opt.master_params)  # nothing stays behind
    held = sum(t.untyped_storage().nbytes() for t in opt.held_tensors())
    assert held == 2 * sum(p.numel() for p in params)  # 2 bytes a parameter: the remainders


def test_policies_name_modes_and_bytes():
    for name, mode, nbytes in [("bf16-master", "fp32", 6), ("bf16-compact", "compact", 4),
                               ("bf16-kahan", "kahan", 4), ("bf16-sr", "stochastic", 2), ("bf16-pure", "none", 2)]:
        policy = mp.Policy.parse(name)
        assert policy.master_mode == mode and policy.weight_bytes == nbytes
        assert mp.Policy.parse(str(policy)) == policy
    custom = mp.Policy.parse("bf16-master,master=kahan")
    assert str(custom) == "bf16-kahan" and custom != mp.Policy.parse("bf16-master")
    assert "master=compact" in str(mp.Policy.parse("bf16-compact,scaling=dynamic"))
    with pytest.raises(ValueError, match="master='kahn' is not a master mode; valid: fp32"):
        mp.Policy.parse("bf16-master,master=kahn")
    table = mp.Policy.parse("bf16-compact").explain(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "compact" in table.splitlines()[2] and "4 B a bf16 weight with its master" in table.splitlines()[0]


def test_compact_refuses_fp16_parameters_through_prepare_and_changes_nothing():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="master mode 'compact' .* bf16 parameters only. Use 'kahan' or 'stochastic'"):
        mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master,master=compact")
    assert mp.prepared_state(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fsdp2_refuses_transient_masters_plainly():
    from mixprec.apply import _sharded_execution
    with pytest.raises(ValueError, match="master=compact under FSDP2 is not supported.*use master=fp32"):
        _sharded_execution(mp.Policy.parse("bf16-compact"), torch.device("cpu"))


def test_transient_store_follows_weights_written_from_outside():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = mp.MasterWeights(torch.optim.SGD([w], lr=2.0**-12), mode="compact")
    w.grad = torch.ones_like(w)
    opt.step()  # the master is 1 - 2^-12, the parameter 1.0
    low: TransientMasters = opt._low
    assert opt.master_value(opt.grad_slots[0]).tolist() == [1 - 2.0**-12] * 3
    with torch.no_grad():
        w.copy_(torch.full((3,), 2.0))  # e.g. model.load_state_dict
    opt.zero_grad()
    w.grad = torch.zeros_like(w)
    opt.step()  # the remainder of the old weight is dropped: the optimizer continues from 2.0
    assert opt.master_value(opt.grad_slots[0]).tolist() == [2.0] * 3 and low.held_tensors()[0].eq(0).all()


# ----- the harness: a run resumed under another master mode, and its checkpoints read by an FP32 model --

def test_a_run_resumes_under_another_master_mode_with_the_same_weights(tmp_path):
    from mixprec.harness.checkpoints import load_checkpoint
    from mixprec.harness.training import train

    straight = train("lm", "bf16-master", steps=12, out=tmp_path / "a")
    train("lm", "bf16-master", steps=12, stop_at=5, out=tmp_path / "b")
    resumed = train("lm", "bf16-compact", steps=12, resume=True, out=tmp_path / "b")
    assert resumed.policy == "bf16-compact" and resumed.final_metric == straight.final_metric
    a = load_checkpoint(tmp_path / "a" / "checkpoint-000012.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint-000012.pt")
    # The model computed with the same BF16 weights at every step (same losses); the FP32 view differs at
    # most where a master met the one tie compact keeps 1 ulp lower (about one element-step in 2^17).
    assert a["history"] == b["history"]
    differ = sum(int((a["model"][k] != b["model"][k]).sum()) for k in a["model"])
    assert differ <= sum(v.numel() for v in a["model"].values()) * 7 / 2**17
    with pytest.raises(ValueError, match="the checkpoint is of another run: policy 'bf16-compact' .*'f16-master'"):
        train("lm", "f16-master", steps=12, resume=True, out=tmp_path / "b")  # not a master-mode change


def test_an_fp32_model_loads_the_fp32_weights_a_checkpoint_holds(tmp_path):
    from mixprec.harness.checkpoints import load_checkpoint
    from mixprec.harness.training import train
    from mixprec.recipes import get_recipe

    train("lm", "bf16-compact", steps=4, out=tmp_path)
    saved = load_checkpoint(tmp_path / "checkpoint-000004.pt")
    torch.manual_seed(0)
    fp32 = get_recipe("lm").make_model()
    fp32.load_state_dict(saved["model"])  # an FP32 run's model, no mixprec
    masters = iter(saved["optimizer"]["masters"])
    for has, (name, p) in zip(saved["optimizer"]["has_master"], fp32.named_parameters(), strict=True):
        assert p.dtype == torch.float32
        if has:  # the masters' values, not the BF16 weights
            assert torch.equal(p.detach(), next(masters)), name


def test_rules_give_modules_their_own_master_mode():
    rule = mp.Rule.parse("2:bf16//fp32")
    assert rule.master == "fp32" and rule.params is None and str(rule) == "2:bf16//fp32"
    assert str(mp.Rule.parse("2:bf16/bf16/kahan")) == "2:bf16/bf16/kahan"
    with pytest.raises(ValueError, match="a rule's master mode must be one of"):
        mp.Rule.parse("2:bf16//kahn")
    policy = mp.Policy.parse("bf16-compact,rule=2:bf16//fp32")
    assert mp.Policy.parse(str(policy)) == policy
    rows = policy.explain(_mlp()).splitlines()
    assert rows[2].split()[5] == "compact" and rows[3].split()[5] == "fp32"  # module 0, module 2
    # The head keeps FP32 masters, the rest compact remainders: trained, the same as all-fp32 masters.
    mixed, opt, _ = _train("bf16-compact,rule=2:bf16//fp32", 30)
    ref, ref_opt, _ = _train("bf16-master", 30)
    assert [type(opt._store(s)).__name__ for s in opt.grad_slots] == ["FP32Masters"] * 2 + ["TransientMasters"] * 2
    for p, q in zip(mixed.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    held = {t.untyped_storage().nbytes() for t in opt.held_tensors()}
    assert held == {3 * 24 * 4, 3 * 4, 24 * 12 * 2, 24 * 2}  # FP32 head masters, int16 remainders


def test_stochastic_bf16_fast_path_rounds_as_quantize_bits():
    from mixprec.quantize import quantize_bits
    m = torch.randn(50_000) * 3
    m[:6] = torch.tensor([math.nan, math.inf, -math.inf, 3.4e38, -0.0, 1e-40])  # specials, an FP32 subnormal
    bits = stochastic.noise(m.shape, seed=2, index=9, step=torch.tensor(4))
    fast = torch.empty_like(m, dtype=torch.bfloat16)
    stochastic.split_(m, fast, mp.BF16, bits)
    general = quantize_bits(m, mp.BF16, "stochastic", noise=bits)
    assert fast[0].isnan() and torch.equal(_bits(fast.float()[1:]), _bits(general[1:]))
