"""Box-prompted masks from a local Segment Anything (SAM) folder, as the COCO-MIG protocol takes them for its colour
check (an object's colour is right when >= 20% of its SAM mask lies in the colour's HSV range).

`BoxSegmenter(folder).mask(image, box)`: SAM prompted with one box (normalised x0, y0, x1, y1, turned into pixels),
three candidate masks (`multimask_output=True`), the one with the highest predicted IoU, upscaled to the image's
size and thresholded at 0 (what segment_anything's `SamPredictor.predict(box=..., multimask_output=True)` and the
protocol's argmax over its scores give). transformers `SamModel` + `SamProcessor`; nothing is downloaded
(`local_files_only`) and the weights are safetensors only. `check_sam_folder` checks a folder before anything loads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

SAM_TYPES = ("sam",)        # config.json model_type values BoxSegmenter runs
SAM_FILES = "config.json, model.safetensors and preprocessor_config.json"
_SAM_HINT = (f"a local transformers Segment Anything model with {SAM_FILES}, "
             "e.g. `hf download facebook/sam-vit-huge --local-dir DIR`")


def check_sam_folder(path: str | Path, field: str = "segmenter") -> str:
    """A SAM folder checked before anything loads: it exists, its config.json says model_type "sam", and the
    weights (safetensors) and the image processor's config are there; a clear error naming the folder and what
    is wrong otherwise (a pickled pytorch_model.bin is not loaded). Returns the model_type."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{field} {str(path)!r} is not a folder: expected {_SAM_HINT}")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{field}: SAM folder {path} has no config.json: expected {_SAM_HINT}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{field}: SAM folder {path}: config.json is not a JSON object ({e})") from e
    if model_type not in SAM_TYPES:
        raise ValueError(f"{field}: SAM folder {path}: model_type {model_type!r} is not supported; expected one of "
                         f"{list(SAM_TYPES)} ({_SAM_HINT})")
    missing = [name for name, present in (
        ("model.safetensors", (path / "model.safetensors").is_file()
         or (path / "model.safetensors.index.json").is_file()),
        ("preprocessor_config.json", (path / "preprocessor_config.json").is_file())) if not present]
    if missing:
        raise FileNotFoundError(f"{field}: SAM folder {path} lacks {', '.join(missing)}: expected {_SAM_HINT} "
                                "(a pickled pytorch_model.bin is not loaded)")
    return model_type


class BoxSegmenter:
    """SAM from a local folder (`check_sam_folder`), on `device` (`precision.resolve_device`: CUDA when there)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from transformers import SamModel, SamProcessor

        from adapterlib.model.base import _quiet_loading
        from adapterlib.model.precision import resolve_device

        self.path = Path(path)
        self.name = f"sam ({self.path.name})"
        self.spec = str(self.path)
        self.model_type = check_sam_folder(self.path)
        self.device = resolve_device(device)
        try:
            with _quiet_loading():
                self.processor = SamProcessor.from_pretrained(self.path, local_files_only=True)
                model = SamModel.from_pretrained(self.path, local_files_only=True, use_safetensors=True)  # no pickle
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"segmenter: SAM folder {self.path}: could not load a SAM model and its processor "
                             f"({SAM_FILES}): {e}") from e
        self.model = model.to(self.device).eval()

    def mask(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The (H, W) bool mask SAM predicts for an (H, W, 3) uint8 image prompted with one normalised box."""
        return self.masks(image, [box])[0]

    def masks(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        """`mask` for several boxes of one image, the image encoded once (each box is prompted on its own)."""
        import torch
        from PIL import Image

        image = np.asarray(image)
        h, w = image.shape[:2]
        if not len(boxes):
            return []
        pixels = []
        for box in boxes:
            if len(box) != 4:
                raise ValueError(f"a box is (x0, y0, x1, y1) normalised to the image, not {box!r}")
            x0, y0, x1, y1 = (float(v) for v in box)
            pixels.append([x0 * w, y0 * h, x1 * w, y1 * h])
        inputs = self.processor(images=Image.fromarray(image).convert("RGB"), input_boxes=[pixels],
                                return_tensors="pt")
        with torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device),
                             input_boxes=inputs["input_boxes"].to(self.device, torch.float32),
                             multimask_output=True)
        # (boxes, 3, H, W) bool at the image's size: the low-resolution logits upscaled, unpadded, thresholded at 0
        candidates = self.processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"],
                                                       inputs["reshaped_input_sizes"])[0]
        best = out.iou_scores[0].argmax(-1).cpu()                      # (boxes,): the highest predicted IoU
        return [candidates[i, int(best[i])].numpy().astype(bool) for i in range(len(pixels))]
