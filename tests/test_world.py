"""The harder Shapes world (overlap, up to six objects, a side range), held-out layouts v2 and the
per-bucket report."""
import hashlib
import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from adapterlib.training import worlds

from adapterlib import shapes
from adapterlib.data.buckets import REPORT_COLUMNS, bucket_of, bucket_report, bucket_rows, boxes_intersect, format_buckets
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.shapes import WorldOptions

HARD = WorldOptions(max_objects=6, overlap=0.5, side=(0.1875, 0.5))
# sha256 of render_batch(range(3000)) images and records (JSON), measured with the world before WorldOptions.
ORIGINAL_WORLD_SHA256 = "d56282acf374af780ea05f229ed45b2e55f7fc86ffcb57c1ad26ec8a2d98a03f"


def _digest(images, records) -> str:
    h = hashlib.sha256(images.tobytes())
    h.update(json.dumps([r.to_json() for r in records]).encode())
    return h.hexdigest()


def test_default_options_reproduce_the_original_world():
    assert _digest(*shapes.render_batch(range(3000))) == ORIGINAL_WORLD_SHA256
    assert _digest(*shapes.render_batch(range(3000), options=WorldOptions())) == ORIGINAL_WORLD_SHA256
    for seed in range(50):
        assert shapes.sample_layout(seed) == shapes.sample_layout(seed, 3) == \
            shapes.sample_layout(seed, options=WorldOptions())


def test_hard_world_is_a_pure_function_of_seed_and_options(tmp_path):
    seeds = range(100, 400)
    a_images, a_records = shapes.render_batch(seeds, options=HARD)
    b_images, b_records = shapes.render_batch(seeds, options=WorldOptions(6, 1, 0.5, (0.1875, 0.5)))
    assert np.array_equal(a_images, b_images) and a_records == b_records
    # one layout at a time (other padding of the object axis) gives the same pixels and records
    for seed, image, record in list(zip(seeds, a_images, a_records))[:40]:
        layout = shapes.sample_layout(seed, options=HARD)
        assert np.array_equal(shapes.render(layout), image) and shapes.to_record(layout) == record
    a = shapes.write_dataset(tmp_path / "a", n=6, seed=5, options=HARD)
    b = shapes.write_dataset(tmp_path / "b", n=6, seed=5, options=HARD)
    assert a.read_bytes() == b.read_bytes()
    # the options matter: the same seeds in the default world differ
    assert not np.array_equal(a_images, shapes.render_batch(seeds)[0])


def _alone(layout, obj) -> np.ndarray:
    """The pixel mask (H, W) of one object rendered on its own."""
    image = shapes.render(shapes.Layout(layout.seed, layout.resolution, (obj,)))
    return (image != shapes.BACKGROUND).any(-1)


def test_smaller_object_in_front_whatever_the_order():
    big = shapes.ShapeObject("red", "square", (0, 0, 16, 16))
    small = shapes.ShapeObject("blue", "square", (8, 8, 20, 20))
    for objects in [(big, small), (small, big)]:
        image = shapes.render(shapes.Layout(0, 32, objects))
        assert (image[8:16, 8:16] == shapes.COLORS["blue"]).all()       # the shared pixels: the smaller one
        assert (image[0:8, 0:16] == shapes.COLORS["red"]).all()
    # equal areas: the one listed later is in front
    twin = shapes.ShapeObject("green", "square", (8, 8, 24, 24))
    assert (shapes.render(shapes.Layout(0, 32, (big, twin)))[8:16, 8:16] == shapes.COLORS["green"]).all()
    assert (shapes.render(shapes.Layout(0, 32, (twin, big)))[8:16, 8:16] == shapes.COLORS["red"]).all()


def test_depth_rule_on_sampled_layouts_and_boxes_are_full_boxes():
    """Every pixel covered by several objects shows the one with the smallest requested box (ties: the
    later); each requested box is the object's full box, even where another hides part of it."""
    shared_pixels, hidden = 0, 0
    for seed in range(300):
        layout = shapes.sample_layout(seed, options=HARD)
        image, record = shapes.render(layout), shapes.to_record(layout)
        masks = [_alone(layout, o) for o in layout.objects]
        for obj, mask, grounded in zip(layout.objects, masks, record.objects):
            ys, xs = np.nonzero(mask)
            assert grounded.box == (xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32, (ys.max() + 1) / 32)
            hidden += int(not (image[mask] == shapes.COLORS[obj.color]).all())
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in (o.box for o in record.objects)]
        cover = np.stack(masks)                                              # (K, H, W)
        for y, x in zip(*np.nonzero(cover.sum(0) >= 2)):
            front = min((j for j in range(len(masks)) if cover[j, y, x]), key=lambda j: (areas[j], -j))
            assert tuple(image[y, x]) == shapes.COLORS[layout.objects[front].color]
            shared_pixels += 1
    assert shared_pixels > 1000 and hidden > 50          # the claims were tested on real overlaps


def test_visible_masks_are_the_pixels_each_object_shows():
    """`box_loss_region visible` judges each object on the pixels it shows: its own colour's, inside its
    full shape, none of another's; together they are the image's non-background pixels."""
    from adapterlib.shapes.detector import visible_masks
    hidden = 0
    for seed in range(40):
        layout = shapes.sample_layout(seed, options=HARD)
        image, record = shapes.render(layout), shapes.to_record(layout)
        masks = visible_masks(image[None], [record], 6)[0]                   # (6, H, W)
        k = len(record.objects)
        assert not masks[k:].any() and (masks.sum(0) <= 1).all()
        assert (masks.any(0) == (image != shapes.BACKGROUND).any(-1)).all()
        for obj, mask in zip(layout.objects, masks):
            alone = _alone(layout, obj)
            assert (mask <= alone).all() and (mask == alone & (image == shapes.COLORS[obj.color]).all(-1)).all()
            hidden += int(mask.sum() < alone.sum())
    assert hidden > 5                                          # objects hidden in part were among them
    bad = Record("a thing", (GroundedObject("a thing", (0, 0, 0.5, 0.5)),), id="r7")
    with pytest.raises(ValueError, match=r"record r7, object 0: phrase 'a thing' names no palette colour"):
        visible_masks(np.zeros((1, 32, 32, 3), np.uint8), [bad], 1)


def test_hidden_in_part_is_what_the_renderer_hides():
    """`box_loss_region layered` treats an object as hidden in part when its whole shape, drawn from its phrase
    and its box, shows another object: on 60 hard-world layouts, every object the renderer does not hide at all is
    not, and every one it hides by 4 or more pixels is (the whole shape is drawn from the tight box: a pixel off at
    an edge, so the threshold's edge, 1-3 pixels, is left free)."""
    from adapterlib.shapes.detector import hidden_in_part, visible_masks
    clear = hidden = 0
    for seed in range(60):
        layout = shapes.sample_layout(seed, options=HARD)
        image, record = shapes.render(layout), shapes.to_record(layout)
        masks = visible_masks(image[None], [record], 6)
        flags = hidden_in_part(masks, [record])[0]
        assert flags.shape == (6,) and not flags[len(layout.objects):].any()
        for obj, mask, flag in zip(layout.objects, masks[0], flags):
            covered = int((_alone(layout, obj) & ~mask).sum())      # its pixels another object shows
            if covered == 0:
                assert not flag, (seed, obj)
                clear += 1
            elif covered >= 4:
                assert flag, (seed, obj)
                hidden += 1
    assert clear > 100 and hidden > 40
    bad = Record("a red thing", (GroundedObject("a red thing", (0, 0, 0.5, 0.5)),), id="r8")
    with pytest.raises(ValueError, match=r"record r8, object 0: phrase 'a red thing' names no shape"):
        hidden_in_part(np.zeros((1, 1, 32, 32), bool), [bad])


def test_colours_unique_counts_reachable_and_defaults_never_overlap():
    counts = set()
    for seed in range(2000):
        layout = shapes.sample_layout(seed, options=HARD)
        colors = [o.color for o in layout.objects]
        assert len(set(colors)) == len(colors)
        counts.add(len(colors))
        assert all(6 <= o.box[2] - o.box[0] <= 16 for o in layout.objects)
    assert counts == {1, 2, 3, 4, 5, 6}
    six = [len(shapes.sample_layout(s, options=WorldOptions(min_objects=6, max_objects=6, overlap=1.0)).objects)
           for s in range(100)]
    assert min(six) >= 4 and six.count(6) > 50
    # without overlap no two requested boxes intersect; with overlap=1 every layout of 2+ objects has one
    for seed in range(300):
        assert not bucket_of(shapes.render_batch([seed], options=WorldOptions(max_objects=6))[1][0])[1]
        record = shapes.render_batch([seed], options=WorldOptions(max_objects=6, min_objects=2, overlap=1.0))[1][0]
        assert bucket_of(record)[1] or len(record.objects) < 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_objects=7), r"max_objects = 7: must be an int in \[1, 6\]"),
    (dict(min_objects=4, max_objects=3), "min_objects = 4 is above max_objects = 3"),
    (dict(overlap=1.5), "overlap = 1.5: must be a probability"),
    (dict(side=(0.5, 0.25)), r"side = \(0.5, 0.25\): must be \(lo, hi\)"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldOptions(**kwargs)


def test_too_small_sides_and_double_settings_are_refused():
    with pytest.raises(ValueError, match="gives 3 px sides at resolution 32: the smallest side is 4 px"):
        shapes.sample_layout(0, options=WorldOptions(side=(0.1, 0.5)))
    with pytest.raises(ValueError, match="give max_objects inside options"):
        shapes.render_batch([0], 4, options=HARD)


def test_heldout_v2_buckets_seeds_and_file():
    records = shapes.heldout_records(version=2)
    per = shapes.HELDOUT_V2_PER_BUCKET
    assert len(records) == per * len(shapes.HELDOUT_V2_BUCKETS) == 220
    found = {}
    for r in records:
        objects, overlap = bucket_of(r)          # from the boxes; the id says the same
        assert r.id.startswith(f"v2-{objects}obj-{'overlap' if overlap else 'apart'}-")
        found[objects, overlap] = found.get((objects, overlap), 0) + 1
    assert found == {b: per for b in shapes.HELDOUT_V2_BUCKETS}
    assert {bucket_of(r) for r in records[:11]} == set(shapes.HELDOUT_V2_BUCKETS)   # the first 11: one each
    seeds = [r.seed for r in records]
    v1 = {r.seed for r in shapes.heldout_records()}
    assert len(set(seeds)) == len(seeds) and min(seeds) >= shapes.HELDOUT_V2_SEED0 == 20_000_000
    assert max(v1) < shapes.HELDOUT_V2_SEED0 and not v1 & set(seeds)   # training seeds are < HELDOUT_SEED0
    assert worlds.heldout_records(5, version=2) == records[:5]
    # v1 and v2 records render together, each in its own world, and match their layouts
    mixed = shapes.heldout_records(3) + records[:11]
    assert worlds.ground_truth_images(mixed).shape == (14, 32, 32, 3)
    with pytest.raises(ValueError, match="does not match the layout of seed"):
        shapes.heldout_images(records[:11], options=WorldOptions())


def test_shipped_heldout_v2_equals_the_writer(tmp_path):
    assert shapes.write_heldout_v2(path=tmp_path / "v2.jsonl").read_bytes() == shapes.HELDOUT_V2_PATH.read_bytes()
    assert shapes.write_heldout(path=tmp_path / "v1.jsonl").read_bytes() == shapes.HELDOUT_PATH.read_bytes()


def test_six_object_captions_fit_the_shipped_tokenizer():
    from transformers import AutoTokenizer
    from adapterlib.paths import repo_path
    tokenizer = AutoTokenizer.from_pretrained(repo_path("adapterlib/models/shapes-tiny/tokenizer"))
    longest = max((r.caption for r in shapes.heldout_records(version=2)), key=lambda c: len(tokenizer(c).input_ids))
    assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length
    assert tokenizer.unk_token_id not in tokenizer(longest).input_ids


# --- the bucket report --------------------------------------------------------------------------

def _record(*boxes) -> Record:
    return Record("", tuple(GroundedObject(f"red {i}", b) for i, b in enumerate(boxes)))


A, B = (0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5)        # touching, not intersecting
C = (0.25, 0.25, 0.75, 0.75)                              # intersects A and B


def test_bucket_of_is_computed_from_the_boxes():
    assert not boxes_intersect(A, B) and boxes_intersect(A, C) and boxes_intersect(B, C)
    assert bucket_of(_record(A)) == (1, False)
    assert bucket_of(_record(A, B)) == (2, False)
    assert bucket_of(_record(A, B, C)) == (3, True)
    assert bucket_of(_record()) == (0, False)


def _table(rows) -> pd.DataFrame:
    """A per-object table like worlds.measure's: (record, success, iou[, measurable])."""
    return pd.DataFrame([dict(record=r, success=s, iou=i, measurable=m) for r, s, i, m in rows])


def test_bucket_report_on_a_hand_made_table():
    records = [_record(A), _record(A), _record(A, B), _record(A, C)]   # buckets (1, no) x2, (2, no), (2, yes)
    adapter = _table([(0, True, 0.9, True), (1, False, 0.1, True),
                      (2, True, 0.8, True), (2, True, 0.6, True),
                      (3, False, 0.2, True), (3, True, 0.7, True), (3, False, np.nan, False)])
    ceiling = _table([(0, True, 1.0, True), (1, True, 1.0, True), (2, True, 1.0, True), (2, True, 1.0, True),
                      (3, True, 0.9, True), (3, False, 0.3, True)])
    base = _table([(0, False, 0.0, True), (1, False, 0.0, True), (2, True, 0.5, True), (2, False, 0.1, True),
                   (3, False, 0.0, True), (3, False, 0.2, True)])
    report = bucket_report(records, adapter, ceiling=ceiling, base=base)
    assert list(report.columns) == REPORT_COLUMNS
    assert list(zip(report.objects, report.overlap)) == [(1, False), (2, False), (2, True)]
    assert list(report.n_layouts) == [2, 1, 1] and list(report.n_objects) == [2, 2, 2]  # the unmeasurable row is out
    assert np.allclose(report.success_rate, [0.5, 1.0, 0.5])
    assert np.allclose(report.miou, [0.5, 0.7, 0.45])
    assert np.allclose(report.ceiling_success_rate, [1.0, 1.0, 0.5])
    assert np.allclose(report.ceiling_miou, [1.0, 1.0, 0.6])
    assert np.allclose(report.base_success_rate, [0.0, 0.5, 0.0])
    assert np.allclose(report.ratio, [0.5, 1.0, 1.0])
    rows = bucket_rows(report)
    nan = float("nan")                                             # no boxes in these tables: no O-mIoU
    assert rows[2] == pytest.approx(dict(objects=2, overlap=True, n_layouts=1, n_objects=2, success_rate=0.5,
                                         miou=0.45, ceiling_success_rate=0.5, ceiling_miou=0.6,
                                         base_success_rate=0.0, base_miou=0.1, ratio=1.0, o_miou=nan,
                                         ceiling_o_miou=nan, base_o_miou=nan), nan_ok=True)
    assert [type(rows[2][k]) for k in ("objects", "overlap", "n_objects", "ratio")] == [int, bool, int, float]
    assert {"objects", "overlap", "n_objects", "success_rate", "ceiling_success_rate"} <= set(rows[0])
    assert "ratio" in format_buckets(report) and "base" in format_buckets(report)


def test_o_miou_is_the_iou_of_the_overlap_regions_averaged_per_image_then_over_images():
    from adapterlib.data.buckets import o_miou, overlap_ious
    records = [_record(A, C), _record(A, B, C), _record(A, B)]     # pairs: (0, 1); (0, 2), (1, 2); none
    half = (0.25, 0.25, 0.5, 0.5)                                  # A and C's overlap region
    rows = [(0, A, A), (0, C, C),                                  # found exactly: the overlap is exact, 1
            (1, A, (0.0, 0.0, 0.5, 0.375)), (1, B, None), (1, C, C),   # B not found: its pair is 0
            (2, A, A), (2, B, B)]
    table = pd.DataFrame([dict(record=r, box=b, found_box=f, measurable=True) for r, b, f in rows])
    pairs = overlap_ious(records, table)
    assert list(zip(pairs.record, pairs["first"], pairs.second)) == [(0, 0, 1), (1, 0, 2), (1, 1, 2)]
    # record 1, pair (A, C): found overlap (0.25, 0.25, 0.5, 0.375) against the requested `half`: IoU 0.5
    assert np.allclose(pairs.o_iou, [1.0, 0.5, 0.0])
    assert o_miou(pairs) == pytest.approx((1.0 + (0.5 + 0.0) / 2) / 2)   # per image, then over images
    assert math.isnan(o_miou(overlap_ious(records[2:], table[table.record == 2].assign(record=0))))
    disjoint = table.copy()                                        # found boxes that no longer meet: 0, not an IoU
    disjoint.at[1, "found_box"] = (0.6, 0.6, 0.9, 0.9)
    assert overlap_ious(records, disjoint).o_iou.iloc[0] == 0.0
    assert half == (0.25, 0.25, 0.5, 0.5)
    report = bucket_report(records, table.assign(success=True, iou=1.0), ceiling=table.assign(success=True, iou=1.0))
    assert np.allclose(report.set_index(["objects", "overlap"]).loc[[(2, True), (3, True)], "o_miou"], [1.0, 0.25])
    assert report.set_index(["objects", "overlap"]).loc[(2, False), "o_miou"] != report.o_miou.max()  # NaN there
    assert "adapter O-mIoU" in format_buckets(report)
    with pytest.raises(ValueError, match="3 rows for record 1 but it has 2 objects"):
        overlap_ious([records[0], records[2]], table[table.record < 2].assign(record=[0, 0, 1, 1, 1]))


def test_bucket_report_edge_cases():
    records = [_record(A), _record(A, B)]
    zero = _table([(0, False, 0.0, True), (1, False, 0.0, True), (1, False, 0.0, True)])
    report = bucket_report(records, zero, ceiling=zero)            # ceiling 0: no ratio; no base: NaN
    assert report.ratio.isna().all() and report.base_success_rate.isna().all()
    assert "base" not in format_buckets(report)
    assert math.isnan(bucket_rows(report)[0]["ratio"])
    with pytest.raises(ValueError, match="names record 2 but there are 2 records"):
        bucket_report(records, _table([(2, True, 1.0, True)]), ceiling=zero)
    with pytest.raises(ValueError, match=r"the ceiling table lacks column\(s\) \['iou'\]"):
        bucket_report(records, zero, ceiling=zero.drop(columns="iou"))
    assert list(bucket_report([], zero, ceiling=zero).columns) == REPORT_COLUMNS


def test_bucket_report_of_the_ground_truth_on_heldout_v2_and_its_figure():
    from adapterlib.analysis.figures import plot_buckets
    records = worlds.heldout_records(version=2)
    table, summary = worlds.measure(worlds.ground_truth_images(records), records)
    report = bucket_report(records, table, ceiling=table)
    assert len(report) == 11 and (report.n_layouts == 20).all()
    assert (report.n_objects == report.objects * 20).all()
    # apart, every object is found; an occluded one may not be (that is the ceiling)
    assert (report[~report.overlap].ceiling_success_rate == 1.0).all()
    assert np.isclose((report.success_rate * report.n_objects).sum() / report.n_objects.sum(), summary["success_rate"])
    matplotlib.use("Agg")
    fig = plot_buckets(report, measured="ground truth")
    apart, overlap = fig.axes
    assert len(apart.patches) == 2 * 6 and len(overlap.patches) == 2 * 5     # ceiling + measured per count
    assert apart.get_legend_handles_labels()[1] == ["ground truth (ceiling)", "ground truth"]
    ceiling_bars = overlap.containers[0]
    assert [bar.get_height() for bar in ceiling_bars] == list(report[report.overlap].ceiling_success_rate)


def test_a_run_can_train_on_the_harder_world_and_is_judged_on_its_held_out_set(tmp_path, monkeypatch):
    from adapterlib.training import worlds
    from adapterlib.evaluation import evaluate
    from adapterlib.training.config import make_config
    from adapterlib.data.manifest import read_manifest
    from adapterlib.training.train import train
    manifest = worlds.training_manifest("shapes-v2", 64, tmp_path)
    world = shapes.WORLDS["shapes-v2"]
    assert world.training == shapes.V2_TRAINING_OPTIONS and world.heldout == 2
    assert manifest.parent.name == f"shapes-v2-64-{shapes.options_tag(world.training)}"
    records = read_manifest(manifest)
    # drawn with the world's training options: the same layouts as those seeds rendered under them
    assert [r.objects for r in records] == [r.objects for r in shapes.render_batch(range(64), options=world.training)[1]]
    assert max(len(r.objects) for r in records) > 3                      # the v2 world, not the default one
    assert sum(bucket_of(r)[1] for r in records) > len(records) / 2      # crowded: most training layouts overlap
    # a change of the world's options never reuses a set written under the old ones
    assert shapes.options_tag(world.training) != shapes.options_tag(shapes.HELDOUT_V2_OPTIONS)
    assert worlds.training_manifest("shapes", 64, tmp_path).parent.name == \
        f"shapes-64-{shapes.options_tag(shapes.WorldOptions())}"
    assert worlds.sample_records("shapes-v2", records, 3) == worlds.heldout_records(3, version=2)
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    run = train(make_config("smoke", run_name="v2", data="shapes-v2", n_train=32, steps=2, save_every=2,
                            n_samples=0), progress=False)
    layouts = evaluate.run_layouts(run, 11)
    assert layouts.source == "heldout-v2" and layouts.records == worlds.heldout_records(11, version=2)


def test_a_resume_keeps_the_set_it_started_with_when_the_world_changed_since(tmp_path, monkeypatch):
    import json as json_
    from adapterlib.training.config import make_config
    from adapterlib.runs import DATA_REPORT
    from adapterlib.training.train import train
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    cfg = dict(run_name="r", data="shapes-v2", n_train=32, save_every=2, n_samples=0)
    run = train(make_config("smoke", steps=2, **cfg), progress=False)
    # as if the run had started on a set drawn with the previous round's options (held-out v2's)
    old = shapes.write_dataset(tmp_path / "runs" / "_datasets" / "shapes-v2-32", 32, options=shapes.HELDOUT_V2_OPTIONS)
    report = run / DATA_REPORT
    report.write_text(json_.dumps({**json_.loads(report.read_text()), "manifest": str(old)}))
    train(make_config("smoke", steps=4, **cfg), resume=True, progress=False)
    assert json_.loads(report.read_text())["manifest"] == str(old)     # resumed on the data it started with
    # that set gone: a regenerated one would be other data, so the resume stops and says why
    (old.parent / "data.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="started on .*shapes-v2-32"):
        train(make_config("smoke", steps=6, **cfg), resume=True, progress=False)
    # a resume on an unchanged world (or a run moved elsewhere: same set name) reads the world's set
    report.write_text(json_.dumps({**json_.loads(report.read_text()),
                                   "manifest": f"/elsewhere/_datasets/{worlds.training_manifest('shapes-v2', 32, tmp_path / 'runs').parent.name}/data.jsonl"}))
    train(make_config("smoke", steps=6, **cfg), resume=True, progress=False)
    assert json_.loads(report.read_text())["manifest"] == str(worlds.training_manifest("shapes-v2", 32, tmp_path / "runs"))
