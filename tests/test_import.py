"""`python -m adapterlib import coco|odvg`: small COCO and ODVG fixtures drawn here with PIL (no downloads),
imported through the command line; the manifests are checked line by line, load in `ManifestImages`
and train; the object limit is one setting from the config to the reader."""
import json

import pytest
from PIL import Image, ImageDraw

from adapterlib import options
from adapterlib.__main__ import main
from adapterlib.training.config import TrainConfig, make_config
from adapterlib.data.manifest import MAX_OBJECTS, ManifestError, ManifestImages, read_manifest

# ---------------------------------------------------------------------------------------------
# fixtures

COLOURS = ["red", "blue", "green", "yellow", "magenta", "cyan", "orange"]


def _draw(path, size, boxes_xyxy):
    """An image of `size` (w, h) with a coloured rectangle at each pixel box (clipped by PIL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    for i, (x0, y0, x1, y1) in enumerate(boxes_xyxy):
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLOURS[i % len(COLOURS)])
    im.save(path)


# image 2's five boxes (xywh): areas 100, 400, 36, 900, 225 -> with a limit of 3, ids 12, 14, 15 stay
B_BOXES = {11: [2, 2, 10, 10], 12: [20, 2, 20, 20], 13: [44, 2, 6, 6], 14: [2, 30, 30, 30], 15: [40, 40, 15, 15]}


def _ann(aid, image_id, cat, bbox, crowd=0):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
            "area": float(bbox[2] * bbox[3])}


@pytest.fixture
def coco(tmp_path):
    """4 images: a (100x80) with a kept box, a crowd box, a zero-width box, a box partly outside (its
    category renamed by the map) and one entirely outside; b (64x64) with 5 boxes (over a limit of 3);
    c (50x50) with only a crowd box; sub/d (40x60) with one box and no caption."""
    root = tmp_path / "coco"
    images = root / "images"
    anns = [_ann(1, 1, 1, [10, 20, 30, 40]), _ann(2, 1, 2, [0, 0, 50, 50], crowd=1),
            _ann(3, 1, 1, [50, 10, 0, 20]), _ann(4, 1, 3, [80, 60, 40, 40]), _ann(5, 1, 2, [120, 10, 10, 10])]
    anns += [_ann(aid, 2, 1 + aid % 3, box) for aid, box in B_BOXES.items()]
    anns += [_ann(21, 3, 2, [5, 5, 20, 20], crowd=1), _ann(31, 4, 2, [4, 6, 16, 30])]
    xyxy = lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])
    entries = [(1, "a.png", 100, 80), (2, "b.png", 64, 64), (3, "c.png", 50, 50), (4, "sub/d.png", 40, 60)]
    for iid, name, w, h in entries:
        _draw(images / name, (w, h), [xyxy(a["bbox"]) for a in anns if a["image_id"] == iid])
    instances = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in entries],
                 "annotations": anns,
                 "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "traffic light"}]}
    captions = {"annotations": [{"id": 101, "image_id": 1, "caption": " A dog  near a light.\n"},
                                {"id": 102, "image_id": 1, "caption": "Another caption of a."},
                                {"id": 201, "image_id": 2, "caption": "Many animals."},
                                {"id": 301, "image_id": 3, "caption": "A crowd of cats."},
                                {"id": 999, "image_id": 77, "caption": "No such image."}]}
    for name, doc in (("instances.json", instances), ("captions.json", captions),
                      ("map.json", {"traffic light": "red light"})):
        (root / name).write_text(json.dumps(doc))
    return root


def _coco_args(root, out, *extra):
    return ["import", "coco", "--instances", str(root / "instances.json"), "--images", str(root / "images"),
            "--captions", str(root / "captions.json"), "--map", str(root / "map.json"), "--out", str(out),
            "--max-objects", "3", *extra]


def _run(argv, capsys):
    """(exit code, the JSON last line of stdout or None, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), out, err


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _close(got, want, tol=1e-6):
    return len(got) == len(want) and all(abs(g - w) <= tol for g, w in zip(got, want))


def _check_objects(record, want):
    assert [o["phrase"] for o in record["objects"]] == [p for p, _ in want], record
    for o, (_, box) in zip(record["objects"], want):
        assert _close(o["box"], box), (o, box)


# ---------------------------------------------------------------------------------------------
# COCO

def test_coco_import_writes_the_manifest_and_counts_every_drop(coco, tmp_path, capsys):
    out = tmp_path / "out"
    code, summary, stdout, _ = _run(_coco_args(coco, out), capsys)
    assert code == 0
    lines = _lines(out / "data.jsonl")
    assert [r["id"] for r in lines] == ["coco-1", "coco-2", "coco-3", "coco-4"]
    assert [r["image"] for r in lines] == ["../coco/images/a.png", "../coco/images/b.png", "../coco/images/c.png",
                                           "../coco/images/sub/d.png"]
    assert [r["caption"] for r in lines] == ["A dog near a light.", "Many animals.", "A crowd of cats.", ""]
    # a: the kept box, then the clipped one renamed by the map (crowd, zero-width, outside dropped)
    _check_objects(lines[0], [("dog", [0.1, 0.25, 0.4, 0.75]), ("red light", [0.8, 0.75, 1.0, 1.0])])
    # b: the 3 largest of 5 (ids 12, 14, 15; category 1 + id % 3), in source order
    _check_objects(lines[1], [("dog", [20 / 64, 2 / 64, 40 / 64, 22 / 64]),
                              ("red light", [2 / 64, 30 / 64, 32 / 64, 60 / 64]),
                              ("dog", [40 / 64, 40 / 64, 55 / 64, 55 / 64])])
    assert lines[2]["objects"] == []                     # only a crowd box: kept, with no objects
    _check_objects(lines[3], [("cat", [0.1, 0.1, 0.5, 0.6])])
    assert summary == {"format": "coco", "manifest": str(out / "data.jsonl"), "records": 4, "objects": 6,
                       "source_records": 4, "records_without_objects": 1, "clipped": 1, "kept_largest": 1,
                       "max_objects": 3,
                       "dropped_objects": {"crowd": 2, "degenerate": 1, "outside": 1, "over_limit": 2, "bad_record": 0},
                       "dropped_records": {"bad_record": 0, "no_objects": 0},
                       "captions_without_image": 1, "caption_mode": "first", "images_without_caption": 1}
    assert "dropped objects: crowd" in stdout and "records over the limit (3; largest kept)" in stdout
    print(stdout)                                        # the table, for the report (pytest -s)
    images = ManifestImages(out / "data.jsonl", 32, progress=False)
    assert len(images) == 4 and images.load([0, 3])[0].shape == (2, 32, 32, 3)


def test_coco_caption_mode_all_gives_one_record_per_caption(coco, tmp_path, capsys):
    out = tmp_path / "all"
    code, summary, _, _ = _run(_coco_args(coco, out, "--caption-mode", "all"), capsys)
    assert code == 0
    lines = _lines(out / "data.jsonl")
    assert [(r["id"], r["caption"]) for r in lines] == [
        ("coco-1-0", "A dog near a light."), ("coco-1-1", "Another caption of a."), ("coco-2", "Many animals."),
        ("coco-3", "A crowd of cats."), ("coco-4", "")]
    assert lines[0]["objects"] == lines[1]["objects"]
    assert summary["records"] == 5 and summary["objects"] == 8 and summary["source_records"] == 4


def test_coco_options_crowd_empty_and_default_limit(coco, tmp_path, capsys):
    out = tmp_path / "opts"
    argv = ["import", "coco", "--instances", str(coco / "instances.json"), "--images", str(coco / "images"),
            "--out", str(out), "--keep-crowd", "--drop-empty"]
    code, summary, _, _ = _run(argv, capsys)
    assert code == 0
    assert summary["max_objects"] == MAX_OBJECTS and summary["kept_largest"] == 0
    assert summary["dropped_objects"]["crowd"] == 0 and summary["caption_mode"] == "none (empty captions)"
    lines = _lines(out / "data.jsonl")
    assert [len(r["objects"]) for r in lines] == [3, 5, 1, 1] and {r["caption"] for r in lines} == {""}
    assert lines[0]["objects"][1] == {"phrase": "cat", "box": [0.0, 0.0, 0.5, 0.625]}   # the crowd box, kept
    # without --keep-crowd, c has no object left: --drop-empty leaves it out, counted
    code, summary, _, _ = _run(argv[:-2] + ["--drop-empty", "--overwrite"], capsys)
    assert code == 0 and summary["records"] == 3 and summary["dropped_records"]["no_objects"] == 1
    assert main(argv) == 2                               # data.jsonl exists: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err


def _edit_instances(coco, change):
    doc = json.loads((coco / "instances.json").read_text())
    change(doc)
    (coco / "instances.json").write_text(json.dumps(doc))


def test_coco_bad_annotation_is_an_error_naming_it_or_skipped_and_counted(coco, tmp_path, capsys):
    _edit_instances(coco, lambda d: d["annotations"][0].update(bbox=[10, 20, 30]))
    code, _, _, err = _run(_coco_args(coco, tmp_path / "o"), capsys)
    assert code == 2
    assert "instances.json: annotations[0] (id 1, image 1): bbox [10, 20, 30] must be a list of 4" in err
    assert not (tmp_path / "o" / "data.jsonl").exists()
    code, summary, _, err = _run(_coco_args(coco, tmp_path / "o", "--skip-bad"), capsys)
    assert code == 0 and summary["dropped_objects"]["bad_record"] == 1 and summary["objects"] == 5
    assert "skipped 1 bad source record(s)" in err


def test_coco_bad_image_entry_is_an_error_naming_it_or_skipped(coco, tmp_path, capsys):
    (coco / "images" / "b.png").unlink()
    code, _, _, err = _run(_coco_args(coco, tmp_path / "o"), capsys)
    assert code == 2 and "images[1] (id 2): image 'b.png' does not exist" in err
    code, summary, _, _ = _run(_coco_args(coco, tmp_path / "o", "--skip-bad"), capsys)
    assert code == 0 and summary["records"] == 3 and summary["dropped_records"]["bad_record"] == 1
    # a stated size that is not the image's would normalise every box wrongly
    _edit_instances(coco, lambda d: d["images"][0].update(width=101))
    code, _, _, err = _run(_coco_args(coco, tmp_path / "o", "--overwrite"), capsys)
    assert code == 2 and "images[0] (id 1): image 'a.png' is 100x80 but the record says 101x80" in err


def test_coco_map_with_an_unknown_category_is_an_error(coco, tmp_path, capsys):
    (coco / "map.json").write_text(json.dumps({"traffic light": "red light", "zebra": "striped horse"}))
    code, _, _, err = _run(_coco_args(coco, tmp_path / "o"), capsys)
    assert code == 2 and "map.json: 'zebra' is not a category of" in err


def test_coco_not_json_is_an_error_naming_the_file(coco, tmp_path, capsys):
    (coco / "instances.json").write_text('{"images": [')
    code, _, _, err = _run(_coco_args(coco, tmp_path / "o"), capsys)
    assert code == 2 and "instances.json: the instances file is not valid JSON" in err


# ---------------------------------------------------------------------------------------------
# ODVG

@pytest.fixture
def odvg(tmp_path):
    """3 good lines (two grounding, one detection), a blank line and a malformed line 4."""
    root = tmp_path / "odvg"
    _draw(root / "imgs" / "g1.png", (64, 48), [(10, 10, 30, 30), (40, 20, 64, 40)])
    _draw(root / "imgs" / "g2.png", (32, 32), [(0, 0, 16, 16), (16, 16, 32, 32)])
    _draw(root / "imgs" / "d1.png", (40, 40), [(0, 0, 20, 20)])
    lines = [
        {"filename": "g1.png", "height": 48, "width": 64,
         "grounding": {"caption": "a red box and a blue box",
                       "regions": [{"bbox": [10, 10, 30, 30], "phrase": "red box", "tokens_positive": [[2, 9]]},
                                   {"bbox": [40, 20, 70, 40], "tokens_positive": [[16, 24]]},      # clipped
                                   {"bbox": [70, 0, 80, 10], "phrase": "ghost"}]}},                # outside
        {"filename": "d1.png", "height": 40, "width": 40,
         "detection": {"instances": [{"bbox": [0, 0, 20, 20], "label": 0, "category": "dog"},
                                     {"bbox": [5, 5, 5, 9], "label": 1, "category": "cat"}]}},     # degenerate
        {"filename": "g2.png", "height": 32, "width": 32,
         "grounding": {"caption": "two squares",
                       "regions": [{"bbox": [[0, 0, 16, 16], [16, 16, 32, 32]], "phrase": "square"}]}},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    text += '{"filename": "g1.png", "height": 48\n'
    (root / "train.jsonl").write_text(text)
    return root


def _odvg_args(root, out, *extra):
    return ["import", "odvg", "--jsonl", str(root / "train.jsonl"), "--images", str(root / "imgs"),
            "--out", str(out), *extra]


def test_odvg_malformed_line_is_an_error_naming_the_line(odvg, tmp_path, capsys):
    code, _, _, err = _run(_odvg_args(odvg, tmp_path / "o"), capsys)
    assert code == 2 and "train.jsonl line 5: invalid JSON" in err
    assert not (tmp_path / "o" / "data.jsonl").exists()


def test_odvg_import_with_skip_bad(odvg, tmp_path, capsys):
    out = tmp_path / "o"
    code, summary, stdout, err = _run(_odvg_args(odvg, out, "--skip-bad"), capsys)
    assert code == 0 and "train.jsonl line 5: invalid JSON" in err
    lines = _lines(out / "data.jsonl")
    assert [(r["id"], r["image"], r["caption"]) for r in lines] == [
        ("odvg-1", "../odvg/imgs/g1.png", "a red box and a blue box"), ("odvg-2", "../odvg/imgs/d1.png", ""),
        ("odvg-4", "../odvg/imgs/g2.png", "two squares")]
    _check_objects(lines[0], [("red box", [10 / 64, 10 / 48, 30 / 64, 30 / 48]), ("blue box", [40 / 64, 20 / 48, 1.0, 40 / 48])])
    _check_objects(lines[1], [("dog", [0.0, 0.0, 0.5, 0.5])])
    _check_objects(lines[2], [("square", [0.0, 0.0, 0.5, 0.5]), ("square", [0.5, 0.5, 1.0, 1.0])])
    assert summary == {"format": "odvg", "manifest": str(out / "data.jsonl"), "records": 3, "objects": 5,
                       "source_records": 4, "records_without_objects": 0, "clipped": 1, "kept_largest": 0,
                       "max_objects": MAX_OBJECTS,
                       "dropped_objects": {"crowd": 0, "degenerate": 1, "outside": 1, "over_limit": 0, "bad_record": 0},
                       "dropped_records": {"bad_record": 1, "no_objects": 0},
                       "grounding_lines": 2, "detection_lines": 1}
    print(stdout)
    assert len(ManifestImages(out / "data.jsonl", 32, progress=False)) == 3


@pytest.mark.parametrize("line, message", [
    ({"filename": "g1.png", "height": 48, "width": 64}, "exactly one of 'grounding' and 'detection'"),
    ({"filename": "g1.png", "height": 48, "width": 0, "grounding": {"caption": "x", "regions": []}},
     "width must be a positive integer"),
    ({"filename": "g1.png", "height": 48, "width": 64,
      "grounding": {"caption": "x", "regions": [{"bbox": [1, 2, 3, 4]}]}}, "regions[0]: needs a non-empty 'phrase'"),
    ({"filename": "g1.png", "height": 48, "width": 64,
      "grounding": {"caption": "x", "regions": [{"bbox": [1, 2, "3", 4], "phrase": "p"}]}},
     "regions[0].bbox [1, 2, '3', 4] must be a list of 4 finite numbers"),
    ({"filename": "nope.png", "height": 48, "width": 64, "grounding": {"caption": "x", "regions": []}},
     "image 'nope.png' does not exist"),
])
def test_odvg_bad_records_name_the_line_and_field(odvg, tmp_path, capsys, line, message):
    (odvg / "train.jsonl").write_text(json.dumps(line) + "\n")
    code, _, _, err = _run(_odvg_args(odvg, tmp_path / "o"), capsys)
    assert code == 2 and "train.jsonl line 1: " in err and message in err, err


# ---------------------------------------------------------------------------------------------
# the object limit: one setting, and training on an import

def test_the_object_limit_is_one_setting(coco, tmp_path, capsys, monkeypatch):
    assert TrainConfig().max_objects == MAX_OBJECTS == options.MAX_OBJECTS
    out = tmp_path / "five"
    code, summary, _, _ = _run(_coco_args(coco, out)[:-1] + ["5"], capsys)    # --max-objects 5: b keeps all 5
    assert code == 0 and summary["kept_largest"] == 0
    manifest = out / "data.jsonl"
    assert len(read_manifest(manifest)) == 4                                    # the default limit (30)
    with pytest.raises(ManifestError, match=r"data.jsonl line 2 \(id 'coco-2'\): objects has 5 entries, more "
                                            r"than the object limit max_objects=3"):
        read_manifest(manifest, max_objects=3)
    with pytest.raises(ValueError, match=r"max_objects = 31: must be in \[1, 30\]"):
        read_manifest(manifest, max_objects=MAX_OBJECTS + 1)
    assert main(_coco_args(coco, tmp_path / "x")[:-1] + ["0"]) == 2             # the same check for the importer
    assert "max_objects = 0: must be in [1, 30]" in capsys.readouterr().err
    # set once in the config, it reaches the reader: refused before any training step
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    from adapterlib.runs import latest_checkpoint
    from adapterlib.training.train import train
    cfg = make_config("smoke", data=str(manifest), steps=2, n_samples=0, max_objects=3, run_name="limit")
    with pytest.raises(ManifestError, match="more than the object limit max_objects=3"):
        train(cfg, progress=False)
    assert latest_checkpoint(tmp_path / "runs" / "limit") is None


def test_a_short_run_trains_on_an_imported_coco_set(coco, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(_coco_args(coco, out)) == 0
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    from adapterlib.runs import latest_checkpoint
    from adapterlib.training.train import train
    cfg = make_config("smoke", data=str(out / "data.jsonl"), steps=2, n_samples=0, save_every=2, run_name="coco")
    run = train(cfg, progress=False)
    assert latest_checkpoint(run) is not None
    report = json.loads((run / "data_report.json").read_text())
    assert report["records"] == 4 and report["skipped"] == 0
