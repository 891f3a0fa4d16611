"""The evaluation API: layouts (held-out or a manifest) measured as ground truth, base alone or adapter."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adapterlib import shapes
from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.data.manifest import Record, write_manifest
from adapterlib.training.checkpoint import parse_checkpoint_spec
from adapterlib.evaluation.evaluate import compare, evaluate, heldout_layouts, images_for, manifest_layouts

REPO = Path(__file__).resolve().parents[1]
STEPS = 3   # enough to sample; the claims here hold at any step count


@pytest.fixture
def adapter(open_adapter):
    return open_adapter


def test_ground_truth_on_heldout_layouts_succeeds_everywhere():
    layouts = heldout_layouts(20)
    assert layouts.seeds == list(range(20))                   # held-out layout i: seed i
    table, summary = evaluate(layouts, reference="ground-truth")
    assert summary["success_rate"] == 1.0 and summary["n_images"] == 20
    assert len(table) == summary["n_objects"] == sum(len(r.objects) for r in layouts.records)


def test_ground_truth_evaluation_does_not_import_torch():
    code = ("import sys; from adapterlib.evaluation.evaluate import evaluate, heldout_layouts; "
            "print(evaluate(heldout_layouts(5), reference='ground-truth')[1]['success_rate']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"


def test_manifest_layouts_use_the_record_seeds_and_image_files(tmp_path, base):
    manifest = shapes.write_dataset(tmp_path / "data", n=5, seed=3)
    layouts = manifest_layouts(manifest)
    assert layouts.seeds == [3, 4, 5, 6, 7] and layouts.manifest == manifest
    _, truth = evaluate(layouts, reference="ground-truth")
    assert truth["success_rate"] == 1.0 and truth["n_images"] == 5
    _, sampled = evaluate(layouts[:2], reference="base", base=base, steps=STEPS)
    assert sampled["n_images"] == 2


def test_manifest_records_without_a_seed_are_sampled_with_their_index(tmp_path):
    records = [Record(r.caption, r.objects) for r in shapes.heldout_records(3)]
    layouts = manifest_layouts(write_manifest(tmp_path / "mine.jsonl", records), n=2)
    assert layouts.seeds == [0, 1] and len(layouts) == 2
    with pytest.raises(ValueError, match="no image and no seed"):
        evaluate(layouts, reference="ground-truth")


def test_adapter_at_scale_zero_gives_exactly_the_base_images_and_summary(base, adapter):
    layouts = heldout_layouts(4)
    base_images = images_for(layouts, reference="base", base=base, steps=STEPS)
    off = images_for(layouts, reference="adapter", base=base, adapter=adapter, scale=0.0, steps=STEPS)
    on = images_for(layouts, reference="adapter", base=base, adapter=adapter, scale=1.0, steps=STEPS)
    assert np.array_equal(off, base_images)
    assert not np.array_equal(on, base_images), "the open-gated adapter should change the images at scale 1"
    base_table, base_summary = evaluate(layouts, reference="base", base=base, steps=STEPS)
    off_table, off_summary = evaluate(layouts, base=base, adapter=adapter, scale=0.0, steps=STEPS)
    assert off_summary == base_summary
    pd.testing.assert_frame_equal(off_table, base_table)


def test_compare_lists_ground_truth_base_then_each_adapter_setting_in_order(base, adapter):
    table = compare(heldout_layouts(3), base, adapter, scales=[0, 1.0], taus=[0.5, 1.0], steps=STEPS)
    assert table.name.tolist() == ["ground truth", "base alone", "adapter scale 0 tau 0.5",
                                   "adapter scale 1 tau 0.5", "adapter scale 0 tau 1", "adapter scale 1 tau 1"]
    assert table.reference.tolist() == ["ground-truth", "base"] + ["adapter"] * 4
    assert table.success_rate.iloc[0] == 1.0 and (table.n_images == 3).all()
    metrics = ["success_rate", "miou", "color_presence", "n_objects"]
    assert table.iloc[2][metrics].equals(table.iloc[1][metrics])        # scale 0 is the base alone
    assert table[["scale", "tau"]].iloc[2:].values.tolist() == [[0, 0.5], [1, 0.5], [0, 1], [1, 1]]


def test_adapter_reference_without_an_adapter_is_an_error(base):
    with pytest.raises(ValueError, match="needs adapter="):
        evaluate(heldout_layouts(2), base=base)
    with pytest.raises(ValueError, match="expected one of"):
        evaluate(heldout_layouts(2), reference="truth")


def test_a_checkpoint_spec_names_a_step_of_this_run_or_another_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    other = tmp_path / "runs" / "other"                          # another run: a name under the runs root
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    assert parse_checkpoint_spec("500", tmp_path) == (tmp_path, "500")
    assert parse_checkpoint_spec("latest", tmp_path) == (tmp_path, "latest")
    assert parse_checkpoint_spec("other", tmp_path) == (other, "latest")
    assert parse_checkpoint_spec("other:40", tmp_path) == (other, "40")
    assert parse_checkpoint_spec(f"{other}:40", tmp_path) == (other, "40")   # or a path


def test_evaluate_with_no_run_measures_the_default_presets_heldout_set_the_documented_ceiling(capsys):
    """`evaluate --reference ground-truth` with no --layouts measures held-out v2 (the default run's set: data
    shapes-v2), so it prints the ceiling docs/notes/results.md gives for that command; v1 stays one flag away."""
    import json

    from adapterlib.__main__ import main
    from adapterlib.paths import REPO_ROOT
    assert main(["evaluate", "--reference", "ground-truth"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert out.startswith("on 220 layouts of heldout-v2") and result["layouts"] == "heldout-v2"
    row = next(line for line in (REPO_ROOT / "docs" / "notes" / "results.md").read_text().splitlines()
               if line.endswith("| `python -m adapterlib evaluate --reference ground-truth` |"))
    assert result["n_images"] == 220 and f"success {result['success_rate']:.3f}" in row and "held-out v2" in row
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", "v1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["layouts"], result["n_images"], result["success_rate"]) == ("heldout", 200, 1.0)


def test_a_sample_set_keys_adapter_images_on_the_grounding_guidance(base, adapter, tmp_path, monkeypatch):
    from adapterlib.evaluation.evaluate import SampleSet
    from adapterlib.model.sample import generate
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    layouts = heldout_layouts(2)
    book = SampleSet(layouts, base, steps=STEPS)
    off = book.images(adapter, grounding_guidance="off")
    assert np.array_equal(off, generate(base, layouts.records, layouts.seeds, adapter=adapter, steps=STEPS,
                                        grounding_guidance="off"))
    assert not np.array_equal(book.images(adapter), off)          # "base", the default: other images
    assert book.sampled == 4
    with pytest.warns(DeprecationWarning):                         # False, the earlier "off": the same key
        assert np.array_equal(book.images(adapter, grounding_guidance=False), off)
    assert book.sampled == 4
