"""`gpt2-small`: the `gpt` recipe at GPT-2 small's shapes (12 layers, 768 wide, 12 heads, sequence
1024, vocabulary 50304; ~124M parameters), on the same kind of synthetic tokens. Made to fill a GPU
(`mixprec bench --recipe gpt2-small --device cuda`); on a CPU one step takes many seconds.

Example:
    >>> recipe().batch_size
    16
"""

from __future__ import annotations

from .base import Recipe
from .gpt import SMALL, make_recipe


def recipe() -> Recipe:
    return make_recipe(
        SMALL, "gpt2-small", "GPT-2 small (12 layers, 768 wide, seq 1024, vocab 50304) on synthetic tokens; "
        "bits/token", train_rows=512, test_rows=16, steps=1000, batch_size=16, lr=6e-4, weight_decay=0.1,
        warmup_steps=100, eval_every=200,
    )
