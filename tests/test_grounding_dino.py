"""GroundingDINO as a detector and SAM's box-prompted masks, on tiny random-weight folders built from configs
(tests/helpers.py): GroundingDINO loads through `worlds.load_detector`, its boxes are the raw model's boxes above the
box threshold, normalised, after NMS at 0.8, best first; each phrase is asked on its own; bad folders are refused by
name before anything loads; `evaluate` takes it from the CLI. SAM: the mask is the one with the best predicted IoU
for the box in pixels, at the image's size."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from adapterlib.__main__ import main
from adapterlib.data.manifest import box_iou, read_manifest
from adapterlib.model.detectors import ZeroShotDetector, score_grounding
from adapterlib.model.grounding_dino import GroundingDinoDetector, grounding_query, nms
from adapterlib.model.segment import BoxSegmenter, check_sam_folder
from adapterlib.training.evalspec import check_detector
from adapterlib.training.worlds import load_detector
from helpers import build_tiny_grounding_dino_folder, build_tiny_sam_folder, photo_manifest


@pytest.fixture(scope="module")
def gdino_folder(tmp_path_factory):
    return build_tiny_grounding_dino_folder(tmp_path_factory.mktemp("grounding-dino"))


@pytest.fixture(scope="module")
def gdino(gdino_folder):
    return load_detector(gdino_folder, "cpu")


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    return build_tiny_sam_folder(tmp_path_factory.mktemp("sam"))


def picture(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def raw_boxes(detector, image, phrase):
    """The model's own boxes and scores for a phrase, computed here: every query's highest token probability, its
    centre/size box as corners, clipped to the image (normalised)."""
    from PIL import Image
    inputs = detector.processor(images=Image.fromarray(image), text=phrase.lower() + ".", return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    scores = out.logits[0].sigmoid().max(-1).values.numpy()
    cx, cy, bw, bh = out.pred_boxes[0].numpy().T
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).clip(0, 1)
    return boxes, scores


# --- the detector

def test_it_loads_through_load_detector_and_finds_normalised_boxes_for_each_phrase(gdino, gdino_folder, tiny_owl_folder):
    assert isinstance(gdino, GroundingDinoDetector) and gdino.model_type == "grounding-dino"
    assert gdino.name == f"grounding-dino ({gdino_folder.name})" and gdino.spec == str(gdino_folder)
    assert (gdino.box_threshold, gdino.text_threshold, gdino.nms_iou) == (0.25, 0.25, 0.8)   # COCO-MIG's
    assert isinstance(load_detector(tiny_owl_folder), ZeroShotDetector)                      # OWL: as before
    image = picture()
    phrases = ["red circle", "blue square", "a dog"]
    found = gdino.detect(image, phrases)
    assert len(found) == 3
    for phrase, (box, score) in zip(phrases, found):
        assert box is not None and len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
        assert box[0] < box[2] and box[1] < box[3] and 0.25 < score <= 1.0
        assert (box, score) == gdino.detect_all(image, phrase)[0]                      # the best box of detect_all
    # each phrase is asked on its own: alone, or in another order, the same detection
    assert gdino.detect(image, ["blue square"]) == [found[1]]
    assert gdino.detect(image, phrases[::-1]) == found[::-1]
    assert found[0] != found[1]                                                      # the query matters


def test_the_query_is_lower_case_and_ends_with_a_full_stop(gdino):
    assert grounding_query("Red Dog") == "red dog." == grounding_query(" red dog. ")
    image = picture(seed=1)
    assert gdino.detect_all(image, "Red Circle") == gdino.detect_all(image, "red circle.")
    assert gdino.detect_all(image, "red circle") != gdino.detect_all(image, "blue square")


def test_detect_all_is_the_models_boxes_above_the_threshold_after_nms_best_first(gdino_folder):
    """Against the raw outputs: each returned box is a raw box with its score, best first; none two overlap
    above 0.8; every raw box above the threshold that is missing overlaps a better kept one above 0.8 (and
    at least one is missing: NMS did something here)."""
    detector = GroundingDinoDetector(gdino_folder, device="cpu", box_threshold=0.0)
    dropped_total = 0
    for seed, (h, w) in enumerate([(48, 64), (32, 32), (40, 52)]):
        image = picture(h, w, seed)
        boxes, scores = raw_boxes(detector, image, "red circle")
        found = detector.detect_all(image, "red circle")
        assert len(found) >= 2
        got = [s for _, s in found]
        assert got == sorted(got, reverse=True)
        kept = []
        for box, score in found:
            i = int(np.argmin(np.abs(scores - score)))
            assert score == pytest.approx(float(scores[i]), abs=1e-6)
            assert box == pytest.approx(boxes[i].tolist(), abs=1e-5)
            kept.append(i)
        for a in range(len(found)):
            for b in range(a):
                assert box_iou(found[a][0], found[b][0]) <= 0.8
        for j in set(range(len(scores))) - set(kept):
            assert any(box_iou(boxes[j], boxes[i]) > 0.8 and scores[i] >= scores[j] for i in kept)
            dropped_total += 1
    assert dropped_total >= 1


def test_the_box_threshold_keeps_only_boxes_above_it(gdino_folder, gdino):
    image = picture()
    every = GroundingDinoDetector(gdino_folder, device="cpu", box_threshold=0.0).detect_all(image, "dog")
    scores = sorted(s for _, s in every)
    middle = scores[len(scores) // 2]
    some = GroundingDinoDetector(gdino_folder, device="cpu", box_threshold=middle).detect_all(image, "dog")
    assert 0 < len(some) < len(every) and all(s > middle for _, s in some)
    assert some == [(b, s) for b, s in every if s > middle]
    assert gdino.detect_all(image, "dog") == [(b, s) for b, s in every if s > 0.25]       # the default, 0.25
    none = GroundingDinoDetector(gdino_folder, device="cpu", box_threshold=1.0)
    assert none.detect_all(image, "dog") == [] and none.detect(image, ["dog", "cat"]) == [(None, 0.0)] * 2


def test_the_text_threshold_labels_boxes_and_drops_none_as_in_the_protocol(gdino_folder):
    image = picture()
    low = GroundingDinoDetector(gdino_folder, device="cpu", text_threshold=0.0).detect_labelled(image, "red circle")
    high = GroundingDinoDetector(gdino_folder, device="cpu", text_threshold=1.0).detect_labelled(image, "red circle")
    assert low and [label for *_, label in low] == ["red circle"] * len(low)    # every token above 0: the whole phrase
    assert [label for *_, label in high] == [""] * len(high)                     # none above 1
    assert [(b, s) for b, s, _ in low] == [(b, s) for b, s, _ in high]           # the same boxes either way


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 7], [20, 20, 30, 30]], float)
    # IoUs with the first: 0.9 (dropped), 0.7 (kept); the last overlaps nothing
    assert nms(boxes, np.array([0.9, 0.8, 0.7, 0.6])).tolist() == [0, 2, 3]
    assert nms(boxes, np.array([0.5, 0.8, 0.7, 0.6])).tolist() == [1, 2, 3]    # 1 drops 0 (0.9) but not 2 (7/9)
    assert nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), iou_threshold=0.95).tolist() == [0, 1, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_bad_grounding_dino_folders_are_refused_by_name_before_loading(gdino_folder, tmp_path, monkeypatch):
    import transformers
    for loader in (transformers.GroundingDinoForObjectDetection, transformers.AutoProcessor):
        monkeypatch.setattr(loader, "from_pretrained", lambda *a, **k: pytest.fail("the loader was reached"))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(gdino_folder, no_weights, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"detector folder {no_weights} lacks model.safetensors: "
                                                          "expected a local transformers zero-shot detection model "
                                                          "(OWL-ViT, OWLv2 or GroundingDINO)")):
        load_detector(no_weights)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(gdino_folder, no_tokenizer, ignore=shutil.ignore_patterns("vocab.txt", "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{no_tokenizer} lacks tokenizer.json or vocab.txt:")):
        load_detector(no_tokenizer)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{no_tokenizer} lacks tokenizer.json or vocab.txt:")):
        check_detector(str(no_tokenizer))                                   # as a run's config is checked
    wrong = tmp_path / "wrong-type"
    shutil.copytree(gdino_folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match=re.escape(
            f"detector folder {wrong}: model_type 'bert' is not supported; expected one of "
            "['owlvit', 'owlv2', 'grounding-dino']")):
        load_detector(wrong)
    with pytest.raises(FileNotFoundError, match="grounding-dino-tiny"):      # the hint names a download
        load_detector(tmp_path / "nowhere")


def test_an_owl_folder_is_not_taken_as_grounding_dino(tiny_owl_folder):
    with pytest.raises(ValueError, match=re.escape(f"detector folder {tiny_owl_folder}: model_type 'owlvit' is "
                                                   "not GroundingDINO")):
        GroundingDinoDetector(tiny_owl_folder)


def test_cli_evaluates_a_manifest_with_a_grounding_dino_folder(gdino_folder, gdino, tmp_path, capsys):
    manifest = photo_manifest(tmp_path / "data", n=3)
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", str(manifest),
                 "--detector", str(gdino_folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["detector"] == str(gdino_folder) and result["layouts"] == str(manifest)
    assert result["n_objects"] == 6 and result["n_images"] == 3 and result["color_presence"] is None
    # the same numbers as the detector scoring the manifest's images itself
    from PIL import Image
    records = read_manifest(manifest)
    images = [np.asarray(Image.open(manifest.parent / r.image).convert("RGB")) for r in records]
    _, summary = score_grounding(images, records, gdino)
    for key in ("success_rate", "miou", "ap50"):
        assert result[key] == pytest.approx(summary[key], abs=1e-6) and 0.0 <= result[key] <= 1.0
    assert summary["miou"] > 0


def test_cli_evaluates_a_tiny_run_with_a_grounding_dino_folder(gdino_folder, base, tmp_path, monkeypatch, capsys):
    from adapterlib.model.adapter import build_adapter
    from helpers import write_run
    runs = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(runs))
    adapter = build_adapter(base)
    write_run(runs, "tiny", "shapes-tiny", adapter)
    adapter.detach()
    manifest = photo_manifest(tmp_path / "data", n=2)
    assert main(["evaluate", "tiny", "--layouts", str(manifest), "--detector", str(gdino_folder), "--limit", "1",
                 "--steps", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["detector"] == str(gdino_folder) and result["layouts"] == str(manifest)
    assert result["n_images"] == 1 and result["n_objects"] == 2


# --- SAM

def reference_mask(segmenter, image, pixel_box):
    """SAM's mask for a box in pixels, computed here: the candidate with the highest predicted IoU, at the image's size."""
    from PIL import Image
    inputs = segmenter.processor(images=Image.fromarray(image), input_boxes=[[pixel_box]], return_tensors="pt")
    with torch.no_grad():
        out = segmenter.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(),
                              multimask_output=True)
    masks = segmenter.processor.post_process_masks(out.pred_masks, inputs["original_sizes"],
                                                   inputs["reshaped_input_sizes"])[0][0]
    assert masks.shape[0] == 3
    return masks[int(out.iou_scores[0, 0].argmax())].numpy(), masks.numpy()


def test_box_segmenter_mask_is_sams_best_mask_for_the_box_at_the_images_size(sam_folder):
    segmenter = BoxSegmenter(sam_folder, device="cpu")
    h, w = 48, 40
    image = picture(h, w, seed=2)
    box = (0.1, 0.2, 0.7, 0.6)
    mask = segmenter.mask(image, box)
    assert mask.shape == (h, w) and mask.dtype == np.bool_
    want, candidates = reference_mask(segmenter, image, [0.1 * w, 0.2 * h, 0.7 * w, 0.6 * h])
    assert np.array_equal(mask, want)
    assert len({c.tobytes() for c in candidates}) == 3          # the choice among the three mattered
    swapped, _ = reference_mask(segmenter, image, [0.1 * h, 0.2 * w, 0.7 * h, 0.6 * w])
    assert not np.array_equal(mask, swapped)                     # so the box's axes are checked above
    # several boxes at once: each as alone
    other = (0.5, 0.0, 1.0, 0.5)
    both = segmenter.masks(image, [box, other])
    assert np.array_equal(both[0], mask) and np.array_equal(both[1], segmenter.mask(image, other))
    assert segmenter.mask(picture(32, 32), (0.0, 0.0, 1.0, 1.0)).shape == (32, 32)


def test_bad_sam_folders_are_refused_by_name_before_loading(sam_folder, gdino_folder, tmp_path, monkeypatch):
    import transformers
    for loader in (transformers.SamModel, transformers.SamProcessor):
        monkeypatch.setattr(loader, "from_pretrained", lambda *a, **k: pytest.fail("the loader was reached"))
    assert check_sam_folder(sam_folder) == "sam"
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(f"segmenter '{missing}' is not a folder: expected a local "
                                                          "transformers Segment Anything model")):
        BoxSegmenter(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"SAM folder {empty} has no config.json")):
        BoxSegmenter(empty)
    with pytest.raises(ValueError, match=re.escape(f"SAM folder {gdino_folder}: model_type 'grounding-dino' is not "
                                                   "supported; expected one of ['sam']")):
        BoxSegmenter(gdino_folder)
    pickled = tmp_path / "pickled"
    shutil.copytree(sam_folder, pickled, ignore=shutil.ignore_patterns("model.safetensors", "preprocessor_config.json"))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"SAM folder {pickled} lacks model.safetensors, preprocessor_config.json: expected")):
        BoxSegmenter(pickled)
    with pytest.raises(FileNotFoundError, match="sam-vit-huge"):             # the hint names a download
        check_sam_folder(pickled)
