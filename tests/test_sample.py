"""Sampling is seeded per image, and the command line prints a parseable summary."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapterlib import shapes
from adapterlib.__main__ import main
from adapterlib.shapes.tiny_base import build_tiny_base
from adapterlib.model.sample import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def untrained_base():
    return build_tiny_base(seed=0).freeze()


def test_sampling_is_seeded_and_reproducible(untrained_base):
    records = shapes.heldout_records(3)
    first = generate(untrained_base, records, [0, 1, 2], steps=2)
    assert first.shape == (3, shapes.RESOLUTION, shapes.RESOLUTION, 3) and first.dtype == np.uint8
    assert np.array_equal(first, generate(untrained_base, records, [0, 1, 2], steps=2))
    # another seed changes that image
    assert not np.array_equal(first[0], generate(untrained_base, records[:1], [7], steps=2)[0])
    # an image does not depend on the batch it was generated in: same noise, same image; CPU kernels
    # may sum in another order at another batch size, which can move a pixel by one level at most
    alone = generate(untrained_base, records[2:], [2], steps=2)[0]
    assert np.abs(first[2].astype(int) - alone).max() <= 1


def _last_line_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_ground_truth_prints_json_last_line():
    out = subprocess.run([sys.executable, "-m", "adapterlib", "evaluate", "--reference", "ground-truth",
                          "--limit", "20"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = _last_line_json(out.stdout)
    assert result["reference"] == "ground-truth" and result["n_images"] == 20
    assert result["success_rate"] >= 0.98 and result["n_objects"] > 0
    assert {"success_rate", "miou", "color_presence", "n_objects"} <= result.keys()


def test_cli_ground_truth_reads_a_manifest(tmp_path, capsys):
    manifest = shapes.write_dataset(tmp_path / "data", n=5, seed=3)
    assert main(["evaluate", "--reference", "ground-truth", "--manifest", str(manifest)]) == 0
    result = _last_line_json(capsys.readouterr().out)
    assert result["n_images"] == 5 and result["success_rate"] == 1.0 and result["layouts"] == str(manifest)


def test_cli_base_reference_samples_the_given_folder(tiny_sd_folder, capsys):
    # a real base names its layouts and detector (here the Shapes ones, on purpose); without them: an error first
    assert main(["evaluate", "--reference", "base", "--base", str(tiny_sd_folder), "--limit", "2"]) == 2
    assert "--reference base on --base" in capsys.readouterr().err
    code = main(["evaluate", "--reference", "base", "--base", str(tiny_sd_folder), "--limit", "2",
                 "--sampling-steps", "2", "--device", "cpu", "--layouts", "v2", "--detector", "color"])
    assert code == 0
    result = _last_line_json(capsys.readouterr().out)
    assert result["reference"] == "base" and result["n_images"] == 2 and result["steps"] == 2
    assert 0.0 <= result["success_rate"] <= 1.0


@pytest.mark.parametrize("flag", ["--sampling-steps", "--steps"])
def test_cli_sampling_steps_reach_the_sampler_and_steps_is_its_earlier_name(flag, tmp_path, monkeypatch, capsys):
    from adapterlib.model import sample
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))       # an empty base cache: the base is sampled
    seen, original = [], sample.denoise

    def recording(base, records, latents, sampling, **kwargs):
        done = []                                      # the steps the loop really ran
        images = original(base, records, latents, sampling, callback=lambda i, t, x: done.append(i), **kwargs)
        seen.append((sampling.steps, len(done)))
        return images
    monkeypatch.setattr(sample, "denoise", recording)
    assert main(["evaluate", "--reference", "base", "--limit", "2", flag, "3"]) == 0
    out, err = capsys.readouterr()
    assert seen == [(3, 3)]
    assert _last_line_json(out)["steps"] == 3
    assert ("--steps is --sampling-steps" in err) == (flag == "--steps")
    if flag == "--steps":
        assert main(["evaluate", "--reference", "base", "--limit", "2"]) == 0       # the default: 25
        assert seen[-1] == (25, 25) and "--sampling-steps" not in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_sampling_runs_on_a_bf16_base(untrained_base):
    import copy

    import torch

    from adapterlib.model.adapter import build_adapter
    from adapterlib.shapes import heldout_records
    base = copy.deepcopy(untrained_base).to(dtype=torch.bfloat16)
    records = heldout_records(2)
    adapter = build_adapter(base)
    images = generate(base, records, [0, 1], adapter=adapter, steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"


def test_grounding_guidance_is_the_default_and_its_unconditional_branch_is_the_base_alone(base, open_adapter):
    from adapterlib.model.sample import Sampling
    assert Sampling().grounding_guidance == "base"
    records, seeds = shapes.heldout_records(3), [0, 1, 2]
    # guidance 0 keeps only the unconditional prediction: with grounding guidance "base" it is the base's own
    # (empty caption, no adapter), so the images are the base alone's; "off" and "null" ground it, so they differ
    base_alone = generate(base, records, seeds, steps=3, guidance=0.0)
    on = generate(base, records, seeds, adapter=open_adapter, steps=3, guidance=0.0)
    off = generate(base, records, seeds, adapter=open_adapter, steps=3, guidance=0.0, grounding_guidance="off")
    null = generate(base, records, seeds, adapter=open_adapter, steps=3, guidance=0.0, grounding_guidance="null")
    assert np.array_equal(on, base_alone)
    assert not np.array_equal(off, base_alone) and not np.array_equal(null, base_alone)
    assert not np.array_equal(null, off)              # null objects are not the layout's objects
    # guidance 1 keeps only the conditional prediction, grounded in every mode: the same images
    one = {mode: generate(base, records, seeds, adapter=open_adapter, steps=3, guidance=1.0, grounding_guidance=mode)
           for mode in ("base", "off", "null")}
    assert np.abs(one["base"].astype(int) - one["off"]).max() <= 1     # batch n vs 2n: one level of rounding at most
    assert np.abs(one["base"].astype(int) - one["null"]).max() <= 1
    # at the default guidance the three modes are different samplers
    three = {mode: generate(base, records, seeds, adapter=open_adapter, steps=3, grounding_guidance=mode)
             for mode in ("base", "off", "null")}
    assert not np.array_equal(three["base"], three["off"]) and not np.array_equal(three["base"], three["null"])


def test_the_earlier_boolean_grounding_guidance_still_works_with_a_warning(base, open_adapter):
    from adapterlib.model.sample import Sampling
    for old, new in ((True, "base"), (False, "off")):
        with pytest.warns(DeprecationWarning, match=f"grounding_guidance={old} is grounding_guidance='{new}'"):
            assert Sampling(grounding_guidance=old).grounding_guidance == new
    records, seeds = shapes.heldout_records(2), [0, 1]
    with pytest.warns(DeprecationWarning):
        old_off = generate(base, records, seeds, adapter=open_adapter, steps=2, grounding_guidance=False)
    assert np.array_equal(old_off, generate(base, records, seeds, adapter=open_adapter, steps=2,
                                            grounding_guidance="off"))


@pytest.mark.parametrize("settings, message", [
    (dict(steps=0), r"steps = 0: give at least 1 denoising step"),
    (dict(tau=1.5), r"tau = 1.5: give a share of the steps in \[0, 1\]"),
    (dict(scale=-0.5), r"scale = -0.5: give a scale >= 0"),
    (dict(grounding_guidance="on"), r"grounding_guidance = 'on': choose one of \('base', 'null', 'off'\)"),
])
def test_the_sampling_settings_are_checked_in_one_place(settings, message):
    from adapterlib.model.sample import Sampling
    with pytest.raises(ValueError, match=message):
        Sampling.of(**settings)
