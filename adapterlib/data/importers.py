"""Import grounded data sets into the manifest format (`data.py`): COCO instances (+ captions) and ODVG.

    python -m adapterlib import coco --instances instances_train2017.json --images train2017/ \\
        [--captions captions_train2017.json] [--map names.json] --out data/coco
    python -m adapterlib import odvg --jsonl train.odvg.jsonl --images images/ --out data/odvg

Each writes `OUT/data.jsonl`; its "image" paths are relative to OUT (nothing is copied or linked).

What every importer does to a box (pixels in, normalised xyxy out; counted in `ImportSummary`):
- a box with zero or negative width or height as given is dropped ("degenerate");
- a box that does not overlap the image is dropped ("outside"); one partly outside is clipped to the
  image ("clipped", kept);
- beyond the object limit (`max_objects`, default data.MAX_OBJECTS, the one setting that training's
  `TrainConfig.max_objects` also is), the largest boxes (clipped pixel area) are kept, GLIGEN's rule;
  the others are dropped ("over_limit") and the record is counted in "kept_largest". Kept objects stay
  in source order.
- COCO crowd annotations (iscrowd=1) are dropped ("crowd") unless `keep_crowd`.

A source record that is malformed (not JSON, a missing or mistyped field, a box that is not 4 finite
numbers, an unknown image or category id, an image file that is missing or whose size is not the one
the record states) is a `SourceError` naming the file and the record (COCO: the list index and id; ODVG:
the line), or with `skip_bad` is left out and counted under "bad_record" (a whole image record, or one
COCO annotation). Images whose objects were all dropped stay, as records with no objects (the format
allows them: they still teach the caption path, and the adapter sees only padding), unless
`drop_empty`, which leaves them out and counts them under "no_objects".

COCO captions: by default one record per image with its first caption (file order); with
captions="all", one record per (image, caption) pair. See README "Importing COCO and ODVG" for why.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from adapterlib.data.manifest import GroundedObject, Record, check_max_objects, write_manifest
from adapterlib.options import MAX_OBJECTS

CAPTION_MODES = ("first", "all")
MANIFEST_NAME = "data.jsonl"

# Reasons, in the order the summary shows them.
OBJECT_REASONS = ("crowd", "degenerate", "outside", "over_limit", "bad_record")
RECORD_REASONS = ("bad_record", "no_objects")


class SourceError(ValueError):
    """A source record (COCO entry, ODVG line) that cannot be imported; names the file and the record."""


@dataclass
class ImportSummary:
    """What an import did: what the last line of `python -m adapterlib import` prints as JSON."""
    format: str
    manifest: str
    max_objects: int
    source_records: int = 0                 # image entries (COCO) / lines (ODVG) read
    records: int = 0                        # manifest records written
    objects: int = 0                        # objects in them
    records_without_objects: int = 0        # written with no objects (all dropped, or none in the source)
    clipped: int = 0                        # boxes partly outside the image, clipped and kept
    kept_largest: int = 0                   # records where the object limit applied (largest kept)
    dropped_objects: Counter = field(default_factory=Counter)   # reason -> boxes left out
    dropped_records: Counter = field(default_factory=Counter)   # reason -> source records left out
    notes: dict = field(default_factory=dict)                   # format-specific counts (captions, ...)
    bad: list = field(default_factory=list)                     # the reasons of the skipped bad records

    def to_json(self) -> dict:
        return {"format": self.format, "manifest": self.manifest, "records": self.records, "objects": self.objects,
                "source_records": self.source_records, "records_without_objects": self.records_without_objects,
                "clipped": self.clipped, "kept_largest": self.kept_largest, "max_objects": self.max_objects,
                "dropped_objects": {r: self.dropped_objects.get(r, 0) for r in OBJECT_REASONS},
                "dropped_records": {r: self.dropped_records.get(r, 0) for r in RECORD_REASONS},
                **self.notes}

    def table(self) -> str:
        rows = [("manifest", self.manifest), ("source records", self.source_records), ("records", self.records),
                ("objects", self.objects), ("records without objects", self.records_without_objects),
                ("boxes clipped (kept)", self.clipped),
                (f"records over the limit ({self.max_objects}; largest kept)", self.kept_largest)]
        rows += [(f"dropped objects: {r}", self.dropped_objects.get(r, 0)) for r in OBJECT_REASONS]
        rows += [(f"dropped records: {r}", self.dropped_records.get(r, 0)) for r in RECORD_REASONS]
        rows += [(k.replace("_", " "), v) for k, v in self.notes.items()]
        width = max(len(k) for k, _ in rows)
        return f"import {self.format}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# shared pieces

def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _box4(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise SourceError(f"{what} {value!r} must be a list of 4 finite numbers")
    return [float(v) for v in value]


def _size(record: dict, where: str) -> tuple[int, int]:
    w, h = record.get("width"), record.get("height")
    for name, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 or v != int(v):
            raise SourceError(f"{where}: {name} must be a positive integer, got {v!r}")
    return int(w), int(h)


def _image_path(images: Path, file_name: Any, where: str, check_size: tuple[int, int] | None) -> Path:
    """The image file of a source record; it must exist (and have the stated size, read from its header)."""
    if not isinstance(file_name, str) or not file_name:
        raise SourceError(f"{where}: the image file name must be a non-empty string, got {file_name!r}")
    if os.path.isabs(file_name) or ".." in Path(file_name).parts:
        raise SourceError(f"{where}: image file name {file_name!r} must be relative to --images, inside it")
    path = images / file_name
    if not path.is_file():
        raise SourceError(f"{where}: image {file_name!r} does not exist (looked for {path})")
    if check_size is not None:
        from PIL import Image
        try:
            with Image.open(path) as im:       # reads the header only
                size = im.size
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            raise SourceError(f"{where}: image {file_name!r} cannot be opened ({type(e).__name__}: {e})") from None
        if tuple(size) != tuple(check_size):
            raise SourceError(f"{where}: image {file_name!r} is {size[0]}x{size[1]} but the record says "
                              f"{check_size[0]}x{check_size[1]} (its boxes would be normalised wrongly)")
    return path


@dataclass
class _Box:
    phrase: str
    xyxy: tuple[float, float, float, float]     # pixels, as given


def _ground(boxes: Iterable[_Box], width: int, height: int, max_objects: int,
            summary: ImportSummary) -> tuple[GroundedObject, ...]:
    """Pixel xyxy boxes -> normalised objects: degenerate and outside boxes dropped, partial ones clipped,
    the largest `max_objects` kept (by clipped area; ties: source order); all counted in `summary`."""
    kept: list[tuple[float, int, GroundedObject]] = []
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = b.xyxy
        if not (x1 > x0 and y1 > y0):
            summary.dropped_objects["degenerate"] += 1
            continue
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if not (cx1 > cx0 and cy1 > cy0):
            summary.dropped_objects["outside"] += 1
            continue
        box = (cx0 / width, cy0 / height, cx1 / width, cy1 / height)
        if not (box[2] > box[0] and box[3] > box[1]):   # narrower than float precision after normalising
            summary.dropped_objects["degenerate"] += 1
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            summary.clipped += 1
        kept.append(((cx1 - cx0) * (cy1 - cy0), i, GroundedObject(b.phrase, box)))
    if len(kept) > max_objects:
        summary.kept_largest += 1
        summary.dropped_objects["over_limit"] += len(kept) - max_objects
        largest = sorted(kept, key=lambda t: (-t[0], t[1]))[:max_objects]
        kept = sorted(largest, key=lambda t: t[1])
    return tuple(o for _, _, o in kept)


class _Policy:
    """A bad source record: raise (the default) or, with skip_bad, count it and go on."""

    def __init__(self, skip_bad: bool, summary: ImportSummary):
        self.skip_bad, self.summary = skip_bad, summary

    def bad(self, error: SourceError, counter: Counter) -> None:
        if not self.skip_bad:
            raise error
        counter["bad_record"] += 1
        self.summary.bad.append(str(error))


def _progress(iterable, total: int, desc: str, progress: bool):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="rec", disable=not progress, file=sys.stderr,
                mininterval=0.5)


def _manifest_path(out: str | Path, overwrite: bool) -> Path:
    path = Path(out) / MANIFEST_NAME
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; give --overwrite to replace it")
    return path


def _image_field(image: Path, out: Path) -> str:
    """The manifest's "image": relative to the manifest's folder, with forward slashes."""
    return Path(os.path.relpath(os.path.abspath(image), os.path.abspath(out))).as_posix()


def _load_json(path: Path, what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: the {what} file is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: the {what} file is not valid JSON ({e.msg} at line {e.lineno} "
                          f"column {e.colno})") from None


def _list_of_objects(doc: Any, key: str, path: Path) -> list[dict]:
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: expected a JSON object with {key!r}, got {type(doc).__name__}")
    if key not in doc:
        raise SourceError(f"{path}: {key!r} is missing (keys: {sorted(doc)[:10]})")
    value = doc[key]
    if not isinstance(value, list):
        raise SourceError(f"{path}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _finish(path: Path, records: list[Record], summary: ImportSummary) -> ImportSummary:
    summary.records = len(records)
    summary.objects = sum(len(r.objects) for r in records)
    summary.records_without_objects = sum(1 for r in records if not r.objects)
    if not records:
        reasons = "".join(f"\n  {r}" for r in summary.bad[:3])
        raise SourceError(f"{summary.format}: no records to write (of {summary.source_records} source records; "
                          f"dropped: {dict(summary.dropped_records)}){reasons}")
    write_manifest(path, records)
    return summary


# ---------------------------------------------------------------------------------------------
# COCO

def _start(kind: str, images: Path, out, overwrite: bool, max_objects: int, skip_bad: bool):
    """What both importers check and set up first: the limit, the images folder, the output manifest."""
    check_max_objects(max_objects)
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: not a folder")
    manifest = _manifest_path(Path(out), overwrite)
    summary = ImportSummary(kind, str(manifest), max_objects)
    return manifest, summary, _Policy(skip_bad, summary)


def import_coco(instances: str | Path, images: str | Path, out: str | Path, *, captions: str | Path | None = None,
                caption_mode: str = "first", name_map: str | Path | None = None, max_objects: int = MAX_OBJECTS,
                keep_crowd: bool = False, drop_empty: bool = False, skip_bad: bool = False,
                check_sizes: bool = True, overwrite: bool = False, progress: bool = True) -> ImportSummary:
    """COCO instances (+ captions) -> OUT/data.jsonl. Phrases are category names (renamed by `name_map`, a
    JSON object {category name: phrase}); boxes go from xywh pixels to normalised xyxy; the module
    docstring lists what is dropped and counted. Record ids are "coco-<image id>" ("-<k>" appended for
    the k-th caption with caption_mode="all")."""
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode = {caption_mode!r}: choose one of {CAPTION_MODES}")
    instances, images = Path(instances), Path(images)
    manifest, summary, policy = _start("coco", images, out, overwrite, max_objects, skip_bad)
    doc = _load_json(instances, "instances")

    # categories: id -> phrase
    names: dict[int, str] = {}
    for i, c in enumerate(_list_of_objects(doc, "categories", instances)):
        where = f"{instances}: categories[{i}]"
        if not isinstance(c, dict) or isinstance(c.get("id"), bool) or not isinstance(c.get("id"), int):
            raise SourceError(f"{where}: needs an integer 'id', got {c!r}")
        if not isinstance(c.get("name"), str) or not c["name"].strip():
            raise SourceError(f"{where} (id {c['id']}): 'name' must be a non-empty string, got {c.get('name')!r}")
        if c["id"] in names:
            raise SourceError(f"{where}: category id {c['id']} appears twice")
        names[c["id"]] = c["name"]
    if name_map is not None:
        names = _rename(names, Path(name_map), instances)

    # images: the source records
    entries = _list_of_objects(doc, "images", instances)
    annotations = _list_of_objects(doc, "annotations", instances)
    by_image: dict[Any, list[tuple[int, dict]]] = {}
    for i, a in enumerate(annotations):
        key = a.get("image_id") if isinstance(a, dict) else None
        by_image.setdefault(key, []).append((i, a))
    image_ids = {e.get("id") for e in entries if isinstance(e, dict)}
    for key, anns in by_image.items():          # annotations no image entry claims
        if key not in image_ids or isinstance(key, bool) or not isinstance(key, int):
            for i, a in anns:
                rid = f" (id {a.get('id')!r})" if isinstance(a, dict) else ""
                policy.bad(SourceError(f"{instances}: annotations[{i}]{rid}: image_id {key!r} is not an image "
                                       f"of the file"), summary.dropped_objects)

    texts = _captions(Path(captions), image_ids, summary) if captions is not None else None
    records: list[Record] = []
    seen: set[int] = set()
    for i, entry in enumerate(_progress(entries, len(entries), "import coco", progress)):
        summary.source_records += 1
        rid = entry.get("id") if isinstance(entry, dict) else None
        where = f"{instances}: images[{i}]" + (f" (id {rid})" if rid is not None else "")
        try:
            if not isinstance(entry, dict):
                raise SourceError(f"{where}: expected an object, got {entry!r}")
            if isinstance(rid, bool) or not isinstance(rid, int):
                raise SourceError(f"{where}: needs an integer 'id', got {rid!r}")
            if rid in seen:
                raise SourceError(f"{where}: image id {rid} appears twice")
            seen.add(rid)
            width, height = _size(entry, where)
            path = _image_path(images, entry.get("file_name"), where, (width, height) if check_sizes else None)
        except SourceError as e:
            policy.bad(e, summary.dropped_records)
            continue
        boxes = []
        for j, a in by_image.get(rid, []):
            awhere = f"{instances}: annotations[{j}]" + (f" (id {a.get('id')!r}, image {rid})")
            try:
                cat = a.get("category_id")
                if isinstance(cat, bool) or cat not in names:
                    raise SourceError(f"{awhere}: category_id {cat!r} is not a category of the file")
                x, y, w, h = _box4(a.get("bbox"), f"{awhere}: bbox")
                crowd = a.get("iscrowd", 0)
                if crowd not in (0, 1) or isinstance(crowd, bool):
                    raise SourceError(f"{awhere}: iscrowd must be 0 or 1, got {crowd!r}")
            except SourceError as e:
                policy.bad(e, summary.dropped_objects)
                continue
            if crowd and not keep_crowd:
                summary.dropped_objects["crowd"] += 1
                continue
            boxes.append(_Box(names[cat], (x, y, x + w, y + h)))
        objects = _ground(boxes, width, height, max_objects, summary)
        if not objects and drop_empty:
            summary.dropped_records["no_objects"] += 1
            continue
        image = _image_field(path, out)
        caps = texts.get(rid, []) if texts is not None else []
        if caption_mode == "first" or len(caps) <= 1:
            records.append(Record(caption=caps[0] if caps else "", objects=objects, image=image, id=f"coco-{rid}"))
        else:
            records += [Record(caption=c, objects=objects, image=image, id=f"coco-{rid}-{k}")
                        for k, c in enumerate(caps)]
    if texts is not None:
        summary.notes["caption_mode"] = caption_mode
        summary.notes["images_without_caption"] = sum(1 for r in records if not r.caption)
    else:
        summary.notes["caption_mode"] = "none (empty captions)"
    return _finish(manifest, records, summary)


def _rename(names: dict[int, str], path: Path, instances: Path) -> dict[int, str]:
    mapping = _load_json(path, "map")
    if not isinstance(mapping, dict):
        raise SourceError(f"{path}: the map must be a JSON object {{\"category name\": \"phrase\"}}, "
                          f"got {type(mapping).__name__}")
    known = set(names.values())
    for key, phrase in mapping.items():
        if key not in known:
            raise SourceError(f"{path}: {key!r} is not a category of {instances} (categories: "
                              f"{sorted(known)[:20]}{' ...' if len(known) > 20 else ''})")
        if not isinstance(phrase, str) or not phrase.strip():
            raise SourceError(f"{path}: the phrase for {key!r} must be a non-empty string, got {phrase!r}")
    return {cid: mapping.get(name, name) for cid, name in names.items()}


def _captions(path: Path, image_ids: set, summary: ImportSummary) -> dict[int, list[str]]:
    """image id -> its captions, in file order (stripped; empty ones left out)."""
    out: dict[int, list[str]] = {}
    unmatched = 0
    for i, a in enumerate(_list_of_objects(_load_json(path, "captions"), "annotations", path)):
        where = f"{path}: annotations[{i}]"
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise SourceError(f"{where}: needs a string 'caption', got {a!r}")
        if a.get("image_id") not in image_ids:
            unmatched += 1
            continue
        text = " ".join(a["caption"].split())
        if text:
            out.setdefault(a["image_id"], []).append(text)
    summary.notes["captions_without_image"] = unmatched
    return out


# ---------------------------------------------------------------------------------------------
# ODVG

def import_odvg(jsonl: str | Path, images: str | Path, out: str | Path, *, max_objects: int = MAX_OBJECTS,
                drop_empty: bool = False, skip_bad: bool = False, check_sizes: bool = True,
                overwrite: bool = False, progress: bool = True) -> ImportSummary:
    """ODVG JSON Lines -> OUT/data.jsonl. A "grounding" line becomes a record with its caption and one object
    per region box (phrase: the region's "phrase", else the caption's `tokens_positive` spans); a
    "detection" line becomes a record with an empty caption and one object per instance (phrase: its
    "category"). Boxes are pixel xyxy. Record ids are "odvg-<line>"."""
    jsonl, images = Path(jsonl), Path(images)
    manifest, summary, policy = _start("odvg", images, out, overwrite, max_objects, skip_bad)
    lines = jsonl.read_bytes().splitlines()
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    records: list[Record] = []
    kinds = Counter()
    for lineno, raw in enumerate(_progress(lines, len(lines), "import odvg", progress), start=1):
        if not raw.strip():
            continue
        summary.source_records += 1
        where = f"{jsonl} line {lineno}"
        try:
            kind, caption, boxes, width, height, path = _odvg_line(raw, where, images, check_sizes)
        except SourceError as e:
            policy.bad(e, summary.dropped_records)
            continue
        kinds[kind] += 1
        objects = _ground(boxes, width, height, max_objects, summary)
        if not objects and drop_empty:
            summary.dropped_records["no_objects"] += 1
            continue
        records.append(Record(caption=caption, objects=objects, image=_image_field(path, out), id=f"odvg-{lineno}"))
    summary.notes["grounding_lines"] = kinds["grounding"]
    summary.notes["detection_lines"] = kinds["detection"]
    return _finish(manifest, records, summary)


def _odvg_line(raw: bytes, where: str, images: Path, check_sizes: bool):
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SourceError(f"{where}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    width, height = _size(obj, where)
    if ("grounding" in obj) == ("detection" in obj):
        raise SourceError(f"{where}: an ODVG record has exactly one of 'grounding' and 'detection' "
                          f"(keys: {sorted(obj)})")
    boxes: list[_Box] = []
    if "grounding" in obj:
        kind, g = "grounding", obj["grounding"]
        if not isinstance(g, dict) or not isinstance(g.get("caption"), str):
            raise SourceError(f"{where}: grounding must be an object with a string 'caption'")
        caption = " ".join(g["caption"].split())
        regions = g.get("regions")
        if not isinstance(regions, list):
            raise SourceError(f"{where}: grounding.regions must be a list, got {regions!r}")
        for i, r in enumerate(regions):
            field_ = f"{where}: grounding.regions[{i}]"
            if not isinstance(r, dict):
                raise SourceError(f"{field_} must be an object, got {r!r}")
            phrase = _region_phrase(r, g["caption"], field_)
            bbox = r.get("bbox")
            # one box [x0, y0, x1, y1], or several for the same phrase [[...], [...]]
            many = isinstance(bbox, list) and bool(bbox) and all(isinstance(b, list) for b in bbox)
            for b in (bbox if many else [bbox]):
                boxes.append(_Box(phrase, tuple(_box4(b, f"{field_}.bbox"))))
    else:
        kind, d = "detection", obj["detection"]
        caption = ""
        if not isinstance(d, dict) or not isinstance(d.get("instances"), list):
            raise SourceError(f"{where}: detection must be an object with an 'instances' list")
        for i, inst in enumerate(d["instances"]):
            field_ = f"{where}: detection.instances[{i}]"
            if not isinstance(inst, dict):
                raise SourceError(f"{field_} must be an object, got {inst!r}")
            phrase = inst.get("category")
            if not isinstance(phrase, str) or not phrase.strip():
                raise SourceError(f"{field_}.category must be a non-empty string, got {phrase!r}")
            boxes.append(_Box(phrase.strip(), tuple(_box4(inst.get("bbox"), f"{field_}.bbox"))))
    path = _image_path(images, obj.get("filename"), where, (width, height) if check_sizes else None)
    return kind, caption, boxes, width, height, path


def _region_phrase(region: dict, caption: str, where: str) -> str:
    phrase = region.get("phrase")
    if isinstance(phrase, str) and phrase.strip():
        return " ".join(phrase.split())
    if phrase is not None and not isinstance(phrase, str):
        raise SourceError(f"{where}.phrase must be a string, got {phrase!r}")
    spans = region.get("tokens_positive")
    ok = isinstance(spans, list) and spans and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
        and 0 <= s[0] < s[1] <= len(caption) for s in spans)
    if not ok:
        raise SourceError(f"{where}: needs a non-empty 'phrase' or 'tokens_positive' spans [[start, end], ...] "
                          f"inside the caption, got phrase {phrase!r}, tokens_positive {spans!r}")
    text = " ".join(" ".join(caption[s:e].split()) for s, e in spans)
    if not text.strip():
        raise SourceError(f"{where}: the tokens_positive spans {spans!r} cover only blanks of the caption")
    return text


# ---------------------------------------------------------------------------------------------
# the command line's side (adapterlib/__main__.py builds the parser)

def report(summary: ImportSummary, print_json: Callable[[dict], None]) -> None:
    """The summary table on stdout, the first skipped reasons on stderr, the JSON object last."""
    if summary.bad:
        shown = "".join(f"\n  {r}" for r in summary.bad[:5])
        more = f"\n  ... and {len(summary.bad) - 5} more" if len(summary.bad) > 5 else ""
        print(f"skipped {len(summary.bad)} bad source record(s) (--skip-bad):{shown}{more}", file=sys.stderr)
    print(summary.table())
    print_json(summary.to_json())
