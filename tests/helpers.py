"""What several test files share: the multi-process launcher, checked subprocess runs, torchrun's command
line, small models and typed wrappers, and walking nested state dicts.

The launcher, ``run_workers(fn, args, workdir=...)``, runs ``fn(rank, *args)`` in ``world_size`` fresh Python
processes (2 by default), joined in one gloo process group, and returns one ``WorkerOutcome`` per rank:

- each process has one torch thread (``OMP_NUM_THREADS=1`` too) and runs with ``-X faulthandler``, so that
  a crash in native code (segfault, abort) still leaves a Python stack in its log;
- the group meets through a file in ``workdir`` (a ``FileStore``): no port to pick, none to collide with
  another program; its collectives time out after ``collective_timeout_s``;
- ``fn``'s return value comes back through ``torch.save`` (written whole or not at all), and the traceback
  of an exception it raised through a text file; a process whose ``fn`` raised exits at once, without
  tearing down a group that may be mid-collective, so that its peers' collectives fail instead of pairing
  with later ones;
- once one process has failed, the others get ``GRACE_S`` to follow and are then stopped; all of them are
  stopped at ``timeout_s``: a hang fails the test, it never blocks it.

``fn`` must be a module-level function of an importable module (a test file: this folder is on the
workers' path), ``args`` picklable. Workers never assert: the test asserts on what they return.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

import mixprec as mp

TESTS = Path(__file__).resolve().parent
WORLD_SIZE = 2
GRACE_S = 10.0  # after one worker failed, how long the others get to exit before they are stopped
COLLECTIVE_TIMEOUT_S = 30.0  # one collective, or the rendezvous, inside a worker
LOG_TAIL_CHARS = 3000


# ====================================================================================================
# The launcher: the parent's side
# ====================================================================================================


@dataclass
class WorkerOutcome:
    """How one rank's process ended, and what it returned."""

    rank: int
    exit_code: int | None  # None: stopped by the launcher; negative: killed by that signal
    result: Any  # fn's return value; None when it returned none, raised, or never finished
    error: str | None  # the traceback of fn's exception, when it raised one
    reason: str  # why the process ended, in words
    log: str  # the tail of its stdout and stderr

    @property
    def ok(self) -> bool:
        """The process exited cleanly after fn returned."""
        return self.exit_code == 0 and self.error is None

    def describe(self) -> str:
        """The reason, then fn's traceback if any, then the log tail: for failure messages."""
        parts = [self.reason]
        if self.error:
            parts.append(f"it raised:\n{self.error.rstrip()}")
        parts.append(f"log tail:\n{self.log}" if self.log else "its log is empty")
        return "\n".join(parts)


def run_workers(fn: Callable[..., Any], args: Sequence[Any] = (), *, workdir: Path, world_size: int = WORLD_SIZE,
                timeout_s: float, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> list[WorkerOutcome]:
    """Run ``fn(rank, *args)`` on every rank of a fresh gloo group of ``world_size`` processes (see the module
    docstring); return each rank's outcome, in rank order. ``workdir`` holds the rendezvous file, the logs
    and the results: a fresh folder per call (created when missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "args.pkl").exists():
        raise ValueError(f"{workdir} was used by another run_workers call: give each call a fresh folder")
    with open(workdir / "args.pkl", "wb") as f:
        pickle.dump(tuple(args), f)
    command = [sys.executable, "-X", "faulthandler", "-c", "import helpers; helpers.worker_main()",
               fn.__module__, fn.__qualname__, str(world_size), str(workdir), str(collective_timeout_s)]
    procs = []
    for rank in range(world_size):
        with open(_log_path(workdir, rank), "w") as log:
            procs.append(subprocess.Popen([*command, str(rank)], stdout=log, stderr=subprocess.STDOUT,
                                          env=_worker_env()))
    start = time.monotonic()
    first_failure = _wait(procs, start + timeout_s)
    exit_codes = [p.poll() for p in procs]  # None: still running, stopped below
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    elapsed = time.monotonic() - start
    reasons = [_reason(rank, exit_codes, first_failure is not None, timeout_s) + f", after {elapsed:.0f} s"
               for rank in range(world_size)]
    return [_outcome(workdir, rank, exit_codes[rank], reasons[rank]) for rank in range(world_size)]


def results(outcomes: list[WorkerOutcome]) -> list[Any]:
    """Every rank's return value; fails the test (with every failed rank's story) unless all ranks are ok."""
    assert all(o.ok for o in outcomes), worker_failures(outcomes)
    return [o.result for o in outcomes]


def worker_failures(outcomes: list[WorkerOutcome]) -> str:
    """What went wrong, rank by rank ("" when every rank is ok)."""
    return "\n".join(f"--- rank {o.rank}: {o.describe()}" for o in outcomes if not o.ok)


def _worker_env() -> dict[str, str]:
    """The parent's environment, one thread, unbuffered output, and this folder and mixprec on the path."""
    path = [str(TESTS), str(Path(mp.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def _wait(procs: list[subprocess.Popen[bytes]], deadline: float) -> float | None:
    """Wait until every process exited, GRACE_S after the first failure, or the deadline; return when the
    first failure was seen (None: none failed)."""
    first_failure = None
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
            first_failure = time.monotonic()  # the others should follow at once; stop them if they do not
        if first_failure is not None and time.monotonic() > first_failure + GRACE_S:
            break
        time.sleep(0.05)
    return first_failure


def _reason(rank: int, exit_codes: list[int | None], a_peer_failed: bool, timeout_s: float) -> str:
    code = exit_codes[rank]
    if code is not None:
        return f"its process exited with code {code}" + (" (killed by a signal)" if code < 0 else "")
    if a_peer_failed:
        failed = {r: c for r, c in enumerate(exit_codes) if c not in (None, 0)}
        return f"stopped by the test {GRACE_S:.0f} s after another process failed (exit codes {failed})"
    return f"stopped by the test at its {timeout_s} s timeout (a hang?)"


def _outcome(workdir: Path, rank: int, exit_code: int | None, reason: str) -> WorkerOutcome:
    result_path, error_path, log_path = (_result_path(workdir, rank), _error_path(workdir, rank),
                                         _log_path(workdir, rank))
    result = torch.load(result_path, weights_only=False) if result_path.exists() else None
    error = error_path.read_text() if error_path.exists() else None
    log = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log_path.exists() else ""
    return WorkerOutcome(rank=rank, exit_code=exit_code, result=result, error=error, reason=reason, log=log)


def _result_path(workdir: Path, rank: int) -> Path:
    return workdir / f"rank{rank}.result.pt"


def _error_path(workdir: Path, rank: int) -> Path:
    return workdir / f"rank{rank}.error.txt"


def _log_path(workdir: Path, rank: int) -> Path:
    return workdir / f"rank{rank}.log"


# ====================================================================================================
# The launcher: a worker's side
# ====================================================================================================


def worker_main() -> None:
    """A worker process (started by run_workers): join the group, run fn, leave its result, exit."""
    module, qualname, world, folder, collective_timeout, rank_text = sys.argv[1:7]
    rank, world_size, workdir = int(rank_text), int(world), Path(folder)
    torch.set_num_threads(1)
    try:
        fn = _find(module, qualname)
        with open(workdir / "args.pkl", "rb") as f:
            args = pickle.load(f)
        _join_group(workdir, rank, world_size, float(collective_timeout))
        result = fn(rank, *args)
        torch.save(result, f"{_result_path(workdir, rank)}.tmp")
        os.replace(f"{_result_path(workdir, rank)}.tmp", _result_path(workdir, rank))  # never half-written
    except BaseException:
        _error_path(workdir, rank).write_text(traceback.format_exc())
        _exit(1)  # no teardown of a group that may be mid-collective: the peers' collectives fail at once
    try:
        dist.barrier()  # every rank is done before any leaves: gloo aborts now and then otherwise
    except BaseException:
        traceback.print_exc()  # a peer failed after this rank's fn returned: its own outcome says why
        _exit(1)
    _exit(0)


def _find(module: str, qualname: str) -> Callable[..., Any]:
    target: Any = importlib.import_module(module)
    for name in qualname.split("."):
        target = getattr(target, name)
    return target


def _join_group(workdir: Path, rank: int, world_size: int, timeout_s: float) -> None:
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.FileStore(str(workdir / "rendezvous"), world_size)
    store.set_timeout(timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ====================================================================================================
# Subprocesses, models and state dicts
# ====================================================================================================


def run_command(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (at most ``timeout`` s); fail the test, with its output, unless it exits 0."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def torchrun_command(*args: str, nproc: int = WORLD_SIZE) -> list[str]:
    """The command line that runs ``python ARGS...`` in ``nproc`` processes under torchrun. --standalone: a
    local rendezvous on a free port, so that parallel runs never collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *args]


def named_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested state dict (dicts, lists, tuples), by its path."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from named_tensors(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from named_tensors(value, f"{prefix}[{i}]")


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


class Checkpointed(torch.nn.Module):
    """Activation checkpointing of one module, as checkpoint wrappers do: backward recomputes its forward
    (non-reentrant)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def typed_prepare(model: ModelT, optimizer: torch.optim.Optimizer, policy: str,
                  ) -> tuple[ModelT, torch.optim.Optimizer, mp.LossScaler]:
    """``mp.prepare`` with an optimizer, typed as the tests use it: the model comes back as given (prepared
    in place), the optimizer (or its MasterWeights) is there."""
    prepared, prepared_optimizer, scaler = mp.prepare(model, optimizer, policy)
    return cast(ModelT, prepared), cast(torch.optim.Optimizer, prepared_optimizer), scaler


def step_float(value: float | torch.Tensor | None) -> float:
    """A number of mp.step's StepInfo (e.g. grad_norm) as a float: after ``sync=False`` it is a 0-dim tensor,
    read here to compare; None (nothing measured: no max_grad_norm given) is an error."""
    if value is None:
        raise ValueError("mp.step measured nothing here: give it max_grad_norm to measure the gradient norm")
    return float(value)
