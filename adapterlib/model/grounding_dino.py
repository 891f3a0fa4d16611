"""GroundingDINO as a `Detector`: a local transformers GroundingDINO folder (e.g. IDEA-Research/grounding-dino-tiny),
run as the COCO-MIG protocol runs it.

The protocol (MIGC's COCO-MIG bench, `eval_mig.py`) asks GroundingDINO for one phrase at a time (the caption is the
phrase lower-cased and ending with "."), keeps every predicted box whose score (its highest token probability) is
above `box_threshold` 0.25, suppresses boxes overlapping a better one with IoU > 0.8 (NMS), and counts an object as
found when the best IoU of any remaining box with the requested one is >= 0.5. `text_threshold` 0.25 only decides
each box's label (the phrase tokens above it), as in GroundingDINO's own `predict`: in the protocol a box whose
label names no class is kept all the same, so here too it drops no box (`detect_labelled` gives the labels).

Boxes are normalised to the image (x0, y0, x1, y1 in [0, 1], clipped to it) before NMS, so what `detect_all`
returns never overlaps above the NMS IoU. Nothing is downloaded (`local_files_only`) and the weights are
safetensors only. torch and transformers are imported when a model is loaded.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from adapterlib.model.detectors import (EXPECTED_FILES, GROUNDING_DINO_TYPES, Box, Detection, Detector,
                                        check_detector_folder)
from adapterlib.model.model_folder import load_model_folder

BOX_THRESHOLD = 0.25     # the COCO-MIG protocol's thresholds
TEXT_THRESHOLD = 0.25
NMS_IOU = 0.8


def grounding_query(phrase: str) -> str:
    """GroundingDINO's caption for a phrase: lower-cased, stripped, ending with "." ("Red Dog" -> "red dog.")."""
    text = phrase.strip().lower()
    return text if text.endswith(".") else text + "."


def box_ious(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with each of (N, 4) boxes (0 where the union is empty)."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=float), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression, torchvision.ops.nms's rule (torchvision is not a dependency): the indices
    of the boxes kept, best score first; a box is dropped when it overlaps a kept, better one with IoU >
    `iou_threshold`."""
    boxes, scores = np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(int(best))
        order = order[box_ious(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(keep, dtype=int)


class GroundingDinoDetector(Detector):
    """A local transformers GroundingDINO model (`GroundingDinoForObjectDetection` + its processor) from a folder.
    `detect_all(image, phrase)`: every box for one phrase above `box_threshold`, after NMS at `nms_iou`, with its
    score, best first. `detect(image, phrases)`: each phrase asked on its own, its best box or (None, 0.0)."""

    def __init__(self, path: str | Path, device: str | None = None, box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD, nms_iou: float = NMS_IOU):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        from adapterlib.model.precision import resolve_device

        self.path = Path(path)
        self.name = f"grounding-dino ({self.path.name})"
        self.spec = str(self.path)
        self.model_type = check_detector_folder(self.path)
        if self.model_type not in GROUNDING_DINO_TYPES:
            raise ValueError(f"detector folder {self.path}: model_type {self.model_type!r} is not GroundingDINO "
                             f"({list(GROUNDING_DINO_TYPES)}); `worlds.load_detector` picks the detector for a folder")
        self.box_threshold, self.text_threshold, self.nms_iou = float(box_threshold), float(text_threshold), float(nms_iou)
        self.device = resolve_device(device)
        self.processor, self.model = load_model_folder(self.path, AutoProcessor, GroundingDinoForObjectDetection,
                                                       self.device, field="detector", kind="detector",
                                                       model=self.model_type, expected=EXPECTED_FILES)
        # transformers < 4.51 named the box threshold `box_threshold`; later ones `threshold`
        params = inspect.signature(self.processor.post_process_grounded_object_detection).parameters
        self._box_threshold_arg = "threshold" if "threshold" in params else "box_threshold"
        tokenizer = self.processor.tokenizer
        self._special = set(tokenizer.all_special_tokens)

    def detect_labelled(self, image: np.ndarray, phrase: str) -> list[tuple[Box, float, str]]:
        """`detect_all` with each box's label: the words of the phrase whose token probability for that box is above
        `text_threshold` (special tokens and "." left out; "" when none is)."""
        import torch
        from PIL import Image

        image = np.asarray(image)
        h, w = image.shape[:2]
        inputs = self.processor(images=Image.fromarray(image).convert("RGB"), text=grounding_query(phrase),
                                truncation=True, max_length=self.model.config.max_text_len,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            out, inputs["input_ids"], text_threshold=self.text_threshold, target_sizes=None,  # boxes relative to the image
            **{self._box_threshold_arg: self.box_threshold})[0]
        if len(result["scores"]) == 0:
            return []
        boxes = result["boxes"].float().cpu().numpy().clip(0.0, 1.0)
        scores = result["scores"].float().cpu().numpy()
        labels = [self._label(text) for text in result["text_labels"]]
        return [(tuple(float(v) for v in boxes[i]), float(scores[i]), labels[i])
                for i in nms(boxes, scores, self.nms_iou)]

    def detect_all(self, image: np.ndarray, phrase: str) -> list[tuple[Box, float]]:
        """Every box found for `phrase` (score > box_threshold, after NMS), normalised to the image, best first."""
        return [(box, score) for box, score, _ in self.detect_labelled(image, phrase)]

    def detect(self, image: np.ndarray, phrases: list[str]) -> list[Detection]:
        detections = []
        for phrase in phrases:                      # one query per phrase, as the protocol asks
            found = self.detect_all(image, phrase)
            detections.append(found[0] if found else (None, 0.0))
        return detections

    def _label(self, text: str) -> str:
        return " ".join(word for word in text.replace(".", " ").split() if word not in self._special)
