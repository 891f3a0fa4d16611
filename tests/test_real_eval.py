"""Checkpoint tests and evaluation on real data: a tiny-SD run on an imported COCO fixture that names its held-out
manifest, measured by a tiny OWL-ViT. Notebook 04 under papermill gives a non-empty grounding-vs-step table on
the held-out records with the detector given by `-p detector`; the colour detector, which can measure no
"dog", is a clear error before any sampling, never an empty table; `evaluate --checkpoint all` takes
`--detector`; a manifest run with no held-out manifest says "(training records: not held out)"; bad
`heldout` / `detector` values are errors when the config is made; both fields may change on resume."""
from __future__ import annotations

import json
import math
import shutil

import nbformat
import pytest

from adapterlib.__main__ import main
from adapterlib.training.config import RESUME_FREE, make_config
from adapterlib.evaluation.evaluate import NOT_HELD_OUT, run_layouts
from adapterlib.evaluation.checkpoint_test import grounding_vs_step
from adapterlib.runs import list_checkpoints

from helpers import import_coco_fixture, papermill


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, tiny_sd_folder, tiny_owl_folder):
    """A tiny-SD run (checkpoints 2, 4) on 8 imported COCO pictures, with 3 other pictures as its held-out
    manifest; the runs root is the module's own."""
    root = tmp_path_factory.mktemp("real")
    train_manifest = import_coco_fixture(root / "train", n=8)
    heldout = import_coco_fixture(root / "val", n=3, first=100)
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERLIB_RUNS", str(runs))
        from adapterlib.training.train import train
        run = train(make_config("sd15", run_name="coco", base_model=str(tiny_sd_folder), data=str(train_manifest),
                                heldout=str(heldout), steps=4, save_every=2, log_every=1, n_samples=0, batch_size=2,
                                crop="center", warmup=1), progress=False)
    return dict(run=run, runs=runs, heldout=heldout, train=train_manifest, owl=tiny_owl_folder)


def _ids(manifest, n):
    return [json.loads(line)["id"] for line in manifest.read_text().splitlines()[:n]]


def test_notebook_04_gives_a_grounding_vs_step_table_on_the_heldout_records_with_the_given_detector(coco_run, tmp_path):
    run, out = coco_run["run"], tmp_path / "04.ipynb"
    done = papermill("04_gate_analysis.ipynb", out, dict(run_name="coco", n_probe=2, detector=coco_run["owl"]),
                     {"ADAPTERLIB_RUNS": str(coco_run["runs"])})
    assert done.returncode == 0, done.stderr[-3000:]
    # the table as the notebook shows it: a row per checkpoint (and step 0, the base alone), with numbers
    cells = nbformat.read(out, as_version=4).cells
    shown = next(c for c in cells if c.cell_type == "code" and "grounding_vs_step(" in c.source)
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in shown.outputs)
    assert f"grounding on 2 layouts of {coco_run['heldout']}, by detector {coco_run['owl'].name}" in text
    shown_table = text.split("success_rate", 1)[1].split("\n\n")[0]          # the first block of the repr
    table = [line.split() for line in shown_table.splitlines()[1:]]
    assert [row[1] for row in table] == ["0", "2", "4"]                 # index, step
    assert all(0 <= float(row[2]) <= 1 and not math.isnan(float(row[3])) and row[6] == "4" for row in table)
    # success, mIoU, (O-mIoU, colour presence), n_objects
    # the probe files: every checkpoint measured on the held-out records, by the -p detector
    steps = [0] + [s for s, _ in list_checkpoints(run)]
    for step in steps:
        result = json.loads((run / "checkpoint_test" / f"step_{step:07d}" / "results.json").read_text())
        assert result["detector"] == str(coco_run["owl"]) and result["settings"]["detector"] == str(coco_run["owl"])
        assert result["layouts"] == _ids(coco_run["heldout"], 2) != _ids(coco_run["train"], 2)
        assert result["held_out"] is True and result["grounding"]["n_objects"] == 4
        assert 0 <= result["grounding"]["success_rate"] <= 1


def test_the_colour_detector_on_phrases_with_no_colour_is_an_error_before_any_sampling(coco_run, monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(coco_run["runs"]))
    import adapterlib.model.sample
    monkeypatch.setattr(adapterlib.model.sample, "generate", lambda *a, **k: pytest.fail("sampled"))
    for detector in (None, "color"):                                  # the run names none: the colour detector
        with pytest.raises(ValueError, match=r"color detector can measure none of the 4 objects of 2 layouts of .*val.*\(e\.g\. 'dog'"):
            grounding_vs_step(coco_run["run"], n=2, detector=detector)


def test_evaluate_checkpoint_all_takes_the_detector(coco_run, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(coco_run["runs"]))
    assert main(["evaluate", "coco", "--checkpoint", "all", "--limit", "2", "--steps", "2",
                 "--detector", str(coco_run["owl"])]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["step"] for row in last["rows"]] == [0, 2, 4]
    assert all(row["n_objects"] == 4 and row["success_rate"] is not None for row in last["rows"])
    assert str(coco_run["heldout"]) in last["title"] and coco_run["owl"].name in last["title"]


def test_a_manifest_run_without_heldout_is_measured_on_its_training_records_and_says_so(coco_run, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    copy = tmp_path / "no-heldout"
    shutil.copytree(coco_run["run"], copy, ignore=shutil.ignore_patterns("checkpoint_test"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "heldout": ""}))
    layouts = run_layouts(copy, 2)
    assert layouts.held_out is False and layouts.source == f"{coco_run['train']} {NOT_HELD_OUT}"
    table = grounding_vs_step(copy, n=2, steps=2, detector=coco_run["owl"])
    assert NOT_HELD_OUT in table.attrs["title"] and table.n_objects.tolist() == [4, 4, 4]


def test_bad_heldout_or_detector_is_an_error_when_the_config_is_made(tmp_path, tiny_owl_folder):
    with pytest.raises(FileNotFoundError, match=r"heldout = '.*nope.jsonl'.* is not a file"):
        make_config("smoke", heldout=str(tmp_path / "nope.jsonl"))
    broken = tmp_path / "owl"
    shutil.copytree(tiny_owl_folder, broken)
    (broken / "model.safetensors").unlink()
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"detector folder {broken} lacks model.safetensors, "
                                                r"preprocessor_config.json"):
        make_config("smoke", detector=str(broken))
    with pytest.raises(FileNotFoundError, match="is not 'color' nor a folder"):
        make_config("smoke", detector=str(tmp_path / "missing"))
    make_config("smoke", heldout="v1", detector="color")               # the named sets and the colour detector


def test_heldout_and_detector_may_change_on_resume(coco_run, tmp_path):
    from adapterlib.training.train import resume_config
    assert {"heldout", "detector"} <= set(RESUME_FREE)
    cfg = resume_config(coco_run["run"], heldout="v2", detector=str(coco_run["owl"]))
    assert (cfg.heldout, cfg.detector) == ("v2", str(coco_run["owl"]))


# --- export --measure measures as `evaluate RUN` does (issue 32)

def _with_detector(coco_run, tmp_path, detector: str):
    """A copy of the COCO run whose config names `detector` (the runs root is tmp_path)."""
    copy = tmp_path / "with-detector"
    shutil.copytree(coco_run["run"], copy, ignore=shutil.ignore_patterns("checkpoint_test"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "detector": detector}))
    return copy


def test_export_measure_uses_the_runs_own_layouts_and_detector_and_names_them_in_the_card(coco_run, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    run = _with_detector(coco_run, tmp_path, str(coco_run["owl"]))
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--measure", "2", "--device", "cpu"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    measured = config["grounding_at_export"]
    assert measured["layouts"] == str(coco_run["heldout"]) and measured["n_layouts"] == 2
    assert measured["detector"] == str(coco_run["owl"]) and measured["n_objects"] == 4
    card = (out / "README.md").read_text()
    assert f"by the zero-shot detector `{coco_run['owl']}`" in card and "colour detector" not in card
    assert f"python -m adapterlib evaluate {run} --checkpoint 4 --limit 2`" in card      # evaluate's own choice
    # --detector and --layouts override the run's, as evaluate's do, and the card's command says so
    out2 = tmp_path / "export2"
    assert main(["export", "coco", "--out", str(out2), "--measure", "1", "--device", "cpu",
                 "--detector", str(coco_run["owl"]), "--layouts", str(coco_run["train"])]) == 2     # not a run here
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(coco_run["runs"]))
    assert main(["export", "coco", "--out", str(out2), "--measure", "1", "--device", "cpu",
                 "--detector", str(coco_run["owl"]), "--layouts", str(coco_run["train"])]) == 0
    measured = json.loads((out2 / "adapter_config.json").read_text())["grounding_at_export"]
    assert measured["layouts"] == str(coco_run["train"]) and measured["detector"] == str(coco_run["owl"])
    assert f"--layouts {coco_run['train']} --detector {coco_run['owl']}`" in (out2 / "README.md").read_text()
    capsys.readouterr()


def test_export_measure_with_a_detector_that_measures_nothing_is_an_error_before_the_base_loads(coco_run, tmp_path,
                                                                                                 monkeypatch, capsys):
    """The run names no detector: the colour detector, which finds no "dog"; refused before the SD base loads."""
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(coco_run["runs"]))
    import adapterlib.interop.export
    monkeypatch.setattr(adapterlib.interop.export, "load_run_base", lambda *a, **k: pytest.fail("loaded the base"))
    out = tmp_path / "export"
    assert main(["export", "coco", "--out", str(out), "--measure", "2"]) == 2
    err = capsys.readouterr().err
    assert "color detector can measure none of the 4 objects of 2 layouts of" in err and "val" in err
    assert not out.exists()
    assert main(["export", "coco", "--out", str(out), "--detector", str(coco_run["owl"])]) == 2    # without --measure
    assert "give --measure N too" in capsys.readouterr().err


def test_export_loads_on_the_same_device_as_evaluate_by_default():
    from adapterlib.__main__ import _parser
    assert _parser().parse_args(["export", "r", "--out", "x"]).device == "auto"
    assert _parser().parse_args(["evaluate", "r"]).device in (None, "auto")


def test_the_coco_mig_path_end_to_end_with_grounding_dino_and_sam_on_a_tiny_sd_base(coco_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """A COCO-imported layout file in MIG-Bench's format (each instance given a colour, as mig_bench_prepare does),
    measured the MIG way on the tiny-SD run: a tiny GroundingDINO finds each noun, a tiny SAM gives the colour check's
    region. COCO layouts have no ground-truth image: no ceiling rows, said by their absence."""
    from adapterlib.data.manifest import GroundedObject, Record, read_manifest
    from adapterlib.data.mig import write_mig
    from helpers import build_tiny_grounding_dino_folder, build_tiny_sam_folder
    colours = ["red", "blue", "green", "yellow", "black", "white", "brown"]
    records = [Record(r.caption, tuple(GroundedObject(f"{colours[(i + k) % 7]} {o.phrase}", o.box)
                                       for k, o in enumerate(r.objects)), id=r.id)
               for i, r in enumerate(read_manifest(coco_run["heldout"], require_image=False))]
    mig = write_mig(tmp_path / "coco_mig.json", records)
    gdino, sam = build_tiny_grounding_dino_folder(tmp_path / "gdino"), build_tiny_sam_folder(tmp_path / "sam")
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(coco_run["runs"]))
    capsys.readouterr()
    assert main(["evaluate", "coco", "--layouts", str(mig), "--detector", str(gdino), "--sam", str(sam),
                 "--limit", "2", "--sampling-steps", "2"]) == 0
    text = capsys.readouterr().out
    result = json.loads(text.strip().splitlines()[-1])
    n = sum(len(r.objects) for r in records[:2])
    assert result["protocol"] == "coco-mig" and result["color_region"] == "sam" and "colour checked on SAM masks" in text
    assert result["levels"]["average"]["n_instances"] == n and result["base_levels"]["average"]["n_instances"] == n
    assert "ground_truth_levels" not in result and result["ground_truth_success_rate"] is None
    for levels in (result["levels"], result["base_levels"]):
        assert all(0 <= v["isr"] <= 1 and 0 <= v["miou"] <= 1 for v in levels.values())
    assert result["detector"] == str(gdino)
