"""Manifest round trip, and validation errors that name file, line and field."""

import json

import pytest

from adapterlib.data.manifest import MAX_OBJECTS, GroundedObject, ManifestError, Record, read_manifest, write_manifest


def _good(**overrides):
    rec = {"image": "a.png", "caption": "a red circle",
           "objects": [{"phrase": "red circle", "box": [0.1, 0.2, 0.5, 0.6]}], "id": "x"}
    rec.update(overrides)
    return rec


def _write(tmp_path, lines):
    (tmp_path / "a.png").write_bytes(b"not really a png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))
    return path


def test_round_trip(tmp_path):
    records = [
        Record("a red circle", (GroundedObject("red circle", (0.1, 0.2, 0.5, 0.6)),), image="a.png", id="a", seed=3),
        Record("", (), image="a.png"),
        Record("two", (GroundedObject("x", (0.0, 0.0, 1.0, 1.0)), GroundedObject("y", (0.25, 0.5, 0.75, 0.875)))),
    ]
    (tmp_path / "a.png").write_bytes(b"")
    path = write_manifest(tmp_path / "data.jsonl", records)
    assert read_manifest(path, require_image=False) == records
    assert "seed" not in json.loads(path.read_text().splitlines()[1])  # None fields omitted


def test_blank_lines_skipped(tmp_path):
    path = _write(tmp_path, ["\n", _good(), "   \n"])
    assert len(read_manifest(path)) == 1


@pytest.mark.parametrize("bad, field, problem", [
    (_good(objects=[{"phrase": "a", "box": [0.1, 0.1, 0.2, 0.2]},
                    {"phrase": "b", "box": [0.8, 0.1, 0.2, 0.5]}]), "objects[1].box", "x0 > x1"),
    (_good(objects=[{"phrase": "a", "box": [0.1, 0.1, 1.2, 0.5]}]), "objects[0].box", "outside [0, 1]"),
    ({k: v for k, v in _good().items() if k != "caption"}, "caption", "missing"),
    (_good(objects=[{"phrase": "a", "box": [0.1, 0.1, 0.2, 0.2]}] * (MAX_OBJECTS + 1)), "objects", "MAX_OBJECTS"),
    (_good(captoin="typo"), "'captoin'", "not a known key"),
    (_good(objects=[{"phrase": "a", "bbox": [0.1, 0.1, 0.2, 0.2]}]), "objects[0].bbox", "not a known key"),
    (_good(objects=[{"phrase": "", "box": [0.1, 0.1, 0.2, 0.2]}]), "objects[0].phrase", "non-empty"),
    (_good(image="missing.png"), "image", "does not exist"),
])
def test_errors_name_line_and_field(tmp_path, bad, field, problem):
    path = _write(tmp_path, [_good(id="ok"), "\n", bad])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    message = str(err.value)
    assert "data.jsonl line 3 (id 'x')" in message
    assert field in message and problem in message


def test_bad_json_names_line(tmp_path):
    path = _write(tmp_path, [_good(), '{"caption": "oops",\n'])
    with pytest.raises(ManifestError, match=r"data.jsonl line 2: invalid JSON"):
        read_manifest(path)


def test_missing_image_allowed_when_not_required(tmp_path):
    path = _write(tmp_path, [{k: v for k, v in _good().items() if k != "image"}])
    assert read_manifest(path, require_image=False)[0].image is None
    with pytest.raises(ManifestError, match="image is missing"):
        read_manifest(path)
