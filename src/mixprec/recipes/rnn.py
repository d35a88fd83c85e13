"""`rnn`: an LSTM language model on the same stdlib byte corpus as `lm`.

The paper's speech and language models were recurrent (DeepSpeech 2, bigLSTM); this is their
smallest relative. Metric: bits per byte on the held-out split (lower is better).

Example:
    >>> LSTMModel()(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Data, Recipe
from .corpus import byte_windows, next_byte_bits, next_byte_loss, stdlib_corpus

BLOCK_SIZE = 64


class LSTMModel(nn.Module):
    def __init__(self, vocab_size: int = 256, n_embd: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.lstm = nn.LSTM(n_embd, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.embed(idx))
        return self.head(output)


def make_data() -> Data:
    return byte_windows(stdlib_corpus(), BLOCK_SIZE)


def recipe() -> Recipe:
    return Recipe(
        name="rnn",
        description="LSTM (128 units) language model on Python's stdlib sources; bits per byte",
        make_data=make_data,
        make_model=LSTMModel,
        loss=next_byte_loss,
        evaluate=next_byte_bits,
        metric="bits/byte",
        higher_is_better=False,
        steps=400,
        batch_size=32,
        lr=5e-3,
        optimizer="adam",
        max_grad_norm=1.0,
        warmup_steps=20,
        eval_every=50,
    )
