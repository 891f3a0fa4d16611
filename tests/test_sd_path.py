"""Stable Diffusion end to end, as a user runs it: a COCO-format fixture through the importer, then notebooks
02 (train), 03 (resume), 04 (gate analysis) and 05 (grid) through papermill on a tiny SD-architecture folder
(UNet, VAE, CLIP text encoder and tokenizer built from configs: tests/conftest.py). Nothing here touches
the Shapes world: the checkpoint samples, the checkpoint test and notebook 05 use the run's own records."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from adapterlib.__main__ import main
from adapterlib.training.checkpoint import verify_checkpoint
from adapterlib.runs import list_checkpoints

from conftest import build_tiny_owl_folder, import_coco_fixture, write_coco_fixture
from test_headless import papermill


def _outputs(notebook: Path) -> str:
    nb = nbformat.read(notebook, 4)
    return "\n".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_coco_import_then_notebooks_02_to_05_on_a_tiny_sd(tmp_path, monkeypatch, tiny_sd_folder, capsys):
    runs = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(runs))
    coco = write_coco_fixture(tmp_path / "coco")
    assert main(["import", "coco", "--instances", str(coco / "instances.json"), "--images", str(coco / "images"),
                 "--captions", str(coco / "captions.json"), "--out", str(tmp_path / "data")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 8 and summary["objects"] == 16
    manifest = tmp_path / "data" / "data.jsonl"
    env = {"ADAPTERLIB_RUNS": str(runs)}

    # 02: the training plan's preset on the SD folder, a few steps
    done = papermill("02_train.ipynb", tmp_path / "02.ipynb", dict(
        preset="sd15", base_model=tiny_sd_folder, data=manifest, steps=4, save_every=2, log_every=1, n_samples=2,
        batch_size=2, crop="center", run_name="sd"), env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "sd"
    config = json.loads((run / "config.json").read_text())
    assert (config["preset"], config["base_model"], config["data"], config["steps"], config["crop"]) == \
        ("sd15", str(tiny_sd_folder), str(manifest), 4, "center")
    assert "encodings cached" in json.loads((run / "data_report.json").read_text())["inputs"]
    assert (run / "samples" / "step_0000004.png").is_file()       # checkpoint samples: the run's first records

    # 03: resume to 6 steps
    done = papermill("03_resume.ipynb", tmp_path / "03.ipynb", dict(run_name="sd", steps=6), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]
    assert verify_checkpoint(list_checkpoints(run)[-1][1]) is None     # every file matches its checksum

    # 04: gate analysis with the checkpoint test on the run's own layouts (no held-out manifest: its training
    # records, which the titles say), measured by a zero-shot detector (a tiny OWL-ViT): the colour detector
    # measures no "dog" (tests/test_real_eval.py)
    detector = build_tiny_owl_folder(tmp_path / "owl")
    done = papermill("04_gate_analysis.ipynb", tmp_path / "04.ipynb", dict(run_name="sd", n_probe=2,
                                                                           detector=detector), env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run / "checkpoint_test" / "step_0000006" / "results.json").read_text())
    assert result["layouts"] == [r["id"] for r in map(json.loads, manifest.read_text().splitlines()[:2])]
    assert result["held_out"] is False and "(training records: not held out)" in _outputs(tmp_path / "04.ipynb")

    # 05: the gate-effect grid on the run's own layouts, measured by the zero-shot detector
    done = papermill("05_gate_effect_grid.ipynb", tmp_path / "05.ipynb", dict(
        run_name="sd", n_layouts=2, n_eval=2, sampling_steps=3, scales="0,1", taus="1.0", detector=detector), env)
    assert done.returncode == 0, done.stderr[-3000:]
    text = _outputs(tmp_path / "05.ipynb")
    assert "a dog and a cat, picture 0" in text and "ap50" in text
    assert f"detector: zero-shot ({detector.name})" in text                  # -p detector measured it
    # each image sampled once: the adapter at scale 1 with grounding guidance on and off, 2 layouts each (the grid,
    # the curve, tau 1.0, the buckets and the side-by-side share them; the base alone comes from its cache)
    assert "images sampled in this notebook: 4 " in text


def _imported(tmp_path: Path) -> Path:
    """The COCO fixture imported: the manifest a user trains SD on."""
    return import_coco_fixture(tmp_path)


def test_the_visible_box_loss_is_refused_on_a_latent_base_before_any_step(tmp_path, monkeypatch, tiny_sd_folder):
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    data = str(_imported(tmp_path))
    for region in ("visible", "exclusive", "layered"):
        cfg = make_config("sd15", run_name="vis", base_model=str(tiny_sd_folder), data=data, box_loss_region=region,
                          steps=2, box_loss_weight=1.0)
        with pytest.raises(ValueError, match=f"box_loss_region = '{region}' needs a pixel base"):
            train(cfg, progress=False)
    assert not (tmp_path / "vis" / "final").exists()
    # no box loss (box_loss_weight 0): the region is unused, nothing is refused
    train(make_config("sd15", run_name="unweighted", base_model=str(tiny_sd_folder), data=data,
                      box_loss_region="visible", box_loss_weight=0.0, steps=1, batch_size=1), progress=False)
    assert (tmp_path / "unweighted" / "final").exists()


def test_stable_diffusion_without_data_is_refused_before_any_work(tmp_path, monkeypatch, tiny_sd_folder, capsys):
    """No silent Shapes on the real path: the sd15 preset names no data, and a latent base given the 32-px Shapes
    world is refused; each error says what to give, before the run folder exists."""
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    assert main(["train", "--preset", "sd15", "--base_model", str(tiny_sd_folder), "--run_name", "nodata"]) == 2
    err = capsys.readouterr().err
    assert "data is empty: the 'sd15' preset trains on your data" in err and "data=PATH/data.jsonl" in err
    assert main(["train", "--preset", "sd15", "--base_model", str(tiny_sd_folder), "--data", "shapes-v2",
                 "--run_name", "shapes-on-sd"]) == 2
    err = capsys.readouterr().err
    assert "is a latent model (it has a VAE)" in err and "data = 'shapes-v2' is the generated Shapes world" in err
    assert "give your manifest" in err
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "shapes-on-sd").exists()


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_a_stable_diffusion_preset_without_a_base_is_refused_before_any_work(preset, tmp_path, monkeypatch, capsys):
    """`train --preset sd15 --data ...` with no --base_model never trains the shipped 32-px shapes-tiny base: the
    sd15 and sdxl presets name no base, and the config refuses none, naming the flag (CLI and papermill)."""
    from adapterlib.training.config import make_config
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    manifest = import_coco_fixture(tmp_path / "d", n=2)
    import adapterlib.training.train
    monkeypatch.setattr(adapterlib.training.train, "train", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", "--preset", preset, "--data", str(manifest), "--run_name", "nobase"]) == 2
    err = capsys.readouterr().err
    assert f"base_model is empty: the {preset!r} preset" in err and "--base_model FOLDER" in err
    assert "-p base_model FOLDER" in err and not (tmp_path / "nobase").exists()
    with pytest.raises(ValueError, match="base_model is empty"):
        make_config(preset, data=str(manifest))
    assert make_config(preset, data=str(manifest), base_model="models/sd").base_model == "models/sd"
    assert make_config("shapes").base_model == "shapes-tiny"            # the embedded default keeps its base
