"""No Ray processes left behind when the trainer dies without shutting Ray down (SIGKILL, the OOM killer).

The local Ray instance that ``ray.init()`` starts shares the driver's fate only in part: gcs_server and raylet die
with it (Ray sets PR_SET_PDEATHSIG) and the workers follow within seconds, but the dashboard and runtime-env agents
(raylet's children) first try to report raylet's death to the dead GCS and only exit when that call times out
(a fixed 60 s in ray 2.60's ``publish_error_to_driver``).

:func:`start_ray_watchdog` starts a small process in its own session that holds the read end of a pipe from the
driver. Every ``POLL_S`` it records Ray's node processes and their descendants (pid + start time); when the pipe
closes without the driver saying ``done`` (it died), it SIGKILLs what is left of them. The start time guards
against a reused pid; a process started less than ``POLL_S`` before the death may be missed (workers exit by
themselves within seconds). This file runs as a script: it imports nothing from verl_omni (nor verl, nor Ray).
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
from typing import Optional

logger = logging.getLogger(__name__)

POLL_S = 2.0
DONE = b"done\n"


class RayWatchdog:
    """The driver's end: :meth:`stop` after ``ray.shutdown()`` tells the watchdog that nothing needs killing."""

    def __init__(self, process: subprocess.Popen, fd: int):
        self.process, self.fd = process, fd

    def stop(self) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, DONE)
        except OSError:
            pass  # the watchdog is gone already
        os.close(self.fd)
        self.fd = None
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_ray_watchdog() -> Optional[RayWatchdog]:
    """Watch the Ray processes this driver started (call right after ``ray.init()`` started a local instance)."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API lists the node's processes
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    except Exception as exc:  # noqa: BLE001 - a Ray without this attribute: run without the watchdog, say so
        logger.warning("no watchdog for Ray's processes (%s): they may outlive a killed trainer by ~60 s", exc)
        return None
    read_fd, write_fd = os.pipe()  # both non-inheritable: only the watchdog gets the read end (as its stdin)
    try:
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(os.getpid()), *map(str, roots)],
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches the trainer, not the watchdog
        )
    finally:
        os.close(read_fd)
    return RayWatchdog(process, write_fd)


# ------------------------------------------------------------------------------------------------ the watchdog
def _snapshot(roots: list[int], known: dict[int, float]) -> None:
    """Add the roots and their descendants to ``known`` (pid -> start time); drop entries that have ended."""
    import psutil

    for pid in list(known):
        if not psutil.pid_exists(pid):
            del known[pid]
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                known.setdefault(process.pid, process.create_time())
        except psutil.Error:
            continue


def _kill_left_over(known: dict[int, float]) -> int:
    import psutil

    victims = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                process.kill()
                victims.append(process)
        except psutil.Error:
            continue
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def watch(roots: list[int]) -> int:
    known: dict[int, float] = {}
    _snapshot(roots, known)
    while True:
        ready, _, _ = select.select([0], [], [], POLL_S)
        if ready:
            data = os.read(0, 64)
            if data:  # "done": the driver shut Ray down itself
                return 0
            break  # EOF without "done": the driver died
        _snapshot(roots, known)
    killed = _kill_left_over(known)
    print(f"[verl_omni] the trainer died without shutting Ray down: killed {killed} Ray processes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(watch([int(pid) for pid in sys.argv[2:]]))
