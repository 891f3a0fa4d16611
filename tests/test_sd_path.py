"""Stable Diffusion refusals before any work, on a tiny SD-architecture folder (tests/helpers.py). The notebooks end to
end on SD, GLIGEN and SDXL folders: tests/test_notebook_chains.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapterlib.__main__ import main
from helpers import import_coco_fixture


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


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "sd3"])
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


def test_a_preset_of_the_other_family_of_base_is_refused_before_any_work(tmp_path, monkeypatch, capsys, tiny_sd_folder):
    """`sd3` (an MM-DiT's recipe: joint blocks, SD3's timesteps) on a UNet folder, and `shapes` on an MM-DiT, stop
    before any step or cache, naming the presets that fit the base."""
    from adapterlib.shapes.tiny_base import build_tiny_dit
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = import_coco_fixture(tmp_path / "d", n=2)
    assert main(["train", "--preset", "sd3", "--base_model", str(tiny_sd_folder), "--data", str(manifest),
                 "--run_name", "sd3-on-unet"]) == 2
    err = capsys.readouterr().err
    assert "preset 'sd3' is for a mmdit base" in err and "an SD 1.x/2.x base (unet)" in err
    assert "use one of ['shapes', 'sd15', 'sdxl']" in err
    dit = build_tiny_dit().save(tmp_path / "dit")
    assert main(["train", "--preset", "shapes", "--base_model", str(dit), "--run_name", "shapes-on-dit"]) == 2
    err = capsys.readouterr().err
    assert "preset 'shapes' is for a unet base" in err and "use one of ['shapes-dit', 'sd3']" in err
    assert not (tmp_path / "runs" / "_cache").exists()
    assert not any((tmp_path / "runs" / name / "checkpoints").exists() for name in ("sd3-on-unet", "shapes-on-dit"))
