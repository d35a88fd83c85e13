"""Checkpoints and random state for the reference training loop: atomic writes, safe loads, exact resume.

A checkpoint is a dict of tensors and plain data (loaded with ``torch.load(weights_only=True)``, so no
arbitrary pickle runs), written to a temporary file and moved into place with os.replace: a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mixprec as mp
from mixprec.recipes import Recipe

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1



def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any training.

    Raises ValueError with the reason (so the CLI prints one line instead of failing at the end).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write to output folder {str(folder)!r}: {error.strerror or error}; "
            "choose another with --out"
        ) from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then os.replace,
    so a crash mid-write leaves the previous checkpoint intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain data only: weights_only)."""
    if not path.is_file():
        raise ValueError(f"no checkpoint to resume from at {str(path)!r}; run once without --resume first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {state.get('version')!r}, "
                         f"this mixprec reads version {CHECKPOINT_VERSION}")
    return state


def checkpoint_step(out: Path, recipe: Recipe, policy: mp.Policy, seed: int, steps: int) -> int:
    """The step a run in ``out`` can resume from; ValueError if there is no checkpoint or it is of
    another run (recipe, policy, seed or steps differ)."""
    checkpoint = load_checkpoint(Path(out) / CHECKPOINT_NAME)
    check_same_run(checkpoint, recipe, policy, seed, steps)
    return int(checkpoint["step"])


def check_same_run(checkpoint: dict[str, Any], recipe: Recipe, policy: mp.Policy, seed: int,
                    steps: int) -> None:
    wanted = {"recipe": recipe.name, "policy": str(policy), "seed": seed, "steps": steps}
    different = {k: (checkpoint[k], v) for k, v in wanted.items() if checkpoint[k] != v}
    if different:
        what = ", ".join(f"{k} {old!r} (asked: {new!r})" for k, (old, new) in different.items())
        raise ValueError(f"the checkpoint is of another run: {what}; resume with the same settings")


# ----- random state -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), Python and NumPy RNG states, as tensors and plain data (weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch, Python and NumPy for one run, and give the caller its RNG states back afterwards."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's CPU thread count inside the block only. Small models run best on one thread: with
    more, thread hand-offs cost more than the arithmetic, and far more on a busy machine."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
