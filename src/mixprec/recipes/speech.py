"""`speech`: a small DeepSpeech-2-shaped acoustic model with CTC loss on generated spectrograms.

The paper's speech experiment (Micikevicius et al. 2018, section 4.3) trained DeepSpeech 2 models
(convolutional layers, then bidirectional recurrent layers, then a fully connected layer, CTC loss)
in mixed precision to FP32's character error rate. This is that pipeline in miniature, small enough
for one CPU core:

* Data (`make_data`, fixed by `DATA_SEED`): "utterances" of 2-6 characters from an `ALPHABET` of
  12 symbols. Every character has a spectral template over `N_BINS` feature bins (two or three
  Gaussian "formants"); an utterance renders each character as a segment of 3-8 frames with its own
  amplitude, shifts all formants by a per-utterance "speaker" offset, smooths the joins between
  segments, adds leading and trailing silence and Gaussian noise, and is zero-padded to `N_FRAMES`
  frames. No character follows itself (as in speech, a doubled letter is one sound), so every target
  is reachable by CTC. Rows: ``(features [N, N_FRAMES, N_BINS], feature lengths, targets [N,
  MAX_CHARS] padded with 0, target lengths)``; the train/test split is fixed.
* Model (`SpeechModel`): Conv1d over time (stride 2) + ReLU, a bidirectional GRU over the packed
  (unpadded) frames, and a linear layer to the alphabet plus the CTC blank (class 0).
* Loss (`loss`): ``F.ctc_loss`` on the log-softmax of the logits cast to FP32 (the paper's rule for
  reductions: the softmax and CTC's sums over paths run in FP32), per-utterance negative
  log-likelihood averaged over the batch. ``zero_infinity`` stays False: every utterance keeps at
  least as many output frames as characters after the stride (3 frames or more per character) and no
  repeated neighbours, so the loss
  is always finite in exact arithmetic, and an inf or NaN means overflow that the loss scaler must
  see (zeroing it would hide exactly what mixed precision training has to detect).
* Metric (`evaluate`): character error rate (CER) of greedy CTC decoding (argmax per frame,
  collapse repeats, drop blanks): summed Levenshtein distance over summed target length on the
  test set; lower is better.

Defaults: 2000 steps of batch 32, Adam at lr 5e-3 (20 warmup steps, cosine to a tenth), gradients
clipped to norm 1. Measured on one CPU thread (seeds 0 and 1): FP32 reaches a CER of 0.057 / 0.061 from
1.13 in about 50 s; f16-master (emulated per op) 0.056 / 0.059, skipping the 4 steps in which the loss
scale settles from 65536 to 8192; f16-master-noscale 0.053 / 0.060 with no step skipped: at this
size CTC's gradients stay inside FP16's range, so unlike the paper's large models it does not need
loss scaling.

Example:
    >>> features, lengths, targets, target_lengths = make_data(train_rows=8, test_rows=4).test
    >>> tuple(features.shape), tuple(targets.shape), recipe().metric
    ((4, 64, 20), (4, 6), 'CER')
    >>> greedy_decode(torch.tensor([[0, 3, 3, 0, 3, 5, 5, 0]]), torch.tensor([7]))
    [[3, 3, 5]]
    >>> edit_distance([1, 2, 3], [1, 3, 4])
    2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import Batch, Data, Recipe

ALPHABET = "abcdefghijkl"  # class k + 1 is ALPHABET[k]; class 0 is the CTC blank
BLANK = 0
N_BINS = 20  # feature bins per frame (a coarse log-mel spectrogram)
N_FRAMES = 64  # every utterance padded to this many frames
MIN_CHARS, MAX_CHARS = 2, 6
MIN_FRAMES_PER_CHAR, MAX_FRAMES_PER_CHAR = 3, 8
MAX_SILENCE = 3  # frames of silence before and after the speech, each drawn from 0..MAX_SILENCE
NOISE = 0.4  # std of the Gaussian noise on every frame
SPEAKER_SHIFT = 1.0  # formants of an utterance shift by up to this many bins
DATA_SEED = 2018  # the data is the same for every run seed (seeds measure training, not the data)
TRAIN_ROWS, TEST_ROWS = 16000, 512
STRIDE = 2  # the convolution's stride over time: the model's output has ceil(frames / 2) frames
KERNEL = 5


def _templates(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Formant centres [characters, 3] (in bins) and heights [characters, 3] (third formant sometimes 0).

    The first two formants of the characters are distinct points of a grid (F1 low, F2 high, as vowels
    are told apart), jittered, so that no two characters coincide under a speaker's shift."""
    n = len(ALPHABET)
    f1 = torch.linspace(2.0, 8.0, 3)
    f2 = torch.linspace(10.5, 17.5, (n + 2) // 3)
    grid = torch.cartesian_prod(f1, f2)[torch.randperm(len(f1) * len(f2), generator=generator)[:n]]
    third = 1.0 + torch.rand(n, 1, generator=generator) * (N_BINS - 2.0)
    centres = torch.cat([grid, third], dim=1) + 0.5 * (torch.rand(n, 3, generator=generator) - 0.5)
    heights = 0.6 + 0.6 * torch.rand(n, 3, generator=generator)
    heights[:, 2] *= 0.5 * (torch.rand(n, generator=generator) < 0.5).float()
    return centres, heights


def _spectrum(centres: torch.Tensor, heights: torch.Tensor, shift: float) -> torch.Tensor:
    """[characters, N_BINS]: each character's formants, shifted by ``shift`` bins, as Gaussian bumps."""
    bins = torch.arange(N_BINS, dtype=torch.float32)
    bumps = torch.exp(-0.5 * ((bins - (centres + shift).unsqueeze(-1)) / 1.2) ** 2)
    return (heights.unsqueeze(-1) * bumps).sum(dim=1)


def _characters(generator: torch.Generator) -> list[int]:
    """2-6 classes (1..len(ALPHABET)), no class right after itself."""
    count = int(torch.randint(MIN_CHARS, MAX_CHARS + 1, (1,), generator=generator))
    chars = [int(torch.randint(len(ALPHABET), (1,), generator=generator)) + 1]
    while len(chars) < count:
        step = int(torch.randint(1, len(ALPHABET), (1,), generator=generator))  # never 0: a different class
        chars.append((chars[-1] - 1 + step) % len(ALPHABET) + 1)
    return chars


def _utterance(generator: torch.Generator, centres: torch.Tensor, heights: torch.Tensor
               ) -> tuple[torch.Tensor, list[int]]:
    """One utterance: its frames [frames, N_BINS] (unpadded) and its classes."""
    chars = _characters(generator)
    shift = float(torch.rand(1, generator=generator)) * 2 * SPEAKER_SHIFT - SPEAKER_SHIFT
    spectra = _spectrum(centres, heights, shift)
    durations = torch.randint(MIN_FRAMES_PER_CHAR, MAX_FRAMES_PER_CHAR + 1, (len(chars),), generator=generator)
    amplitudes = 0.7 + 0.6 * torch.rand(len(chars), generator=generator)
    index = torch.tensor(chars) - 1
    speech = (spectra[index] * amplitudes.unsqueeze(-1)).repeat_interleave(durations, dim=0)
    before, after = (int(v) for v in torch.randint(MAX_SILENCE + 1, (2,), generator=generator))
    frames = F.pad(speech, (0, 0, before, after))
    # Smooth joins: a 3-tap moving average over time (coarticulation); silence fades in and out.
    frames = F.avg_pool1d(frames.T.unsqueeze(0), 3, stride=1, padding=1, count_include_pad=True)[0].T
    frames = frames + NOISE * torch.randn(frames.shape, generator=generator)
    return frames, chars


def make_data(train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS, seed: int = DATA_SEED) -> Data:
    """``train_rows + test_rows`` utterances from ``seed``: the first ``train_rows`` train, the rest test."""
    generator = torch.Generator().manual_seed(seed)
    centres, heights = _templates(generator)
    rows = train_rows + test_rows
    features = torch.zeros(rows, N_FRAMES, N_BINS)
    lengths = torch.zeros(rows, dtype=torch.long)
    targets = torch.zeros(rows, MAX_CHARS, dtype=torch.long)
    target_lengths = torch.zeros(rows, dtype=torch.long)
    for row in range(rows):
        frames, chars = _utterance(generator, centres, heights)
        features[row, : len(frames)] = frames
        lengths[row] = len(frames)
        targets[row, : len(chars)] = torch.tensor(chars)
        target_lengths[row] = len(chars)
    columns = (features, lengths, targets, target_lengths)
    return Data(
        train=tuple(t[:train_rows] for t in columns),
        test=tuple(t[train_rows:] for t in columns),
        info={"source": "synthetic spectrograms", "data_seed": seed, "alphabet": ALPHABET, "bins": N_BINS,
              "frames": N_FRAMES, "train_rows": train_rows, "test_rows": test_rows},
    )


def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after the strided convolution (padding KERNEL // 2): ceil(lengths / STRIDE)."""
    return (lengths + 2 * (KERNEL // 2) - KERNEL) // STRIDE + 1


class SpeechModel(nn.Module):
    """Conv1d (stride 2) + ReLU, a bidirectional GRU, a linear layer to the alphabet and the blank.

    ``forward(features [N, T, N_BINS], lengths [N])`` returns logits [N, ceil(T / 2), classes] and the
    output lengths. Frames past a row's length are zeroed before the convolution and not read by the GRU
    (packed sequences), so a row's logits do not depend on its padding or on the other rows.
    """

    def __init__(self, channels: int = 96, hidden: int = 96, classes: int | None = None) -> None:
        super().__init__()
        classes = len(ALPHABET) + 1 if classes is None else classes
        self.conv = nn.Conv1d(N_BINS, channels, KERNEL, stride=STRIDE, padding=KERNEL // 2)
        self.rnn = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_end = torch.arange(features.shape[1], device=features.device)[None, :] >= lengths[:, None]
        features = features.masked_fill(past_end.unsqueeze(-1), 0.0)  # padding is silence, whatever it holds
        x = F.relu(self.conv(features.transpose(1, 2))).transpose(1, 2)
        out_lengths = output_lengths(lengths)
        packed = pack_padded_sequence(x, out_lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.head(y), out_lengths


def ctc(logits: torch.Tensor, out_lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
        ) -> torch.Tensor:
    """CTC negative log-likelihood per utterance, averaged over the batch; softmax and CTC in FP32."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T, N, classes], as ctc_loss wants
    total = F.ctc_loss(log_probs, targets, out_lengths, target_lengths, blank=BLANK, reduction="sum",
                       zero_infinity=False)
    return total / len(targets)


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    features, lengths, targets, target_lengths = batch
    logits, out_lengths = model(features, lengths)
    return ctc(logits, out_lengths, targets, target_lengths)


def greedy_decode(best: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path decoding of per-frame classes [N, T] (argmax of the logits) within ``lengths``:
    consecutive repeats collapse to one, then blanks are dropped."""
    decoded = []
    for row, length in zip(best.tolist(), lengths.tolist(), strict=True):
        out: list[int] = []
        previous = BLANK
        for label in row[:length]:
            if label != previous and label != BLANK:
                out.append(label)
            previous = label
        decoded.append(out)
    return decoded


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a`` into ``b``."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def character_error_rate(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Summed edit distance over summed reference length."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    errors = sum(edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True))
    return errors / max(1, sum(len(r) for r in references))


def evaluate(model: nn.Module, data: Data) -> float:
    """CER of greedy CTC decoding on the test split."""
    features, lengths, targets, target_lengths = data.test
    logits, out_lengths = model(features, lengths)
    hypotheses = greedy_decode(logits.float().argmax(dim=-1), out_lengths)
    references = [row[:n] for row, n in zip(targets.tolist(), target_lengths.tolist(), strict=True)]
    return character_error_rate(hypotheses, references)


def recipe() -> Recipe:
    return Recipe(
        name="speech",
        description="Conv1d + bidirectional GRU, CTC loss, on synthetic spectrograms (DeepSpeech 2 in miniature); CER",
        make_data=make_data,
        make_model=SpeechModel,
        loss=loss,
        evaluate=evaluate,
        metric="CER",
        higher_is_better=False,
        steps=2000,
        batch_size=32,
        lr=5e-3,
        optimizer="adam",
        max_grad_norm=1.0,
        warmup_steps=20,
        eval_every=200,
    )
