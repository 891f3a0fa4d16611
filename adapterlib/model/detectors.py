"""Detectors that measure grounding, and the one scoring function all of them share.

A `Detector` looks for each requested phrase in an image and returns its best box (or None) with a
score. `score_grounding` turns images + records + a detector into the per-object table and the
summary that `evaluate` reports: success (the found box overlaps the requested one with IoU >= 0.5),
mIoU, AP@0.5 over the whole set, and, for a detector that finds objects by colour, colour presence.

Two detectors: the Shapes colour detector (`adapterlib.shapes.detector.ColorDetector`, reached through
`datasets.load_detector("color")`) and `ZeroShotDetector`, a local transformers OWL-ViT / OWLv2 folder
(`datasets.load_detector(FOLDER)`). torch and transformers are imported only when a model is loaded.
"""
from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from adapterlib.data.buckets import o_miou, overlap_ious
from adapterlib.data.manifest import Record, box_iou
from adapterlib.model.model_folder import check_model_folder, load_model_folder

Box = tuple[float, float, float, float]   # normalised x0, y0, x1, y1
Detection = tuple[Box | None, float]      # the best box for a phrase (None: not found) and its score

TABLE_COLUMNS = ["record", "id", "phrase", "color", "box", "found_box", "score", "iou", "found", "success",
                 "color_present", "measurable"]
ZERO_SHOT_TYPES = ("owlvit", "owlv2")     # config.json model_type values ZeroShotDetector runs
GROUNDING_DINO_TYPES = ("grounding-dino",)  # ... and grounding_dino.GroundingDinoDetector runs
DETECTOR_TYPES = ZERO_SHOT_TYPES + GROUNDING_DINO_TYPES   # every detector folder `worlds.load_detector` takes
EXPECTED_FILES = "config.json, model.safetensors, preprocessor_config.json and tokenizer files"


class Detector(ABC):
    """Finds one best box per phrase. Subclasses implement `detect`; a detector that cannot look for
    some phrases says so in `measurable` (those objects are left out of the summary, with a warning);
    one that finds objects by colour sets `reports_color` and `color_of` (the table's color column,
    the summary's color_presence)."""

    name = "detector"
    reports_color = False

    @abstractmethod
    def detect(self, image: np.ndarray, phrases: list[str]) -> list[Detection]:
        """For an (H, W, 3) uint8 image: (best box or None, score) for each phrase, in order."""

    def detect_all(self, image: np.ndarray, phrase: str) -> list[tuple[Box, float]]:
        """Every box the detector finds for one text query, with its score, best first (what the COCO-MIG
        protocol takes its best IoU over). This default: `detect`'s best box, if any."""
        box, score = self.detect(image, [phrase])[0]
        return [] if box is None else [(box, score)]

    def measurable(self, phrase: str) -> bool:
        return True

    def color_of(self, phrase: str) -> str | None:
        return None


def score_grounding(images: np.ndarray | Sequence[np.ndarray], records: Sequence[Record], detector: Detector,
                    iou_threshold: float = 0.5) -> tuple[pd.DataFrame, dict]:
    """One row per requested object (TABLE_COLUMNS) and a summary over the measurable objects:
    success_rate and miou (means), o_miou (OverLayBench's IoU on the overlap regions of the requested boxes,
    `buckets.overlap_ious`; None when no two requested boxes of an image intersect), ap50 (`average_precision_at` the same IoU threshold, 0.5 unless
    given), color_presence (the found rate for a colour detector, else None), n_objects (measurable),
    n_images. The detector is asked once per image for each distinct measurable phrase; objects
    sharing a phrase share its detection."""
    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    rows = []
    for i, (image, record) in enumerate(zip(images, records)):
        phrases = list(dict.fromkeys(o.phrase for o in record.objects if detector.measurable(o.phrase)))
        detections = detector.detect(np.asarray(image), phrases) if phrases else []
        if len(detections) != len(phrases):
            raise ValueError(f"the {detector.name} detector returned {len(detections)} detections for "
                             f"{len(phrases)} phrases (record {i}, id {record.id!r})")
        found = dict(zip(phrases, detections))
        for o in record.objects:
            row = {"record": i, "id": record.id, "phrase": o.phrase, "color": detector.color_of(o.phrase),
                   "box": tuple(o.box), "found_box": None, "measurable": o.phrase in found}
            if o.phrase not in found:
                row.update(score=math.nan, iou=math.nan, found=False, success=False, color_present=False)
            else:
                box, score = found[o.phrase]
                iou = box_iou(o.box, box) if box is not None else 0.0
                row.update(found_box=box, score=float(score), iou=iou, found=box is not None,
                           success=iou >= iou_threshold,
                           color_present=(box is not None) if detector.reports_color else None)
            rows.append(row)

    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    skipped = table.loc[~table["measurable"].astype(bool), "phrase"].tolist()
    if skipped:
        warnings.warn(f"{len(skipped)} object(s) could not be measured by the {detector.name} detector and were "
                      f"left out (e.g. {skipped[0]!r})")
    measured = table[table["measurable"].astype(bool)]
    n = len(measured)
    nan = float("nan")
    summary = {
        "success_rate": float(measured["success"].mean()) if n else nan,
        "miou": float(measured["iou"].mean()) if n else nan,
        "o_miou": _none_if_nan(o_miou(overlap_ious(records, table))),
        "ap50": average_precision_at(table, iou_threshold) if n else nan,
        "color_presence": (float(measured["color_present"].mean()) if n else nan) if detector.reports_color else None,
        "n_objects": int(n),
        "n_images": int(len(records)),
    }
    return table, summary


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def average_precision_at(table: pd.DataFrame, iou_threshold: float = 0.5) -> float:
    """Class-agnostic AP at an IoU threshold over a whole `score_grounding` table.

    The ground truth is every measurable requested object; a detection is each (image, phrase) with a
    found box. Detections are ranked by score across the set; one is a true positive when its box
    overlaps some requested box of the same phrase in the same image with IoU >= the threshold (with
    one detection per phrase and image, no box is claimed twice). Objects whose phrase found nothing
    count as misses. The AP is the VOC all-point interpolated area under precision/recall
    (`average_precision`); all phrases are pooled into one ranking (not a mean over phrase classes,
    which would be noise for open phrases seen once or twice)."""
    measured = table[table["measurable"].astype(bool)]
    scores, hits = [], []
    for _, group in measured.groupby(["record", "phrase"], sort=False):
        found_box = group["found_box"].iloc[0]
        if found_box is None:
            continue
        scores.append(float(group["score"].iloc[0]))
        hits.append(any(box_iou(box, found_box) >= iou_threshold for box in group["box"]))
    return average_precision(scores, hits, len(measured))


def average_precision(scores: Sequence[float], hits: Sequence[bool], n_positives: int) -> float:
    """VOC all-point interpolated AP of detections (`scores`, true/false positive `hits`) against
    `n_positives` ground-truth objects: precision made monotone from the right, summed over the
    recall steps. Detections with equal scores enter the ranking together (precision and recall are
    read only after the last of them), so the AP does not depend on the order of ties. NaN when there
    is no ground truth."""
    if n_positives <= 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    ranked = np.asarray(scores, dtype=float)[order]
    tp = np.cumsum(np.asarray(hits, dtype=bool)[order])
    fp = np.cumsum(~np.asarray(hits, dtype=bool)[order])
    last_of_tie = np.append(ranked[1:] != ranked[:-1], True) if len(ranked) else np.zeros(0, bool)
    recall = tp[last_of_tie] / n_positives
    precision = tp[last_of_tie] / (tp[last_of_tie] + fp[last_of_tie])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]                  # the best precision at any higher recall
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


class ZeroShotDetector(Detector):
    """A local transformers zero-shot detection model (OWL-ViT or OWLv2) from a folder: the record's
    phrases are the text queries, and a phrase's detection is its highest-scoring predicted box, each
    phrase scored on its own (one query does not suppress another's box). Boxes are converted by the
    image processor's `post_process_object_detection`, then normalised to the image. Nothing is
    downloaded (`local_files_only`) and the weights are safetensors only (a pickled checkpoint is refused)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from adapterlib.model.precision import resolve_device

        self.path = Path(path)
        self.name = f"zero-shot ({self.path.name})"
        self.spec = str(self.path)
        self.model_type = check_detector_folder(self.path)
        self.device = resolve_device(device)
        self.processor, self.model = load_model_folder(self.path, AutoProcessor, AutoModelForZeroShotObjectDetection,
                                                       self.device, field="detector", kind="detector",
                                                       model=self.model_type, expected=EXPECTED_FILES)

    def detect(self, image: np.ndarray, phrases: list[str]) -> list[Detection]:
        from types import SimpleNamespace

        import torch

        h, w = image.shape[:2]
        inputs = self.processor(text=[phrases], images=image, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        # OWLv2 predicts in the image padded to a square (bottom/right): its side is the target size (older
        # transformers scale by the size given, newer ones by its larger side: the same for a square)
        side = (max(h, w),) * 2 if self.model_type == "owlv2" else (h, w)
        post_process = self.processor.image_processor.post_process_object_detection
        detections = []
        for q in range(len(phrases)):
            one = SimpleNamespace(logits=out.logits[..., q:q + 1], pred_boxes=out.pred_boxes)
            result = post_process(one, threshold=0.0, target_sizes=[side])[0]
            if len(result["scores"]) == 0:                         # every score underflowed to 0
                detections.append((None, 0.0))
                continue
            best = int(result["scores"].argmax())
            x0, y0, x1, y1 = result["boxes"][best].float().cpu().tolist()
            box = (min(max(x0 / w, 0.0), 1.0), min(max(y0 / h, 0.0), 1.0),
                   min(max(x1 / w, 0.0), 1.0), min(max(y1 / h, 0.0), 1.0))
            detections.append((box, float(result["scores"][best])))
        return detections


def check_detector_folder(path: str | Path, field: str = "detector") -> str:
    """A zero-shot detector folder checked before anything loads (or any sampling starts; `check_model_folder`): it
    exists, its config.json names OWL-ViT, OWLv2 or GroundingDINO (DETECTOR_TYPES), and the weights (safetensors), the
    image processor's config and the tokenizer files (OWL's CLIP BPE tokenizer: tokenizer.json or vocab.json +
    merges.txt; GroundingDINO's BERT WordPiece tokenizer: tokenizer.json or vocab.txt) are there; a clear error
    naming the folder and what is missing otherwise. Returns the model_type."""
    path = Path(path)

    def tokenizer(model_type: str) -> list[tuple[str, bool]]:
        if model_type in GROUNDING_DINO_TYPES:
            return [("tokenizer.json or vocab.txt", (path / "tokenizer.json").is_file()
                     or (path / "vocab.txt").is_file())]
        return [("tokenizer.json or vocab.json + merges.txt", (path / "tokenizer.json").is_file()
                 or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()))]
    return check_model_folder(path, field=field, kind="detector", types=DETECTOR_TYPES, hint=_HINT, names=("color",),
                              files=tokenizer)


_HINT = ("a local transformers zero-shot detection model (OWL-ViT, OWLv2 or GroundingDINO) with "
         f"{EXPECTED_FILES}, e.g. `hf download google/owlv2-base-patch16-ensemble --local-dir DIR` or "
         "`hf download IDEA-Research/grounding-dino-tiny --local-dir DIR`")
