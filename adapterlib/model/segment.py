"""Box-prompted masks from a local Segment Anything (SAM) folder, as the COCO-MIG protocol takes them for its colour
check (an object's colour is right when >= 20% of its SAM mask lies in the colour's HSV range).

`BoxSegmenter(folder).mask(image, box)`: SAM prompted with one box (normalised x0, y0, x1, y1, turned into pixels),
three candidate masks (`multimask_output=True`), the one with the highest predicted IoU, upscaled to the image's
size and thresholded at 0 (what segment_anything's `SamPredictor.predict(box=..., multimask_output=True)` and the
protocol's argmax over its scores give). transformers `SamModel` + `SamProcessor`; nothing is downloaded
(`local_files_only`) and the weights are safetensors only. `check_sam_folder` checks a folder before anything loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from adapterlib.model.model_folder import check_model_folder, load_model_folder

SAM_TYPES = ("sam",)        # config.json model_type values BoxSegmenter runs
SAM_FILES = "config.json, model.safetensors and preprocessor_config.json"
_SAM_HINT = (f"a local transformers Segment Anything model with {SAM_FILES}, "
             "e.g. `hf download facebook/sam-vit-huge --local-dir DIR`")


def check_sam_folder(path: str | Path, field: str = "segmenter") -> str:
    """A SAM folder checked before anything loads (`check_model_folder`): it exists, its config.json says model_type
    "sam", and the weights (safetensors) and the image processor's config are there; a clear error naming the folder
    and what is wrong otherwise (a pickled pytorch_model.bin is not loaded). Returns the model_type."""
    return check_model_folder(path, field=field, kind="SAM", types=SAM_TYPES, hint=_SAM_HINT)


class BoxSegmenter:
    """SAM from a local folder (`check_sam_folder`), on `device` (`precision.resolve_device`: CUDA when there)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from transformers import SamModel, SamProcessor

        from adapterlib.model.precision import resolve_device

        self.path = Path(path)
        self.name = f"sam ({self.path.name})"
        self.spec = str(self.path)
        self.model_type = check_sam_folder(self.path)
        self.device = resolve_device(device)
        self.processor, self.model = load_model_folder(self.path, SamProcessor, SamModel, self.device,
                                                       field="segmenter", kind="SAM", model="SAM", expected=SAM_FILES)

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
