"""The `translation` recipe: its generated corpus and grammar, BLEU, and short training runs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mixprec.harness.training import train
from mixprec.recipes import get_recipe
from mixprec.recipes import translation as tr

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "mixprec.recipes.translation:recipe"


@pytest.fixture(scope="module")
def data() -> tr.Data:
    return tr.make_data()


def test_recipe_loads_by_spec():
    recipe = get_recipe(SPEC)
    assert (recipe.name, recipe.metric, recipe.higher_is_better) == ("translation", "BLEU", True)


def test_data_is_deterministic(data):
    again = tr.make_data()
    for a, b in zip(data.train + data.test, again.train + again.test, strict=True):
        assert torch.equal(a, b)
    other = tr.make_data(train_rows=len(data.train[0]), test_rows=len(data.test[0]), seed=tr.DATA_SEED + 1)
    assert not torch.equal(data.train[0], other.train[0])


def test_shapes_lengths_and_specials(data):
    source, target = data.train
    assert source.shape == (tr.TRAIN_ROWS, tr.SOURCE_WIDTH) and target.shape == (tr.TRAIN_ROWS, tr.TARGET_WIDTH)
    lengths = (source != tr.PAD).sum(1)
    assert lengths.min().item() == 4 and lengths.max().item() == 12
    assert (target[:, 0] == tr.BOS).all()
    target_lengths = (target != tr.PAD).sum(1)
    assert (target[torch.arange(len(target)), target_lengths - 1] == tr.EOS).all()  # EOS right before the padding
    assert source.max().item() < tr.LEXICON.source_vocab and target.max().item() < tr.LEXICON.target_vocab
    assert (source[:, 0] != tr.PAD).all() and ((source == tr.BOS) | (source == tr.EOS)).sum() == 0


def test_test_sentences_are_not_in_train(data):
    train_rows = {tuple(row) for row in data.train[0].tolist()}
    test_rows = [tuple(row) for row in data.test[0].tolist()]
    assert len(set(test_rows)) == len(test_rows) == tr.TEST_ROWS
    assert not train_rows & set(test_rows)


def test_lexicon_target_ids_are_one_to_one():
    lex = tr.LEXICON
    words = [t for pair in lex.det_tgt for t in pair] + list(lex.adj_tgt) + list(lex.noun_tgt)
    words += sorted({t for verb in lex.verb_tgt for t in verb}) + list(lex.adv_tgt)
    assert len(words) == len(set(words)) == lex.target_vocab - tr.SPECIALS
    assert sum(len(verb) == 2 for verb in lex.verb_tgt) == tr.N_PARTICLE_VERB
    assert sum(len(noun) == 2 for noun in lex.noun_src) == tr.N_COMPOUND
    assert set(lex.gender) == {0, 1}


def test_grammar_reorders_agrees_and_maps_many_to_one_and_one_to_many():
    lex = tr.LEXICON
    compound, simple, particle_verb = tr.N_NOUN, 5, 0  # a compound noun, a plain noun, a verb with a particle
    sentence = tr.Sentence(subject=(1, (3, 7), simple), verb=particle_verb, object=(2, (), compound), adverb=4)
    assert tr.source_tokens(sentence) == [
        lex.det_src[1], lex.adj_src[3], lex.adj_src[7], lex.noun_src[simple][0],  # adjectives before the noun
        lex.verb_src[particle_verb],  # subject verb object adverb
        lex.det_src[2], *lex.noun_src[compound],  # two source words
        lex.adv_src[4],
    ]
    assert len(lex.noun_src[compound]) == 2 and len(lex.verb_tgt[particle_verb]) == 2
    assert tr.target_tokens(sentence) == [
        lex.det_tgt[1][lex.gender[simple]], lex.noun_tgt[simple], lex.adj_tgt[3], lex.adj_tgt[7],  # noun first
        lex.det_tgt[2][lex.gender[compound]], lex.noun_tgt[compound],  # one target word
        lex.adv_tgt[4], *lex.verb_tgt[particle_verb],  # the verb last, with its particle
    ]
    plain = tr.Sentence(subject=(0, (), simple), verb=tr.N_PARTICLE_VERB, adverb=0)
    assert len(tr.source_tokens(plain)) == 4 and len(tr.target_tokens(plain)) == 4


def test_corpus_rows_follow_the_grammar(data):
    """Re-deriving the rows from the same seed gives the stored tensors; the verb is every target's last word."""
    rng = random.Random(tr.DATA_SEED)
    verb_ends = {verb[-1] for verb in tr.LEXICON.verb_tgt}
    source, target = data.train
    for i in range(20):
        sentence = tr.sample_sentence(rng)  # the first sentences of the stream are distinct: all kept
        assert tr.strip(source[i].tolist()) == tr.source_tokens(sentence)
        words = tr.strip(target[i].tolist())
        assert words == tr.target_tokens(sentence) and words[-1] in verb_ends


def test_strip():
    assert tr.strip([tr.BOS, 7, 8, tr.EOS, 9, tr.PAD]) == [7, 8]
    assert tr.strip([7, tr.PAD, 8]) == [7, 8]


def test_bleu_identical_is_100_and_no_overlap_is_0():
    refs = [[10, 11, 12, 13, 14], [20, 21, 22, 23]]
    assert tr.corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert tr.corpus_bleu([[30, 31, 32, 33, 34], [40, 41, 42, 43]], refs) == 0.0
    assert tr.corpus_bleu([[]], [[1, 2, 3, 4]]) == 0.0
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        tr.corpus_bleu([[1]], refs)


def test_bleu_partial_match_by_hand():
    # One substitution in the middle of 8 tokens: p1..p4 = 7/8, 5/7, 3/6, 1/5; product 1/16; BLEU = 100 * 1/2.
    ref = [10, 11, 12, 13, 14, 15, 16, 17]
    assert tr.corpus_bleu([[10, 11, 12, 13, 20, 15, 16, 17]], [ref]) == pytest.approx(50.0)
    # A prefix of 6: every precision 1, brevity penalty exp(1 - 8/6).
    assert tr.corpus_bleu([ref[:6]], [ref]) == pytest.approx(100 * math.exp(1 - 8 / 6))
    # Clipping: "10 10 10 10" against "10 11 12 13" matches one unigram, not four.
    assert tr.corpus_bleu([[10, 10, 10, 10]], [[10, 11, 12, 13]], max_n=1) == pytest.approx(25.0)


def test_bleu_counts_over_the_corpus_not_per_sentence():
    # A perfect 5-token sentence and a 4-token miss: p = 5/9, 4/7, 3/5, 2/3 (the mean of sentence BLEUs is 50).
    hyps, refs = [[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[1, 2, 3, 4, 5], [16, 17, 18, 19]]
    expected = 100 * (5 / 9 * 4 / 7 * 3 / 5 * 2 / 3) ** 0.25
    assert tr.corpus_bleu(hyps, refs) == pytest.approx(expected)
    assert abs(expected - 50.0) > 5


def test_short_training_lowers_the_loss_and_learns_to_translate(data):
    torch.manual_seed(0)
    model = tr.Seq2Seq()
    source, target = data.test
    accuracy_before = tr.token_accuracy(model, source, target)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(120):
        loss = tr.loss(model, data.batch(step, 64, seed=0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(tr.LEXICON.target_vocab), rel=0.1)  # uniform at the start
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        accuracy_after = tr.token_accuracy(model, source, target)
        bleu = tr.bleu(model, data)
        decoded = tr.greedy_decode(model, source[:8])
    assert accuracy_before < 0.1 < 0.5 < accuracy_after
    assert 20.0 < bleu <= 100.0  # about 62 after these 120 steps
    assert decoded.shape[0] == 8 and decoded.shape[1] <= tr.TARGET_WIDTH - 1


def test_runs_under_f16_master_emulated(data):
    result = train(SPEC, "f16-master", steps=12, data=data, threads=1)
    assert (result.execution, result.emulation, result.steps) == ("emulated", "per op", 12)
    losses = [r["loss"] for r in result.history if r["kind"] == "step"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result.metric == "BLEU" and 0.0 <= result.final_metric <= 100.0
    assert result.skipped_steps <= 2 and result.final_loss_scale > 1
