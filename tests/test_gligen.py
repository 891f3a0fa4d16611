"""The `gligen` variant (diffusers' own GLIGEN modules on our frozen base), its weights out (`export`) and in
(`init_from`, `evaluate --gligen`), on the shipped tiny base and a tiny SD folder built from configs."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionGLIGENPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from adapterlib.__main__ import main
from adapterlib.model.adapter import AdaptedUNet, build_adapter
from adapterlib.model.hooks import transformer_blocks
from adapterlib.model.base import load_base
from adapterlib.training.checkpoint import load_adapter
from adapterlib.evaluation.checks import identity_at_init
from adapterlib.training.config import make_config
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.interop.export import export
from adapterlib.model.gligen import gated_unet, load_gligen_weights, read_gligen_folder
from adapterlib.model.sample import generate, ground, initial_noise
from adapterlib.training.train import resume_config, train
from helpers import opened, write_run

TINY = dict(steps=6, batch_size=2, n_train=16, save_every=4, log_every=1, n_samples=0, warmup=2)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def gated_folder(folder, unet_config, seed=0, alpha=0.7):
    """A diffusers GLIGEN UNet folder with the key names diffusers' conversion script writes
    (UNet2DConditionModel(attention_type="gated").save_pretrained), random weights, gates open."""
    torch.manual_seed(seed)
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "attention_type": "gated"})
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(alpha)
            elif name.startswith("position_net.null"):
                p.copy_(torch.randn_like(p))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def test_gligen_at_init_is_the_base_bit_for_bit_and_leaves_the_base_weights_untouched(base, records):
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    adapter = build_adapter(base, attention="gligen")
    try:
        assert identity_at_init(base, adapter, records) == 0.0
        assert set(adapter.gate_parameters()) == {f"layers.{i}.{g}" for i in range(len(adapter.layers))
                                                  for g in ("alpha_attn", "alpha_dense")}
        assert adapter.fast_parameters() == adapter.gate_parameters()
        assert all(k.startswith(("position_net.", "layers.")) for k in adapter.trainable_parameters())
    finally:
        adapter.detach()
    after = base.unet.state_dict()
    assert after.keys() == before.keys()                      # the fusers never became the base's submodules
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("fuser" in b.__dict__ for b in base.unet.modules())


def test_gligen_forward_is_diffusers_gated_unet_at_scale_1_and_the_scale_multiplies_both_gates(base, records):
    adapter = opened(build_adapter(base, attention="gligen"))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(records), 3, 32, 32, generator=g)
        t = torch.tensor([500] * len(records))
        with torch.no_grad():
            context = base.encode_captions([r.caption for r in records])
            grounding = ground(base, records, max_objects=adapter.max_objects)
            ours = AdaptedUNet(base.unet, adapter)(x, t, context, grounding, 1.0)
            half = AdaptedUNet(base.unet, adapter)(x, t, context, grounding, 0.5)
            zero = AdaptedUNet(base.unet, adapter)(x, t, context, grounding, torch.zeros(len(records)))
            plain = base.unet(x, t, encoder_hidden_states=context).sample
            n = grounding.present.shape[1]
            pad = lambda v: torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, 30 - n))
            theirs = gated_unet(base.unet, adapter)(
                x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": dict(
                    boxes=pad(grounding.boxes), masks=pad(grounding.present.float()),
                    positive_embeddings=pad(grounding.phrases))}).sample
    finally:
        adapter.detach()
    assert (ours - plain).abs().max() > 0.1                  # the open fusers change the prediction
    assert torch.equal(ours, theirs)                          # and as diffusers' own GLIGEN UNet does, bit for bit
    assert (half - ours).abs().max() > 1e-3 and (half - plain).abs().max() > 1e-3
    assert torch.equal(zero, plain)                           # scale 0 multiplies both gates away


def test_a_gligen_run_trains_logs_tanh_alpha_gates_and_resumes_exactly(runs):
    cfg = lambda name: make_config("shapes", run_name=name, adapter_attention="gligen", **TINY)
    whole = train(cfg("whole"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("split"), progress=False, stop_at_step=3)
    split = train(resume_config(runs / "split"), resume=True, progress=False)
    a, b = (load_file(str(r / "final" / "adapter.safetensors")) for r in (whole, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].item() != 0 for k in a if k.endswith(("alpha_attn", "alpha_dense")))     # it trained
    metrics = pd.read_csv(split / "metrics.csv")
    assert {"gate_0_attn", "gate_0_ff"} <= set(metrics.columns)
    assert metrics.gate_0_attn.iloc[-1] == pytest.approx(np.tanh(a["layers.0.alpha_attn"].item()), abs=1e-6)


def test_an_exported_gligen_run_gives_our_sampler_images_in_diffusers_gligen_pipeline(runs, tmp_path, tiny_sd_folder):
    base = load_base(tiny_sd_folder)
    adapter = opened(build_adapter(base, attention="gligen"), value=2.0)
    run = write_run(runs, "sd-gligen", tiny_sd_folder, adapter)
    adapter.detach()
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter.safetensors", "adapter_config.json", "README.md", "diffusers"}
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(out / "diffusers")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(base.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                               set_alpha_to_one=False)   # our sampler's DDIM
    phrases, boxes = ["red", "and"], [(0.0, 0.0, 0.5, 0.6), (0.4, 0.3, 1.0, 1.0)]
    record = Record("a red and a cir", tuple(GroundedObject(p, b) for p, b in zip(phrases, boxes)))
    ours_adapter = load_adapter(out, base)
    # guidance 1: diffusers' pipeline runs the grounded branch alone (its CFG grounds the unconditional branch
    # on null objects, which our sampler does not do)
    ours = generate(base, [record], [3], adapter=ours_adapter, steps=4, guidance=1.0)[0]
    plain = generate(base, [record], [3], steps=4, guidance=1.0)[0]
    theirs = np.asarray(pipe(record.caption, gligen_phrases=phrases, gligen_boxes=[list(b) for b in boxes],
                             gligen_scheduled_sampling_beta=1.0, num_inference_steps=4, guidance_scale=1.0,
                             latents=initial_noise(base, [3]), output_type="pil").images[0])
    ours_adapter.detach()
    assert np.abs(ours.astype(int) - plain).max() >= 4          # the adapter changes the image (7-13 levels seen)
    assert np.abs(ours.astype(int) - theirs).max() <= 1, np.abs(ours.astype(int) - theirs).max()


def test_import_then_export_is_bitwise_the_same_gligen_weights(runs, tmp_path, tiny_sd_folder):
    base = load_base(tiny_sd_folder)
    source = gated_folder(tmp_path / "gligen", base.unet.config)
    adapter = load_gligen_weights(build_adapter(base, attention="gligen"), source)
    run = write_run(runs, "imported", tiny_sd_folder, adapter, init_from=str(source))
    adapter.detach()
    export(run, tmp_path / "out")
    before, after = read_gligen_folder(source)[1], read_gligen_folder(tmp_path / "out" / "diffusers")[1]
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_folder_with_the_conversion_scripts_key_names_trains_and_evaluates(runs, tmp_path, base, capsys):
    source = gated_folder(tmp_path / "gligen", base.unet.config)
    run = train(make_config("shapes", run_name="from-gligen", adapter_attention="gligen", init_from=str(source),
                            **{**TINY, "steps": 2, "save_every": 2}), progress=False)
    trained = load_file(str(run / "final" / "adapter.safetensors"))
    fresh = build_adapter(base, attention="gligen")
    names = fresh.diffusers_names()
    fresh.detach()
    folder = read_gligen_folder(source)[1]
    assert max((trained[k] - folder[names[k]]).abs().max().item() for k in trained) < 0.05   # started from it
    assert trained["layers.0.alpha_attn"].item() == pytest.approx(0.7, abs=0.05)
    assert main(["evaluate", "--gligen", str(source), "--limit", "2", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_images"] == 2 and result["gligen"] == str(source) and result["buckets"]


def test_a_masked_run_exports_a_self_describing_adapter_folder(runs, tmp_path, base):
    adapter = build_adapter(base)
    run = write_run(runs, "masked-run", "shapes-tiny", adapter, step=7)
    adapter.detach()
    info = export(run, tmp_path / "out", measure=2)
    out = tmp_path / "out"
    assert info["variant"] == "masked" and not (out / "diffusers").exists()
    assert (out / "adapter.safetensors").read_bytes() == (run / "checkpoints" / "step_0000007" /
                                                          "adapter.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["step"] == 7 and config["base_model"] == "shapes-tiny" and config["data"] == "shapes-v2"
    assert "shapes-tiny" in card and "shapes-v2" in card and "| lr |" in card
    assert "success_rate" in card and f"python -m adapterlib evaluate {run}" in card
    assert config["grounding_at_export"]["n_layouts"] == 2
    load_adapter(out, base).detach()                               # loads back as a checkpoint
    with pytest.raises(FileExistsError, match="not empty"):
        export(run, out)


def test_bad_gligen_folders_are_refused_naming_the_folder_or_key(tmp_path, base, tiny_sd_folder):
    plain = tmp_path / "plain"
    base.unet.save_pretrained(plain / "unet")
    with pytest.raises(ValueError, match=r"config.json.*attention_type 'default'"):
        read_gligen_folder(plain)
    folder = gated_folder(tmp_path / "nopos", base.unet.config)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(file)).items() if not k.startswith("position_net.")}, str(file))
    with pytest.raises(ValueError, match="no 'position_net.*' key"):
        read_gligen_folder(folder)
    pickled = gated_folder(tmp_path / "pickled", base.unet.config)
    file = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(file)), file.with_suffix(".bin"))
    file.unlink()
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin.*pickled.*refused"):
        read_gligen_folder(pickled)
    other = gated_folder(tmp_path / "sd-gligen", UNet2DConditionModel.load_config(tiny_sd_folder / "unet"))
    adapter = build_adapter(base, attention="gligen")
    try:
        with pytest.raises(ValueError, match="cross_attention_dim 32 does not match the base's 64"):
            load_gligen_weights(adapter, other)
    finally:
        adapter.detach()
    with pytest.raises(ValueError, match="init_from.*needs adapter_attention = 'gligen'"):
        make_config("shapes", init_from=str(other))
    with pytest.raises(ValueError, match="adapter_norm"):
        build_adapter(base, attention="gligen", norm="rmsnorm")


def test_the_bench_gligen_row_trains_exactly_the_peers_parameters():
    from adapterlib.evaluation import bench
    assert bench.parse_variants("gligen") == (("gligen", True),)
    result = bench.run_bench("tiny", device="cpu", batch=2, rounds=1, steps_per_round=1, warmup=0,
                             variants=bench.parse_variants("gligen"))
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["ours gligen"]["samples_per_s"] > 0
    assert rows["ours gligen"]["trainable_params"] == rows["peer"]["trainable_params"]


def test_init_from_is_fixed_on_resume():
    from adapterlib.training.config import RESUME_FIXED, resume_changes
    assert "init_from" in RESUME_FIXED
    saved = make_config("shapes", run_name="r", adapter_attention="gligen", init_from="gligen-a").to_dict()
    with pytest.raises(ValueError, match=r"cannot change init_from \(saved 'gligen-a', asked 'gligen-b'\)"):
        resume_changes(saved, {"init_from": "gligen-b"}, "r")


def test_gligen_takes_its_own_blocks_and_width_whatever_the_preset_and_refuses_others():
    """The shapes and sd15 presets adapt the decoder only (docs/notes/blocks.md); GLIGEN has a fuser in every block and
    its own feed-forward (width 4), whatever the preset's choice for our layer."""
    from adapterlib.training.config import GLIGEN_FIXED
    assert make_config("shapes").adapter_blocks == "decoder" and make_config("sd15", base_model="sd").adapter_blocks == "decoder"
    for preset in ("shapes", "sd15", "sdxl"):
        cfg = make_config(preset, adapter_attention="gligen", **({} if preset == "shapes" else {"base_model": "sd"}))
        assert (cfg.adapter_blocks, cfg.adapter_ff_mult) == ("all", 4) == tuple(GLIGEN_FIXED.values())
    for name, other in (("adapter_blocks", "decoder"), ("adapter_ff_mult", 2)):
        with pytest.raises(ValueError, match=f"adapter_attention = 'gligen' is diffusers' GLIGEN as it is .*every "
                                             f"transformer block.*give {name} = {GLIGEN_FIXED[name]!r}, not {other!r}"):
            make_config("shapes", adapter_attention="gligen", **{name: other})


def test_the_gligen_modules_refuse_other_blocks_or_width_before_hooking_the_base(base):
    """Below the config too (build_adapter, load_adapter): GligenAdapter itself takes every block and width 4."""
    for option, field, value in (("adapted_blocks", "blocks", "decoder"), ("ff_mult", "ff_mult", 2)):
        with pytest.raises(ValueError, match=f"GLIGEN as it is: .*'adapter_{field}': {value!r}.* cannot be set"):
            build_adapter(base, attention="gligen", **{option: value})
        assert not any(b._forward_hooks for b in transformer_blocks(base.unet).values())


def test_a_gligen_folder_on_a_real_base_needs_layouts_and_a_detector_named_before_anything_loads(
        runs, tmp_path, tiny_sd_folder, tiny_owl_folder, monkeypatch, capsys):
    """`evaluate --gligen DIR --base SD_DIR` would measure 32-px Shapes layouts with the colour detector: on a base
    other than shapes-tiny, --layouts and --detector are required, an error naming both before anything loads."""
    from helpers import import_coco_fixture
    import adapterlib.evaluation.evaluate
    import adapterlib.model.gligen
    source = gated_folder(tmp_path / "gligen", load_base(tiny_sd_folder).unet.config)
    manifest = import_coco_fixture(tmp_path / "val", n=2)
    with monkeypatch.context() as m:
        m.setattr(adapterlib.model.gligen, "read_gligen_folder", lambda *a: pytest.fail("read the folder"))
        m.setattr(adapterlib.evaluation.evaluate, "load_base_for", lambda *a: pytest.fail("loaded the base"))
        for given, missing in (([], "--layouts and --detector"), (["--layouts", str(manifest)], "--detector"),
                               (["--detector", str(tiny_owl_folder)], "--layouts")):
            assert main(["evaluate", "--gligen", str(source), "--base", str(tiny_sd_folder), *given]) == 2
            err = capsys.readouterr().err
            assert f"--gligen on --base {tiny_sd_folder} (not a shipped Shapes base: shapes-tiny, shapes-dit, shapes-flux) needs {missing}:" in err
    # both given: measured on those layouts by that detector
    assert main(["evaluate", "--gligen", str(source), "--base", str(tiny_sd_folder), "--layouts", str(manifest),
                 "--detector", str(tiny_owl_folder), "--limit", "1", "--steps", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["layouts"], result["detector"], result["n_images"]) == (str(manifest), str(tiny_owl_folder), 1)
