"""Built-in tasks, and the way to name your own.

``get_recipe("digits")`` returns a built-in; ``get_recipe("my_pkg.tasks:my_recipe")`` imports a
``Recipe`` (or a function returning one) from your code, the current directory first, and
``get_recipe("path/to/tasks.py:my_recipe")`` loads it from a file; ``--recipe`` accepts the same.

Example:
    >>> from mixprec.recipes import RECIPES, get_recipe
    >>> sorted(RECIPES)  # doctest: +NORMALIZE_WHITESPACE
    ['detection', 'digits', 'gpt', 'gpt-medium', 'gpt2-small', 'lm', 'rnn', 'speech', 'tiny-updates', 'translation',
     'underflow']
    >>> get_recipe("tiny-updates").name
    'tiny-updates'
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .base import OPTIMIZERS, Batch, Data, Recipe

#: recipe name -> (module under mixprec.recipes, one-line description). Modules load on first use.
RECIPES: dict[str, tuple[str, str]] = {
    "digits": ("digits", "CNN with BatchNorm on scikit-learn's handwritten digits; accuracy"),
    "lm": ("lm", "small GPT on Python's own stdlib sources, byte-level; bits per byte"),
    "rnn": ("rnn", "LSTM language model on the same byte corpus; bits per byte"),
    "underflow": ("underflow", "activation gradients in [2^-27, 2^-24): needs loss scaling in f16"),
    "tiny-updates": ("tiny_updates", "updates below 2^-11 of the weights: needs FP32 master weights"),
    "detection": ("detection", "single-shot detector (anchors, SSD matching, hard negatives) on shapes; mAP@0.5"),
    "speech": ("speech", "conv + bidirectional GRU acoustic model with CTC on generated spectrograms; CER"),
    "translation": ("translation", "GRU encoder-decoder with attention on a generated parallel corpus; BLEU"),
    "gpt": ("gpt", "GPT-2-shaped, tiny, on synthetic tokens (for `mixprec bench` on a CPU); bits per token"),
    "gpt2-small": ("gpt2_small", "GPT-2 small (124M, seq 1024) on synthetic tokens, to fill a GPU; bits per token"),
    "gpt-medium": ("gpt_medium", "GPT-2-shaped, 4 layers x 512, seq 256: where 16-bit CPU hardware (AMX) matters"),
}


def get_recipe(spec: str) -> Recipe:
    """A built-in recipe by name, ``"module.path:object"`` (importable, or in the current directory) or
    ``"path/to/file.py:object"`` for a Recipe (or factory) in your code.

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
    target, _, attribute = spec.rpartition(":")  # the last colon: a Windows path has one of its own
    if not target.strip() or not attribute.strip() or target.startswith("."):
        raise ValueError(
            f"recipe {spec!r} is not NAME, module.path:object or path/to/file.py:object (an absolute module "
            f"path and an object name, both non-empty); built-in names: {', '.join(RECIPES)}")
    try:
        module = _load_file(target) if target.endswith(".py") else _import_from_cwd(target)
    except (ImportError, OSError) as error:
        raise ValueError(f"cannot import {target!r} for recipe {spec!r}: {error}") from None
    if not hasattr(module, attribute):
        raise ValueError(f"module {target!r} has no attribute {attribute!r} (recipe {spec!r})")
    obj = getattr(module, attribute)
    if callable(obj) and not isinstance(obj, Recipe):
        obj = obj()
    if not isinstance(obj, Recipe):
        raise TypeError(
            f"{spec!r} is a {type(obj).__name__}, not a mixprec.recipes.Recipe (or a function returning one)"
        )
    return obj


def _import_from_cwd(module_name: str) -> ModuleType:
    """Import ``module_name`` as ``python -m`` would find it: the current directory first.

    The ``mixprec`` console script does not put the current directory on sys.path (``python -m`` does),
    so it is added for this import only.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(cwd)


def _load_file(path: str) -> ModuleType:
    """Load a recipe file given by its path (``path/to/tasks.py``) as a module of its own."""
    file = Path(path).resolve()
    if not file.is_file():
        raise ImportError(f"{file} is a folder, not a Python file" if file.is_dir() else f"no such file: {file}")
    name = f"mixprec_recipe_{file.stem}_{abs(hash(str(file)))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:  # a name not ending in .py: no loader knows the file
        raise ImportError(f"{file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


__all__ = ["OPTIMIZERS", "RECIPES", "Batch", "Data", "Recipe", "get_recipe"]
