"""The grounded-caption manifest format: one JSON record per line.

    {"image": "images/0000001.png", "caption": "a red circle",
     "objects": [{"phrase": "red circle", "box": [x0, y0, x1, y1]}],
     "id": "shapes-1", "seed": 1}

Boxes are normalised to [0, 1] as (x0, y0, x1, y1) with x1, y1 exclusive
(pixel box divided by width/height). "image" is relative to the manifest's
folder; "id" and "seed" are optional. Validation is strict -- unknown keys
are errors -- so a typo in a hand-written manifest fails loudly with the
file, line, record id and field instead of silently training on bad data.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

# The object limit: objects per record that the manifest reader, the importers and the adapter take. It is
# one setting, `TrainConfig.max_objects` (training passes it to `ManifestImages`; `python -m adapterlib
# import` takes it as --max-objects); MAX_OBJECTS (adapterlib/options.py) is its default (GLIGEN's 30) and ceiling.
from adapterlib.files import atomic_write
from adapterlib.options import CROPS, MAX_OBJECTS, ON_BAD_RECORD


def check_max_objects(max_objects: int) -> int:
    """`max_objects` if it is a valid object limit (an int in [1, MAX_OBJECTS]), else a ValueError."""
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects = {max_objects}: must be in [1, {MAX_OBJECTS}] (the object limit's ceiling, "
                         f"options.MAX_OBJECTS)")
    return max_objects

_log = logging.getLogger(__name__)

_RECORD_KEYS = ("image", "caption", "objects", "id", "seed")
_OBJECT_KEYS = ("phrase", "box")


class ManifestError(ValueError):
    """A manifest line that does not follow the format."""


@dataclass(frozen=True)
class GroundedObject:
    phrase: str
    box: tuple[float, float, float, float]

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "box": list(self.box)}


@dataclass(frozen=True)
class Record:
    caption: str
    objects: tuple[GroundedObject, ...]
    image: str | None = None
    id: str | None = None
    seed: int | None = None

    def to_json(self) -> dict:
        """The record as a JSON-ready dict; None fields are omitted."""
        out: dict[str, Any] = {}
        if self.image is not None:
            out["image"] = self.image
        out["caption"] = self.caption
        out["objects"] = [o.to_json() for o in self.objects]
        if self.id is not None:
            out["id"] = self.id
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str, require_image: bool, max_objects: int = MAX_OBJECTS) -> "Record":
        """Validate a decoded JSON value; errors start with `where` (file and line). A record may hold at
        most `max_objects` objects (the object limit, see MAX_OBJECTS)."""
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        # Name the record in every later message so it can be found in big files.
        rid = obj.get("id")
        if isinstance(rid, str):
            where = f"{where} (id {rid!r})"

        def fail(field: str, problem: str) -> ManifestError:
            return ManifestError(f"{where}: {field} {problem}")

        for key in obj:
            if key not in _RECORD_KEYS:
                raise fail(repr(key), f"is not a known key (expected one of {list(_RECORD_KEYS)})")
        if rid is not None and not isinstance(rid, str):
            raise fail("id", f"must be a string, got {rid!r}")

        image = obj.get("image")
        if image is None:
            if require_image:
                raise fail("image", "is missing")
        elif not isinstance(image, str) or not image:
            raise fail("image", f"must be a non-empty string, got {image!r}")

        if "caption" not in obj:
            raise fail("caption", "is missing")
        caption = obj["caption"]
        if not isinstance(caption, str):
            raise fail("caption", f"must be a string, got {caption!r}")

        seed = obj.get("seed")
        # bool is an int subclass; `true` is never a meaningful seed.
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise fail("seed", f"must be an integer, got {seed!r}")

        if "objects" not in obj:
            raise fail("objects", "is missing")
        raw_objects = obj["objects"]
        if not isinstance(raw_objects, list):
            raise fail("objects", f"must be a list, got {type(raw_objects).__name__}")
        if len(raw_objects) > max_objects:
            raise fail("objects", f"has {len(raw_objects)} entries, more than the object limit max_objects="
                                  f"{max_objects} (default options.MAX_OBJECTS={MAX_OBJECTS}; in training "
                                  f"TrainConfig.max_objects)")
        objects = tuple(_parse_object(o, f"objects[{i}]", fail) for i, o in enumerate(raw_objects))

        return cls(caption=caption, objects=objects, image=image, id=rid, seed=seed)


def _parse_object(obj: Any, field: str, fail) -> GroundedObject:
    if not isinstance(obj, dict):
        raise fail(field, f"must be an object, got {obj!r}")
    for key in obj:
        if key not in _OBJECT_KEYS:
            raise fail(f"{field}.{key}", f"is not a known key (expected one of {list(_OBJECT_KEYS)})")
    phrase = obj.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise fail(f"{field}.phrase", f"must be a non-empty string, got {phrase!r}")
    if "box" not in obj:
        raise fail(f"{field}.box", "is missing")
    box = obj["box"]
    if not isinstance(box, list) or len(box) != 4:
        raise fail(f"{field}.box", f"{box!r} must be a list of 4 numbers")
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise fail(f"{field}.box", f"{box!r} must hold 4 finite numbers")
    if any(v < 0.0 or v > 1.0 for v in box):
        raise fail(f"{field}.box", f"{box!r} is outside [0, 1]")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not x0 < x1:
        raise fail(f"{field}.box", f"{box!r} has x0 > x1" if x0 > x1 else f"{box!r} has zero width")
    if not y0 < y1:
        raise fail(f"{field}.box", f"{box!r} has y0 > y1" if y0 > y1 else f"{box!r} has zero height")
    return GroundedObject(phrase=phrase, box=(x0, y0, x1, y1))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


_FIRST_REASONS = 3  # how many reasons a "no valid records" / "bad images" error shows


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {list(ON_BAD_RECORD)}, got {on_bad_record!r}")


def _first_reasons(reasons: Sequence[str]) -> str:
    shown = "".join(f"\n  {r}" for r in reasons[:_FIRST_REASONS])
    more = len(reasons) - _FIRST_REASONS
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def _no_valid_records(path: Path, reasons: Sequence[str]) -> ManifestError:
    return ManifestError(f"{path}: no valid records ({len(reasons)} skipped under on_bad_record='skip'); "
                         f"first reasons:{_first_reasons(reasons)}")


def _image_problem(path: Path) -> str | None:
    """Why the image file at `path` cannot be used without decoding it (None when it is a file)."""
    if path.is_file():
        return None
    if path.exists():
        return f"is not a file (looked for {path})"
    return f"does not exist (looked for {path})"


def _read_manifest(path: str | Path, require_image: bool, on_bad_record: str,
                   max_objects: int = MAX_OBJECTS) -> tuple[list[Record], list[int], list[str]]:
    """(records, their 1-based line numbers, reasons for the skipped lines)."""
    _check_policy(on_bad_record)
    check_max_objects(max_objects)
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not data.startswith(codecs.BOM_UTF8):
        raise ManifestError(f"{path}: the file is UTF-16 encoded (it starts with a UTF-16 byte-order mark); "
                            f"save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):  # written by some Windows editors; harmless
        data = data[len(codecs.BOM_UTF8):]
    records, lines, reasons = [], [], []
    # bytes.splitlines breaks at \n, \r\n and \r, as text mode did, so line numbers are what an editor shows.
    for lineno, raw in enumerate(data.splitlines(), start=1):
        where = f"{path} line {lineno}"
        try:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                    f"of the line); save the manifest as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            record = Record.from_json(obj, where, require_image, max_objects)
            if require_image:
                problem = _image_problem(resolve_image(path, record))
                if problem is not None:
                    rid = f" (id {record.id!r})" if record.id is not None else ""
                    raise ManifestError(f"{where}{rid}: image {record.image!r} {problem}")
        except ManifestError as e:
            if on_bad_record == "error":
                raise
            reasons.append(str(e))
            continue
        records.append(record)
        lines.append(lineno)
    if not records:
        if reasons:
            raise _no_valid_records(path, reasons)
        raise ManifestError(f"{path}: no records (the file is {'empty' if not data else 'only blank lines'})")
    return records, lines, reasons


def read_manifest_report(path: str | Path, require_image: bool = True, on_bad_record: str = "error",
                         max_objects: int = MAX_OBJECTS) -> tuple[list[Record], list[str]]:
    """Read and validate a manifest: (records, reasons for the skipped lines).

    on_bad_record="error" raises ManifestError on the first bad line (the reasons are then always empty);
    "skip" leaves a bad line out and records why: one full message per skipped line, naming the file,
    line, record id and field. A manifest with no valid record is a ManifestError under both policies.
    With `require_image`, every record needs an image and the image file must exist (it is not decoded
    here: `ManifestImages` does that). A record with more than `max_objects` objects is a bad record."""
    records, _, reasons = _read_manifest(path, require_image, on_bad_record, max_objects)
    return records, reasons


def read_manifest(path: str | Path, require_image: bool = True, on_bad_record: str = "error",
                  max_objects: int = MAX_OBJECTS) -> list[Record]:
    """Read and validate a manifest; raises ManifestError on the first bad line (on_bad_record="error"),
    or leaves bad lines out and logs how many (on_bad_record="skip"; `read_manifest_report` returns the
    reasons)."""
    records, reasons = read_manifest_report(path, require_image, on_bad_record, max_objects)
    if reasons:
        _log.warning("%s: skipped %d bad record(s) (on_bad_record='skip'):%s", path, len(reasons),
                     _first_reasons(reasons))
    return records


def write_manifest(path: str | Path, records: Iterable[Record]) -> Path:
    """Write records one per line (parent folders are created), through a temporary file renamed at the
    end: a manifest that exists is complete (a killed writer leaves none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record.to_json()) + "\n" for record in records]
    return atomic_write(path, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"), durable=True)


def png_bytes(image) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array or a PIL image (the one encoder of the project)."""
    import io

    from PIL import Image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _decode_problem(path: Path) -> str | None:
    """Why the image at `path` cannot be trained on (None when it decodes to a nonzero size)."""
    from PIL import Image
    problem = _image_problem(path)          # exists, is a file: the reader's own check, once more as decoded
    if problem is not None:
        return problem
    if path.stat().st_size == 0:
        return f"is empty (0 bytes at {path})"
    try:
        with Image.open(path) as im:
            im.load()  # full decode: a truncated or corrupt file fails here, not mid-training
            size = im.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        return f"does not decode ({type(e).__name__}: {e})"
    if size[0] <= 0 or size[1] <= 0:
        return f"has zero size ({size[0]}x{size[1]})"
    return None


def resolve_image(manifest_path: str | Path, record: Record) -> Path:
    """The image file of a record: its path is relative to the manifest's folder."""
    if record.image is None:
        raise ValueError(f"record {record.id!r} has no image")
    return Path(manifest_path).parent / record.image


# --- the crop / flip policy (TrainConfig.crop, TrainConfig.flip)

# An object whose box keeps less than this share of its area inside the crop is dropped (counted), as is one
# cropped away entirely: a sliver at the edge would teach the adapter a box that no longer shows the object.
MIN_KEPT_AREA = 0.2
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def check_crop(crop: str) -> str:
    """`crop` if it is a crop policy (one of CROPS), else a ValueError."""
    if crop not in CROPS:
        raise ValueError(f"crop = {crop!r}: choose one of {CROPS}")
    return crop


def names_a_side(text: str) -> bool:
    """Whether `text` has the word "left" or "right" (a phrase a horizontal flip makes wrong)."""
    return _SIDE_WORD.search(text) is not None


def sample_rng(seed: int, position: int, n: int) -> np.random.Generator:
    """The crop / flip randomness of the sample at `position` of the data stream (n records a epoch): a
    numpy Generator seeded with (seed, epoch, record slot), a pure function of (seed, position) that never
    touches the training Generator -- so a resumed run draws the same crops, and a run without crop or flip
    draws nothing."""
    return np.random.default_rng([int(seed), int(position) // n, int(position) % n])


@dataclass(frozen=True)
class TransformReport:
    """What `transform_sample` did to one sample: objects dropped by the crop, whether it was flipped, and
    the kept objects whose phrase names a side ("left"/"right") in a flipped sample (left unchanged)."""
    dropped: int = 0
    flipped: bool = False
    side_words: int = 0
    # where the sample sits in its image (SDXL's size and crop conditioning, `encodings.time_ids`): the image
    # file's (height, width), the resized image's, and the square crop's (top, left) in the resized image
    # before any flip
    original_size: tuple[int, int] = (0, 0)
    resized_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)


def flip_objects(objects) -> tuple[GroundedObject, ...]:
    """The objects mirrored left-right (x0' = 1 - x1, x1' = 1 - x0; phrases left as they are): the one flip, for an
    image's boxes (`transform_sample`) and for a cached record (`flip_record`)."""
    return tuple(GroundedObject(o.phrase, (1.0 - o.box[2], o.box[1], 1.0 - o.box[0], o.box[3])) for o in objects)


def flip_record(record: Record) -> Record:
    """The record with its boxes mirrored left-right (`flip_objects`)."""
    return dataclasses.replace(record, objects=flip_objects(record.objects))


def transform_sample(image, record: Record, resolution: int, crop: str = "none", flip: bool = False,
                     rng: np.random.Generator | None = None) -> tuple[np.ndarray, Record, TransformReport]:
    """One training sample at `resolution`: ((R, R, 3) uint8 image, record with the boxes transformed the
    same way, TransformReport). `image` is a PIL image.

    crop="none" is the original behaviour: the image is resized (stretched, bicubic) to a square; the
    normalised boxes are unchanged and the record is returned as it is. "center" / "random": the shorter
    side is resized to `resolution` (bicubic, aspect kept), then a square is cropped at the centre or at a
    random offset (from `rng`); each box goes to pixels, is shifted by the crop, normalised and clipped to
    [0, 1]. An object whose clipped box has zero area, or keeps less than MIN_KEPT_AREA of its area, is
    dropped and counted. flip=True flips the image horizontally with probability 0.5 (from `rng`; the coin
    is drawn first, then the crop offset), boxes with it (x0' = 1 - x1, x1' = 1 - x0). Phrases and the
    caption are left unchanged: a phrase that names a side ("left cup") is not rewritten, it is counted in
    `side_words` (swapping words would also rewrite "right" in other senses)."""
    from PIL import Image
    check_crop(crop)
    if (crop == "random" or flip) and rng is None:
        raise ValueError("transform_sample: crop='random' and flip need an rng (see sample_rng)")
    do_flip = bool(flip and rng.random() < 0.5)
    image = image.convert("RGB")
    R = resolution
    objects, dropped = record.objects, 0
    original, resized, (ox, oy) = image.size[::-1], (R, R), (0, 0)
    if crop == "none":
        if image.size != (R, R):
            image = image.resize((R, R), Image.BICUBIC)
    else:
        w, h = image.size
        s = R / min(w, h)
        nw, nh = (R, max(R, round(h * s))) if w <= h else (max(R, round(w * s)), R)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BICUBIC)
        if crop == "center":
            ox, oy = (nw - R) // 2, (nh - R) // 2
        else:
            ox, oy = int(rng.integers(0, nw - R + 1)), int(rng.integers(0, nh - R + 1))
        resized = (nh, nw)
        if (nw, nh) != (R, R):
            image = image.crop((ox, oy, ox + R, oy + R))
        kept = []
        for o in objects:
            x0, y0, x1, y1 = o.box
            full = ((x0 * nw - ox) / R, (y0 * nh - oy) / R, (x1 * nw - ox) / R, (y1 * nh - oy) / R)
            box = tuple(min(1.0, max(0.0, v)) for v in full)
            area = (box[2] - box[0]) * (box[3] - box[1])
            if box[2] <= box[0] or box[3] <= box[1] or area < MIN_KEPT_AREA * (full[2] - full[0]) * (full[3] - full[1]):
                dropped += 1
                continue
            kept.append(GroundedObject(o.phrase, box))
        objects = tuple(kept)
    side_words = 0
    if do_flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        objects = flip_objects(objects)
        side_words = sum(names_a_side(o.phrase) for o in objects)
    if objects is not record.objects:
        record = dataclasses.replace(record, objects=objects)
    return np.asarray(image), record, TransformReport(dropped, do_flip, side_words, original, resized, (oy, ox))


class ManifestImages:
    """A manifest's records with their images, loaded on demand and resized to the model's resolution.

    Boxes are normalised, so resizing (crop="none") keeps every box valid; non-square images are
    stretched, which the boxes follow exactly. crop="center" / "random" and flip transform the image and
    its boxes together (`transform_sample`); the randomness is a pure function of (seed, the sample's
    position in the data stream). Objects cropped away are dropped and counted in `dropped_by_crop`.

    Construction checks every image once, before any training: it exists, is a non-empty file, decodes
    and has a nonzero size. A bad record (in the manifest or its image) is a ManifestError naming the
    manifest, line and record id (on_bad_record="error": after the pass, with the count of bad images),
    or is left out (on_bad_record="skip"): `skipped` holds every reason, from the reader and from the
    image pass; `lines` holds the manifest line of each kept record. `max_objects` is the object limit
    (training passes `TrainConfig.max_objects`): a record with more objects is a bad record here, before
    any training, not an error in the middle of it."""

    def __init__(self, manifest: str | Path, resolution: int, on_bad_record: str = "error",
                 progress: bool = True, max_objects: int = MAX_OBJECTS, crop: str = "none", flip: bool = False,
                 seed: int = 0):
        self.manifest = Path(manifest)
        self.resolution = resolution
        self.max_objects = max_objects
        self.crop, self.flip, self.seed = check_crop(crop), bool(flip), int(seed)
        # what the crop / flip policy did in the loads of this instance (a report's numbers; a resumed run
        # counts from its resume on)
        self.dropped_by_crop = 0      # objects cropped away or below MIN_KEPT_AREA of their area
        self.flipped = 0              # samples flipped
        self.side_words_flipped = 0   # kept objects whose phrase names a side ("left"/"right") in a flipped sample
        records, lines, self.skipped = _read_manifest(self.manifest, True, on_bad_record, max_objects)
        keep, bad = [], []
        from tqdm import tqdm
        for i in tqdm(range(len(records)), desc="verify images", unit="img", disable=not progress,
                      file=sys.stderr, mininterval=0.5):
            problem = _decode_problem(resolve_image(self.manifest, records[i]))
            if problem is None:
                keep.append(i)
                continue
            rid = f" (id {records[i].id!r})" if records[i].id is not None else ""
            bad.append(f"{self.manifest} line {lines[i]}{rid}: image {records[i].image!r} {problem}")
        if bad and on_bad_record == "error":
            more = (f"\n{len(bad)} of {len(records)} images are bad; the others:{_first_reasons(bad[1:])}\n"
                    f"(on_bad_record='skip' leaves them out)") if len(bad) > 1 else ""
            raise ManifestError(bad[0] + more)
        self.skipped += bad
        if not keep:
            raise _no_valid_records(self.manifest, self.skipped)
        self.records = [records[i] for i in keep]
        self.lines = [lines[i] for i in keep]
        if self.skipped:
            _log.warning("%s: skipped %d bad record(s) of %d (on_bad_record='skip'):%s", self.manifest,
                         len(self.skipped), len(self.skipped) + len(keep), _first_reasons(self.skipped))

    def __len__(self) -> int:
        return len(self.records)

    def load(self, indices, positions=None) -> tuple[np.ndarray, list[Record]]:
        """(B, H, W, 3) uint8 images and their records, both transformed by the crop / flip policy
        (`transform_sample`; crop="none" without flip: resized, the records as they are).

        `positions`: each sample's position in the data stream (training passes step * batch_size + i);
        the crop offset and flip coin of a sample come from (seed, position) only (`sample_rng`). Without
        positions, a sample's position is its index (epoch 0)."""
        images, records, _ = self.load_reports(indices, positions)
        return images, records

    def load_reports(self, indices, positions=None) -> tuple[np.ndarray, list[Record], list[TransformReport]]:
        """`load`, with each sample's TransformReport (where its crop sits: SDXL's size and crop conditioning)."""
        from PIL import Image
        indices = [int(i) for i in indices]
        positions = indices if positions is None else [int(p) for p in positions]
        if len(positions) != len(indices):
            raise ValueError(f"{len(indices)} indices but {len(positions)} positions")
        random = self.crop == "random" or self.flip
        images, records, reports = [], [], []
        for i, pos in zip(indices, positions):
            rng = sample_rng(self.seed, pos, len(self.records)) if random else None
            with Image.open(resolve_image(self.manifest, self.records[i])) as im:
                image, record, report = transform_sample(im, self.records[i], self.resolution, self.crop,
                                                         self.flip, rng)
            self.dropped_by_crop += report.dropped
            self.flipped += report.flipped
            self.side_words_flipped += report.side_words
            images.append(image)
            records.append(record)
            reports.append(report)
        return np.stack(images), records, reports
