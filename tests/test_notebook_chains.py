"""Notebooks 01 to 05 through papermill, as a user runs them, on each kind of base that is not the Shapes default:
a tiny SD 1.x folder with our adapter, the same folder with diffusers' own GLIGEN modules, a tiny SDXL folder, a
tiny SD3 (MM-DiT) folder and a tiny FLUX.1 folder (all built from configs: tests/helpers.py). One chain, parametrized: 01 checks (identity at init), 02 trains 2 steps,
03 resumes to 4, 04 reads the gates and runs the checkpoint test with a zero-shot detector (a tiny OWL-ViT), 05 draws
the gate-effect grid. Nothing here touches the Shapes world: samples, checkpoint tests and 05 use the run's records.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from adapterlib.runs import list_checkpoints
from adapterlib.training.checkpoint import verify_checkpoint
from helpers import build_tiny_owl_folder, import_coco_fixture, notebook_outputs, papermill, photo_manifest

CHAINS = {
    # base fixture, preset, extra fields, the data it trains on
    "sd": ("tiny_sd_folder", "sd15", {}, "coco"),
    "gligen": ("tiny_sd_folder", "sd15", {"adapter_attention": "gligen"}, "coco"),
    "sdxl": ("tiny_sdxl_folder", "sdxl", {}, "photos"),
    "sd3": ("tiny_sd3_folder", "sd3", {}, "photos"),
    "flux": ("tiny_flux_folder", "flux", {}, "photos"),
}


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_notebooks_01_to_05_on_a_tiny_base(chain, tmp_path, request):
    fixture, preset, fields, data = CHAINS[chain]
    base = request.getfixturevalue(fixture)
    runs = tmp_path / "runs"
    env = {"ADAPTERLIB_RUNS": str(runs)}
    manifest = import_coco_fixture(tmp_path) if data == "coco" else photo_manifest(tmp_path / "d")
    given = dict(preset=preset, base_model=base, data=manifest, **fields)

    def run(notebook, out, params):
        done = papermill(notebook, tmp_path / out, params, env)
        assert done.returncode == 0, done.stderr[-3000:]
        return notebook_outputs(tmp_path / out)

    # 01: the checks, on the base and the run's own captions and boxes
    assert "all checks PASS" in run("01_dtype_zero_init_check.ipynb", "01.ipynb", given)

    # 02: two steps of the preset on the folder; every -p reaches config.json
    run("02_train.ipynb", "02.ipynb", dict(**given, steps=2, save_every=2, log_every=1, n_samples=2, batch_size=2,
                                           run_name="r", **({"crop": "center"} if data == "coco" else {}),
                                           **({"base_guidance": 2.5} if chain == "flux" else {})))
    folder = runs / "r"
    config = json.loads((folder / "config.json").read_text())
    assert (config["preset"], config["base_model"], config["data"], config["steps"]) == \
        (preset, str(base), str(manifest), 2)
    assert "encodings cached" in json.loads((folder / "data_report.json").read_text())["inputs"]
    assert (folder / "samples" / "step_0000002.png").is_file()         # checkpoint samples: the run's first records

    # 03: resumed to 4 steps; every checkpoint file matches its checksum
    run("03_resume.ipynb", "03.ipynb", dict(run_name="r", steps=4))
    assert [s for s, _ in list_checkpoints(folder)] == [2, 4]
    assert verify_checkpoint(list_checkpoints(folder)[-1][1]) is None

    # 04: the gates and the checkpoint test on the run's own layouts (no held-out manifest: its training records,
    # which the titles say), measured by a zero-shot detector (the colour detector measures no "dog")
    detector = build_tiny_owl_folder(tmp_path / "owl")
    text = run("04_gate_analysis.ipynb", "04.ipynb", dict(run_name="r", n_probe=2, detector=detector))
    result = json.loads((folder / "checkpoint_test" / "step_0000004" / "results.json").read_text())
    assert result["layouts"] == [r["id"] for r in map(json.loads, manifest.read_text().splitlines()[:2])]
    assert result["held_out"] is False and "(training records: not held out)" in text

    # 05: the gate-effect grid, measured by the zero-shot detector
    text = run("05_gate_effect_grid.ipynb", "05.ipynb", dict(run_name="r", n_layouts=2, n_eval=2, sampling_steps=2,
                                                           scales="0,1", taus="1.0", detector=detector))
    assert "ap50" in text and f"detector: zero-shot ({detector.name})" in text
    first_caption = json.loads(manifest.read_text().splitlines()[0])["caption"]
    assert first_caption in text

    if chain == "gligen":      # diffusers' GLIGEN modules in every block; its gates are tanh(alpha_attn / alpha_dense)
        assert (config["adapter_attention"], config["adapter_blocks"]) == ("gligen", "all")
        assert {"gate_0_attn", "gate_0_ff"} <= set(pd.read_csv(folder / "metrics.csv").columns)
    if chain == "flux":        # a -p reaches the config, and train.log says the guidance a distilled base trains at
        assert config["base_guidance"] == 2.5 and "trains with guidance 2.5" in (folder / "train.log").read_text()
    if chain == "sd":          # each image sampled once in 05 (scale 1, grounding guidance on and off, 2 layouts)
        assert "images sampled in this notebook: 4 " in text
