"""The reference training loop on shortened runs: the paper's findings, exact resume, memory, errors."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from helpers import named_tensors as _tensors  # shared with test_kill_resume
from mixprec.harness.checkpoints import find_checkpoint
from mixprec.harness.training import compare, train
from mixprec.recipes import get_recipe

THREADS = 1  # small models: one thread is fastest, and steadiest next to other test processes


def test_stopped_and_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    # digits has BatchNorm (running stats), FP32 masters, Adam state, a dynamic scaler and an LR schedule.
    kwargs = dict(steps=24, threads=THREADS)
    whole = train("digits", "f16-master", out=tmp_path / "whole", **kwargs)
    stopped = train("digits", "f16-master", out=tmp_path / "resumed", stop_at=9, **kwargs)
    assert stopped.steps == 9
    resumed = train("digits", "f16-master", out=tmp_path / "resumed", resume=True, **kwargs)

    _, a, _ = find_checkpoint(tmp_path / "whole")
    _, b, _ = find_checkpoint(tmp_path / "resumed")
    state_a = dict(_tensors({k: a[k] for k in ("model", "optimizer", "scaler", "scheduler")}))
    state_b = dict(_tensors({k: b[k] for k in ("model", "optimizer", "scaler", "scheduler")}))
    assert state_a.keys() == state_b.keys() and any("master" in k for k in state_a)
    different = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not different, different
    assert resumed.history == whole.history  # every loss, scale and metric, bit for bit
    assert resumed.final_metric == whole.final_metric and resumed.steps == 24


def test_resume_refuses_another_runs_checkpoint_and_a_missing_one(tmp_path):
    train("tiny-updates", "f32", steps=3, out=tmp_path, threads=THREADS)
    with pytest.raises(ValueError, match="another run: policy 'f32' \\(asked: 'f16-master'\\)"):
        train("tiny-updates", "f16-master", steps=3, out=tmp_path, resume=True)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        train("tiny-updates", "f32", steps=3, out=tmp_path / "empty", resume=True)


def test_underflow_fails_without_loss_scaling_and_matches_fp32_with_it():
    c = compare("underflow", ["f32", "f16-master", "f16-master-noscale"], steps=60, threads=THREADS)
    f32, master, noscale = (c.runs_of(p)[0] for p in c.policies)
    assert f32.final_metric < 0.8 * f32.initial_metric  # FP32 learns
    # Without scaling every gradient flushed to zero: not one weight moved.
    assert noscale.final_metric == noscale.initial_metric
    assert master.final_metric == pytest.approx(f32.final_metric, rel=0.01)
    assert master.skipped_steps == 0 and master.final_loss_scale == 2.0**16


def test_tiny_updates_stall_without_master_weights_and_match_fp32_with_them():
    c = compare("tiny-updates", ["f32", "f16-master", "f16-pure"], steps=300, threads=THREADS)
    f32, master, pure = (c.runs_of(p)[0] for p in c.policies)
    assert f32.final_metric < 0.5 * f32.initial_metric
    # (nearly) every update rounded away; Adam's 16-bit state lets a few through, as it does natively
    assert pure.final_metric > 0.95 * pure.initial_metric
    assert master.final_metric == pytest.approx(f32.final_metric, rel=0.05)


def test_digits_f16_master_lies_within_fp32_spread_over_three_seeds():
    c = compare("digits", ["f32", "f16-master"], seeds=3, steps=100, threads=THREADS)
    f32 = [r.final_metric for r in c.runs_of("f32")]
    master = statistics.fmean(r.final_metric for r in c.runs_of("f16-master"))
    assert min(f32) > 0.9
    assert min(f32) <= master <= max(f32), (master, f32)


def test_lm_and_rnn_f16_master_track_fp32_on_a_short_run():
    for name in ("lm", "rnn"):
        c = compare(name, ["f32", "f16-master"], steps=25, threads=THREADS)
        f32, master = (c.runs_of(p)[0] for p in c.policies)
        assert f32.final_metric < f32.initial_metric - 1.0  # learning, in bits per byte
        assert master.final_metric == pytest.approx(f32.final_metric, abs=0.05), name
        assert "corpus_sha256" in master.data_info


def test_skipped_steps_do_not_advance_the_lr_schedule():
    # A loss 2^12 times larger overflows FP16 at the initial scale 2^16: the first steps are skipped.
    base = get_recipe("tiny-updates")
    loud = dataclasses.replace(base, loss=lambda model, batch: base.loss(model, batch) * 2.0**12, warmup_steps=5)
    result = train(loud, "f16-master", steps=12, threads=THREADS)
    steps = [r for r in result.history if r["kind"] == "step"]
    assert result.skipped_steps > 0 and not steps[0]["applied"]
    assert result.final_loss_scale < 2.0**16
    applied_before = 0
    for record in steps:
        expected = loud.lr * loud.lr_factor(applied_before, 12)
        assert record["lr"] == pytest.approx(expected), record
        applied_before += record["applied"]


def test_train_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train("tiny-updates", "f32", steps=2, seed=7, threads=THREADS)
    assert torch.equal(torch.get_rng_state(), before)


def test_threads_setting_is_restored():
    before = torch.get_num_threads()
    train("tiny-updates", "f32", steps=1, threads=1)
    assert torch.get_num_threads() == before


def test_memory_is_counted_by_mp_memory_in_the_policy_formats():
    runs = {p: train("tiny-updates", p, steps=1, threads=THREADS) for p in ("f32", "f16-master", "f16-pure")}
    f32, master, pure = (runs[p].memory for p in ("f32", "f16-master", "f16-pure"))
    n = 32 * 8  # the model's parameters (Linear(32, 8), no bias)
    assert f32["parameters"] == f32["gradients"] == 4 * n and f32["masters"] == 0
    assert master["parameters"] == 2 * n and master["masters"] == 4 * n
    # the 16-bit gradient on the model, where PyTorch keeps it (an FP32 one exists only between micro-batches)
    assert master["gradients"] == 2 * n and pure["gradients"] == 2 * n and pure["masters"] == 0
    # Adam's two moments (FP32 next to masters, in the parameters' format without), and its FP32 step count
    assert master["optimizer_state"] == 2 * 4 * n + 4 and pure["optimizer_state"] == 2 * 2 * n + 4
    # one forward saves the input (64 x 32) for the weight gradient, and the loss its input and target (64 x 8)
    assert f32["activations"] == (64 * 32 + 2 * 64 * 8) * 4 == 2 * master["activations"]
    assert runs["f16-master"].memory_held["parameters"] == 4 * n  # emulated: FP32 tensors hold the FP16 values
    assert runs["f32"].memory_source == "counted" and "emulated" in runs["f16-master"].memory_source


def test_bad_arguments_fail_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write to output folder"):
        train("tiny-updates", "f32", steps=1, out=blocker / "run")
    with pytest.raises(ValueError, match="unknown policy preset 'f17'"):
        train("tiny-updates", "f17", steps=1)
    with pytest.raises(ValueError, match="stop_at must be in 1..5"):
        train("tiny-updates", "f32", steps=5, stop_at=9)
