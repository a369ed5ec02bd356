"""One run at a time per run folder: a lock file beside the folder, held (flock) while a run uses it."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from pipeline import dist, errors
from pipeline.errors import StageError

log = logging.getLogger("pipeline")


def lock_files(run_dir: Path) -> tuple[Path, Path]:
    """Beside the run folder (which stays a plain folder of results): the lock, flock'ed while a run uses
    the folder (the OS drops it when the process ends, even killed), and who holds it, for the next run."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock", run_dir.parent / f".{run_dir.name}.lock.json"


def writable_run_dir(run_dir: Path) -> None:
    """Create the run folder and prove it is writable before any model is loaded."""
    probe = Path(run_dir) / f".write-test-{os.getpid()}"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        if err.errno in errors.DISK_FULL:
            raise errors.disk_full(probe, 0, what="the run folder", cleanup="") from err
        raise errors.not_writable(run_dir, err) from err


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False):
    """Hold the run folder for one run at a time: a second run is refused (naming the first), or with
    `wait` queues behind it. Only rank 0 of a multi-process run takes it."""
    from filelock import FileLock, Timeout

    if not dist.is_main():
        yield
        return
    writable_run_dir(run_dir)
    lock_path, holder = lock_files(run_dir)
    lock = FileLock(str(lock_path), timeout=-1 if wait else 0)
    try:
        if wait and lock_holder(run_dir):
            log.info("run folder %s is in use (%s); waiting for it", run_dir, lock_holder(run_dir))
        lock.acquire()
    except Timeout:
        who = lock_holder(run_dir) or "another process"
        raise StageError(
            f"run folder '{run_dir}' is in use by another run ({who}). Wait for it to finish, add --wait to start "
            "when it does, or give this run its own folder (name=... or output_dir=...). A run that crashed "
            "does not keep the folder: the lock ends with its process."
        ) from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": platform.node(), "command": " ".join(sys.argv),
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def lock_holder(run_dir: Path) -> str | None:
    """'PID 123 on host, started ...' for the run that holds the folder, if it said."""
    try:
        info = json.loads(lock_files(run_dir)[1].read_text())
        return f"PID {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return None
