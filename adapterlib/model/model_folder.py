"""A local transformers model folder (a detector's, SAM's): checked before anything loads, with a clear error naming
the folder and what is wrong (`check_model_folder`), then loaded quietly, from the folder alone and from safetensors
only (`load_model_folder`). torch and transformers are imported by the callers, when a model is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence


def check_model_folder(path: str | Path, *, field: str, kind: str, types: Sequence[str], hint: str,
                       names: Sequence[str] = (),
                       files: Callable[[str], Sequence[tuple[str, bool]]] = lambda model_type: ()) -> str:
    """The folder `path` that `field` names, checked before anything loads: it exists (`names`: what else `field`
    takes, e.g. 'color', said when it is no folder), its config.json is a JSON object whose model_type is one of
    `types`, and the weights (safetensors), the image processor's config and `files(model_type)` (more (name,
    present) pairs, e.g. the tokenizer's) are there. Otherwise a clear error naming `field`, the `kind` of folder
    ("detector", "SAM"), the folder and what is wrong, with `hint` (what is expected, where to get it); a pickled
    pytorch_model.bin is not loaded. Returns the model_type."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{field} {str(path)!r} is not {' nor '.join([*map(repr, names), 'a folder'])}: "
                                f"expected {hint}")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{field}: {kind} folder {path} has no config.json: expected {hint}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{field}: {kind} folder {path}: config.json is not a JSON object ({e})") from e
    if model_type not in types:
        raise ValueError(f"{field}: {kind} folder {path}: model_type {model_type!r} is not supported; expected one of "
                         f"{list(types)} ({hint})")
    missing = [name for name, present in (
        ("model.safetensors", (path / "model.safetensors").is_file()
         or (path / "model.safetensors.index.json").is_file()),
        ("preprocessor_config.json", (path / "preprocessor_config.json").is_file()),
        *files(model_type)) if not present]
    if missing:
        raise FileNotFoundError(f"{field}: {kind} folder {path} lacks {', '.join(missing)}: expected {hint} "
                                "(a pickled pytorch_model.bin is not loaded)")
    return model_type


def load_model_folder(path: Path, processor_class, model_class, device, *, field: str, kind: str, model: str,
                      expected: str):
    """`processor_class` and `model_class` (transformers auto or model classes) from the checked folder `path`: nothing
    downloaded (`local_files_only`), the weights safetensors only (no pickle), no loading progress bar in a
    notebook's output; the model on `device`, in eval mode. A folder that does not load is a ValueError naming
    `field`, the `kind` of folder, the folder, the `model` it should hold and the files `expected`.
    Returns (processor, model)."""
    from adapterlib.model.base import _quiet_loading

    try:
        with _quiet_loading():
            processor = processor_class.from_pretrained(path, local_files_only=True)
            loaded = model_class.from_pretrained(path, local_files_only=True, use_safetensors=True)  # no pickle
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{field}: {kind} folder {path}: could not load a {model} model and its processor "
                         f"({expected}): {e}") from e
    return processor, loaded.to(device).eval()
