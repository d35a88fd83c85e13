"""The `speech` recipe: its generated utterances, CTC decoding and edit distance, the CER metric, and
short training runs in FP32 and under f16-master (emulated per op)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mixprec.harness.training import train
from mixprec.recipes import Data, get_recipe, speech

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def small() -> Data:
    return speech.make_data(train_rows=384, test_rows=64)


def test_data_is_deterministic_and_the_seed_matters(small):
    again = speech.make_data(train_rows=384, test_rows=64)
    for a, b in zip(small.train + small.test, again.train + again.test, strict=True):
        assert torch.equal(a, b)
    other = speech.make_data(train_rows=384, test_rows=64, seed=speech.DATA_SEED + 1)
    assert not torch.equal(small.train[0], other.train[0])
    # the same seed gives the same first rows whatever the split sizes: the split is a slice
    bigger = speech.make_data(train_rows=400, test_rows=8)
    assert torch.equal(bigger.train[0][:384], small.train[0])


def test_lengths_and_padding_are_consistent(small):
    for features, lengths, targets, target_lengths in (small.train, small.test):
        n = len(features)
        assert features.shape == (n, speech.N_FRAMES, speech.N_BINS) and targets.shape == (n, speech.MAX_CHARS)
        assert lengths.dtype == target_lengths.dtype == torch.long
        frames = torch.arange(speech.N_FRAMES)
        padding = frames[None, :] >= lengths[:, None]
        assert torch.all(features[padding] == 0)  # padded frames are exactly zero
        assert torch.all(features[~padding].abs().sum(-1) > 0)  # every real frame carries signal or noise
        assert int(target_lengths.min()) >= speech.MIN_CHARS and int(target_lengths.max()) <= speech.MAX_CHARS
        assert torch.all(lengths >= speech.MIN_FRAMES_PER_CHAR * target_lengths)
        assert torch.all(lengths <= speech.MAX_FRAMES_PER_CHAR * target_lengths + 2 * speech.MAX_SILENCE)
        slots = torch.arange(speech.MAX_CHARS)[None, :] < target_lengths[:, None]
        assert torch.all(targets[~slots] == speech.BLANK)
        assert int(targets[slots].min()) >= 1 and int(targets[slots].max()) <= len(speech.ALPHABET)
        for row, length in zip(targets.tolist(), target_lengths.tolist(), strict=True):
            assert all(a != b for a, b in zip(row[: length - 1], row[1:length], strict=True))  # no repeated neighbours
        # CTC can align every target after the stride, so the loss is finite without zero_infinity
        assert torch.all(speech.output_lengths(lengths) >= target_lengths)


def test_output_lengths_match_the_convolution():
    conv = nn.Conv1d(1, 1, speech.KERNEL, stride=speech.STRIDE, padding=speech.KERNEL // 2)
    for length in range(1, 70):
        assert conv(torch.zeros(1, 1, length)).shape[-1] == int(speech.output_lengths(torch.tensor(length)))


def test_edit_distance_on_hand_examples():
    ed = speech.edit_distance
    assert ed([], []) == 0
    assert ed([1, 2, 3], []) == 3 and ed([], [4, 5]) == 2
    assert ed([1, 2, 3], [1, 2, 3]) == 0
    assert ed([1, 2, 3], [1, 3]) == 1  # a deletion
    assert ed([1, 2, 3], [1, 2, 4]) == 1  # a substitution
    assert ed([1, 2], [2, 1]) == 2  # no transpositions in Levenshtein distance
    assert ed(list(b"kitten"), list(b"sitting")) == 3
    assert ed(list(b"sitting"), list(b"kitten")) == 3
    assert ed(list(b"flaw"), list(b"lawn")) == 2


def test_greedy_decoding_collapses_repeats_then_drops_blanks():
    best = torch.tensor([
        [0, 3, 3, 0, 3, 5, 5, 0],  # a blank between two 3s keeps both
        [2, 2, 2, 4, 4, 1, 0, 0],  # repeats collapse without blanks
        [0, 0, 0, 0, 0, 0, 0, 0],  # all blank: nothing
        [1, 2, 3, 4, 5, 6, 7, 8],  # only the first `length` frames count
    ])
    assert speech.greedy_decode(best, torch.tensor([8, 8, 8, 3])) == [[3, 3, 5], [2, 4, 1], [], [1, 2, 3]]


class _Fixed(nn.Module):
    """Returns the given logits and lengths whatever its input (a stand-in for a trained model)."""

    def __init__(self, logits: torch.Tensor, lengths: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.lengths = logits, lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits, self.lengths


def test_cer_is_zero_for_a_perfect_prediction_and_counts_errors(small):
    _, lengths, targets, target_lengths = small.test
    out_lengths = speech.output_lengths(lengths)
    classes = len(speech.ALPHABET) + 1
    best = torch.full((len(targets), int(out_lengths.max())), speech.BLANK)
    for row, n in enumerate(target_lengths.tolist()):
        best[row, 0 : 2 * n : 2] = targets[row, :n]  # each character, then a blank
    logits = nn.functional.one_hot(best, classes).float()
    assert speech.evaluate(_Fixed(logits, out_lengths), small) == 0.0
    silent = nn.functional.one_hot(torch.zeros_like(best), classes).float()
    assert speech.evaluate(_Fixed(silent, out_lengths), small) == 1.0  # all deleted
    assert speech.character_error_rate([[1, 2], [3]], [[1, 2, 4], [3]]) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        speech.character_error_rate([[1], [2]], [[1]])


def test_loss_is_finite_on_every_row_and_cast_to_fp32(small):
    torch.manual_seed(0)
    model = speech.SpeechModel()
    features, lengths, targets, target_lengths = small.train
    logits, out_lengths = model(features, lengths)
    assert logits.shape == (len(features), speech.N_FRAMES // speech.STRIDE, len(speech.ALPHABET) + 1)
    assert torch.equal(out_lengths, speech.output_lengths(lengths))
    log_probs = nn.functional.log_softmax(logits, dim=-1).transpose(0, 1)
    per_row = nn.functional.ctc_loss(log_probs, targets, out_lengths, target_lengths, reduction="none")
    assert torch.isfinite(per_row).all()
    batch_loss = speech.ctc(logits.half(), out_lengths, targets, target_lengths)
    assert batch_loss.dtype == torch.float32 and math.isfinite(batch_loss.item())


def test_padding_does_not_change_a_rows_output(small):
    """Packed sequences: frames past a row's length (and other rows) do not reach its logits."""
    torch.manual_seed(0)
    model = speech.SpeechModel().eval()
    features, lengths, _, _ = small.test
    with torch.no_grad():
        logits, out_lengths = model(features[:4], lengths[:4])
        noisy = features[:4].clone()
        noisy[torch.arange(speech.N_FRAMES)[None, :] >= lengths[:4, None]] = 5.0
        logits_noisy, _ = model(noisy, lengths[:4])
        alone, _ = model(features[:1], lengths[:1])
    for row in range(4):
        n = int(out_lengths[row])
        assert torch.allclose(logits[row, :n], logits_noisy[row, :n], atol=1e-5)
    n = int(out_lengths[0])
    assert torch.allclose(logits[0, :n], alone[0, :n], atol=1e-5)


def test_a_short_training_run_lowers_the_ctc_loss(small):
    recipe = speech.recipe()
    torch.manual_seed(0)
    model = speech.SpeechModel()
    optimizer = recipe.build_optimizer(model.parameters())
    first = speech.loss(model, small.batch(0, 32, seed=0)).item()
    for step in range(40):
        loss = speech.loss(model, small.batch(step, 32, seed=0))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    last = sum(speech.loss(model, small.batch(k, 32, seed=1)).item() for k in range(4)) / 4
    assert math.isfinite(first) and last < 0.6 * first


def test_recipe_runs_under_f16_master_emulated(small):
    recipe = get_recipe("mixprec.recipes.speech:recipe")
    assert (recipe.name, recipe.metric, recipe.higher_is_better) == ("speech", "CER", False)
    short = dataclasses.replace(recipe, steps=6, eval_every=6, warmup_steps=2)
    result = train(short, "f16-master", data=small, steps=6, seed=0)
    assert result.execution == "emulated" and result.emulation == "per op"
    assert result.steps == 6 and math.isfinite(result.final_loss)
    assert 0.0 <= result.final_metric <= 2.0 and result.skipped_steps < 6
    steps = [r for r in result.history if r["kind"] == "step"]
    assert any(r["applied"] for r in steps)
