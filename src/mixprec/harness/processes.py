"""Several processes: under torchrun, who this process is, its slice of each batch, the process group;
across runs, the lock that keeps two of them out of one run folder (`run_folder_lock`).

`mixprec.harness.training.train` runs data-parallel when torchrun starts it with ``WORLD_SIZE`` > 1: every rank
trains a DistributedDataParallel replica on its contiguous slice of the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mixprec.recipes import Batch, Recipe

__all__ = ["rank_and_world_size", "rows_per_process", "check_one_process", "process_group", "shard",
           "run_folder_lock", "LOCK_NAME"]


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes training together: torch.distributed's when
    initialised, else torchrun's environment (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` for a plain run.

    Example:
        >>> rank_and_world_size()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rows_per_process(recipe: Recipe, world_size: int) -> int:
    """Rows of every batch each of ``world_size`` processes trains on: an equal slice of the recipe's
    batch, which stays the global batch. ValueError if ``recipe.batch_size`` does not split evenly.

    Example:
        >>> from mixprec.recipes import get_recipe
        >>> rows_per_process(get_recipe("digits"), 2)
        32
    """
    if recipe.batch_size % world_size:
        fits = [str(n) for n in range(1, min(recipe.batch_size, 16) + 1) if recipe.batch_size % n == 0]
        raise ValueError(
            f"recipe {recipe.name!r} has batch_size {recipe.batch_size}, which {world_size} processes cannot "
            f"split evenly (each trains on an equal slice of every batch); run {', '.join(fits)} "
            f"processes, or give the recipe a batch_size divisible by {world_size}")
    return recipe.batch_size // world_size


def check_one_process(what: str) -> None:
    """ValueError under torchrun with several processes: for what trains many runs and writes one report."""
    world_size = rank_and_world_size()[1]
    if world_size > 1:
        raise ValueError(f"{what} runs in one process, not {world_size} (torchrun); under torchrun use "
                         "`mixprec train`, one policy per run")


@contextlib.contextmanager
def process_group(device: torch.device, world_size: int) -> Iterator[None]:
    """Join torchrun's process group for the run (gloo on CPU, NCCL on CUDA) unless the caller already
    has one, and leave it afterwards only if the run joined it."""
    if world_size == 1 or dist.is_initialized():
        yield
        return
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # NCCL's current device, restored
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        try:
            yield
            # Every rank's collectives done before any rank tears the group down: gloo's worker threads
            # still holding work at exit abort the process now and then ("terminate called ...").
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous 1/world_size of every tensor of ``batch`` (the whole batch for one process)."""
    if world_size == 1:
        return batch
    size = len(batch[0]) // world_size
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)


# ----- one run per folder: the lock ---------------------------------------------------------------------

LOCK_NAME = ".mixprec.lock"  # in the run folder while a run (or a resume) uses it: who holds it, since when
LOCK_TEMP_PATTERN = ".mixprec.lock.*.tmp"  # a lock being written: linked into place whole, then removed


@contextlib.contextmanager
def run_folder_lock(folder: Path, *, cli: bool = False, warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock file for the block: a second run (or resume, or overwrite) of the same folder
    is refused meanwhile with a one-line ValueError naming the process that holds it.

    The lock file (``.mixprec.lock``) holds the holder's pid, host and start time; it is written whole
    and put in place by ``os.link``, which fails if one is there (atomic, on NFS too). A lock whose
    process is gone on this host (killed: SIGKILL leaves it) is stale: it is taken over, with a line to
    ``warn`` saying so. A lock held by this process already (`mixprec train` around `train`) is held
    once: the inner block neither takes nor releases it (so two threads of one process are not kept
    apart). Under torchrun only rank 0 takes it (`train` and `mixprec train` see to that).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with run_folder_lock(folder):
        ...     (folder / LOCK_NAME).exists()
        True
        >>> (folder / LOCK_NAME).exists()
        False
    """
    path, me = Path(folder) / LOCK_NAME, _this_process()
    stale: dict[str, Any] | None = None  # the dead process's lock this process removed, if it did
    for _ in range(10):  # each turn: take it, or find who holds it (a stale lock is removed: try again)
        holder = _take(path, me)
        if holder is None:
            break
        if not holder:  # released (or its writer's temporary file removed) meanwhile: try again
            continue
        if _same_process(holder, me):
            yield  # this process holds it already: held once, released by the outer block
            return
        if _running(holder) is not False:
            raise ValueError(_busy(folder, path, holder, cli))
        stale = holder if _remove_stale(path, holder) else stale
    else:
        raise ValueError(f"could not take the lock {str(path)!r}: other processes keep taking and releasing it")
    if stale is not None and warn is not None:
        warn(f"took over the lock of output folder {str(folder)!r}: it was held by pid {stale.get('pid')} "
             f"on {stale.get('host')} (started {stale.get('started')}), which is no longer running")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _read_lock(path) == me:
                path.unlink()


def _this_process() -> dict[str, Any]:
    """What the lock file records of this process: pid, host, start time (and the kernel's, to tell a
    reused pid from the process that took the lock)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "proc_start": _proc_start(os.getpid())}


def _take(path: Path, me: dict[str, Any]) -> dict[str, Any] | None:
    """Create the lock file holding ``me`` (None: taken), or read the one there: its holder ({}: gone)."""
    data = json.dumps(me).encode()
    tmp = path.with_name(f"{LOCK_NAME}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        tmp.write_bytes(data)
        os.link(tmp, path)  # fails if a lock is there; the lock is never seen half written
        return None
    except FileExistsError:
        pass
    except OSError:  # no hard links on this file system: exclusive create, then write
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return None
    finally:
        tmp.unlink(missing_ok=True)
    return _read_lock(path) or {}


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock file's holder; None if there is no lock file; {"pid": None} if it cannot be read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {"pid": None}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"pid": None}
    return holder if isinstance(holder, dict) else {"pid": None}


def _same_process(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    return all(holder.get(k) == me[k] for k in ("pid", "host", "proc_start"))


def _proc_start(pid: int) -> str | None:
    """When process ``pid`` started, in the kernel's clock ticks since boot (/proc, Linux); None elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(holder: dict[str, Any]) -> bool | None:
    """Whether the lock's process still runs: None if that cannot be told (another host, an unreadable
    lock). Dead: no such process, a zombie, or a process that started later under the same pid."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z" and holder.get("proc_start") in (None, fields[19])
    except (OSError, IndexError):
        if Path("/proc/self/stat").exists():
            return False  # /proc is there, and the process is not
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path, holder: dict[str, Any]) -> bool:
    """Remove the lock file if it still holds ``holder`` (a dead process); whether it did. Breakers on
    this host take turns (flock on the folder), so none removes a lock another has just taken."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no turns
        fcntl = None  # type: ignore[assignment]
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _read_lock(path) != holder:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)  # releases the flock


def _busy(folder: Path, path: Path, holder: dict[str, Any], cli: bool) -> str:
    """The one-line refusal: which process holds the folder, and what to do."""
    out = "--out" if cli else "out="
    pid, host, started = holder.get("pid"), holder.get("host"), holder.get("started")
    if pid is None:
        return (f"output folder {str(folder)!r} is locked by {str(path)!r}, which cannot be read; if no run uses "
                f"the folder, delete that file, or choose another {out}")
    if host != socket.gethostname():
        return (f"output folder {str(folder)!r} is in use by pid {pid} on host {host} (started {started}), which "
                f"cannot be checked from here; wait for that run to end, or if it has, delete {str(path)!r}; or "
                f"choose another {out}")
    return (f"output folder {str(folder)!r} is in use by another run: pid {pid} (started {started}); wait for it "
            f"to end or stop it (kill {pid}), or choose another {out}")
