"""JSON the way every file and last line of this project writes it: strict (NaN and infinities become
null, numpy scalars become Python numbers, tuples become lists), and written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


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
    """Write strict JSON to `path` through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(value, indent=indent))
    os.replace(tmp, path)
    return path
