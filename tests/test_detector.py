"""The colour-blob detector measures grounding correctly on known images."""

import numpy as np

from adapterlib.evaluation import evaluate

from adapterlib import shapes
from adapterlib.data.manifest import box_iou
from adapterlib.shapes.detector import evaluate_grounding
from adapterlib.shapes.world import color_of


def test_detector_on_ground_truth_succeeds():
    records = shapes.heldout_records()
    table, summary = evaluate_grounding(shapes.heldout_images(records), records)
    assert summary["success_rate"] >= 0.98 and summary["miou"] >= 0.95
    assert summary["n_images"] == 200 and summary["n_objects"] == len(table)
    assert all(type(summary[k]) is float for k in ("success_rate", "miou", "color_presence"))


def test_detector_finds_nothing_on_blank_image():
    records = shapes.heldout_records(10)
    blank = np.full((10, shapes.RESOLUTION, shapes.RESOLUTION, 3), shapes.BACKGROUND, dtype=np.uint8)
    _, summary = evaluate_grounding(blank, records)
    assert summary["success_rate"] == 0.0 and summary["color_presence"] == 0.0 and summary["miou"] == 0.0


def test_detector_penalises_misplaced_object():
    layout = shapes.sample_layout(2)
    record = shapes.to_record(layout)
    shifted = np.roll(shapes.render(layout), 10, axis=1)  # 10 px to the right
    table, summary = evaluate_grounding([shifted], [record])
    assert (table["iou"] < 0.5).all() and summary["success_rate"] == 0.0


def test_color_tolerance_accepts_noisy_render():
    records = shapes.heldout_records(50)
    images = shapes.heldout_images(records).astype(np.float64)
    noise = np.random.default_rng(0).normal(0.0, 15.0, images.shape)
    noisy = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    _, summary = evaluate_grounding(noisy, records)
    assert summary["success_rate"] == 1.0


def test_color_of_and_iou():
    assert color_of("A Red circle") == "red"
    assert color_of("reddish blob") is None
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == 1.0
    assert box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert abs(box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) - 1 / 3) < 1e-9


def test_format_summary_aligns_rows():
    text = evaluate.format_summary({
        "ground truth": {"success_rate": 1.0, "miou": 1.0, "color_presence": 1.0, "n_objects": 346, "n_images": 200},
        "base": {"success_rate": 0.1234, "miou": 0.2, "color_presence": 0.9, "n_objects": 346, "n_images": 200},
    })
    lines = text.splitlines()
    assert len(lines) == 3 and "0.123" in lines[2] and lines[1].startswith("ground truth")
    assert len({len(l) for l in lines}) == 1
