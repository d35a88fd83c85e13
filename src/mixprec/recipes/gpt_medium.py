"""`gpt-medium`: the `gpt` recipe at a size where 16-bit (and FP8) hardware matters on a CPU: 4 layers, 512
wide, 8 heads, sequence 256, vocabulary 2048 (~13.8M parameters), on the same kind of synthetic tokens. Its
matmuls are large enough that a CPU with AMX-BF16 runs them far faster in BF16 than in FP32; one step
takes about a second on 2 cores without AMX (`mixprec bench --recipe gpt-medium`).

Example:
    >>> recipe().batch_size, round(parameter_count(MEDIUM) / 1e6, 1)
    (8, 13.8)
"""

from __future__ import annotations

from .base import Recipe
from .gpt import make_recipe, parameter_count  # noqa: F401  (parameter_count: the docstring's example)
from .lm import GPTConfig

MEDIUM = GPTConfig(block_size=256, vocab_size=2048, n_layer=4, n_head=8, n_embd=512)


def recipe() -> Recipe:
    return make_recipe(
        MEDIUM, "gpt-medium", "GPT-2-shaped, medium (4 layers, 512 wide, seq 256, vocab 2048) on synthetic "
        "tokens; bits/token", train_rows=1024, test_rows=32, steps=300, batch_size=8, lr=1e-3, weight_decay=0.1,
        warmup_steps=30, eval_every=100,
    )
