"""Built-in tasks, and the way to name your own.

``get_recipe("digits")`` returns a built-in; ``get_recipe("my_pkg.tasks:my_recipe")`` imports a
``Recipe`` (or a function returning one) from your code, which is what ``--recipe`` accepts too.

Example:
    >>> from mixprec.recipes import RECIPES, get_recipe
    >>> sorted(RECIPES)
    ['digits', 'lm', 'rnn', 'tiny-updates', 'underflow']
    >>> get_recipe("tiny-updates").name
    'tiny-updates'
"""

from __future__ import annotations

import importlib

from .base import OPTIMIZERS, Batch, Data, Recipe

#: recipe name -> (module under mixprec.recipes, one-line description). Modules load on first use.
RECIPES: dict[str, tuple[str, str]] = {
    "digits": ("digits", "CNN with BatchNorm on scikit-learn's handwritten digits; accuracy"),
    "lm": ("lm", "small GPT on Python's own stdlib sources, byte-level; bits per byte"),
    "rnn": ("rnn", "LSTM language model on the same byte corpus; bits per byte"),
    "underflow": ("underflow", "activation gradients in [2^-27, 2^-24): needs loss scaling in f16"),
    "tiny-updates": ("tiny_updates", "updates below 2^-11 of the weights: needs FP32 master weights"),
}


def get_recipe(spec: str) -> Recipe:
    """A built-in recipe by name, or ``"module.path:object"`` for a Recipe (or factory) in your code.

    Raises ValueError naming the valid choices when ``spec`` matches nothing.
    """
    if ":" in spec:
        return _import_recipe(spec)
    if spec not in RECIPES:
        raise ValueError(
            f"unknown recipe {spec!r}; valid: {', '.join(RECIPES)} (or module.path:object for your own)"
        )
    module = importlib.import_module(f"{__name__}.{RECIPES[spec][0]}")
    return module.recipe()


def _import_recipe(spec: str) -> Recipe:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for recipe {spec!r}: {error}") from None
    if not hasattr(module, attribute):
        raise ValueError(f"module {module_name!r} has no attribute {attribute!r} (recipe {spec!r})")
    obj = getattr(module, attribute)
    if callable(obj) and not isinstance(obj, Recipe):
        obj = obj()
    if not isinstance(obj, Recipe):
        raise TypeError(
            f"{spec!r} is a {type(obj).__name__}, not a mixprec.recipes.Recipe (or a function returning one)"
        )
    return obj


__all__ = ["OPTIMIZERS", "RECIPES", "Batch", "Data", "Recipe", "get_recipe"]
