"""A byte-level text corpus from files that ship with Python itself, or from your own files.

The default corpus is the source of a fixed list of standard-library modules, found through
``importlib`` (no download). Its SHA-256 goes into every result, because another Python version
ships other sources and so trains on other bytes.

Example:
    >>> corpus = stdlib_corpus()
    >>> len(corpus.bytes) > 100_000, len(corpus.sha256)
    (True, 64)
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .base import Batch, Data

EVAL_WINDOWS = 256  # a fixed slice of the test split: enough for a stable number, fast on a CPU

#: Pure-Python modules present in every CPython >= 3.10 (about 1 MB of source together).
STDLIB_MODULES = (
    "argparse", "ast", "calendar", "collections", "dataclasses", "difflib", "enum", "fractions",
    "functools", "heapq", "inspect", "json.decoder", "pathlib", "pprint", "shlex", "statistics",
    "string", "textwrap", "tokenize", "typing",
)


@dataclass(frozen=True)
class Corpus:
    bytes: bytes
    sources: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.bytes).hexdigest()


def stdlib_corpus(modules: tuple[str, ...] = STDLIB_MODULES) -> Corpus:
    """The concatenated sources of ``modules``, in the given order."""
    paths = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise ValueError(f"standard-library module {name!r} has no Python source here")
        paths.append(Path(spec.origin))
    corpus = file_corpus(paths)
    return Corpus(corpus.bytes, tuple(f"{m} ({sys.version.split()[0]})" for m in modules))


def file_corpus(paths: list[Path] | list[str]) -> Corpus:
    """The bytes of ``paths`` (files, or folders read recursively in sorted order), concatenated."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"corpus path {str(path)!r} is not a file or folder")
    if not files:
        raise ValueError(f"no files found in {[str(p) for p in paths]}")
    return Corpus(b"".join(f.read_bytes() for f in files), tuple(str(f) for f in files))


def byte_windows(corpus: Corpus, block_size: int, test_fraction: float = 0.1) -> Data:
    """Non-overlapping windows of ``block_size + 1`` bytes: inputs are [:-1], targets [1:].

    The last ``test_fraction`` of the corpus is held out, so test text was never trained on.
    """
    data = torch.frombuffer(bytearray(corpus.bytes), dtype=torch.uint8).long()
    split = int(len(data) * (1.0 - test_fraction))
    train, test = _windows(data[:split], block_size), _windows(data[split:], block_size)
    return Data(
        train=(train,),
        test=(test,),
        info={"corpus_sha256": corpus.sha256, "corpus_bytes": len(corpus.bytes),
              "corpus_sources": list(corpus.sources), "block_size": block_size},
    )


def _windows(data: torch.Tensor, block_size: int) -> torch.Tensor:
    n = (len(data) - 1) // block_size
    # Window i covers bytes [i*block, (i+1)*block] inclusive: the target of the last input byte.
    index = torch.arange(n).unsqueeze(1) * block_size + torch.arange(block_size + 1)
    return data[index]


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy in bits per predicted byte (natural log converted to base 2)."""
    import math

    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
    return loss.item() / math.log(2)


def next_byte_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of predicting each next byte of a window (the loss of the byte-level recipes)."""
    (windows,) = batch
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


def next_byte_bits(model: nn.Module, data: Data) -> float:
    """Bits per byte on the first EVAL_WINDOWS windows of the test split (the byte-level recipes' metric)."""
    (windows,) = data.test
    windows = windows[:EVAL_WINDOWS]
    return bits_per_byte(model(windows[:, :-1]), windows[:, 1:])
