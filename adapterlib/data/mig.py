"""COCO-MIG's layout file (MIGC, `LeyRio/MIG_Bench`): read and written as the benchmark publishes it, so a layout
file from `mig_bench_sample.py` is measured here as it is there (`evaluation/protocols.py`).

The file is one JSON object: each key a layout id, each value

    {"caption": "a photo of a red dog and a blue cup", "image_id": 139,
     "segment": [{"bbox": [x0, y0, x1, y1], "label": "red dog"}, ...]}

with boxes as fractions of the image side. Each instance's label is a colour and a noun ("red dog"; an article in
front, "a red dog", is allowed); its level is the layout's instance count (L2 to L6 in the benchmark). A layout
becomes a `Record` (caption, one object per segment: phrase = label, box = bbox; id = its key). Where every label
of a layout names a Shapes colour and shape ("red circle": the caller says which labels it can render) and its
`image_id` is a Shapes seed, the record keeps that seed, so its ground truth is rendered (the ceiling) and checked
against the seed's own layout.

`read_layouts(path)` reads either kind of layout file: a MIG JSON object, or a JSON Lines manifest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from adapterlib.data.manifest import ManifestError, Record, read_manifest
from adapterlib.files import atomic_write
from adapterlib.options import MAX_OBJECTS

PROTOCOL = "coco-mig"
ARTICLES = ("a", "an", "the")
# The colours COCO-MIG gives its instances (and checks in HSV); the Shapes palette's are its own (shapes/world.py)
MIG_COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown")


def is_mig_file(path: str | Path) -> bool:
    """Whether `path` holds a MIG layout file: one JSON object whose values carry a "segment" list (a JSON Lines
    manifest has one object per line; one line alone has "objects", not "segment")."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(64).lstrip()[:1] != b"{":
                return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "segment" in v
                                                          for v in data.values())


def split_label(label: str) -> tuple[str, str]:
    """(colour, noun) of a MIG instance label: "red dog" -> ("red", "dog"); "a red dog" -> ("red", "dog"). The
    colour is the first word after an article, as eval_mig.py reads it; the noun the words after it."""
    words = label.strip().split()
    if words and words[0].lower() in ARTICLES:
        words = words[1:]
    if len(words) < 2:
        raise ValueError(f"label {label!r}: a MIG label is a colour and a noun (\"red dog\")")
    return words[0].lower(), " ".join(words[1:])


def level(record: Record) -> str:
    """A layout's COCO-MIG level: "L" and its instance count (L2 to L6 in the benchmark)."""
    return f"L{len(record.objects)}"


def read_mig(path: str | Path, max_objects: int = MAX_OBJECTS,
             renderable: Callable[[list[str]], bool] | None = None) -> list[Record]:
    """The layouts of a MIG layout file as records, in the file's order; a clear ManifestError naming the file,
    the layout's key and the field for anything that does not follow the format, before any work. A layout whose
    labels `renderable` accepts (e.g. all in the Shapes vocabulary) keeps its integer image_id as its seed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not a MIG layout file (one JSON object): {e}") from e
    if not isinstance(data, dict) or not data:
        raise ManifestError(f"{path}: a MIG layout file is one JSON object of layouts {{id: {{caption, segment, "
                            f"image_id}}}}; got {type(data).__name__ if data else 'an empty object'}")
    records = []
    for key, layout in data.items():
        where = f"{path} layout {key!r}"
        if not isinstance(layout, dict):
            raise ManifestError(f"{where}: expected an object with caption and segment, got {type(layout).__name__}")
        segment = layout.get("segment")
        if not isinstance(segment, list) or not segment:
            raise ManifestError(f"{where}: field 'segment' must be a non-empty list of {{bbox, label}}")
        caption = layout.get("caption", "")
        if not isinstance(caption, str):
            raise ManifestError(f"{where}: field 'caption' must be a string")
        objects = []
        for i, instance in enumerate(segment):
            if not isinstance(instance, dict) or "bbox" not in instance or "label" not in instance:
                raise ManifestError(f"{where} segment {i}: expected an object with 'bbox' and 'label'")
            label = instance["label"]
            if not isinstance(label, str):
                raise ManifestError(f"{where} segment {i}: field 'label' must be a string, got {label!r}")
            try:
                split_label(label)
            except ValueError as e:
                raise ManifestError(f"{where} segment {i}: field 'label': {e}") from e
            objects.append({"phrase": label, "box": instance["bbox"]})
        image_id = layout.get("image_id")
        seed = image_id if (renderable is not None and isinstance(image_id, int) and not isinstance(image_id, bool)
                            and renderable([o["phrase"] for o in objects])) else None
        record = Record.from_json({"caption": caption, "objects": objects, "id": str(key),
                                   **({"seed": seed} if seed is not None else {})},
                                  where=f"{where} (segment as objects: bbox = box, label = phrase)",
                                  require_image=False, max_objects=max_objects)
        records.append(record)
    return records


def write_mig(path: str | Path, records: Iterable[Record]) -> Path:
    """Records as a MIG layout file (keys: the record ids, else their index; image_id: the seed, else the index),
    written through a temporary file renamed at the end."""
    out = {}
    for i, r in enumerate(records):
        out[r.id if r.id is not None else str(i)] = {
            "caption": r.caption, "image_id": r.seed if r.seed is not None else i,
            "segment": [{"bbox": [round(float(v), 6) for v in o.box], "label": _label(o.phrase)} for o in r.objects]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()) + "\n}\n"  # a layout a line
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=True)


def _label(phrase: str) -> str:
    colour, noun = split_label(phrase)
    return f"{colour} {noun}"


def read_layouts(path: str | Path, n: int | None = None, renderable: Callable[[list[str]], bool] | None = None
                 ) -> tuple[list[Record], str | None]:
    """The layouts of a file (the first n if given) and its protocol: a MIG layout file ("coco-mig"; `read_mig`'s
    `renderable`), or a JSON Lines manifest (None; images optional)."""
    if is_mig_file(path):
        return read_mig(path, renderable=renderable)[:n], PROTOCOL
    return read_manifest(path, require_image=False)[:n], None
