"""The headless job does what it is told: every parameter reaches the config (papermill and the
command line), one way to name and resume a run, progress in the terminal, the runs root."""
import ast
import json
import os
import subprocess
import sys

import nbformat
import pytest

from adapterlib.__main__ import main
from adapterlib.model.adapter import architecture_options, build_adapter
from adapterlib.options import ARCHITECTURE
from adapterlib.model.base import load_base
from adapterlib.evaluation.checks import CHECK_FIELDS
from adapterlib.training.config import FIELDS, PRESETS, RESUME_FIXED, RESUME_FREE, USER_PRESETS, TrainConfig, make_config
from adapterlib.paths import REPO_ROOT
from adapterlib.runs import latest_checkpoint, read_config
from helpers import NOTEBOOKS, papermill



@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(root))
    return root


# ---------------------------------------------------------------------------------------------
# the resume policy

def test_resume_partition_is_disjoint_and_covers_every_field():
    assert set(RESUME_FIXED).isdisjoint(RESUME_FREE)
    assert set(RESUME_FIXED) | set(RESUME_FREE) == set(FIELDS)
    assert len(RESUME_FIXED) + len(RESUME_FREE) == len(FIELDS)


def test_presets_name_only_fields():
    for name, values in PRESETS.items():
        assert set(values) <= set(FIELDS), name
        given = {"base_model": "models/sd"} if values.get("base_model") == "" else {}   # sd15, sdxl: none named
        make_config(name, **given)                           # and each one is a valid config


# ---------------------------------------------------------------------------------------------
# papermill: every -p reaches config.json

def test_papermill_fields_of_every_kind_reach_config_json(runs_root, tmp_path):
    given = dict(preset="smoke", run_name="pm", steps=6, lr=0.0005, batch_size=3, adapter_attention="cross",
                 adapter_feedforward=False, adapter_depth="learned", box_loss_weight=0.5, timesteps="cubic",
                 lr_schedule="cosine", data="shapes", save_every=3, log_every=2, n_samples=0, caption_dropout=0.25)
    done = papermill("02_train.ipynb", tmp_path / "out.ipynb", given)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = read_config(runs_root / "pm")
    assert {k: saved[k] for k in given} == given              # a float, ints, a string choice, a bool
    assert saved["n_train"] == PRESETS["smoke"]["n_train"]    # the rest from the preset
    assert latest_checkpoint(runs_root / "pm")[0] == 6
    assert "Passed unknown parameter" not in done.stderr        # papermill knows every field from the cell
    # progress went to the terminal papermill ran in, not only into the notebook
    assert "[train pm] step 6/6 (100%)" in done.stderr and "samples/s" in done.stderr and "ETA" in done.stderr


def test_papermill_unknown_parameter_is_an_error_naming_it(runs_root, tmp_path):
    done = papermill("02_train.ipynb", tmp_path / "out.ipynb", dict(preset="smoke", run_name="typo", learning_rate=0.1))
    assert done.returncode != 0
    assert "learning_rate" in done.stderr and "unknown parameter" in done.stderr
    assert not (runs_root / "typo").exists()                 # refused before any work


def test_papermill_sd15_preset_without_data_stops_and_says_what_to_give(runs_root, tmp_path, tiny_sd_folder):
    """The first real command without `-p data`: refused before any work (it used to train SD on Shapes)."""
    done = papermill("02_train.ipynb", tmp_path / "out.ipynb",
                     dict(preset="sd15", base_model=tiny_sd_folder, run_name="sd", steps=2))
    assert done.returncode != 0
    assert "data is empty: the 'sd15' preset trains on your data" in done.stderr, done.stderr[-3000:]
    assert not (runs_root / "sd").exists()


def test_papermill_base_notebook_retrains_on_the_world_it_is_given(tmp_path):
    """Notebook 00 with retrain: `-p world`, `-p steps`, `-p n_images` reach the base's training.json, and the
    notebook goes on with that base (a two-step base may then stop at the quality bar, and only there)."""
    out_dir = tmp_path / "base"
    done = papermill("00_base_model.ipynb", tmp_path / "out.ipynb", dict(
        retrain=True, steps=2, batch_size=2, n_images=24, world="shapes-v2", n_eval=2, out_dir=out_dir))
    assert done.returncode == 0 or "colour presence" in done.stderr, done.stderr[-3000:]
    config = json.loads((out_dir / "training.json").read_text())["config"]
    assert (config["world"], config["steps"], config["n_images"], config["batch_size"]) == ("shapes-v2", 2, 24, 2)
    outputs = [o.get("text", "") for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
               for o in c.get("outputs", [])]
    assert f"base: {out_dir}\n" in outputs


@pytest.mark.parametrize("notebook, own, names", [
    ("01_dtype_zero_init_check.ipynb", "preset", {"preset", *CHECK_FIELDS}), ("02_train.ipynb", "preset", {"preset", *FIELDS}),
    ("03_resume.ipynb", "run_name", {"run_name", *RESUME_FREE})])
def test_parameters_cells_list_every_field_they_take(notebook, own, names):
    """papermill learns a notebook's parameters from its parameters cell: each field is there (as None,
    "from the preset"), so `papermill --help-notebook` lists it and `-p` never warns."""
    assigned = _parameters(notebook)
    assert set(assigned) == names
    assert {k for k, v in assigned.items() if v is not None} == {own}      # every field: "not given"


def test_notebook_02_parameters_cell_is_the_configs_own_description_word_for_word():
    """Notebook 02's parameters cell is generated from TrainConfig's source (each field's comment there), so the two
    never drift; a field's comment changed in config.py without `python -m adapterlib.training.config` fails here."""
    from adapterlib.training.config import field_comments, parameters_cell
    nb = nbformat.read(NOTEBOOKS / "02_train.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == parameters_cell(), "run `python -m adapterlib.training.config` to regenerate the cell"
    import papermill                                         # papermill's own reading of the cell knows every field
    assert set(papermill.inspect_notebook(str(NOTEBOOKS / "02_train.ipynb"))) == {"preset", *FIELDS}
    comments = field_comments()
    assert set(comments) == set(FIELDS) and all(comments[f] for f in FIELDS), "every field is described in config.py"
    assert "learned" in " ".join(comments["adapter_depth"])        # the choices the config takes are the ones it names


def _parameters(notebook) -> dict:
    """The names the notebook's parameters cell assigns, with their values."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {}
    exec(cell.source, {}, assigned)
    return assigned


def _code_after_parameters(notebook) -> list[ast.Module]:
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    return [ast.parse(c.source) for c in nb.cells[at + 1:] if c.cell_type == "code"]


@pytest.mark.parametrize("notebook", ["00_base_model.ipynb", "06_throughput.ipynb"])
def test_own_parameters_are_the_ones_the_notebook_reads(notebook):
    """A notebook that builds no config: its parameters cell, the names `params.only` accepts and the names its
    code reads afterwards are the same set (no parameter that does nothing, none read that papermill cannot set)."""
    trees = _code_after_parameters(notebook)
    only = [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "only"]
    assert len(only) == 1
    accepted = set(ast.literal_eval(only[0].keywords[0].value))
    read = {node.id for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Load)}
    assert set(_parameters(notebook)) == accepted
    assert accepted <= read, f"parameters the notebook never reads: {sorted(accepted - read)}"


def test_notebook_01_parameters_are_what_its_checks_use():
    """01 takes the base, the adapter's architecture (each one reaches build_adapter through
    architecture_options), the data, device and precision: each is read from the config in its code."""
    trees = _code_after_parameters("01_dtype_zero_init_check.ipynb")
    read = {node.attr for tree in trees for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg"}
    calls = {node.func.id for tree in trees for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "architecture_options" in calls
    used = read | set(ARCHITECTURE)
    assert set(_parameters("01_dtype_zero_init_check.ipynb")) - {"preset"} <= used
    assert set(CHECK_FIELDS) <= used, f"fields 01 takes and never uses: {sorted(set(CHECK_FIELDS) - used)}"


def _config_cells(notebook):
    """The capture, parameters and config cells of a notebook, as code (the config cell calls params.config)."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    end = next(i for i, s in enumerate(code) if "params.config(" in s)
    return code[:end + 1]


def _run_config_cells(notebook, injected: str) -> dict:
    """The notebook's own cells up to its config, with `injected` as papermill's injected-parameters cell."""
    namespace = {}
    for i, source in enumerate(_config_cells(notebook)):
        exec(source.replace("print(", "(lambda *a, **k: None)("), namespace)
        if i == 1:                                           # capture cell, then the parameters cell
            exec(injected, namespace)
    return namespace


@pytest.mark.parametrize("notebook, injected, override", [
    ("01_dtype_zero_init_check.ipynb", "adapter_depth = 'learned'", dict(adapter_depth="learned")),
    ("02_train.ipynb", "steps = 25000", dict(steps=25000))])
def test_one_field_alone_gives_the_shapes_preset(notebook, injected, override, monkeypatch):
    """The notebook's own cells, with the cell papermill injects for `-p steps 25000` (01: `-p adapter_depth
    learned`), as a user runs them (no test harness preset): the shapes preset with only that field changed."""
    monkeypatch.delenv("ADAPTERLIB_DEFAULT_PRESET", raising=False)
    cfg = _run_config_cells(notebook, injected)["cfg"]
    expected = make_config("shapes", **override)
    assert {k: v for k, v in cfg.to_dict().items() if k != "run_name"} == \
        {k: v for k, v in expected.to_dict().items() if k != "run_name"}


def test_notebook_01_refuses_a_field_it_does_not_use():
    """`-p lr 0.1` (or `-p steps 25000`) to notebook 01 would change nothing it checks: an error naming it."""
    for injected, name in (("lr = 0.1", "lr"), ("steps = 25000", "steps")):
        with pytest.raises(ValueError, match=f"\\['{name}'\\] \\(\\['{name}'\\]: config fields this notebook does not use"):
            _run_config_cells("01_dtype_zero_init_check.ipynb", injected)


def test_papermill_architecture_fields_reach_the_adapter_notebook_01_builds(tmp_path):
    """`-p adapter_attention cross -p adapter_depth learned ...` to 01: the adapter it checks is the one a run with
    those fields trains (`tests/test_checks.py` holds a trained run's adapter to the same builder)."""
    given = dict(adapter_attention="cross", adapter_depth="learned", adapter_norm="rmsnorm", adapter_feedforward=True,
                 adapter_ff_mult=3, max_objects=4)
    done = papermill("01_dtype_zero_init_check.ipynb", tmp_path / "out.ipynb", given)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Passed unknown parameter" not in done.stderr
    printed = _outputs(tmp_path / "out.ipynb")
    line = next(l for l in printed.splitlines() if l.startswith("adapter: "))
    built = json.loads(line[len("adapter: "):])
    assert (built["attention"], built["depth"], built["norm"], built["feedforward"], built["ff_mult"],
            built["max_objects"]) == ("cross", "learned", "rmsnorm", True, 3, 4)
    adapter = build_adapter(load_base("shapes-tiny"), **architecture_options(make_config("smoke", **given)))
    assert built == {k: v for k, v in adapter.config.items() if k != "blocks"}
    assert "held-out layouts of shapes-v2" in printed and "all checks PASS" in printed


def test_papermill_notebook_01_on_an_sd_base_checks_with_the_manifest_captions(tmp_path, tiny_sd_folder):
    """On a Stable Diffusion base with `-p data MANIFEST`: the checks run on the manifest's captions and boxes,
    not on Shapes layouts."""
    from adapterlib.data.manifest import GroundedObject, Record, write_manifest
    manifest = write_manifest(tmp_path / "data.jsonl", [
        Record("a kayak on a lake", (GroundedObject("a kayak", (0.2, 0.5, 0.8, 0.7)),)),
        Record("a lamp beside a bed", (GroundedObject("a lamp", (0.0, 0.1, 0.3, 0.6)),
                                       GroundedObject("a bed", (0.3, 0.4, 1.0, 1.0))))])
    done = papermill("01_dtype_zero_init_check.ipynb", tmp_path / "out.ipynb",
                     dict(preset="sd15", base_model=tiny_sd_folder, data=manifest, mixed_precision="no"))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = _outputs(tmp_path / "out.ipynb")
    assert f"2 layouts: the first 2 records of {manifest}" in printed
    assert "'a kayak on a lake': ['a kayak']" in printed and "'a lamp beside a bed': ['a lamp', 'a bed']" in printed
    assert "held-out" not in printed                                             # and the sd15 preset's adapter:
    assert f'"attention": "{PRESETS["sd15"]["adapter_attention"]}"' in printed
    assert "all checks PASS" in printed


def _outputs(notebook) -> str:
    """Everything the executed notebook printed."""
    nb = nbformat.read(notebook, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_resume_notebook_extends_a_run_and_refuses_a_fixed_field(runs_root, tmp_path):
    assert main(["train", "--preset", "smoke", "--run_name", "nb3", "--steps", "4", "--save_every", "2",
                 "--n_samples", "0"]) == 0
    done = papermill("03_resume.ipynb", tmp_path / "out.ipynb", dict(run_name="nb3", steps=6))
    assert done.returncode == 0, done.stderr[-3000:]
    assert latest_checkpoint(runs_root / "nb3")[0] == 6
    assert read_config(runs_root / "nb3")["steps"] == 4      # config.json keeps the original values
    assert 'resume changes: {"steps": 6}' in (runs_root / "nb3" / "train.log").read_text()
    refused = papermill("03_resume.ipynb", tmp_path / "out2.ipynb", dict(run_name="nb3", lr=0.1))
    assert refused.returncode != 0 and "cannot change lr" in refused.stderr


# ---------------------------------------------------------------------------------------------
# the command line

def test_cli_train_and_resume_use_the_same_run_folder(runs_root, capsys):
    assert main(["train", "--preset", "smoke", "--run_name", "cli", "--steps", "4", "--save_every", "2",
                 "--lr", "0.002", "--adapter_feedforward", "false", "--n_samples", "0"]) == 0
    saved = read_config(runs_root / "cli")
    assert (saved["lr"], saved["adapter_feedforward"], saved["steps"], saved["preset"]) == (0.002, False, 4, "smoke")
    assert main(["train", "--resume", "cli", "--steps", "6"]) == 0
    assert latest_checkpoint(runs_root / "cli")[0] == 6
    log = (runs_root / "cli" / "train.log").read_text()
    assert 'resume changes: {"steps": 6}' in log and "resumed at step 4 of 6" in log
    capsys.readouterr()
    assert main(["train", "--resume", "cli", "--adapter_attention", "self"]) == 2
    assert "cannot change adapter_attention" in capsys.readouterr().err
    assert main(["train", "--preset", "smoke", "--run_name", "cli"]) == 2          # exists: resume it
    assert "resume" in capsys.readouterr().err


def test_train_help_gives_each_presets_own_value_of_every_field(monkeypatch, capsys):
    """`train --help` names, for each field, the value each user preset starts from (the config `make_config`
    builds), not the dataclass default the shapes preset overrides (lr_schedule, box_loss_region, ...)."""
    import dataclasses
    import re
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    entries = re.split(r"\n  (?=--)", capsys.readouterr().out)
    helps = {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries if e.startswith("--")}
    presets = USER_PRESETS
    needed = {"base_model": "models/sd", "data": "data.jsonl"}          # the sd15, sdxl and sd3 presets name none
    configs = {p: make_config(p, **{k: v for k, v in needed.items() if PRESETS[p].get(k) == ""}) for p in presets}
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        text = helps[f"--{f.name}"].split("default: the preset's: ", 1)[1]
        text, relative = text.split("; a relative path is the working directory's", 1) if "; a relative" in text \
            else (text, None)
        assert (relative is not None) == (f.name in ("base_model", "data", "heldout", "detector", "init_from")), f.name
        said = {}
        for group in text.split("; "):
            name = "(?:" + "|".join(map(re.escape, presets)) + ")"
            names, value = re.match(rf"^({name}(?:, {name})*) (.*)$", group).groups()
            said.update({name: value for name in names.split(", ")})
        assert set(said) == set(presets), (f.name, text)
        for preset in presets:
            value = PRESETS[preset].get(f.name, f.default)
            if f.name != "run_name":                                     # made at run time from the date
                actual = getattr(configs[preset], f.name)
                assert value == actual or (value == "" and f.name in needed), (preset, f.name, value, actual)
            assert said[preset] == ("'' (none: give one)" if value == "" and f.name in needed else repr(value)), \
                (preset, f.name, said[preset])
            checked += 1
    assert checked > 100
    # the fields the shapes preset overrides say its value, not the dataclass default
    assert helps["--lr_schedule"].endswith("default: the preset's: shapes, sd15, sdxl, shapes-dit, sd3, shapes-flux, "
                                           "flux 'cosine'")
    assert helps["--box_loss_region"].endswith("default: the preset's: shapes, shapes-dit, shapes-flux 'layered'; sd15, "
                                               "sdxl, sd3, flux 'box'")
    assert helps["--adapter_blocks"].endswith("default: the preset's: shapes, sd15, sdxl 'decoder'; shapes-dit, sd3, "
                                              "shapes-flux, flux 'middle'")
    assert helps["--adapter_ff_mult"].endswith("default: the preset's: shapes, shapes-dit, shapes-flux, flux 2; sd15, "
                                               "sdxl, sd3 4")
    assert helps["--timesteps"].endswith("default: the preset's: shapes, sd15, sdxl, shapes-dit, shapes-flux 'uniform'; "
                                         "sd3, flux 'logit-normal'")
    assert "default: the preset's: shapes 'shapes-tiny'; sd15, sdxl, sd3, flux '' (none: give one); shapes-dit " \
           "'shapes-dit'; shapes-flux 'shapes-flux'" in helps["--base_model"]


def test_import_and_train_run_from_another_directory_meet_on_the_same_relative_path(tmp_path, monkeypatch, capsys):
    """On the command line a relative path is the working directory's, for the paths `import` writes and those
    `train` reads alike; one that exists only under the repository root is still found there."""
    from helpers import write_coco_fixture
    runs = tmp_path / "runs"
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(runs))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_coco_fixture(work / "coco", n=4)
    assert main(["import", "coco", "--instances", "coco/instances.json", "--images", "coco/images",
                 "--captions", "coco/captions.json", "--out", "data/coco"]) == 0
    assert (work / "data" / "coco" / "data.jsonl").is_file() and not (REPO_ROOT / "data" / "coco").exists()
    assert main(["train", "--preset", "smoke", "--data", "data/coco/data.jsonl", "--run_name", "met", "--steps", "1",
                 "--save_every", "1", "--batch_size", "2", "--n_samples", "0", "--box_loss_region", "box"]) == 0
    assert read_config(runs / "met")["data"] == str(work / "data" / "coco" / "data.jsonl")   # the file it read
    capsys.readouterr()
    # a path of the checkout, given from elsewhere: found under the repository root (the fallback)
    assert main(["evaluate", "--reference", "ground-truth", "--layouts", "adapterlib/shapes/heldout_v2.jsonl",
                 "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layouts"] == \
        str(REPO_ROOT / "adapterlib" / "shapes" / "heldout_v2.jsonl")
    # a missing one is named as the user meant it: in the working directory
    assert main(["train", "--preset", "smoke", "--data", "data/nope.jsonl", "--run_name", "nope"]) == 2
    assert str(work / "data" / "nope.jsonl") in capsys.readouterr().err


def test_cli_unknown_flag_and_bad_value_are_errors(runs_root):
    for argv in (["--preset", "smoke", "--learning_rate", "0.1"], ["--preset", "smoke", "--lr", "fast"],
                 ["--preset", "smoke", "--adapter_feedforward", "maybe"]):
        with pytest.raises(SystemExit) as stop:
            main(["train", *argv])
        assert stop.value.code == 2
    assert not runs_root.exists()


def test_cli_prints_progress_and_writes_nothing_to_repo_runs(runs_root):
    before = sorted(p.name for p in (REPO_ROOT / "runs").iterdir())
    done = subprocess.run([sys.executable, "-m", "adapterlib", "train", "--preset", "smoke", "--run_name", "p",
                           "--steps", "3", "--n_samples", "0", "--progress-every", "0"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.splitlines() if l.startswith("[train p] step")]
    assert [l.split()[3] for l in lines] == ["1/3", "2/3", "3/3"]
    assert all("loss" in l and "gate" in l and "samples/s" in l and "ETA" in l for l in lines)
    assert (runs_root / "p" / "final" / "adapter.safetensors").is_file()
    assert sorted(p.name for p in (REPO_ROOT / "runs").iterdir()) == before


# ---------------------------------------------------------------------------------------------
# a run killed before its first checkpoint

def test_a_run_killed_before_its_first_checkpoint_starts_again(runs_root):
    from adapterlib.training.train import train
    killed = runs_root / "early"
    killed.mkdir(parents=True)                    # what a run killed at step 3 of 10 (save_every 5) leaves
    cfg = make_config("smoke", run_name="early", steps=4, save_every=2, n_samples=0)
    (killed / "config.json").write_text(json.dumps(cfg.to_dict()))
    (killed / "metrics.csv").write_text("step,loss\n1,0.1\n")
    (killed / "train.log").write_text("started at step 0 of 4 on cpu\n")
    train(cfg, progress=False)
    log = (killed / "train.log").read_text()
    assert "has no complete checkpoint: starting again from step 0" in log
    assert latest_checkpoint(killed)[0] == 4
    # and through --resume too
    other = runs_root / "early2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg.to_dict(), "run_name": "early2"}))
    assert main(["train", "--resume", "early2"]) == 0
    assert latest_checkpoint(other)[0] == 4


def test_a_run_given_by_path_outside_the_runs_root_resumes_in_place(runs_root, tmp_path):
    path = tmp_path / "elsewhere" / "mine"
    assert main(["train", "--preset", "smoke", "--run_name", str(path), "--steps", "2", "--save_every", "2",
                 "--n_samples", "0"]) == 0
    assert main(["train", "--resume", str(path), "--steps", "4"]) == 0
    assert latest_checkpoint(path)[0] == 4
    assert sorted(p.name for p in runs_root.iterdir()) == ["_cache", "_datasets"]   # shared: the Shapes set, its encodings
