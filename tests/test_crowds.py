"""The held-out random crowds (version 3): random placement, the shipped file, depth buckets and the per-object
factors that say which objects are lost."""
import numpy as np
import pandas as pd
import pytest

from adapterlib import shapes
from adapterlib.__main__ import main
from adapterlib.data.buckets import (DEPTHS, bucket_of, bucket_rows, depth_of, depth_report, factor_report,
                                     format_buckets, format_factors, object_factors)
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.shapes import WorldOptions
from adapterlib.training import worlds


def _record(*boxes) -> Record:
    return Record("", tuple(GroundedObject(f"red {i}", b) for i, b in enumerate(boxes)))


def test_random_placement_reaches_what_the_ruled_world_never_draws():
    crowd = WorldOptions(max_objects=6, min_objects=6, side=(0.1875, 0.5), placement="random")
    layouts = [shapes.sample_layout(s, options=crowd) for s in range(300)]
    assert all(len(l.objects) == 6 for l in layouts)              # random placement never drops an object
    records = [shapes.to_record(l) for l in layouts]
    assert {depth_of(r) for r in records} >= {"deep", "inside"}
    ruled = [shapes.sample_layout(s, options=shapes.HELDOUT_V2_OPTIONS) for s in range(300)]
    # the ruled world keeps IoU <= 1/2 per pair of placed boxes: never two of one size on top of each other
    boxes = lambda layout: [o.box for o in layout.objects]
    from adapterlib.data.manifest import box_iou
    worst = lambda ls: max(box_iou(a, b) for l in ls for i, a in enumerate(boxes(l)) for b in boxes(l)[i + 1:])
    assert worst(ruled) <= 0.5 + 1e-9 < worst(layouts)
    # the default placement leaves the tag of every set written before `placement` existed as it was
    assert shapes.options_tag(shapes.V2_TRAINING_OPTIONS) == "%s" % shapes.options_tag(
        WorldOptions(max_objects=6, min_objects=2, overlap=0.6, side=(0.1875, 0.5), placement="ruled"))
    assert shapes.options_tag(crowd) != shapes.options_tag(WorldOptions(max_objects=6, min_objects=6,
                                                                        side=(0.1875, 0.5)))
    with pytest.raises(ValueError, match="placement = 'anywhere': must be one of"):
        WorldOptions(placement="anywhere")


def test_shipped_crowds_equal_the_writer_and_are_reachable_by_name(tmp_path):
    assert shapes.write_crowds(path=tmp_path / "c.jsonl").read_bytes() == shapes.CROWDS_PATH.read_bytes()
    records = shapes.heldout_records(version=3)
    assert len(records) == 240 and [len(r.objects) for r in records[:6]] == [1, 2, 3, 4, 5, 6]
    assert sum(bucket_of(r)[1] for r in records) == 176          # overlapping layouts: left to chance
    assert min(r.seed for r in records) >= shapes.CROWDS_SEED0 > max(r.seed for r in shapes.heldout_records(version=2))
    assert all(r.id.startswith(f"crowd-{len(r.objects)}obj-") for r in records)
    assert worlds.ground_truth_images(records[:6]).shape == (6, 32, 32, 3)   # each seed in its own world
    from adapterlib.evaluation.evaluate import named_layouts
    layouts = named_layouts("crowds", 6)
    assert layouts.source == "heldout-crowds" and layouts.records == records[:6]
    assert worlds.sample_records("shapes-v2", [], 3, "crowds") == records[:3]
    from adapterlib.training.config import TrainConfig
    assert TrainConfig(heldout="crowds").heldout == "crowds"


def test_depth_of_and_object_factors_by_hand():
    big, small_inside, corner = (0.0, 0.0, 0.5, 0.5), (0.125, 0.125, 0.25, 0.25), (0.375, 0.375, 0.75, 0.75)
    apart = (0.75, 0.75, 1.0, 1.0)
    assert depth_of(_record(big, apart)) == "apart"
    assert depth_of(_record(big, small_inside)) == "inside"
    assert depth_of(_record(big, (0.4, 0.0, 0.9, 0.5))) == "shallow"       # 0.1 of 0.5 wide: 1/5 covered
    # the share is of the smaller box: corner (0.375 side) has 0.125^2 / 0.375^2 = 1/9 under big
    assert depth_of(_record(big, corner)) == "shallow"
    assert depth_of(_record((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5))) == "deep"   # half of each
    f = object_factors([_record(big, small_inside, apart)])
    assert list(f["object"]) == [0, 1, 2]
    # the small box is in front of the big one: 1/16 of big is hidden; nothing hides the small one
    assert f["hidden"].tolist() == pytest.approx([1 / 16, 0.0, 0.0])
    assert f["in_front"].tolist() == [0, 1, 0] and f["border"].tolist() == [True, False, True]
    assert f["side"].tolist() == pytest.approx([0.5, 0.125, 0.25])
    # of two equal boxes, the later is in front
    g = object_factors([_record((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5))])
    assert g["hidden"].tolist() == pytest.approx([0.5, 0.0])


def test_depth_and_factor_reports_on_a_hand_made_table():
    big, small_inside, apart = (0.0, 0.0, 0.5, 0.5), (0.125, 0.125, 0.25, 0.25), (0.75, 0.75, 1.0, 1.0)
    records = [_record(big, small_inside), _record(big, apart)]
    table = pd.DataFrame([dict(record=0, success=False, iou=0.2, measurable=True, box=big, found_box=None),
                          dict(record=0, success=True, iou=0.8, measurable=True, box=small_inside,
                               found_box=small_inside),
                          dict(record=1, success=True, iou=1.0, measurable=True, box=big, found_box=big),
                          dict(record=1, success=True, iou=0.6, measurable=True, box=apart, found_box=apart)])
    ceiling = table.assign(success=True, iou=1.0, found_box=table["box"])
    report = depth_report(records, table, ceiling=ceiling)
    assert list(report["depth"]) == ["apart", "inside"]                   # DEPTHS' order, those present
    assert report["success_rate"].tolist() == pytest.approx([1.0, 0.5])
    assert report["miou"].tolist() == pytest.approx([0.8, 0.5])
    assert report["ratio"].tolist() == pytest.approx([1.0, 0.5])
    assert report["o_miou"].iloc[1] == 0.0 and report["ceiling_o_miou"].iloc[1] == 1.0   # big not found
    assert bucket_rows(report)[1]["depth"] == "inside" and "depth" in format_buckets(report)
    factors = factor_report(records, table, ceiling=ceiling).set_index(["factor", "group"])
    assert factors.loc[("hidden", "< 1/3"), "success_rate"] == 0.0        # the big one behind the small one
    assert factors.loc[("hidden", "none"), "n_objects"] == 3
    assert factors.loc[("border", "yes"), "miou"] == pytest.approx((0.2 + 1.0 + 0.6) / 3)
    assert factors.loc[("in front of", "1"), "ratio"] == 1.0
    assert "ceiling mIoU" in format_factors(factors.reset_index())
    with pytest.raises(ValueError, match="3 rows for 4 requested objects"):
        factor_report(records, table.iloc[:3])
    assert DEPTHS[0] == "apart"


def test_evaluate_prints_depth_and_factor_tables_for_the_crowds(capsys):
    import json
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", "crowds", "--limit", "30"]) == 0
    out = capsys.readouterr().out
    assert "on 30 layouts of heldout-crowds" in out and "by overlap depth" in out and "which objects are lost" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["layouts"] == "heldout-crowds"
    assert {r["depth"] for r in result["depths"]} <= set(DEPTHS) and len(result["depths"]) >= 3
    hidden = {r["group"]: r for r in result["factors"] if r["factor"] == "hidden"}
    assert hidden["none"]["success_rate"] == 1.0                         # an unhidden object is always found


def test_the_box_loss_ring_is_the_background_just_outside_each_box_and_reaches_the_run(tmp_path, monkeypatch):
    import torch
    from adapterlib.training.losses import edge_ring
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.25, 0.75, 0.5], [0.0, 0.0, 0.125, 0.125]]])
    ring = edge_ring(boxes, (8, 8), 1).reshape(1, 8, 8, 3)
    first = ring[0, :, :, 0]
    # a 1-cell frame around cells 2-3 x 2-3, less the cells of the box beside it (rows 2-3 of column 4)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 1:5] = expected[4, 1:5] = expected[1:5, 1] = True
    assert torch.equal(first, expected), first.int()
    assert not ring[0, 0, 0, 2] and ring[0, 1, 0, 2] and ring[0, 1, 1, 2] and ring[0, 0, 1, 2]  # the image's edge cuts it
    assert ring.sum() == expected.sum() + 10 + 3
    assert edge_ring(boxes, (8, 8), 2).sum() > ring.sum()
    # the field reaches the run and changes what it trains
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    from adapterlib.__main__ import main
    from safetensors.torch import load_file
    fields = ["--steps", "3", "--batch_size", "4", "--n_train", "16", "--save_every", "3", "--n_samples", "0"]
    assert main(["train", "--run_name", "plain", *fields]) == 0
    assert main(["train", "--run_name", "ring", *fields, "--box_loss_ring", "1"]) == 0
    import json
    assert json.loads((tmp_path / "ring" / "config.json").read_text())["box_loss_ring"] == 1
    a, b = (load_file(str(tmp_path / n / "final" / "adapter.safetensors")) for n in ("plain", "ring"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 0
    assert main(["train", "--resume", "ring", "--box_loss_ring", "2"]) == 2              # it defines the run


def test_the_shapes_preset_trains_with_the_ring_beside_the_map_and_the_flag_turns_it_off(tmp_path, monkeypatch):
    import json
    from adapterlib.__main__ import main
    from adapterlib.training.config import make_config, preset_value
    assert make_config("shapes").box_loss_ring == 1 and make_config("shapes").adapter_subcell is True
    for preset in ("shapes-dit", "shapes-flux", "sd15", "sdxl", "sd3", "flux"):   # measured on the UNet of Shapes only
        assert preset_value(preset, "box_loss_ring") == 0, preset
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    fields = ["--preset", "shapes", "--steps", "1", "--batch_size", "4", "--n_train", "16", "--save_every", "1",
              "--n_samples", "0"]
    assert main(["train", "--run_name", "preset", *fields]) == 0
    assert main(["train", "--run_name", "off", *fields, "--box_loss_ring", "0"]) == 0
    written = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in ("preset", "off")}
    assert written["preset"]["box_loss_ring"] == 1 and written["preset"]["adapter_subcell"] is True
    assert written["off"]["box_loss_ring"] == 0 and written["off"]["adapter_subcell"] is True
