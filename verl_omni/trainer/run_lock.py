"""One trainer per run directory (``trainer.default_local_dir``).

Two runs writing to one directory overwrite each other's checkpoints, samples and tensorboard files while
both exit 0. :func:`acquire_run_lock` takes an exclusive ``fcntl.flock`` on ``<dir>/run.lock`` and writes the
owner (pid, host, start time, command) into it, for the error message a second trainer gets.

Why flock: the kernel releases it when the owning process dies, however it dies (SIGKILL included), so a lock
left by a dead run never blocks the next one; the owner information left in the file only tells the next
owner whose stale lock it takes over (a logged warning). Two cases need the recorded owner instead:

- the file records another host: flock may not reach across hosts on a network filesystem and the pid cannot be
  checked from here, so the run refuses, naming that host and how to clear the lock;
- the filesystem has no flock (``ENOLCK`` / ``EOPNOTSUPP``): same host, the recorded pid decides (alive: refuse;
  gone: take over).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirectoryLocked(RuntimeError):
    """Another trainer owns the run directory (or may own it: another host's lock)."""


@dataclass
class RunLock:
    """An owned run directory; :meth:`release` (idempotent) or process exit gives it back."""

    directory: str
    path: str
    fd: Optional[int]

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty file means "released cleanly": nothing stale to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # releasing must never mask the error that ended the run; closing drops the lock anyway
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(directory: str) -> RunLock:
    """Own ``directory`` for this process or raise RunDirectoryLocked naming the directory and its owner."""
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flock_held = _try_flock(fd, directory, path)
        previous = _read_owner(fd)
        if previous:
            _refuse_or_take_over(previous, flock_held, directory, path)
        _write_owner(fd, _this_owner())
    except BaseException:
        os.close(fd)  # also drops the flock if we got it
        raise
    return RunLock(directory=directory, path=path, fd=fd)


def describe_owner(owner: dict[str, Any]) -> str:
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')!r}, started {owner.get('started', '?')}, "
        f"command {owner.get('command', '?')!r}"
    )


# ------------------------------------------------------------------------------------------------ internals
def _try_flock(fd: int, directory: str, path: str) -> bool:
    """True when we hold the flock, False when this filesystem has none; raises if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        owner = _read_owner(fd)
        who = describe_owner(owner) if owner else "a process that has not written its details yet"
        raise RunDirectoryLocked(
            f"trainer.default_local_dir={directory} is in use by another trainer ({who}). Two runs in one "
            "directory would overwrite each other's checkpoints: wait for it to finish, stop it, or set "
            "trainer.default_local_dir to another directory"
        ) from None
    except OSError as exc:
        if exc.errno not in _FLOCK_UNSUPPORTED:
            raise
        logger.warning("%s: the filesystem does not support flock (%s); relying on the recorded owner's pid", path, exc)
        return False


def _refuse_or_take_over(previous: dict[str, Any], flock_held: bool, directory: str, path: str) -> None:
    if "unreadable" in previous:  # a write cut short (killed mid-write): no host or pid to check
        if not flock_held:
            raise RunDirectoryLocked(
                f"trainer.default_local_dir={directory} has an unreadable lock record {previous['unreadable']!r} "
                f"and no flock to check it with; if no run uses this directory, delete {path} and start again"
            )
        _warn_take_over(f"the unreadable lock record {previous['unreadable']!r} in {path}")
        return
    host = socket.gethostname()
    if previous.get("host") != host:
        raise RunDirectoryLocked(
            f"trainer.default_local_dir={directory} is locked by a trainer on another host "
            f"({describe_owner(previous)}); "
            f"its pid cannot be checked from {host!r}. If no run uses this directory any more, delete {path} and "
            "start again; otherwise set trainer.default_local_dir to another directory"
        )
    pid = previous.get("pid")
    alive = isinstance(pid, int) and _pid_alive(pid)
    if alive and not flock_held:
        raise RunDirectoryLocked(
            f"trainer.default_local_dir={directory} is in use by another trainer ({describe_owner(previous)}): "
            "wait for it to finish, stop it, or set trainer.default_local_dir to another directory"
        )
    why = "it is gone" if not alive else "it no longer holds the lock (the pid was reused)"
    _warn_take_over(f"the stale lock {path} of {describe_owner(previous)}: {why}")


def _warn_take_over(what: str) -> None:
    message = (
        f"taking over {what}; that run ended without releasing it (killed?), so its last checkpoint may "
        "be older than its last step"
    )
    logger.warning(message)
    print(f"[verl_omni] WARNING {message}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _this_owner() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:500],
    }


def _read_owner(fd: int) -> Optional[dict[str, Any]]:
    """The owner recorded in the lock file; {} for an unreadable record, None for an empty file."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    if not raw.strip():
        return None
    try:
        owner = json.loads(raw)
    except ValueError:
        owner = None
    return owner if isinstance(owner, dict) else {"unreadable": raw[:80].decode(errors="replace")}


def _write_owner(fd: int, owner: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(owner).encode())
    os.fsync(fd)
