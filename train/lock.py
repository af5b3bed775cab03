"""A work-dir lock held for the life of a training run: two runs never write into one folder.

The lock is `WORK_DIR/.lock`, created atomically (`O_CREAT | O_EXCL`) with the owner's pid, host and
start time. A second run into a live work dir fails at once naming the pid and the file; a lock whose
process is gone (same host, pid not running, e.g. after SIGKILL) is taken over with a warning. A lock
from another host is never taken over: the message says how to remove it if that run is over.

Example:
    >>> import tempfile
    >>> with WorkDirLock(tempfile.mkdtemp()):
    ...     pass  # train
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WorkDirBusy(RuntimeError):
    """Another live run holds the work dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkDirLock:
    """Context manager holding `work_dir/.lock` (see the module docstring)."""

    def __init__(self, work_dir: Union[str, "os.PathLike[str]"]):
        self.path = Path(work_dir) / LOCK_NAME
        self.held = False

    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "WorkDirLock":
        """Take the lock or raise WorkDirBusy; a stale lock (dead process on this host) is taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:  # half-written by a racing process, or garbage: look again
                    time.sleep(0.05)
                    owner = self._read()
                if owner and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    log.warning("taking over %s: its run (pid %s, started %s) is no longer running",
                                self.path, owner.get("pid"), owner.get("started"))
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
                       if owner else "an unknown process")
                raise WorkDirBusy(f"{self.path.parent} is in use by another training run ({who}; lock file "
                                  f"{self.path}); wait for it, or pass another --work-dir. If that run is over "
                                  f"(e.g. on another machine), delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkDirBusy(f"could not take {self.path}: it keeps reappearing; is another run starting?")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            owner = self._read()
            if owner is None or owner.get("pid") == os.getpid():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> "WorkDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
