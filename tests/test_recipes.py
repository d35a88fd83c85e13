"""Recipes alone, in plain FP32 torch: data, models, losses, metrics, and the numbers each task is built
around (the underflow band, the size of the tiny updates)."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from mixprec.recipes import RECIPES, Data, Recipe, get_recipe, underflow
from mixprec.recipes import corpus as corpus_module


def test_registry_lists_the_builtin_recipes():
    assert set(RECIPES) == {"digits", "lm", "rnn", "underflow", "tiny-updates", "gpt", "gpt2-small", "gpt-medium",
                            "detection", "speech", "translation"}
    for name in RECIPES:
        recipe = get_recipe(name)
        assert isinstance(recipe, Recipe) and recipe.name == name


def test_unknown_recipe_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown recipe 'mnist'.*digits, lm, rnn, underflow, tiny-updates"):
        get_recipe("mnist")


def test_recipe_from_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent("""
        from mixprec.recipes import get_recipe
        import dataclasses
        small = dataclasses.replace(get_recipe("tiny-updates"), name="mine", steps=7)
        def factory():
            return small
        not_a_recipe = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_recipe("my_tasks:small").steps == 7
    assert get_recipe("my_tasks:factory").name == "mine"
    with pytest.raises(TypeError, match="not a mixprec.recipes.Recipe"):
        get_recipe("my_tasks:not_a_recipe")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_recipe("my_tasks:missing")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        get_recipe("no_such_module_xyz:thing")
    sys.modules.pop("my_tasks", None)


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    data = Data(train=(torch.arange(10), torch.arange(10) * 2), test=(torch.arange(2),))
    first = data.batch(0, 5, seed=3)
    assert torch.equal(first[0], data.batch(0, 5, seed=3)[0])  # reproducible
    assert not torch.equal(first[0], data.batch(0, 5, seed=4)[0])  # the seed matters
    assert torch.equal(first[1], first[0] * 2)  # rows stay aligned across tensors
    epoch = torch.cat([data.batch(s, 5, seed=3)[0] for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch = a permutation
    with pytest.raises(ValueError, match="larger than the training set"):
        data.batch(0, 11, seed=0)


def test_recipe_checks_its_fields():
    base = get_recipe("tiny-updates")
    import dataclasses

    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*adam, adamw, sgd"):
        dataclasses.replace(base, optimizer="lion")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        dataclasses.replace(base, steps=0)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    recipe = get_recipe("lm")
    factors = [recipe.lr_factor(s, 600) for s in range(600)]
    assert factors[0] == pytest.approx(1 / recipe.warmup_steps)
    assert max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_stdlib_corpus_is_stable_and_recorded():
    a, b = corpus_module.stdlib_corpus(), corpus_module.stdlib_corpus()
    assert a.sha256 == b.sha256 and len(a.bytes) > 500_000
    assert b"def " in a.bytes and len(a.sources) == len(corpus_module.STDLIB_MODULES)


def test_file_corpus_and_windows(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(100)))
    corpus = corpus_module.file_corpus([tmp_path])
    data = corpus_module.byte_windows(corpus, block_size=8, test_fraction=0.2)
    (windows,) = data.train
    assert windows.shape == (9, 9)  # 80 training bytes -> 9 windows of 8 inputs + 1 target
    assert windows[1, 0] == 8 and windows[0, -1] == 8  # a window's target is the next one's first byte
    assert data.info["corpus_sha256"] == corpus.sha256
    with pytest.raises(ValueError, match="not a file or folder"):
        corpus_module.file_corpus([tmp_path / "missing"])


@pytest.mark.parametrize("name", ["digits", "lm", "rnn", "underflow", "tiny-updates"])
def test_each_recipe_builds_and_its_loss_and_metric_are_finite(name):
    recipe = get_recipe(name)
    data = recipe.make_data()
    torch.manual_seed(0)
    model = recipe.make_model()
    batch = data.batch(0, recipe.batch_size, seed=0)
    loss = recipe.loss(model, batch)
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        metric = recipe.evaluate(model, data)
    assert math.isfinite(metric)


def test_byte_models_start_near_uniform_at_eight_bits_per_byte():
    for name in ("lm", "rnn"):
        recipe = get_recipe(name)
        torch.manual_seed(0)
        with torch.no_grad():
            assert recipe.evaluate(recipe.make_model().eval(), recipe.make_data()) == pytest.approx(8.0, abs=0.3)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_underflow_activation_gradients_live_in_the_band_and_the_output_gradient_flushes_in_fp16():
    """The paper's SSD picture: FP32 activation gradients mostly in [2^-27, 2^-24); and the gradient that
    enters the network (w.r.t. its output) rounds to zero in FP16, so everything behind it is zero."""
    recipe = get_recipe("underflow")
    data = recipe.make_data()
    torch.manual_seed(0)
    model = recipe.make_model()
    grads: list[torch.Tensor] = []
    for layer in model:
        layer.register_full_backward_hook(lambda module, gin, gout: grads.append(gout[0].flatten()))
    recipe.loss(model, data.batch(0, recipe.batch_size, seed=0)).backward()
    output_grad = grads[0]  # hooks fire from the output backwards
    assert output_grad.abs().max() < 2.0**-25  # below half the smallest FP16 subnormal
    assert torch.count_nonzero(output_grad.half()) == 0
    nonzero = torch.cat(grads).abs()
    nonzero = nonzero[nonzero > 0]
    exponent = torch.log2(nonzero)
    in_band = ((exponent >= -27) & (exponent < -24)).float().mean().item()
    assert in_band > 0.6, in_band
    # The weight gradients are larger (summed over the batch): it is the activation gradients that underflow.
    weight_grad = model[0].weight.grad.abs()
    assert weight_grad.median() > 2.0**-24


def test_underflow_lr_compensates_the_loss_weight():
    recipe = get_recipe("underflow")
    assert recipe.lr * underflow.LOSS_WEIGHT == pytest.approx(underflow.BASE_LR)


def test_tiny_updates_are_lost_when_added_in_fp16():
    recipe = get_recipe("tiny-updates")
    data = recipe.make_data()
    model = recipe.make_model()
    weight = model.weight.detach().clone()
    assert weight.abs().min() >= 4 and weight.abs().max() < 8
    optimizer = recipe.build_optimizer(model.parameters())
    for step in range(5):
        recipe.loss(model, data.batch(step, recipe.batch_size, seed=0)).backward()
        before = model.weight.detach().clone()
        optimizer.step()
        optimizer.zero_grad()
        update = model.weight.detach() - before
        assert (update.abs() / before.abs()).max() < 2.0**-11  # the paper's threshold
        # In FP16, weight + update rounds back to the weight: the update is lost.
        assert torch.equal((before.half() + update.half()), before.half())
    assert not torch.equal(model.weight.detach(), weight)  # in FP32 the updates do land
