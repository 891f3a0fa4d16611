"""One run, one writer: the lock a training process holds on its run folder.

`train` (a new run or `--resume`; the command line, a notebook, papermill, `launch`) takes the run's lock
before it writes anything into the folder and holds it until it exits; with several processes (Accelerate),
rank 0 takes it for all of them. A second writer stops at once with `RunLocked`, an error naming the run,
the holder (pid, host, when it started, its command) and what to do.

The lock is an advisory `flock` on `RUN/.writer.lock`. The operating system releases it when the holder's
process ends, however it ends (SIGKILL, out of memory, a lost machine), so a dead holder never blocks the next
resume: the file left behind only describes the last holder (a note, not a block). Readers (`status`,
`evaluate`, notebooks 04 and 05, the live plot) never take it. Where the file system cannot lock (some
network mounts), the run says so once and goes on unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".writer.lock"
# errors of a file system that cannot lock (as opposed to "another process holds it": EWOULDBLOCK)
NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLocked(RuntimeError):
    """Another process is training this run."""


def holder(folder: str | Path) -> dict | None:
    """What the lock file says of the last process that took the run's lock (it may have ended since), or
    None. Reads only: never takes the lock."""
    path = Path(folder) / LOCK_FILE
    try:
        return json.loads(path.read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "a process that has not written its name yet"
    return (f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('started')}, "
            f"command: {info.get('command')}")


class RunLock:
    """The writer's lock of one run folder: `acquire()` before the first write, `release()` at exit (the
    process's death releases it too)."""

    def __init__(self, folder: str | Path):
        self.folder, self.fd = Path(folder), None

    def acquire(self) -> str | None:
        """Take the lock or raise RunLocked. Returns a note for train.log when the file system cannot lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)       # no O_TRUNC: a refused writer changes no byte
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"run {self.folder} is being trained by another process ({describe(holder(self.folder))}). "
                "A run has one writer: wait for that process to finish, or stop it (SIGTERM or Ctrl-C: it writes a "
                "checkpoint) and resume, or choose another run_name. Reading it (status, evaluate, notebooks 04 "
                "and 05) needs no lock") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKING:
                raise
            return (f"the file system of {self.folder} cannot lock files ({e.strerror}): this run is not "
                    "protected against a second writer; make sure only one process trains it")
        self.fd = fd
        info = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    command=" ".join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
