"""The crop / flip policy (TrainConfig.crop, TrainConfig.flip): a box drawn on the image before the transform
covers the same pixels after it; objects cropped away are dropped and counted; crop="none" is the old resize;
the randomness is a pure function of (seed, position), so training with it resumes bitwise."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapterlib.training.config import make_config
from adapterlib.data.manifest import (MIN_KEPT_AREA, GroundedObject, ManifestImages, Record, names_a_side, sample_rng,
                             transform_sample)
from adapterlib.training.train import resume_config, train

RED = (255, 0, 0)


def _picture(size, box_px, background=(40, 90, 160)):
    """A (w, h) PIL image of `background` with a solid red rectangle at pixel box (x0, y0, x1, y1), x1/y1
    exclusive, and the record whose one object has that box, normalised."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8) + np.array(background, np.uint8)
    x0, y0, x1, y1 = box_px
    pixels[y0:y1, x0:x1] = RED
    box = (x0 / w, y0 / h, x1 / w, y1 / h)
    return Image.fromarray(pixels, mode="RGB"), Record("a red box", (GroundedObject("red box", box),))


def _red(image):
    image = image.astype(int)
    return (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)


def _assert_box_covers_the_red(image, box):
    """The pixels inside `box` (rounded to the pixel grid, one pixel in from its edges for the bicubic
    blur) are red, and the red's tight bounding box equals `box` within one pixel."""
    R = image.shape[0]
    px = np.array(box) * R
    x0, y0, x1, y1 = np.round(px).astype(int)
    red = _red(image)
    assert red[y0 + 1:y1 - 1, x0 + 1:x1 - 1].all(), "a pixel inside the transformed box is not red"
    ys, xs = np.nonzero(red)
    tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert np.abs(tight - px).max() <= 1.0, f"red covers {tight.tolist()}, the box is {px.tolist()}"


@pytest.mark.parametrize("size, box_px, R", [((160, 100), (60, 20, 120, 80), 50),     # wide
                                             ((90, 150), (10, 40, 70, 120), 48),      # tall, non-integer scale
                                             ((200, 100), (40, 10, 120, 60), 50)])    # clipped at the left edge
def test_center_crop_box_covers_the_same_pixels(size, box_px, R):
    image, record = _picture(size, box_px)
    out, rec, report = transform_sample(image, record, R, "center")
    assert out.shape == (R, R, 3) and out.dtype == np.uint8
    assert report.dropped == 0 and len(rec.objects) == 1 and not report.flipped
    assert all(0.0 <= v <= 1.0 for v in rec.objects[0].box)
    _assert_box_covers_the_red(out, rec.objects[0].box)


def test_random_crop_box_covers_the_same_pixels():
    image, record = _picture((180, 100), (50, 30, 110, 70))
    offsets = set()
    for position in range(12):
        out, rec, report = transform_sample(image, record, 50, "random", rng=sample_rng(3, position, 5))
        if rec.objects:
            _assert_box_covers_the_red(out, rec.objects[0].box)
            offsets.add(round(rec.objects[0].box[0], 6))
        else:
            assert report.dropped == 1
    assert len(offsets) > 1, "random crops all at the same offset"


@pytest.mark.parametrize("crop", ["none", "center", "random"])
def test_flip_box_covers_the_same_pixels(crop):
    image, record = _picture((150, 100), (20, 30, 70, 90))
    seen = set()
    for position in range(20):
        out, rec, report = transform_sample(image, record, 50, crop, flip=True, rng=sample_rng(0, position, 7))
        seen.add(report.flipped)
        if rec.objects:
            _assert_box_covers_the_red(out, rec.objects[0].box)
        assert rec.objects[0].phrase == "red box" if rec.objects else True
    assert seen == {True, False}, "the flip is not a coin"


def test_flip_mirrors_the_box_and_leaves_side_words_counted():
    image, _ = _picture((64, 64), (4, 8, 20, 40))
    record = Record("a cup on the left", (GroundedObject("left cup", (4 / 64, 8 / 64, 20 / 64, 40 / 64)),
                                          GroundedObject("bright lamp", (0.5, 0.5, 0.9, 0.9))))
    position = next(p for p in range(50) if transform_sample(image, record, 64, "none", True,
                                                               sample_rng(0, p, 1))[2].flipped)
    out, rec, report = transform_sample(image, record, 64, "none", True, sample_rng(0, position, 1))
    assert rec.objects[0].box == pytest.approx((1 - 20 / 64, 8 / 64, 1 - 4 / 64, 40 / 64))
    assert rec.objects[1].box == pytest.approx((0.1, 0.5, 0.5, 0.9))
    assert [o.phrase for o in rec.objects] == ["left cup", "bright lamp"] and rec.caption == record.caption
    assert report.side_words == 1                         # "bright" does not name a side
    assert names_a_side("Right handle") and not names_a_side("copyright notice")
    _assert_box_covers_the_red(out, rec.objects[0].box)


def _manifest(tmp_path, pictures):
    """A manifest of (size, [pixel boxes]) pictures, each box a red rectangle; returns its path."""
    (tmp_path / "images").mkdir(exist_ok=True)
    lines = []
    for i, (size, boxes) in enumerate(pictures):
        w, h = size
        pixels = np.zeros((h, w, 3), np.uint8) + np.array([40, 90, 160], np.uint8)
        pixels += np.random.default_rng(i).integers(0, 30, pixels.shape, dtype=np.uint8)
        for x0, y0, x1, y1 in boxes:
            pixels[y0:y1, x0:x1] = RED
        Image.fromarray(pixels, mode="RGB").save(tmp_path / "images" / f"{i}.png")
        objects = [dict(phrase=f"red box {k}", box=[x0 / w, y0 / h, x1 / w, y1 / h])
                   for k, (x0, y0, x1, y1) in enumerate(boxes)]
        lines.append(json.dumps(dict(image=f"images/{i}.png", caption="red boxes", objects=objects, id=f"r{i}")))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_objects_cropped_away_are_dropped_and_counted(tmp_path):
    # 200x100 at 50: resized to 100x50, the centre crop keeps x in [25, 75) of it, i.e. [50, 150) of the image
    path = _manifest(tmp_path, [((200, 100), [(0, 0, 40, 100),        # entirely cropped away
                                              (0, 10, 56, 90),        # keeps 6/56 of its area < MIN_KEPT_AREA
                                              (30, 10, 70, 90),       # keeps 20/40: kept, clipped
                                              (80, 20, 120, 80)])])   # inside
    assert MIN_KEPT_AREA == 0.2
    data = ManifestImages(path, 50, progress=False, crop="center")
    images, records = data.load([0])
    assert [o.phrase for o in records[0].objects] == ["red box 2", "red box 3"]
    assert data.dropped_by_crop == 2
    assert records[0].objects[0].box == pytest.approx((0.0, 0.1, (35 - 25) / 50, 0.9))
    assert data.records[0].objects[0].phrase == "red box 0"          # the manifest's records are untouched
    data.load([0])
    assert data.dropped_by_crop == 4


def test_crop_none_is_the_plain_resize(tmp_path):
    path = _manifest(tmp_path, [((40, 24), [(4, 4, 20, 20)]), ((16, 16), [(2, 2, 8, 8)])])
    data = ManifestImages(path, 32, progress=False)
    assert data.crop == "none" and not data.flip
    images, records = data.load([0, 1], positions=[5, 6])
    for k in range(2):
        plain = Image.open(tmp_path / "images" / f"{k}.png").convert("RGB").resize((32, 32), Image.BICUBIC)
        assert np.array_equal(images[k], np.asarray(plain))
        assert records[k] is data.records[k]
    assert data.dropped_by_crop == 0 and data.flipped == 0


def test_the_crop_is_a_function_of_seed_and_position(tmp_path):
    path = _manifest(tmp_path, [((120, 40), [(40, 5, 80, 35)]) for _ in range(3)])
    data = ManifestImages(path, 32, progress=False, crop="random", seed=7)
    again = ManifestImages(path, 32, progress=False, crop="random", seed=7)
    a, ra = data.load([1], positions=[4])
    b, rb = again.load([1], positions=[4])
    assert np.array_equal(a, b) and ra == rb
    other_epochs = [data.load([1], positions=[4 + 3 * k])[0] for k in range(1, 8)]
    assert any(not np.array_equal(a, o) for o in other_epochs), "every epoch cropped the same way"
    other_seed = ManifestImages(path, 32, progress=False, crop="random", seed=8)
    assert any(not np.array_equal(data.load([1], positions=[p])[0], other_seed.load([1], positions=[p])[0])
               for p in range(3, 12))


def test_bad_crop_is_a_config_error():
    with pytest.raises(ValueError, match="crop"):
        make_config("smoke", crop="middle")
    with pytest.raises(TypeError, match="flip"):
        make_config("smoke", flip="yes")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def test_a_smoke_run_trains_with_random_crop_and_flip(runs):
    folder = train(make_config("smoke", run_name="cropped", crop="random", flip=True, steps=2, n_samples=0),
                   progress=False)
    assert (folder / "final" / "adapter.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["crop"] == "random"
    report = json.loads((folder / "data_report.json").read_text())
    assert report["flipped"] > 0 and {"cropped_away", "side_words_flipped"} <= set(report)   # 8 samples, p = 0.5
    assert "sample(s) flipped" in (folder / "train.log").read_text()


def test_resume_with_random_crop_matches_uninterrupted_run(runs, tmp_path):
    pictures = [((48 + 8 * i, 32), [(4 + 2 * i, 4, 30 + 2 * i, 28), (30, 2, 46, 14)]) for i in range(6)]
    manifest = _manifest(tmp_path, pictures)
    tiny = dict(steps=6, batch_size=2, save_every=4, log_every=1, n_samples=0, warmup=2, data=str(manifest),
                crop="random", flip=True, box_loss_region="exclusive")   # "red box": a colour, no Shapes shape
    whole = train(make_config("shapes", run_name="whole", **tiny), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(make_config("shapes", run_name="split", **tiny), progress=False, stop_at_step=3)
    split = train(resume_config(runs / "split"), resume=True, progress=False)
    a = load_file(str(whole / "final" / "adapter.safetensors"))
    b = load_file(str(split / "final" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different adapter weights"


def test_a_run_saved_before_crop_and_flip_existed_resumes(runs):
    folder = train(make_config("shapes", run_name="old", steps=2, batch_size=2, n_train=16, save_every=2,
                               log_every=1, n_samples=0, warmup=1), progress=False)
    saved = json.loads((folder / "config.json").read_text())
    del saved["crop"], saved["flip"]                     # as an older version wrote it
    (folder / "config.json").write_text(json.dumps(saved))
    train(resume_config(runs / "old", steps=3), resume=True, progress=False)
    with pytest.raises(ValueError, match="crop"):
        resume_config(runs / "old", crop="center")
