"""`translation`: an encoder-decoder with attention translating a generated parallel corpus; BLEU.

The paper's machine-translation experiment trained a GNMT-like model (an LSTM encoder-decoder with
attention) on WMT English-French in mixed precision and matched FP32's BLEU. This is its smallest
relative: the same kind of model (an embedding, a bidirectional GRU encoder, a GRU decoder with Luong
"general" attention, teacher forcing in training) on a corpus drawn from a fixed seed by a small
synthetic grammar, scored the same way (corpus BLEU-4 of greedy translations of held-out sentences).

The grammar (`Lexicon`, `Sentence`) has a source vocabulary and a separate target vocabulary (target
ids are a seeded permutation: a word's target id is unrelated to its source id) and real translation phenomena:

* word-for-word lexical mapping of determiners, adjectives, nouns, verbs and adverbs;
* local reordering: adjectives follow their noun in the target ("the big red dog" -> "le chien grand
  rouge"), and the verb goes last (source subject-verb-object-adverb, target subject-object-adverb-verb);
* agreement: a determiner's target form depends on its noun's gender (the model must look ahead);
* many-to-one: compound nouns, two source words, are one target word;
* one-to-many: particle verbs, one source word, are two target words (verb + particle);
* lengths of 4-12 source tokens (4-11 target words); targets are ``BOS words EOS``, both sides padded
  with PAD. The test sentences are not in the training set.

Defaults: embeddings 64 wide, encoder GRUs 2 x 64, decoder GRU 128 (~0.23M parameters); 4000 training
pairs, 400 test pairs; Adam, lr 3e-3 (30 warmup steps, cosine to 10%), batch 64, 2500 steps (40 epochs), about a
minute on one CPU thread in FP32, reaching a BLEU of about 99.5 (f16-master and f16-master-noscale too).

Loss: token cross-entropy on the FP32-cast logits, PAD ignored. Metric: corpus BLEU-4 (`corpus_bleu`, in
0..100, higher is better); `token_accuracy` gives teacher-forced accuracy for tests.

Example:
    >>> corpus_bleu([[5, 6, 7, 8]], [[5, 6, 7, 8]])
    100.0
    >>> data = make_data(train_rows=8, test_rows=4)
    >>> tuple(data.train[0].shape), tuple(data.test[1].shape)
    ((8, 12), (4, 13))
    >>> Seq2Seq()(data.test[0], data.test[1][:, :-1]).shape
    torch.Size([4, 12, 156])
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Data, Recipe

PAD, BOS, EOS = 0, 1, 2
SPECIALS = 3
N_DET, N_ADJ, N_NOUN, N_COMPOUND, N_VERB, N_PARTICLE_VERB, N_PARTICLE, N_ADV = 4, 30, 60, 10, 30, 8, 3, 12
DATA_SEED = 2018  # the corpus is the same for every run seed
TRAIN_ROWS, TEST_ROWS = 4000, 400
SOURCE_WIDTH = 12  # at most 5 + 1 + 5 + 1 source tokens
TARGET_WIDTH = 13  # BOS + at most 4 + 4 + 1 + 2 words + EOS

NounPhrase = tuple[int, tuple[int, ...], int]  # (determiner, adjectives, noun) as word indices


@dataclass(frozen=True)
class Sentence:
    """A sentence as the grammar sees it: word indices of each role (before lexical mapping)."""

    subject: NounPhrase
    verb: int
    object: NounPhrase | None = None
    adverb: int | None = None


@dataclass(frozen=True)
class Lexicon:
    """The word-for-word mapping: source and target token ids of every word index.

    Nouns ``N_NOUN..N_NOUN+N_COMPOUND-1`` are compounds (two source tokens); verbs ``0..N_PARTICLE_VERB-1``
    take a particle (two target tokens). ``det_tgt[d][g]`` is determiner d before a noun of gender g.
    """

    det_src: tuple[int, ...]
    adj_src: tuple[int, ...]
    noun_src: tuple[tuple[int, ...], ...]
    verb_src: tuple[int, ...]
    adv_src: tuple[int, ...]
    det_tgt: tuple[tuple[int, int], ...]
    adj_tgt: tuple[int, ...]
    noun_tgt: tuple[int, ...]
    gender: tuple[int, ...]
    verb_tgt: tuple[tuple[int, ...], ...]
    adv_tgt: tuple[int, ...]
    source_vocab: int
    target_vocab: int


def make_lexicon(seed: int = DATA_SEED) -> Lexicon:
    """The grammar's lexicon: source ids in order after the specials, target ids a seeded permutation."""
    rng = random.Random(seed)
    ids = iter(range(SPECIALS, 10**6))
    det_src = tuple(next(ids) for _ in range(N_DET))
    adj_src = tuple(next(ids) for _ in range(N_ADJ))
    noun_src = tuple((next(ids),) for _ in range(N_NOUN)) + tuple((next(ids), next(ids)) for _ in range(N_COMPOUND))
    verb_src = tuple(next(ids) for _ in range(N_VERB))
    adv_src = tuple(next(ids) for _ in range(N_ADV))
    source_vocab = next(ids)
    n_target = 2 * N_DET + N_ADJ + N_NOUN + N_COMPOUND + N_VERB + N_PARTICLE + N_ADV
    shuffled = list(range(SPECIALS, SPECIALS + n_target))
    rng.shuffle(shuffled)
    tgt = iter(shuffled)
    det_tgt = tuple((next(tgt), next(tgt)) for _ in range(N_DET))
    adj_tgt = tuple(next(tgt) for _ in range(N_ADJ))
    noun_tgt = tuple(next(tgt) for _ in range(N_NOUN + N_COMPOUND))
    verbs = [next(tgt) for _ in range(N_VERB)]
    particles = [next(tgt) for _ in range(N_PARTICLE)]
    verb_tgt = tuple((v, particles[i % N_PARTICLE]) if i < N_PARTICLE_VERB else (v,) for i, v in enumerate(verbs))
    adv_tgt = tuple(next(tgt) for _ in range(N_ADV))
    gender = tuple(rng.randrange(2) for _ in range(N_NOUN + N_COMPOUND))
    return Lexicon(det_src, adj_src, noun_src, verb_src, adv_src, det_tgt, adj_tgt, noun_tgt, gender, verb_tgt,
                   adv_tgt, source_vocab, SPECIALS + n_target)


LEXICON = make_lexicon()


def source_tokens(sentence: Sentence, lex: Lexicon = LEXICON) -> list[int]:
    """The source side: subject, verb, object, adverb; adjectives before their noun."""
    def phrase(np: NounPhrase) -> list[int]:
        det, adjectives, noun = np
        return [lex.det_src[det], *(lex.adj_src[a] for a in adjectives), *lex.noun_src[noun]]

    tokens = [*phrase(sentence.subject), lex.verb_src[sentence.verb]]
    if sentence.object is not None:
        tokens += phrase(sentence.object)
    if sentence.adverb is not None:
        tokens.append(lex.adv_src[sentence.adverb])
    return tokens


def target_tokens(sentence: Sentence, lex: Lexicon = LEXICON) -> list[int]:
    """The target words (no BOS/EOS): subject, object, adverb, verb last; adjectives after their noun,
    the determiner agreeing with the noun's gender."""
    def phrase(np: NounPhrase) -> list[int]:
        det, adjectives, noun = np
        return [lex.det_tgt[det][lex.gender[noun]], lex.noun_tgt[noun], *(lex.adj_tgt[a] for a in adjectives)]

    tokens = phrase(sentence.subject)
    if sentence.object is not None:
        tokens += phrase(sentence.object)
    if sentence.adverb is not None:
        tokens.append(lex.adv_tgt[sentence.adverb])
    return tokens + list(lex.verb_tgt[sentence.verb])


def sample_sentence(rng: random.Random) -> Sentence:
    """One sentence: an object three times in four; an adverb always without one, else 40% of the time."""
    def phrase() -> NounPhrase:
        count = rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0]
        return rng.randrange(N_DET), tuple(rng.sample(range(N_ADJ), count)), rng.randrange(N_NOUN + N_COMPOUND)

    subject, verb = phrase(), rng.randrange(N_VERB)
    obj = phrase() if rng.random() < 0.75 else None
    adverb = rng.randrange(N_ADV) if obj is None or rng.random() < 0.4 else None
    return Sentence(subject, verb, obj, adverb)


def _padded(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def make_data(train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS, seed: int = DATA_SEED) -> Data:
    """Distinct sentences drawn from ``seed``: the first ``train_rows`` train, the next ``test_rows`` test.

    Source rows are padded to SOURCE_WIDTH, target rows (``BOS words EOS``) to TARGET_WIDTH.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    sources: list[list[int]] = []
    targets: list[list[int]] = []
    while len(sources) < train_rows + test_rows:
        sentence = sample_sentence(rng)
        source = source_tokens(sentence)
        if tuple(source) in seen:  # the mapping is a function: a new source is a new pair
            continue
        seen.add(tuple(source))
        sources.append(source)
        targets.append([BOS, *target_tokens(sentence), EOS])
    src, tgt = _padded(sources, SOURCE_WIDTH), _padded(targets, TARGET_WIDTH)
    return Data(
        train=(src[:train_rows], tgt[:train_rows]),
        test=(src[train_rows:], tgt[train_rows:]),
        info={"source": "synthetic grammar (reordering, agreement, compounds, particle verbs)", "data_seed": seed,
              "train_rows": train_rows, "test_rows": test_rows, "source_vocab": LEXICON.source_vocab,
              "target_vocab": LEXICON.target_vocab},
    )


# ----- the model --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Embedding + bidirectional GRU; returns (memory, source mask, the decoder's initial state)."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.rnn = nn.GRU(embed, hidden // 2, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(hidden, hidden)

    def forward(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = source != PAD
        memory, _ = self.rnn(self.embed(source))
        pooled = (memory * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return memory, mask, torch.tanh(self.bridge(pooled)).unsqueeze(0)


class Decoder(nn.Module):
    """GRU decoder with Luong "general" attention: score(h, m) = h . W m, then tanh(W_c [context; h])."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.attn = nn.Linear(hidden, hidden, bias=False)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, previous: torch.Tensor, state: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for the tokens after ``previous`` (B, T), and the GRU state after them."""
        output, state = self.rnn(self.embed(previous), state)
        scores = torch.bmm(output, self.attn(memory).transpose(1, 2))  # (B, T, S)
        # The softmax is a reduction: in FP32, as the paper keeps them, PAD positions masked out.
        weights = scores.float().masked_fill(~mask.unsqueeze(1), -math.inf).softmax(-1).to(memory.dtype)
        context = torch.bmm(weights, memory)
        return self.head(torch.tanh(self.combine(torch.cat([context, output], dim=-1)))), state


class Seq2Seq(nn.Module):
    """The encoder-decoder; ``forward(source, target_in)`` is the teacher-forced pass (logits per position)."""

    def __init__(self, source_vocab: int = LEXICON.source_vocab, target_vocab: int = LEXICON.target_vocab,
                 embed: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = Encoder(source_vocab, embed, hidden)
        self.decoder = Decoder(target_vocab, embed, hidden)

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        memory, mask, state = self.encoder(source)
        return self.decoder(target_in, state, memory, mask)[0]


def _inner(model: nn.Module) -> Seq2Seq:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's
    inner = getattr(inner, "module", inner)  # DistributedDataParallel's
    if not isinstance(inner, Seq2Seq):
        raise TypeError(f"the translation recipe needs its Seq2Seq model, got {type(inner).__name__}")
    return inner


def greedy_decode(model: nn.Module, source: torch.Tensor, max_len: int = TARGET_WIDTH - 1) -> torch.Tensor:
    """Greedy translations (B, <= max_len): the argmax token each step; after EOS, PAD."""
    seq2seq = _inner(model)
    memory, mask, state = seq2seq.encoder(source)
    token = torch.full((len(source), 1), BOS, dtype=torch.long, device=source.device)
    done = torch.zeros(len(source), dtype=torch.bool, device=source.device)
    steps = []
    for _ in range(max_len):
        logits, state = seq2seq.decoder(token, state, memory, mask)
        token = logits[:, -1].argmax(-1, keepdim=True).masked_fill(done.unsqueeze(1), PAD)
        steps.append(token)
        done |= token.squeeze(1) == EOS
        if bool(done.all()):
            break
    return torch.cat(steps, dim=1)


def strip(tokens: Sequence[int]) -> list[int]:
    """The words of a token row: up to the first EOS, without BOS and PAD."""
    words = []
    for token in tokens:
        if token == EOS:
            break
        if token not in (BOS, PAD):
            words.append(int(token))
    return words


def corpus_bleu(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) in 0..100, one reference per sentence, no smoothing.

    Clipped n-gram matches and n-gram counts (n = 1..max_n) are summed over the corpus, then
    BLEU = BP * exp(mean over n of log p_n), with BP = exp(1 - r / c) when the total hypothesis
    length c is below the total reference length r, else 1. Any p_n of 0 gives 0.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Teacher forcing: token cross-entropy of each next target token on FP32 logits, PAD ignored."""
    source, target = batch
    logits = model(source, target[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), target[:, 1:].flatten(), ignore_index=PAD)


def token_accuracy(model: nn.Module, source: torch.Tensor, target: torch.Tensor) -> float:
    """Teacher-forced accuracy: the fraction of non-PAD next target tokens (EOS included) predicted right."""
    predicted = model(source, target[:, :-1]).argmax(-1)
    labels = target[:, 1:]
    real = labels != PAD
    return (predicted[real] == labels[real]).float().mean().item()


def bleu(model: nn.Module, data: Data) -> float:
    """Corpus BLEU-4 of greedy translations of the test sources against their references."""
    source, target = data.test
    hypotheses = [strip(row) for row in greedy_decode(model, source).tolist()]
    references = [strip(row) for row in target.tolist()]
    return corpus_bleu(hypotheses, references)


def recipe() -> Recipe:
    return Recipe(
        name="translation",
        description="bi-GRU encoder + GRU decoder with Luong attention on a synthetic parallel corpus; BLEU",
        make_data=make_data,
        make_model=Seq2Seq,
        loss=loss,
        evaluate=bleu,
        metric="BLEU",
        higher_is_better=True,
        steps=2500,
        batch_size=64,
        lr=3e-3,
        optimizer="adam",
        max_grad_norm=1.0,
        warmup_steps=30,
        eval_every=250,
    )
