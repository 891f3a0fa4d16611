"""Files, written one way: JSON strict (NaN and infinities become null, numpy scalars become Python numbers, tuples
become lists), every file through `atomic_write` (a temporary file renamed over the target, so a reader never sees
half a file and a killed writer leaves the old one), `fsync` where a crash must not lose it, and one file hash.
Folders written as a whole (checkpoints, exports, the base's cached samples) are built beside their target and
renamed in the same way, with these helpers for their files.

A write that runs out of space (a full disk, a quota, a file-size limit) stops as `OutOfSpace`: one line naming the
path and what was being written (`atomic_write`, `out_of_space`), which the command line prints as it is; the
temporary file or folder is removed, so the next call after freeing space starts from what was complete."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

# errors a full disk gives: no space, over quota, over the file-size limit (EFBIG), and what libraries that write
# through their own code say for them (torch.save: "unexpected pos"; safetensors: the Rust io::Error's kind)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_SPACE_WORDS = ("no space left", "disk quota", "file too large", "unexpected pos", "storagefull", "filetoolarge",
                  "code: 28,", "code: 27,", "code: 122,")


class OutOfSpace(OSError):
    """A write that ran out of space: the message names the path and what was being written."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a write that ran out of space."""
    while error is not None:
        if isinstance(error, OutOfSpace) or (isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS):
            return True
        if any(word in str(error).lower() for word in NO_SPACE_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def out_of_space_message(path, what: str, error: BaseException) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip().splitlines()[0]
    return (f"out of disk space writing {what} to {path} ({reason[:160]}): free space there (df -h "
            f"{Path(path).parent}) and run the same command again; what was complete before is intact")


@contextmanager
def out_of_space(what: str, path):
    """Inside it, a write that runs out of space is raised as `OutOfSpace` naming `path` and `what`."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as e:
        if is_out_of_space(e):
            raise OutOfSpace(errno.ENOSPC, out_of_space_message(path, what, e)) from e
        raise


def strict_json(value):
    """`value` with NaN/inf -> None, tuples -> lists, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, **kw) -> str:
    """Strict JSON text (never NaN)."""
    return json.dumps(strict_json(value), allow_nan=False, **kw)


def write_json(path: str | Path, value, indent: int | None = 1) -> Path:
    """Write strict JSON to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(dumps(value, indent=indent)))


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """`write(tmp)` fills a temporary file beside `path` (named with this process's id, so two writers never share
    one), which then replaces `path` in one rename. `durable`: the file is fsynced before the rename (a power cut
    leaves the old file or the whole new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with out_of_space("a file", path):
            write(tmp)
            if durable:
                fsync(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def fsync(path: str | Path) -> None:
    """Flush a file (or a folder's entries: a rename in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: str | Path, h=None):
    """`h` (a new SHA-256 when None) updated with the file's bytes, read in 1 MiB blocks; returns `h`."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def sha256(path: str | Path) -> str:
    """The file's SHA-256, hex."""
    return hash_file(path).hexdigest()
