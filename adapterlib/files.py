"""Files, written one way: JSON strict (NaN and infinities become null, numpy scalars become Python numbers, tuples
become lists), every file through `atomic_write` (a temporary file renamed over the target, so a reader never sees
half a file and a killed writer leaves the old one), `fsync` where a crash must not lose it, and one file hash.
Folders written as a whole (checkpoints, exports, the base's cached samples) are built beside their target and
renamed in the same way, with these helpers for their files."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable


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
