"""Detectors behind one interface: AP@0.5 by hand, the colour detector through it, and a tiny random-weight
OWL-ViT / OWLv2 folder (built from configs, offline) run through load_detector, evaluate and the CLI."""
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from adapterlib import shapes
from adapterlib.__main__ import main
from adapterlib.data.manifest import GroundedObject, Record, write_manifest
from adapterlib.training.worlds import load_detector, measure
from adapterlib.model.detectors import Detector, ZeroShotDetector, average_precision, score_grounding
from adapterlib.evaluation.evaluate import SUMMARY_KEYS, evaluate, manifest_layouts
from adapterlib.shapes.detector import ColorDetector, evaluate_grounding
from helpers import build_tiny_owl_folder

@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory):
    return build_tiny_owl_folder(tmp_path_factory.mktemp("owlvit"))


def drawn_manifest(folder):
    """Three PIL-drawn 64 x 48 images and their records (one with the same phrase twice)."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = [[("red circle", (0.1, 0.1, 0.5, 0.6)), ("blue square", (0.55, 0.3, 0.95, 0.9))],
             [("green triangle", (0.2, 0.2, 0.8, 0.8))],
             [("dog", (0.05, 0.1, 0.4, 0.9)), ("dog", (0.6, 0.1, 0.95, 0.9)), ("a yellow ball", (0.4, 0.4, 0.6, 0.6))]]
    colors = ["red", "blue", "green", "brown", "brown", "yellow"]
    records, k = [], 0
    for i, objects in enumerate(specs):
        image = Image.new("RGB", (64, 48), "white")
        draw = ImageDraw.Draw(image)
        for _, (x0, y0, x1, y1) in objects:
            draw.ellipse((x0 * 64, y0 * 48, x1 * 64 - 1, y1 * 48 - 1), fill=colors[k])
            k += 1
        image.save(folder / f"{i}.png")
        records.append(Record(" and ".join(p for p, _ in objects), tuple(GroundedObject(p, b) for p, b in objects),
                              image=f"{i}.png", id=f"drawn-{i}"))
    return write_manifest(folder / "data.jsonl", records)


class FixedDetector(Detector):
    """Returns the detections it is given, per phrase, and remembers what it was asked."""
    name = "fixed"

    def __init__(self, per_image: list[dict]):
        self.per_image, self.asked = per_image, []

    def detect(self, image, phrases):
        self.asked.append(list(phrases))
        return [self.per_image[len(self.asked) - 1][p] for p in phrases]


def record(*objects) -> Record:
    return Record("", tuple(GroundedObject(p, b) for p, b in objects))


# --- AP@0.5, by hand

def test_ap50_on_a_hand_made_case():
    """4 requested objects in 2 images. Ranked: 0.9 true (exact box), 0.8 false (IoU 0), 0.7 true
    (IoU 0.6), and bird: no box (a miss). Precision/recall: (1, 1/4), (1/2, 1/4), (2/3, 2/4).
    Interpolated: recall 0 -> 1/4 at precision 1, 1/4 -> 1/2 at precision 2/3: AP = 1/4 + 1/6 = 5/12."""
    records = [record(("cat", (0.0, 0.0, 0.5, 0.5)), ("dog", (0.5, 0.5, 1.0, 1.0))),
               record(("cat", (0.0, 0.0, 0.5, 1.0)), ("bird", (0.5, 0.0, 1.0, 0.5)))]
    detector = FixedDetector([{"cat": ((0.0, 0.0, 0.5, 0.5), 0.9), "dog": ((0.0, 0.0, 0.2, 0.2), 0.8)},
                              {"cat": ((0.0, 0.0, 0.3, 1.0), 0.7), "bird": (None, 0.0)}])
    images = np.zeros((2, 8, 8, 3), np.uint8)
    table, summary = score_grounding(images, records, detector)
    assert summary["ap50"] == pytest.approx(5 / 12)
    assert table.success.tolist() == [True, False, True, False]
    assert table.iou.tolist() == pytest.approx([1.0, 0.0, 0.6, 0.0])
    assert summary["success_rate"] == 0.5 and summary["miou"] == pytest.approx(0.4)
    assert summary["color_presence"] is None and summary["n_objects"] == 4 and summary["n_images"] == 2
    assert table.score.tolist()[:3] == [0.9, 0.8, 0.7] and table.found.tolist() == [True, True, True, False]


def test_ap_core_ties_perfect_and_empty_rankings():
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 4) == pytest.approx(5 / 12)
    # equal scores enter together, so the order of ties does not matter: one point (recall 1/2, precision 1/2)
    assert average_precision([0.5, 0.5], [True, False], 2) == average_precision([0.5, 0.5], [False, True], 2) == 0.25
    assert average_precision([0.3, 0.2, 0.1], [True, True, True], 3) == 1.0
    assert average_precision([0.3], [True], 2) == 0.5                 # half the objects never detected
    assert average_precision([], [], 3) == 0.0
    assert math.isnan(average_precision([], [], 0))


def test_a_phrase_is_asked_once_per_image_and_its_box_can_match_either_object():
    """Two "dog" objects: one detection, matching the second dog; the first dog is a miss (AP 1 x 1/2)."""
    left, right = (0.0, 0.0, 0.4, 1.0), (0.6, 0.0, 1.0, 1.0)
    detector = FixedDetector([{"dog": (right, 0.4)}])
    image = np.zeros((1, 8, 8, 3), np.uint8)
    table, summary = score_grounding(image, [record(("dog", left), ("dog", right))], detector)
    assert detector.asked == [["dog"]]
    assert table.success.tolist() == [False, True] and summary["ap50"] == 0.5


def test_a_detector_answering_the_wrong_number_of_phrases_is_an_error():
    detector = FixedDetector([{"cat": (None, 0.0)}])
    detector.detect = lambda image, phrases: []
    with pytest.raises(ValueError, match="returned 0 detections for 1 phrases"):
        score_grounding(np.zeros((1, 8, 8, 3), np.uint8), [record(("cat", (0, 0, 1, 1)))], detector)


# --- the colour detector through the interface

def test_colour_detector_is_the_default_and_scores_the_ground_truth_perfectly():
    records = shapes.heldout_records(20)
    images = shapes.heldout_images(records)
    table, summary = measure(images, records)
    assert isinstance(load_detector(), ColorDetector) and load_detector("color").reports_color
    assert summary == evaluate_grounding(images, records)[1] == measure(images, records, ColorDetector())[1]
    assert summary["ap50"] == 1.0 and summary["success_rate"] == 1.0 and type(summary["color_presence"]) is float
    # the score is the blob's share of the image: positive for every found object
    assert (table.score > 0).all() and (table.score < 1).all()


def test_colour_detector_ap_falls_when_objects_move():
    records = shapes.heldout_records(10)
    shifted = np.roll(shapes.heldout_images(records), 12, axis=2)            # 12 px to the right
    _, summary = measure(shifted, records)
    assert summary["ap50"] < 0.5 and summary["success_rate"] < 0.5


# --- a zero-shot detector from a folder

def test_zero_shot_detector_runs_through_evaluate(owl_folder, tmp_path):
    detector = load_detector(owl_folder)
    assert isinstance(detector, ZeroShotDetector) and detector.model_type == "owlvit"
    layouts = manifest_layouts(drawn_manifest(tmp_path / "data"))
    table, summary = evaluate(layouts, reference="ground-truth", detector=detector)
    assert len(table) == 6 and table.measurable.all() and table.found.all()
    assert table.phrase.tolist() == ["red circle", "blue square", "green triangle", "dog", "dog", "a yellow ball"]
    assert set(summary) == set(SUMMARY_KEYS) and summary["color_presence"] is None
    assert summary["n_objects"] == 6 and summary["n_images"] == 3
    for key in ("success_rate", "miou", "ap50"):
        assert 0.0 <= summary[key] <= 1.0
    assert all(0.0 <= v <= 1.0 for box in table.found_box for v in box)
    assert ((table.score > 0) & (table.score <= 1)).all()
    assert table.found_box[3] == table.found_box[4]                         # the two dogs share one detection


@pytest.mark.parametrize("kind", ["owlvit", "owlv2"])
def test_zero_shot_box_is_each_phrases_best_patch_box_in_image_coordinates(kind, tmp_path):
    """Computed here from the raw outputs: the patch with the phrase's highest score, its centre/size box
    as corners, normalised to the image (OWLv2 predicts in the image padded to a square, bottom/right)."""
    detector = load_detector(build_tiny_owl_folder(tmp_path / kind, kind))
    h, w = 48, 64
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    phrases = ["red circle", "blue square", "a dog", "green ball"]
    inputs = detector.processor(text=[phrases], images=image, return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    sx, sy = (max(h, w) / w, max(h, w) / h) if kind == "owlv2" else (1.0, 1.0)
    found = detector.detect(image, phrases)
    inside = 0
    for q, (box, score) in enumerate(found):
        scores = out.logits[0, :, q].sigmoid()
        best = int(scores.argmax())
        cx, cy, bw, bh = out.pred_boxes[0, best].tolist()
        want = [(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy]
        assert box == pytest.approx([min(max(v, 0.0), 1.0) for v in want], abs=1e-5)
        assert score == pytest.approx(float(scores[best]))
        inside += sum(0.0 < v < 1.0 for v in want[1::2])
    assert inside >= 1, "no y coordinate inside the image: the check above would not see a wrong scale"
    # each phrase is scored on its own: asking for one phrase alone gives the same box
    alone = detector.detect(image, phrases[1:])[0]
    assert alone[0] == pytest.approx(found[1][0], abs=1e-5) and alone[1] == pytest.approx(found[1][1], abs=1e-5)


def test_cli_evaluates_a_manifest_with_a_detector_folder(owl_folder, tmp_path, capsys):
    manifest = drawn_manifest(tmp_path / "data")
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", str(manifest),
                 "--detector", str(owl_folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["detector"] == str(owl_folder) and result["layouts"] == str(manifest)
    assert result["n_objects"] == 6 and 0.0 <= result["ap50"] <= 1.0 and result["color_presence"] is None
    assert out[0] == f"on 3 layouts of {manifest}"                           # the title: which layouts
    assert "ap50" in out[1] and out[2].startswith("ground truth")          # the table's header and row


def test_bad_detector_folders_are_clear_errors(owl_folder, tmp_path, capsys):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(f"detector '{missing}' is not 'color' nor a folder")):
        load_detector(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path} has no config.json: expected a local")):
        load_detector(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=re.escape("model_type 'bert' is not supported; expected one of ['owlvit'")):
        load_detector(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "owlvit"}))     # no weights, no processor
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"detector folder {tmp_path} lacks model.safetensors, preprocessor_config.json, tokenizer.json or "
            "vocab.json + merges.txt")):
        load_detector(tmp_path)
    pickled = tmp_path / "pickled"                                          # weights as pickle only: refused
    shutil.copytree(owl_folder, pickled, ignore=shutil.ignore_patterns("model.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=re.escape(f"detector folder {pickled} lacks model.safetensors:")):
        load_detector(pickled)
    broken = tmp_path / "broken"                                            # every file there, one unreadable
    shutil.copytree(owl_folder, broken)
    (broken / "preprocessor_config.json").write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"detector folder {broken}: could not load a owlvit model")):
        load_detector(broken)
    # through the CLI: exit 2 and the message, before any work
    assert main(["evaluate", "--reference", "ground-truth", "--limit", "2", "--detector", str(tmp_path / "nope")]) == 2
    assert f"detector '{tmp_path / 'nope'}' is not 'color' nor a folder" in capsys.readouterr().err
