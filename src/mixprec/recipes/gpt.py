"""`gpt`: a GPT-2-shaped language model on synthetic tokens, for timing and memory (`mixprec bench`).

The model is GPT-2's: pre-LayerNorm blocks (the `lm` recipe's `Block`, attention through
``F.scaled_dot_product_attention``), learned positions, token embeddings tied to the output head, GELU
MLPs 4x wide, biases, GPT-2's initialisation. Two sizes:

* ``gpt`` (`TINY`): 2 layers, 64 wide, 4 heads, sequence 64, vocabulary 512 (~137k parameters):
  tens of steps a second on one CPU core, for tests and CPU benchmarks;
* ``gpt2-small`` (`SMALL`): GPT-2 small, 12 layers, 768 wide, 12 heads, sequence 1024, vocabulary
  50304 (GPT-2's 50257 padded to a multiple of 64), ~124M parameters: the shape that fills an H100.

The tokens are synthetic, drawn from a seed, so that loading data is never the bottleneck of a
benchmark: a random sparse Markov chain in which every token has `SUCCESSORS` possible next tokens,
each equally likely. A model that learns the chain reaches log2(SUCCESSORS) = 2 bits per token (the
floor; a little less where a token's successors repeat); knowing nothing it sits at log2(vocabulary).

Metric: bits per token on held-out sequences (lower is better).

Example:
    >>> model = GPT2(TINY)
    >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 512])
    >>> parameter_count(SMALL) // 10**6
    124
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from .base import Data, Recipe

if TYPE_CHECKING:
    from typing_extensions import Unpack
from .corpus import next_byte_loss
from .lm import GPT, GPTConfig

TINY = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64)
SMALL = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)

SUCCESSORS = 4  # next-token choices per token in the synthetic chain: a floor of 2 bits per token
DATA_SEED = 1234  # the data is the same for every run seed (seeds measure training, not the data)
EVAL_TOKENS = 16 * 1024  # tokens scored by the metric (in chunks, so GPT-2's logits stay small)


class GPT2(GPT):
    """GPT-2: the `lm` recipe's GPT with the head tied to the token embedding and GPT-2's initialisation."""

    def __init__(self, config: GPTConfig = TINY) -> None:
        super().__init__(config)
        self.head.weight = self.tok_emb.weight  # tied: one matrix embeds and predicts
        # GPT-2's init: N(0, 0.02), and the projections that add into the residual stream scaled down by
        # sqrt(2 * layers) so that the stream's variance does not grow with depth.
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, std=std)


def parameter_count(config: GPTConfig) -> int:
    """Parameters of ``GPT2(config)``, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = GPT2(config)
    return sum(p.numel() for p in model.parameters())  # a tied matrix is counted once


def markov_tokens(rows: int, length: int, vocab_size: int, seed: int = DATA_SEED,
                  successors: int = SUCCESSORS) -> torch.Tensor:
    """``rows`` sequences of ``length`` tokens from a random sparse Markov chain drawn from ``seed``.

    Each token's ``successors`` next tokens are drawn once (the chain); each step picks one of them
    uniformly. Vectorised over rows: ``length`` small steps, milliseconds even for GPT-2's shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    chain = torch.randint(vocab_size, (vocab_size, successors), generator=generator)
    choices = torch.randint(successors, (rows, length), generator=generator)
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (rows,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = chain[tokens[:, t - 1], choices[:, t]]
    return tokens


def make_data(config: GPTConfig, train_rows: int, test_rows: int) -> Data:
    """Windows of ``block_size + 1`` tokens (inputs [:-1], targets [1:]); test rows come after train rows."""
    tokens = markov_tokens(train_rows + test_rows, config.block_size + 1, config.vocab_size)
    return Data(
        train=(tokens[:train_rows],),
        test=(tokens[train_rows:],),
        info={"source": "synthetic Markov chain", "data_seed": DATA_SEED, "successors": SUCCESSORS,
              "floor_bits_per_token": math.log2(SUCCESSORS), "block_size": config.block_size,
              "vocab_size": config.vocab_size},
    )


def bits_per_token(model: nn.Module, data: Data) -> float:
    """Mean cross-entropy in bits per predicted token over the first ~EVAL_TOKENS test tokens.

    Scored a few sequences at a time: GPT-2 small's logits are 50304 floats per token.
    """
    (windows,) = data.test
    per_chunk = max(1, 4096 // (windows.shape[1] - 1))
    n = max(1, min(len(windows), EVAL_TOKENS // (windows.shape[1] - 1)))
    total, count = 0.0, 0
    for start in range(0, n, per_chunk):
        chunk = windows[start:min(n, start + per_chunk)]
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count / math.log(2)


class RecipeDefaults(TypedDict, total=False):
    """The Recipe fields a GPT recipe may set (the others `make_recipe` sets itself)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float
    eps: float
    warmup_steps: int
    eval_every: int
    make_optimizer: Callable[[Iterable[nn.Parameter], Recipe], torch.optim.Optimizer] | None


def make_recipe(config: GPTConfig, name: str, description: str, *, train_rows: int, test_rows: int,
                **defaults: Unpack[RecipeDefaults]) -> Recipe:
    """A Recipe for ``GPT2(config)`` on the synthetic chain; ``defaults`` override Recipe fields."""
    return Recipe(
        name=name,
        description=description,
        make_data=lambda: make_data(config, train_rows, test_rows),
        make_model=lambda: GPT2(config),
        loss=next_byte_loss,  # next-token cross-entropy in FP32 (the name is the byte recipes'; any vocab works)
        evaluate=bits_per_token,
        metric="bits/token",
        higher_is_better=False,
        optimizer="adamw",
        max_grad_norm=1.0,
        **defaults,
    )


def recipe() -> Recipe:
    return make_recipe(
        TINY, "gpt", "GPT-2-shaped, tiny (2 layers, 64 wide, seq 64, vocab 512) on synthetic tokens; bits/token",
        train_rows=2048, test_rows=128, steps=300, batch_size=16, lr=3e-3, weight_decay=0.01,
        warmup_steps=20, eval_every=50,
    )
