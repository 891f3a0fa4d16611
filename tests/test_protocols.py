"""The COCO-MIG protocol (adapterlib/data/mig.py, adapterlib/evaluation/protocols.py) and O-mIoU in `evaluate`:
MIG-Bench's layout file read as published (bad input named by file, layout and field), colours checked in
OpenCV's HSV convention with the benchmark's ranges, each instance scored as eval_mig.py scores it (the best IoU
of every box found, the colour on the SAM mask or the box's pixels, mIoU's 0 for a wrong colour), levels L2-L6,
and `evaluate RUN --layouts MIG_FILE` printing the level table and the JSON line with the three rows."""
from __future__ import annotations

import json

import math

import numpy as np
import pandas as pd
import pytest

from adapterlib.__main__ import main
from adapterlib.data.manifest import GroundedObject, ManifestError, Record, write_manifest
from adapterlib.data.mig import is_mig_file, read_layouts, read_mig, split_label, write_mig
from adapterlib.evaluation.protocols import (HSV_RANGES, box_mask, color_share, hsv, in_color_range, measure_mig,
                                             mig_levels)
from adapterlib.model.detectors import Detector
from adapterlib.paths import REPO_ROOT
from adapterlib.training.worlds import renders_phrases

MIG_SHAPES = REPO_ROOT / "adapterlib" / "shapes" / "mig_shapes.json"


def _write(path, layouts) -> str:
    path.write_text(json.dumps(layouts))
    return str(path)


PUBLISHED = {"0": {"caption": "a photo of a red dog and a blue cup", "image_id": 139,
                   "segment": [{"bbox": [0.1, 0.1, 0.5, 0.6], "label": "red dog"},
                               {"bbox": [0.4, 0.2, 0.9, 0.8], "label": "a blue cup"}]},
             "7": {"caption": "a red circle and a green square", "image_id": 20000000,
                   "segment": [{"bbox": [0.0, 0.0, 0.5, 0.5], "label": "red circle"},
                               {"bbox": [0.5, 0.5, 1.0, 1.0], "label": "green square"}]}}


def test_a_mig_layout_file_is_read_as_published(tmp_path):
    path = _write(tmp_path / "mig.json", PUBLISHED)
    assert is_mig_file(path)
    records = read_mig(path, renderable=renders_phrases)
    assert [r.id for r in records] == ["0", "7"] and records[0].caption == "a photo of a red dog and a blue cup"
    assert [o.phrase for o in records[0].objects] == ["red dog", "a blue cup"]
    assert records[0].objects[1].box == (0.4, 0.2, 0.9, 0.8)
    assert records[0].seed is None                    # COCO's image_id is no Shapes seed: no ground truth to render
    assert records[1].seed == 20000000                # a Shapes layout keeps its seed: rendered for the ceiling
    assert read_mig(path)[1].seed is None             # unless the caller renders nothing
    assert split_label("a red dog") == ("red", "dog") and split_label("brown teddy bear") == ("brown", "teddy bear")
    assert read_layouts(path, 1)[1] == "coco-mig" and len(read_layouts(path, 1)[0]) == 1
    manifest = write_manifest(tmp_path / "m.jsonl", records[:1])      # a manifest of one line is not a MIG file
    assert not is_mig_file(manifest) and read_layouts(manifest)[1] is None
    again = write_mig(tmp_path / "again.json", records)
    assert [[(o.phrase, o.box) for o in r.objects] for r in read_mig(again)] == [
        [("red dog", (0.1, 0.1, 0.5, 0.6)), ("blue cup", (0.4, 0.2, 0.9, 0.8))],           # labels as MIG writes them
        [("red circle", (0.0, 0.0, 0.5, 0.5)), ("green square", (0.5, 0.5, 1.0, 1.0))]]


@pytest.mark.parametrize("change, message", [
    (lambda l: l["7"].pop("segment"), r"layout '7': field 'segment' must be a non-empty list"),
    (lambda l: l["7"]["segment"][1].update(bbox=[0.5, 0.5, 1.0]), r"layout '7' .*box"),
    (lambda l: l["7"]["segment"][1].update(bbox=[0.5, 0.5, 1.5, 1.0]), r"layout '7' .*box"),
    (lambda l: l["0"]["segment"][0].update(label="dog"), r"layout '0' segment 0: field 'label': .*colour and a noun"),
    (lambda l: l["0"]["segment"][0].pop("label"), r"layout '0' segment 0: expected an object with 'bbox' and 'label'"),
])
def test_a_bad_mig_file_is_refused_naming_the_file_the_layout_and_the_field(tmp_path, capsys, change, message):
    layouts = json.loads(json.dumps(PUBLISHED))
    change(layouts)
    path = _write(tmp_path / "bad.json", layouts)
    with pytest.raises(ManifestError, match=message):
        read_mig(path)
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", path]) == 2      # before any work
    assert "bad.json" in capsys.readouterr().err


def test_hsv_is_opencvs_and_each_colour_range_holds_its_colour():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [128, 64, 0]]], np.uint8)
    # cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV) gives these (hue halved)
    assert hsv(pixels)[0].tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 255], [0, 0, 0],
                                       [15, 255, 128]]
    from adapterlib.shapes.world import COLORS
    for name, rgb in COLORS.items():                 # the Shapes palette in its own range
        assert in_color_range(np.array([[rgb]], np.uint8), name).all(), name
    assert in_color_range(np.array([[[128, 64, 0]]], np.uint8), "brown").all()
    assert not in_color_range(np.array([[COLORS["red"]]], np.uint8), "blue").any()
    assert in_color_range(np.array([[[250, 250, 250]]], np.uint8), "white").all()
    with pytest.raises(ValueError, match="colour 'purple' has no HSV range"):
        in_color_range(pixels, "purple")
    assert set(HSV_RANGES) >= {"red", "blue", "green", "yellow", "black", "white", "brown"}


class _Boxes(Detector):
    """Returns given boxes for each query."""
    name = "boxes"

    def __init__(self, found: dict, reports_color: bool = False):
        self.found, self.reports_color, self.queries = found, reports_color, []

    def detect(self, image, phrases):
        return [(self.found[p][0][0], 0.9) if self.found.get(p) else (None, 0.0) for p in phrases]

    def detect_all(self, image, phrase):
        self.queries.append(phrase)
        return [(box, 0.9) for box, in self.found.get(phrase, [])]


def _painted(boxes_colours, side=32):
    image = np.full((side, side, 3), 127, np.uint8)                 # grey: no colour's range
    for box, rgb in boxes_colours:
        image[box_mask((side, side), box)] = rgb
    return image


A, B, C = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0), (0.5, 0.0, 1.0, 0.5)


def test_each_instance_is_scored_as_eval_mig_scores_it():
    red, blue = (230, 25, 25), (30, 60, 230)
    images = [_painted([(A, red), (B, red)]), _painted([(A, red), (C, blue)]), _painted([(A, red), (B, blue)])]
    records = [Record("", (GroundedObject("red dog", A), GroundedObject("blue cup", B))),             # L2
               Record("", (GroundedObject("red dog", A), GroundedObject("green cat", C),
                           GroundedObject("yellow car", B))),                                         # L3
               Record("", (GroundedObject("red dog", A), GroundedObject("blue cup", B)))]             # L2
    shifted = (0.0, 0.0, 0.5, 0.4)                                                                    # IoU 0.8 with A
    detector = _Boxes({"dog": [((0.6, 0.6, 0.9, 0.9),), (shifted,)], "cup": [(B,)], "cat": [((0.5, 0.0, 1.0, 0.15),)]})
    table, levels = measure_mig(images, records, detector)
    assert detector.queries[:2] == ["dog", "cup"]                    # the noun is the query
    assert table.iou.round(6).tolist() == [0.8, 1.0, 0.8, 0.3, 0.0, 0.8, 1.0]    # the best of every box found
    # placed + right colour; placed + wrong colour (B is red): mIoU 0; IoU 0.3: kept, not placed; nothing found: 0
    assert table.success.tolist() == [True, False, True, False, False, True, True]
    assert table.miou.round(6).tolist() == [0.8, 0.0, 0.8, 0.3, 0.0, 0.8, 1.0]
    assert table.color_right.tolist()[:2] == [True, False] and table.color_right.isna().tolist()[3:5] == [True, True]
    assert list(levels) == ["L2", "L3", "average"]
    assert levels["L2"] == pytest.approx(dict(isr=3 / 4, miou=(0.8 + 0 + 0.8 + 1.0) / 4, image_success=1 / 2,
                                              n_instances=4, n_images=2))
    assert levels["L3"] == pytest.approx(dict(isr=1 / 3, miou=(0.8 + 0.3) / 3, image_success=0.0,
                                              n_instances=3, n_images=1))
    assert levels["average"] == pytest.approx(dict(isr=4 / 7, miou=3.7 / 7, image_success=1 / 3, n_instances=7,
                                                   n_images=3))
    assert mig_levels(table.iloc[:0]) == {}
    by_colour = _Boxes({"red dog": [(A,)]}, reports_color=True)     # a colour detector looks for the whole label
    measure_mig(images[:1], [Record("", (GroundedObject("red dog", A),))], by_colour)
    assert by_colour.queries == ["red dog"]


def test_the_colour_region_is_the_sam_mask_when_given_else_the_box():
    red = (230, 25, 25)
    image = _painted([((0.0, 0.0, 0.1, 0.5), red)])                  # red on 3 of A's 16 columns
    record = Record("", (GroundedObject("red ball", A), GroundedObject("red cup", B)))
    detector = _Boxes({"ball": [(A,)], "cup": [((0.9, 0.9, 1.0, 1.0),)]})
    table, _ = measure_mig([image], [record], detector)
    assert table.color_share[0] == pytest.approx(color_share(image, box_mask((32, 32), A), "red")) == 3 / 16
    assert table.placed[0] and not table.success[0] and table.miou[0] == 0.0     # under 20% of the box: wrong

    class Segmenter:
        boxes = []

        def mask(self, image, box):
            self.boxes.append(box)
            return box_mask(image.shape[:2], (0.0, 0.0, 0.1, 0.5))    # SAM's mask: the red object alone

    segmenter = Segmenter()
    table, _ = measure_mig([image], [record], detector, segmenter)
    assert table.color_share[0] == 1.0 and table.success[0]
    assert segmenter.boxes == [A]                  # prompted with the layout box; the unplaced cup never asked


def test_the_shipped_shapes_mig_file_is_held_out_v2s_layouts_of_two_to_six_objects(tmp_path):
    from adapterlib.shapes.world import heldout_records, write_mig_shapes
    assert write_mig_shapes(tmp_path / "again.json").read_bytes() == MIG_SHAPES.read_bytes()     # no drift
    records = read_mig(MIG_SHAPES, renderable=renders_phrases)
    v2 = {r.id: r for r in heldout_records(version=2)}
    assert len(records) == 200 and all(r.seed == v2[r.id].seed and r.objects == v2[r.id].objects for r in records)
    counts = [len(r.objects) for r in records]
    assert {n: counts.count(n) for n in set(counts)} == {2: 40, 3: 40, 4: 40, 5: 40, 6: 40}


def test_evaluate_on_the_shapes_mig_file_prints_the_levels_and_the_json_line(tmp_path, monkeypatch, capsys):
    out = capsys.readouterr
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", str(MIG_SHAPES)]) == 0
    text = out().out
    truth = json.loads(text.strip().splitlines()[-1])
    assert truth["protocol"] == "coco-mig" and truth["color_region"] == "box" and "L6" in text
    assert list(truth["levels"]) == ["L2", "L3", "L4", "L5", "L6", "average"]
    assert [truth["levels"][f"L{n}"]["n_images"] for n in range(2, 7)] == [40] * 5
    assert truth["levels"]["average"]["isr"] >= 0.97          # the rendered ground truth: its colours right
    assert truth["levels"]["average"]["n_instances"] == truth["n_objects"] == 800
    assert 0.5 < truth["o_miou"] < truth["miou"]                # the overlap regions are the hard part, even here

    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    train(make_config("shapes", run_name="tiny", steps=2, batch_size=2, n_train=16, save_every=2, log_every=1,
                      n_samples=0, warmup=1), progress=False)
    out()
    assert main(["evaluate", "tiny", "--layouts", str(MIG_SHAPES), "--limit", "6", "--sampling-steps", "2"]) == 0
    text = out().out
    result = json.loads(text.strip().splitlines()[-1])
    assert "coco-mig on 6 layouts" in text and "adapter step 2 ISR" in text
    assert result["protocol"] == "coco-mig" and list(result["levels"]) == ["L2", "L3", "L4", "average"]
    assert set(result["ground_truth_levels"]) == set(result["base_levels"]) == set(result["levels"])
    assert result["levels"]["average"]["n_instances"] == result["n_objects"] == 2 + 2 + 3 + 3 + 4 + 4
    assert all(0 <= result[k]["average"]["isr"] <= 1 for k in ("levels", "ground_truth_levels", "base_levels"))
    assert result["ground_truth_o_miou"] is not None and any(b["o_miou"] is not None for b in result["buckets"])


def test_overlay_score_and_the_split_of_any_layouts_by_it():
    from adapterlib.data.buckets import format_splits, overlay_score, overlay_splits, split_report
    a, b, c = (0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5), (0.5, 0.5, 1.0, 1.0)     # IoU(a, b) = 1/3; c apart
    record = Record("", (GroundedObject("red dog", a), GroundedObject("red cat", b), GroundedObject("red cup", c)))
    similarity = [[1.0, 0.6, 0.9], [0.6, 1.0, 0.9], [0.9, 0.9, 1.0]]
    assert overlay_score(record, similarity) == pytest.approx(0.6 / 3)            # only the overlapping pair counts
    apart = Record("", (GroundedObject("red dog", a), GroundedObject("red cup", c)))
    assert overlay_score(apart, similarity) == 0.0
    pair = lambda s: Record("", (GroundedObject("x y", a), GroundedObject("x z", b)))      # noqa: E731
    records = [apart, pair(0), pair(0), pair(0), pair(0), pair(0), pair(0)]
    scores = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert overlay_splits(records, scores) == ["no overlap", "simple", "simple", "regular", "regular", "complex",
                                               "complex"]
    assert overlay_splits([apart], [0.0]) == ["no overlap"]
    rows = [(r, k, o.box, o.box, True) for r, rec in enumerate(records) for k, o in enumerate(rec.objects)]
    table = pd.DataFrame([dict(record=r, box=box, found_box=found, measurable=m, success=k == 0, iou=0.5 + 0.5 * (k == 0))
                          for r, k, box, found, m in rows])
    report = split_report(records, scores, table, ceiling=table)
    assert report.split.tolist() == ["no overlap", "simple", "regular", "complex"]
    assert report.n_layouts.tolist() == [1, 2, 2, 2] and report.n_objects.tolist() == [2, 4, 4, 4]
    assert report.success_rate.tolist() == [0.5] * 4 and report.miou.tolist() == [0.75] * 4
    assert math.isnan(report.o_miou[0]) and report.o_miou[1:].tolist() == [1.0] * 3      # found = requested
    assert report.base_success_rate.isna().all() and "base" not in format_splits(report)
    assert report.score_min.tolist() == [0.0, 0.1, 0.3, 0.5]


def test_overlay_scores_take_the_bases_phrase_similarity_and_evaluate_reports_the_split(capsys):
    from adapterlib.evaluation.evaluate import load_base_for
    from adapterlib.evaluation.protocols import overlay_scores
    a, b = (0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)
    same = Record("", (GroundedObject("red circle", a), GroundedObject("red circle", b)))
    other = Record("", (GroundedObject("red circle", a), GroundedObject("blue square", b)))
    first, second = overlay_scores([same, other], load_base_for("shapes-tiny"))
    assert first == pytest.approx(1 / 3, abs=1e-6)                   # one phrase: cosine 1, the score is the IoU
    assert second < first
    assert main(["evaluate", "--reference", "ground-truth"]) == 0
    text = capsys.readouterr().out
    splits = json.loads(text.strip().splitlines()[-1])["overlay_splits"]
    assert "by OverLayScore" in text and [s["split"] for s in splits] == ["no overlap", "simple", "regular", "complex"]
    assert splits[0]["n_layouts"] == 120 and sum(s["n_layouts"] for s in splits[1:]) == 100      # v2's 100 overlapping
    assert all(32 <= s["n_layouts"] <= 35 for s in splits[1:])
    assert splits[0]["o_miou"] is None and all(0 < s["o_miou"] <= 1 for s in splits[1:])
