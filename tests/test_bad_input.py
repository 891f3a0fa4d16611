"""Bad input gets a clear error before training starts: the manifest's bytes (byte-order mark, UTF-8, no
records), the on_bad_record policy, and the images checked in one pass when ManifestImages is built."""

import codecs
import io
import json

import numpy as np
import pytest
from PIL import Image

from adapterlib.data.manifest import ManifestError, ManifestImages, read_manifest, read_manifest_report


def _record(i, **overrides):
    rec = {"image": f"images/{i}.png", "caption": "a red circle",
           "objects": [{"phrase": "red circle", "box": [0.1, 0.2, 0.5, 0.6]}], "id": f"r{i}"}
    rec.update(overrides)
    return rec


def _png(size=(16, 16), seed=0) -> bytes:
    """A noisy PNG: it barely compresses, so cutting it short cuts into the pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _dataset(tmp_path, n=4):
    """n good records, images/<i>.png for i < n; returns the manifest path."""
    (tmp_path / "images").mkdir()
    for i in range(n):
        (tmp_path / "images" / f"{i}.png").write_bytes(_png(seed=i))
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(n)))
    return path


# --- the manifest's bytes

def test_utf8_byte_order_mark_accepted(tmp_path):
    path = _dataset(tmp_path, n=2)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert [r.id for r in read_manifest(path)] == ["r0", "r1"]


def test_utf16_manifest_named(tmp_path):
    path = _dataset(tmp_path, n=1)
    path.write_bytes(path.read_text().encode("utf-16"))
    with pytest.raises(ManifestError, match=r"data.jsonl: the file is UTF-16 encoded"):
        read_manifest(path)


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = _dataset(tmp_path, n=3)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"a red circle", "a red cércle".encode("latin-1"))
    path.write_bytes(b"".join(lines))
    with pytest.raises(ManifestError, match=r"data.jsonl line 2: not valid UTF-8 \(byte 0xe9 at byte \d+ of the line\)"):
        read_manifest(path)
    records, reasons = read_manifest_report(path, on_bad_record="skip")
    assert [r.id for r in records] == ["r0", "r2"] and len(reasons) == 1 and "line 2: not valid UTF-8" in reasons[0]


def test_crlf_and_cr_line_ends_keep_line_numbers(tmp_path):
    path = _dataset(tmp_path, n=3)
    lines = path.read_text().splitlines()
    path.write_bytes((lines[0] + "\r\n" + lines[1] + "\r" + '{"caption": 3}' + "\r\n").encode())
    with pytest.raises(ManifestError, match=r"data.jsonl line 3: image is missing"):
        read_manifest(path)


@pytest.mark.parametrize("content, what", [(b"", "empty"), (b"\n  \n\r\n\t\n", "only blank lines"),
                                           (codecs.BOM_UTF8, "empty")])
def test_manifest_without_records_refused(tmp_path, content, what):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=rf"data.jsonl: no records \(the file is {what}\)"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(path, on_bad_record="skip")


# --- the on_bad_record policy in the reader

def test_skip_policy_skips_a_bad_record_and_reports_why(tmp_path):
    path = _dataset(tmp_path, n=4)
    lines = path.read_text().splitlines()
    lines[1] = json.dumps(_record(1, captoin="typo"))
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"data.jsonl line 2 \(id 'r1'\): 'captoin' is not a known key"):
        read_manifest(path)                                    # the default is still "error"
    records, reasons = read_manifest_report(path, on_bad_record="skip")
    assert [r.id for r in records] == ["r0", "r2"]
    assert len(reasons) == 2
    assert "data.jsonl line 2 (id 'r1'): 'captoin' is not a known key" in reasons[0]
    assert "data.jsonl line 4: invalid JSON" in reasons[1]
    assert read_manifest(path, on_bad_record="skip") == records   # the plain list for existing callers


def test_skip_policy_skips_a_missing_image(tmp_path):
    path = _dataset(tmp_path, n=3)
    (tmp_path / "images" / "1.png").unlink()
    records, reasons = read_manifest_report(path, on_bad_record="skip")
    assert [r.id for r in records] == ["r0", "r2"]
    assert reasons == [f"{path} line 2 (id 'r1'): image 'images/1.png' does not exist "
                       f"(looked for {tmp_path / 'images' / '1.png'})"]


def test_skip_with_no_valid_record_still_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(_record(i, caption=None)) for i in range(5)) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path, require_image=False, on_bad_record="skip")
    message = str(err.value)
    assert "data.jsonl: no valid records (5 skipped under on_bad_record='skip')" in message
    assert "line 1 (id 'r0'): caption must be a string" in message and "... and 2 more" in message


def test_unknown_policy_refused(tmp_path):
    path = _dataset(tmp_path, n=1)
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        read_manifest(path, on_bad_record="ignore")
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        ManifestImages(path, 16, on_bad_record="warn", progress=False)


# --- images, checked in one pass when ManifestImages is built

def _break_missing(p):
    p.unlink()


def _break_directory(p):
    p.unlink()
    p.mkdir()


def _break_truncated(p):
    p.write_bytes(p.read_bytes()[:300])


def _break_corrupt(p):
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


def _break_zero_bytes(p):
    p.write_bytes(b"")


def _break_not_an_image(p):
    p.write_text("a caption, not a picture\n")


BREAKS = [(_break_missing, "does not exist"), (_break_directory, "is not a file"),
          (_break_truncated, "does not decode"), (_break_corrupt, "does not decode"),
          (_break_zero_bytes, "is empty (0 bytes"), (_break_not_an_image, "does not decode")]


@pytest.mark.parametrize("breaks, problem", BREAKS, ids=[b.__name__[7:] for b, _ in BREAKS])
def test_bad_image_named_by_line_and_id_before_training(tmp_path, breaks, problem):
    path = _dataset(tmp_path, n=4)
    breaks(tmp_path / "images" / "2.png")
    with pytest.raises(ManifestError) as err:
        ManifestImages(path, 16, progress=False)
    message = str(err.value)
    assert message.startswith(f"{path} line 3 (id 'r2'): image 'images/2.png' {problem}"), message

    data = ManifestImages(path, 16, on_bad_record="skip", progress=False)
    assert len(data) == 3 and [r.id for r in data.records] == ["r0", "r1", "r3"] and data.lines == [1, 2, 4]
    assert len(data.skipped) == 1 and data.skipped[0].startswith(f"{path} line 3 (id 'r2'): image 'images/2.png' {problem}")
    images, records = data.load([0, 1, 2])
    assert images.shape == (3, 16, 16, 3) and [r.id for r in records] == ["r0", "r1", "r3"]


def test_bad_images_all_counted_in_one_pass(tmp_path):
    path = _dataset(tmp_path, n=6)
    for i in (1, 3, 4):
        _break_zero_bytes(tmp_path / "images" / f"{i}.png")
    with pytest.raises(ManifestError) as err:
        ManifestImages(path, 16, progress=False)
    message = str(err.value)
    assert message.startswith(f"{path} line 2 (id 'r1'): image 'images/1.png' is empty")
    assert "3 of 6 images are bad" in message and "line 5 (id 'r4')" in message and "on_bad_record='skip'" in message


def test_skipped_holds_reader_and_image_reasons(tmp_path):
    path = _dataset(tmp_path, n=4)
    lines = path.read_text().splitlines()
    lines[0] = json.dumps(_record(0, objects="none"))
    path.write_text("\n".join(lines) + "\n")
    _break_truncated(tmp_path / "images" / "3.png")
    data = ManifestImages(path, 16, on_bad_record="skip", progress=False)
    assert [r.id for r in data.records] == ["r1", "r2"] and data.lines == [2, 3]
    assert len(data.skipped) == 2
    assert "line 1 (id 'r0'): objects must be a list" in data.skipped[0]
    assert "line 4 (id 'r3'): image 'images/3.png' does not decode" in data.skipped[1]


def test_skip_with_no_decodable_image_still_refused(tmp_path):
    path = _dataset(tmp_path, n=2)
    for i in range(2):
        _break_corrupt(tmp_path / "images" / f"{i}.png")
    with pytest.raises(ManifestError, match=r"data.jsonl: no valid records \(2 skipped under on_bad_record='skip'\)"):
        ManifestImages(path, 16, on_bad_record="skip", progress=False)


def test_good_images_load_resized(tmp_path):
    path = _dataset(tmp_path, n=3)
    (tmp_path / "images" / "1.png").write_bytes(_png(size=(40, 24)))   # non-square: stretched
    data = ManifestImages(path, 8, progress=False)
    assert data.skipped == [] and data.lines == [1, 2, 3]
    images, _ = data.load([2, 1])
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8


def test_progress_bar_on_stderr(tmp_path, capsys):
    path = _dataset(tmp_path, n=2)
    ManifestImages(path, 16, progress=False)
    assert capsys.readouterr().err == ""
    ManifestImages(path, 16)
    captured = capsys.readouterr()
    assert "verify images" in captured.err and "2/2" in captured.err and captured.out == ""
