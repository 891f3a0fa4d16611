"""Training, checkpoints and resume on tiny CPU runs (a few steps each)."""
import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from adapterlib.__main__ import main
from adapterlib.training.checkpoint import load_adapter
from adapterlib.training.config import TrainConfig, make_config
from adapterlib.runs import latest_checkpoint, list_checkpoints
from adapterlib.training.train import resume_config, train

TINY = dict(steps=6, batch_size=2, n_train=16, save_every=4, log_every=1, n_samples=0, warmup=2)


def tiny(name, **kw):
    return make_config("shapes", run_name=name, **{**TINY, **kw})


def weights(run_dir):
    return load_file(str(run_dir / "final" / "adapter.safetensors"))


def test_resume_matches_uninterrupted_run(runs):
    whole = train(tiny("whole"), progress=False)
    with pytest.raises(KeyboardInterrupt):              # stop between checkpoints (save_every=4)
        train(tiny("split"), progress=False, stop_at_step=3)
    split = train(resume_config(runs / "split"), resume=True, progress=False)
    a, b = weights(whole), weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different adapter weights"
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "gate" in k)   # it trained
    metrics = pd.read_csv(split / "metrics.csv")
    assert metrics.step.tolist() == list(range(1, 7)), "metrics.csv has duplicated or missing steps"
    assert pd.read_csv(whole / "metrics.csv").loss.tolist() == metrics.loss.tolist()


def test_interrupt_writes_a_checkpoint(runs):
    with pytest.raises(KeyboardInterrupt):
        train(tiny("stopped"), progress=False, stop_at_step=3)
    assert latest_checkpoint(runs / "stopped")[0] == 3
    assert not list((runs / "stopped" / "checkpoints").glob("*.tmp"))


def test_sigterm_writes_a_checkpoint(runs):
    def send_sigterm(run_dir):                          # called after logging step 2
        if pd.read_csv(run_dir / "metrics.csv").step.max() == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(tiny("termed"), progress=False, on_log=send_sigterm)
    assert [s for s, _ in list_checkpoints(runs / "termed")] == [2]


def test_resume_refuses_an_architecture_change_naming_the_field(runs):
    train(tiny("arch", steps=4), progress=False)
    with pytest.raises(ValueError, match="adapter_attention"):
        resume_config(runs / "arch", adapter_attention="self")
    changed = TrainConfig(**{**json.loads((runs / "arch" / "config.json").read_text()), "adapter_norm": "rmsnorm"})
    with pytest.raises(ValueError, match="adapter_norm"):
        train(changed, resume=True, progress=False)


def test_resume_can_extend_steps(runs):
    train(tiny("extend", steps=4), progress=False)
    train(resume_config(runs / "extend", steps=6), resume=True, progress=False)
    assert latest_checkpoint(runs / "extend")[0] == 6


def test_an_existing_run_is_not_overwritten(runs):
    train(tiny("once", steps=2), progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny("once", steps=2), progress=False)


def test_wrong_parameter_type_is_an_error_not_a_cast():
    with pytest.raises(TypeError, match="steps"):
        make_config("shapes", steps="100")
    with pytest.raises(TypeError, match="lr"):
        make_config("shapes", lr="1e-3")
    assert make_config("shapes", lr=1).lr == 1                 # papermill's `-p lr 1` is an int: fine
    with pytest.raises(ValueError, match=r"unknown parameter\(s\)"):
        make_config("shapes", learning_rate=1e-3)


def test_sd15_preset_keeps_the_seed_plan_values():
    cfg = make_config("sd15", base_model="models/sd15")
    assert (cfg.batch_size, cfg.lr, cfg.phrase_dropout, cfg.scale_min, cfg.scale_max, cfg.save_every, cfg.steps) == \
        (2, 1e-4, 0.1, 0.5, 1.0, 2000, 25_000)


def test_checkpoint_loads_back_into_an_adapter_and_the_cli_evaluates_it(runs, capsys):
    run = train(tiny("evaluated", steps=4), progress=False)
    from adapterlib.model.base import load_base
    adapter = load_adapter(latest_checkpoint(run)[1], load_base())
    saved = load_file(str(run / "final" / "adapter.safetensors"))
    assert all(torch.equal(p.detach(), saved[n]) for n, p in adapter.trainable_parameters().items())
    assert main(["evaluate", str(run), "--limit", "2", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["n_images"] == 2 and result["ground_truth_success_rate"] == 1.0
    assert result["grounding_guidance"] == "base"


def test_cli_grounding_guidance_flag_reaches_the_sampler(runs, capsys, monkeypatch):
    from adapterlib.model import sample
    run = train(tiny("guided", steps=2, n_samples=0), progress=False)
    seen, original = [], sample.denoise

    def recording(base, records, latents, sampling, *, adapter=None, **kwargs):
        seen.append((adapter is not None, sampling.grounding_guidance, sampling.steps))
        return original(base, records, latents, sampling, adapter=adapter, **kwargs)
    monkeypatch.setattr(sample, "denoise", recording)
    # today's values, and `on`, the earlier name of `base` (a note on stderr); --steps, the earlier --sampling-steps
    for flag, value, steps in (("off", "off", "--sampling-steps"), ("null", "null", "--sampling-steps"),
                               ("on", "base", "--steps")):
        seen.clear()
        assert main(["evaluate", str(run), "--limit", "2", steps, "2", "--grounding-guidance", flag]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out.strip().splitlines()[-1])["grounding_guidance"] == value
        assert (True, value, 2) in seen                  # the adapter's images were sampled with it
        assert all(s == 2 for _, _, s in seen)
        assert ("--grounding-guidance on is --grounding-guidance base" in err) == (flag == "on")
        assert ("--steps is --sampling-steps" in err) == (steps == "--steps")
    with pytest.raises(SystemExit):                      # argparse refuses another value
        main(["evaluate", str(run), "--limit", "2", "--grounding-guidance", "grounded"])
    assert "invalid choice: 'grounded'" in capsys.readouterr().err


def test_training_and_sampling_go_through_the_module_forward(runs, monkeypatch):
    """Every training step (and every grounded sampling step) calls AdaptedUNet.forward: the work
    DDP/Accelerate would synchronise and torch.compile would compile starts in that module."""
    from adapterlib.model.adapter import AdaptedUNet
    calls = []
    original = AdaptedUNet.forward

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)
    monkeypatch.setattr(AdaptedUNet, "forward", counting)
    train(tiny("through-forward", steps=3, save_every=3, n_samples=1), progress=False)
    assert calls[:3] == [True, True, True]                    # the 3 training steps, with gradients
    assert len(calls) == 3 + 25 and not any(calls[3:])        # then the checkpoint's sample: 25 DDIM steps


def test_box_loss_is_the_mean_over_objects_of_the_error_inside_each_box():
    from adapterlib.model.adapter import Grounding
    from adapterlib.training.losses import box_loss
    # a 4x4 error map, one channel: 1 everywhere, 9 in the top-left 2x2; objects: that quarter, the whole image
    pred, target = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    pred[..., :2, :2] = 3.0
    g = Grounding(phrases=torch.zeros(1, 3, 8), boxes=torch.tensor([[[0, 0, 0.5, 0.5], [0, 0, 1, 1], [0, 0, 0.1, 0.1]]]),
                  present=torch.tensor([[True, True, False]]), keep_text=torch.ones(1, 3, dtype=torch.bool))
    whole = (4 * 9 + 12 * 1) / 16                                       # 3.0, the image's MSE
    assert box_loss(pred, target, g).item() == pytest.approx((9.0 + whole) / 2)   # padding not counted
    # the small object weighs as much as the whole image, where the image's MSE gives it a quarter
    assert torch.nn.functional.mse_loss(pred, target).item() == pytest.approx(whole)


def test_box_loss_weight_reaches_training(runs):
    assert TrainConfig().box_loss_weight == 1.0 and make_config("sd15", base_model="sd").box_loss_weight == 1.0
    for name, weight in (("plain", 0.0), ("default", None), ("double", 2.0)):
        train(tiny(name, steps=3) if weight is None else tiny(name, steps=3, box_loss_weight=weight))
    plain, default, double = (weights(runs / name) for name in ("plain", "default", "double"))
    assert any(not torch.equal(plain[k], default[k]) for k in plain)
    assert any(not torch.equal(default[k], double[k]) for k in plain)


def test_box_loss_region_visible_judges_an_object_on_its_own_pixels_and_reaches_training(runs, monkeypatch):
    from adapterlib.training import losses, step as step_module
    from adapterlib.model.adapter import Grounding
    from adapterlib.training.batches import Batch
    # error 9 in the top-left 2x2, 1 elsewhere; one object whose box is the whole image but shows only that corner
    pred, target = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    pred[..., :2, :2] = 3.0
    g = Grounding(phrases=torch.zeros(1, 1, 8), boxes=torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]),
                  present=torch.ones(1, 1, dtype=torch.bool), keep_text=torch.ones(1, 1, dtype=torch.bool))
    corner = torch.zeros(1, 16, 1, dtype=torch.bool)
    corner[0, [0, 1, 4, 5], 0] = True
    assert losses.box_loss(pred, target, g).item() == pytest.approx(3.0)           # the box: the image's mean
    assert losses.box_loss(pred, target, g, region=corner).item() == pytest.approx(9.0)
    # on a rendered overlap: the visible region is each object's own colour; the exclusive one adds the background
    # inside its box and leaves out what the other object shows there
    from adapterlib import shapes
    layout = shapes.Layout(0, 32, (shapes.ShapeObject("red", "square", (0, 0, 16, 16)),
                                   shapes.ShapeObject("blue", "circle", (8, 8, 20, 20))))
    image, record = shapes.render(layout), shapes.to_record(layout)
    two = Grounding(phrases=torch.zeros(1, 2, 8), boxes=torch.tensor([[o.box for o in record.objects]]),
                    present=torch.ones(1, 2, dtype=torch.bool), keep_text=torch.ones(1, 2, dtype=torch.bool))
    batch = Batch(records=[record], pixels=torch.from_numpy(image[None].copy()))
    own, excl, layered = (losses.visible_region(batch, two, (32, 32), r)[0].T.reshape(2, 32, 32).numpy()
                          for r in ("visible", "exclusive", "layered"))
    red, blue = ((image == shapes.COLORS[c]).all(-1) for c in ("red", "blue"))
    background = (image == shapes.BACKGROUND).all(-1)
    assert (own[0] == red).all() and (own[1] == blue).all() and 0 < red[8:16, 8:16].sum() < 64
    box0, box1 = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    for box, obj in zip((box0, box1), record.objects):
        x0, y0, x1, y1 = (round(v * 32) for v in obj.box)
        box[y0:y1, x0:x1] = True
    assert (excl[0] == box0 & ~blue).all() and (excl[1] == box1 & ~red).all() and (excl[1] & background).any()
    # layered: the red square, hidden in part by the smaller circle in front, is judged on its own pixels; the
    # circle, which nothing hides, on its box less the red pixels there (exclusive)
    assert (layered[0] == own[0]).all() and (layered[1] == excl[1]).all() and (excl[1] != own[1]).any()
    with pytest.raises(ValueError, match="box_loss_region 'visible' needs a pixel base"):
        losses.visible_region(Batch(records=[], mean=torch.zeros(1, 4, 4, 4)), g, (4, 4))
    with pytest.raises(ValueError, match="box_loss_region"):
        TrainConfig(box_loss_region="mask")
    # a phrase naming no colour stops the run before any step, naming the record and the object
    manifest = shapes.write_dataset(runs / "data", n=4)
    lines = manifest.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["objects"][0]["phrase"] = "a thing"
    manifest.write_text("\n".join(lines[:2] + [json.dumps(bad)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"object 0: phrase 'a thing' names no palette colour"):
        train(tiny("colourless", data=str(manifest), n_train=4, box_loss_region="exclusive"), progress=False)
    assert not list((runs / "colourless").glob("checkpoints/*"))
    shapeless = dict(bad, objects=[dict(bad["objects"][0], phrase="a red thing")] + bad["objects"][1:])
    manifest.write_text("\n".join(lines[:2] + [json.dumps(shapeless)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"object 0: phrase 'a red thing' names no shape"):
        train(tiny("shapeless", data=str(manifest), n_train=4, box_loss_region="layered"), progress=False)
    assert not list((runs / "shapeless").glob("checkpoints/*"))
    # with no box loss the region is unused: nothing is refused
    train(tiny("unweighted", data=str(manifest), n_train=4, steps=1, box_loss_region="layered", box_loss_weight=0.0),
          progress=False)
    # the field reaches the loop: each step's box loss gets the visible pixels, and the weights differ from the box's
    seen = []
    real = step_module.visible_region
    monkeypatch.setattr(step_module, "visible_region", lambda *a: seen.append(real(*a)) or seen[-1])
    run = train(tiny("visible", steps=2, box_loss_region="visible"))
    assert len(seen) == 2 and seen[0].shape[1] == 32 * 32 and seen[0].any()
    assert json.loads((run / "config.json").read_text())["box_loss_region"] == "visible"
    train(tiny("box", steps=2, box_loss_region="box"))
    visible, box = weights(runs / "visible"), weights(runs / "box")
    assert any(not torch.equal(visible[k], box[k]) for k in box)


def test_cubic_timesteps_put_most_steps_at_high_noise_and_the_field_reaches_training(runs, monkeypatch):
    from adapterlib.training import losses, step as step_module
    g = torch.Generator().manual_seed(0)
    uniform, cubic = (losses.draw_timesteps(rule, 20_000, 1000, g) for rule in ("uniform", "cubic"))
    for t in (uniform, cubic):
        assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 999
    assert (uniform >= 500).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (cubic >= 500).float().mean().item() == pytest.approx(0.5 ** (1 / 3), abs=0.02)   # P(u^3 <= 1/2)
    with pytest.raises(ValueError, match="timesteps"):
        TrainConfig(timesteps="late")
    drawn = []
    real = step_module.draw_timesteps
    monkeypatch.setattr(step_module, "draw_timesteps", lambda rule, *a: drawn.append(rule) or real(rule, *a))
    run = train(tiny("cubic", steps=2, timesteps="cubic"))
    assert drawn == ["cubic", "cubic"]
    assert json.loads((run / "config.json").read_text())["timesteps"] == "cubic"


def test_cosine_lr_schedule_decays_to_zero_and_the_field_reaches_training(runs):
    from adapterlib.training.losses import lr_factor
    cfg = TrainConfig(steps=1100, warmup=100, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.01) and lr_factor(99, cfg) == lr_factor(100, cfg) == 1.0
    assert lr_factor(600, cfg) == pytest.approx(0.5) and lr_factor(1100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(600, TrainConfig(steps=1100, warmup=100)) == 1.0          # the default stays constant
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    for name in ("constant", "cosine"):
        train(tiny(name, lr_schedule=name))
    lr = {name: pd.read_csv(runs / name / "metrics.csv").set_index("step")["lr"] for name in ("constant", "cosine")}
    peak = tiny("x").lr
    assert (lr["constant"].loc[2:] == peak).all()
    assert lr["cosine"].loc[2] == pytest.approx(peak) and lr["cosine"].loc[4] == pytest.approx(peak / 2)
    assert lr["cosine"].loc[6] == pytest.approx(0.0, abs=1e-12) and lr["cosine"].loc[2:].is_monotonic_decreasing
    assert json.loads((runs / "cosine" / "config.json").read_text())["lr_schedule"] == "cosine"


def test_the_shapes_recipe_decays_its_rate_and_an_older_run_resumes_at_the_constant_one(runs):
    assert make_config("shapes").lr_schedule == "cosine"            # the default run's recipe (README)
    assert make_config("shapes").box_loss_region == "layered"
    assert make_config("sd15", base_model="sd").lr_schedule == "cosine"              # docs/notes/recipe.md
    assert make_config("sd15", base_model="sd").box_loss_region == "box"
    folder = train(tiny("before-schedules", steps=4, save_every=2, warmup=1, lr_schedule="constant",
                        box_loss_region="box"), progress=False)
    saved = json.loads((folder / "config.json").read_text())
    del saved["lr_schedule"], saved["box_loss_region"]   # as a version before the fields were written
    (folder / "config.json").write_text(json.dumps(saved))
    old = resume_config(runs / "before-schedules", steps=6)
    assert (old.lr_schedule, old.box_loss_region) == ("constant", "box")
    train(resume_config(runs / "before-schedules", steps=6), resume=True, progress=False)
    lr = pd.read_csv(folder / "metrics.csv").set_index("step")["lr"]
    assert (lr.loc[2:] == tiny("x").lr).all()            # no decay after the resume either


def test_compiled_training_pads_every_batch_to_max_objects_and_trains(runs, monkeypatch):
    """`compile true` on the Shapes world, whose batches hold different object counts: every batch is padded to
    max_objects slots (one shape, one compile; inductor's dynamic shapes stopped this run at its first backward
    before), and the compiled model trains."""
    import shutil

    from adapterlib.model.adapter import Grounding
    from adapterlib.data.manifest import GroundedObject, Record
    records = [Record(f"{k} objects", tuple(GroundedObject("red square", (0.1 * i, 0, 0.1 * i + 0.1, 0.1))
                                            for i in range(k))) for k in (1, 3)]
    padded = Grounding.from_records(records, torch.ones(4, 8), pad_to=5)
    assert padded.phrases.shape == (2, 5, 8) and padded.present.sum(1).tolist() == [1, 3]
    assert Grounding.from_records(records, torch.ones(4, 8)).phrases.shape == (2, 3, 8)    # uncompiled: the batch's
    with pytest.raises(ValueError, match="3 objects, more than the 2 slots"):
        Grounding.from_records(records, torch.ones(4, 8), pad_to=2)
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    seen, original = [], Grounding.from_records.__func__

    def spy(cls, *args, **kw):
        out = original(cls, *args, **kw)
        seen.append((max(len(r.objects) for r in args[0]), out.phrases.shape[1]))
        return out
    monkeypatch.setattr(Grounding, "from_records", classmethod(spy))
    run = train(tiny("compiled", steps=3, batch_size=2, max_objects=6, compile=True), progress=False)
    assert len({most for most, _ in seen}) > 1, "the batches should hold different object counts"
    assert {slots for _, slots in seen} == {6}
    assert pd.read_csv(run / "metrics.csv").step.tolist() == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["compile"] is True
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights(run).items() if "gate" in k)
