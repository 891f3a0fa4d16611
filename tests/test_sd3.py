"""Stable Diffusion 3 (an MM-DiT) as a base (docs/guide/sd3.md), on tiny SD3-architecture folders written by diffusers'
own StableDiffusion3Pipeline (tests/helpers.py, with and without the T5): it is diffusers' SD3 (the pipeline runs it,
our caption encodings are its prompt encodings, our sampler without an adapter gives its images), a fresh adapter on
its joint blocks is the base exactly and an opened one acts on the chosen blocks only, the training objective is
rectified flow's, a run imported from COCO caches, trains, resumes exactly, is evaluated, sampled and exported, two
processes train what one does, and bad SD3 input is refused before any work, naming the part."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapterlib.__main__ import main
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.model.adapter import AdaptedUNet, build_adapter
from adapterlib.model.base import load_base
from adapterlib.model.hooks import image_tokens, transformer_blocks
from adapterlib.model.sample import generate, ground, initial_noise

from helpers import (SD3_JOINT_WIDTH, SD3_LAYERS, SD3_RESOLUTION, SD3_SAMPLE_SIZE, SD3_T5_TOKENS, SD3_VAE_SCALE,
                     SD3_VAE_SHIFT, block_outputs, build_tiny_owl_folder, import_train_resume, photo_manifest,
                     sample_and_export, sd15_run_on_a_swapped_base)

CLIP_TOKENS, CLIP_WIDTH = 77, 32          # both CLIPs' hidden states, 16 + 16 wide
BLOCKS = [f"transformer_blocks.{i}" for i in range(SD3_LAYERS)]
DOG_AND_CAT = Record("a dog and a cat", (GroundedObject("dog", (0.0, 0.0, 0.5, 0.5)),
                                          GroundedObject("cat", (0.5, 0.5, 1.0, 1.0))))
A_RED_BOX = Record("a red box", (GroundedObject("red box", (0.2, 0.1, 0.9, 0.8)),))


@pytest.fixture(scope="module")
def sd3(tiny_sd3_folder):
    return load_base(tiny_sd3_folder)


def _open(adapter):
    """Every gate at 1, so the adapter acts (a fresh one is the base exactly)."""
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    return adapter


def _pipeline(folder):
    from diffusers import StableDiffusion3Pipeline
    no_t5 = {} if (folder / "text_encoder_3").is_dir() else dict(text_encoder_3=None, tokenizer_3=None)  # diffusers' way
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **no_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# the base

@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_the_tiny_folder_is_diffusers_sd3_and_our_caption_encodings_are_its_prompt_encodings(request, t5):
    folder = request.getfixturevalue("tiny_sd3_folder" if t5 else "tiny_sd3_no_t5_folder")
    base = load_base(folder)
    pipe = _pipeline(folder)
    image = pipe("a red dog", num_inference_steps=2, height=SD3_RESOLUTION, width=SD3_RESOLUTION, output_type="np",
                 max_sequence_length=base.t5_tokens, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, SD3_RESOLUTION, SD3_RESOLUTION, 3) and np.isfinite(image).all()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert (base.is_sd3, base.is_flow, base.pooled, base.is_sdxl, base.family) == (True, True, True, False, "mmdit")
    assert base.net is base.transformer and base.unet is None and (base.text_encoder_3 is not None) == t5
    assert base.resolution == SD3_RESOLUTION and base.t5_tokens == SD3_T5_TOKENS
    assert (base.vae.config.scaling_factor, base.latent_shift) == (SD3_VAE_SCALE, SD3_VAE_SHIFT)
    captions = ["a red dog", "a blue cat and a green box", ""]
    with torch.no_grad():
        context, pooled = base.encode_text(captions)
        prompt, _, prompt_pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=base.t5_tokens)
    assert context.shape == (3, CLIP_TOKENS + SD3_T5_TOKENS, SD3_JOINT_WIDTH) and pooled.shape == (3, 2 * 16)
    torch.testing.assert_close(context, prompt)
    torch.testing.assert_close(pooled, prompt_pooled)
    assert context[:, :CLIP_TOKENS, :CLIP_WIDTH].abs().amax(-1).gt(0).all()        # every CLIP token is encoded
    assert not context[:, :CLIP_TOKENS, CLIP_WIDTH:].any()                         # zero-padded to the joint width
    t5_part = context[:, CLIP_TOKENS:]
    assert t5_part.abs().amax(-1).gt(0).all() if t5 else not t5_part.any()        # no T5: its part is zeros
    assert pooled[2].any()                                      # SD3 encodes the empty caption (no forced zeros)
    phrases = base.encode_phrases(["red", "dog"])
    assert phrases.shape == (2, base.phrase_dim) == (2, 32)     # both CLIPs' projected pooled outputs
    with torch.no_grad():
        torch.testing.assert_close(phrases[1:], pipe.encode_prompt("dog", None, None, do_classifier_free_guidance=False,
                                                                   max_sequence_length=base.t5_tokens)[2])


def test_our_sampler_without_an_adapter_gives_diffusers_sd3_pipelines_images(tiny_sd3_folder, sd3):
    """The flow-matching Euler loop (`generate`: SD3's schedule, shift 3, guidance over the empty caption, the VAE's
    shift and scaling undone) is StableDiffusion3Pipeline's, from the same noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adapterlib.model.sample import sampler
    scheduler = sampler(sd3)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    records = [DOG_AND_CAT, A_RED_BOX]
    ours = generate(sd3, records, [0, 1], steps=3, guidance=3.0)
    pipe = _pipeline(tiny_sd3_folder)
    theirs = pipe([r.caption for r in records], num_inference_steps=3, guidance_scale=3.0, output_type="np",
                  latents=initial_noise(sd3, [0, 1]), max_sequence_length=sd3.t5_tokens).images
    assert ours.shape == (2, SD3_RESOLUTION, SD3_RESOLUTION, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - generate(sd3, records, [0, 1], steps=3, guidance=1.0)).max() > 1   # guided


def test_the_flow_matching_objective_is_rectified_flow_on_sd3s_shifted_sigmas(sd3):
    """`noised` at integer t in [0, T) (larger: noisier): x_t = (1 - s) x0 + s noise, target noise - x0, the
    transformer's timestep s * 1000, with s FlowMatchEulerDiscreteScheduler's sigma (shift 3) for that noise level
    (diffusers' SD3 training script's lookup, its timesteps in descending order)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3.path, subfolder="scheduler")
    T = scheduler.config.num_train_timesteps
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, SD3_SAMPLE_SIZE, SD3_SAMPLE_SIZE, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 250, 700, T - 1])
    noisy, target, net_t = sd3.noised(x0, noise, t)
    u = (t + 1).double() / T                                      # the unshifted sigma of level t
    s = (3.0 * u / (1 + 2.0 * u)).float()                         # SD3's shift 3
    theirs = scheduler.timesteps[T - 1 - t]                       # the script's timestep for that level
    torch.testing.assert_close(net_t.float(), theirs.float())
    torch.testing.assert_close(net_t.float(), s * T)
    looked_up = torch.stack([scheduler.sigmas[(scheduler.timesteps == v).nonzero().item()] for v in theirs]).float()
    torch.testing.assert_close(looked_up, s)
    b = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - b) * x0 + b * noise)
    torch.testing.assert_close(target, noise - x0)
    assert s[-1].item() == pytest.approx(1.0) and s[0].item() < 0.01 and (s.diff() > 0).all()   # larger t: noisier
    assert not torch.equal(target, noise)                         # not DDPM's epsilon target


# ---------------------------------------------------------------------------------------------
# the adapter on the joint blocks

def _inputs(base, records, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(records), 16, SD3_SAMPLE_SIZE, SD3_SAMPLE_SIZE, generator=g)
    noisy, _, t = base.noised(x0, torch.randn(x0.shape, generator=g), torch.tensor([300, 800][:len(records)]))
    with torch.no_grad():
        context, pooled = base.encode_text([r.caption for r in records])
    return noisy, t, context, base.added_cond(pooled)


@pytest.mark.parametrize("subcell", [False, True])          # the sub-cell map on the joint blocks' token grid
def test_a_fresh_adapter_on_sd3_is_the_base_exactly_and_opened_it_acts(sd3, subcell):
    from adapterlib.evaluation import checks
    records = [DOG_AND_CAT, A_RED_BOX]
    adapter = build_adapter(sd3, subcell=subcell)
    try:
        assert adapter.block_names == BLOCKS and len(adapter.layers) == SD3_LAYERS
        assert adapter.config["text_dim"] == sd3.phrase_dim == 32
        assert adapter.config["token_dim"] == sd3.net.config.caption_projection_dim == 16
        noisy, t, context, added = _inputs(sd3, records)
        assert set(added) == {"pooled_projections"} and added["pooled_projections"].shape == (2, 32)
        grounding = ground(sd3, records, max_objects=adapter.max_objects)
        model = AdaptedUNet(sd3.net, adapter)
        with torch.no_grad():
            plain = sd3.predict(noisy, t, context, added)
            fresh = model(noisy, t, context, grounding, added=added)
        assert plain.shape == noisy.shape and (fresh - plain).abs().max().item() == 0.0
        assert checks.identity_at_init(sd3, adapter, records) == 0.0
        summary = checks.run_all(sd3, adapter, records, "cpu", "no")
        assert (summary.result == "PASS").all(), summary.to_string()
        _open(adapter)
        with torch.no_grad():
            acting = model(noisy, t, context, grounding, added=added)
            off = model(noisy, t, context, grounding, scale=0.0, added=added)
        assert (acting - plain).abs().max().item() > 1e-3
        assert torch.equal(off, plain)
    finally:
        adapter.detach()
    assert not any(block._forward_hooks for block in transformer_blocks(sd3.net).values())


@pytest.mark.parametrize("spec, chosen", [
    ("all", [0, 1, 2, 3]), ("first-half", [0, 1]), ("middle", [1, 2]), ("last-half", [2, 3]),
    ("transformer_blocks.3", [3]), ("transformer_blocks.0,transformer_blocks.2", [0, 2])])
def test_a_block_choice_on_sd3_puts_layers_on_those_joint_blocks_and_changes_only_their_image_stream(sd3, spec, chosen):
    """The chosen blocks get a layer; with the gates open, every block before the first chosen one gives the base's
    output exactly, the first chosen one changes its image tokens and passes its context tokens unchanged."""
    names = [BLOCKS[i] for i in chosen]
    chosen_blocks, outputs = block_outputs(sd3, spec, _inputs(sd3, [DOG_AND_CAT]), [DOG_AND_CAT])
    assert chosen_blocks == names
    for name in BLOCKS[:chosen[0]]:
        plain, adapted = outputs[name]
        assert torch.equal(image_tokens(plain), image_tokens(adapted)), name
    plain, adapted = outputs[names[0]]
    assert not torch.equal(image_tokens(plain), image_tokens(adapted))
    if plain[0] is not None:                              # the last block returns no context stream
        assert torch.equal(plain[0], adapted[0])


def test_unet_block_choices_and_gligen_are_refused_on_the_dit_naming_the_choices(sd3):
    for spec in ("decoder", "low", "migc"):
        with pytest.raises(ValueError, match=rf"adapter_blocks '{spec}' is a UNet's choice .*a stack of 4 joint blocks: "
                                             r"choose all, first-half, last-half, middle"):
            build_adapter(sd3, adapted_blocks=spec)
    with pytest.raises(ValueError, match=r"adapter_blocks 'up_blocks.1'.*transformer_blocks"):
        build_adapter(sd3, adapted_blocks="up_blocks.1")
    with pytest.raises(ValueError, match=rf"adapter_attention 'gligen' .*{sd3.path} is an SD3 \(MM-DiT\) base: choose "
                                         r"one of \('self', 'cross', 'masked'\)"):
        build_adapter(sd3, attention="gligen")
    assert not any(block._forward_hooks for block in transformer_blocks(sd3.net).values())    # nothing left attached


# ---------------------------------------------------------------------------------------------
# as a user runs it: import -> cache -> train -> --resume -> evaluate -> sample -> export

def test_coco_import_cache_train_resume_evaluate_sample_export_on_a_tiny_sd3(tmp_path, monkeypatch, tiny_sd3_folder,
                                                                              capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adapterlib.interop.pipeline import GroundedPipeline
    runs, manifest, whole = import_train_resume(tmp_path, monkeypatch, capsys, "sd3", tiny_sd3_folder,
                                                "--adapter_blocks", "middle")
    config = json.loads((runs / "whole" / "config.json").read_text())
    assert (config["adapter_blocks"], config["base_model"]) == ("middle", str(tiny_sd3_folder))
    detector = build_tiny_owl_folder(tmp_path / "owl")
    assert main(["evaluate", "whole", "--limit", "2", "--sampling-steps", "2", "--layouts", manifest,
                 "--detector", str(detector)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_images"] == 2 and "ap50" in result
    # sampling through the run's pipeline (the flow-matching sampler), then the export
    pipe = GroundedPipeline.from_run("whole", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.unet is None
    assert pipe.transformer is not None and pipe.text_encoder_3 is not None and pipe.t5_tokens == SD3_T5_TOKENS
    assert pipe.adapter.block_names == BLOCKS[1:3]
    sample_and_export(tmp_path, pipe, tiny_sd3_folder, whole, [DOG_AND_CAT, A_RED_BOX])


def test_training_on_an_sd3_folder_without_its_t5_trains_at_the_flow_objectives_timesteps(tmp_path, monkeypatch,
                                                                                          tiny_sd3_no_t5_folder):
    """A run on the T5-less folder trains (its captions' T5 part zeros); every training forward of the transformer
    gets the flow objective's noisy input and timestep sigma * 1000 (`base.noised`), not the integer level."""
    import adapterlib.model.adapter
    from adapterlib.model.base import BaseModel
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    noised, seen = [], []
    original_noised, original_predict = BaseModel.noised, adapterlib.model.adapter.predict
    monkeypatch.setattr(BaseModel, "noised", lambda self, *a: noised.append(original_noised(self, *a)) or noised[-1])
    monkeypatch.setattr(adapterlib.model.adapter, "predict",
                        lambda net, noisy, t, context, added=None: seen.append((noisy, t, context, added))
                        or original_predict(net, noisy, t, context, added))
    manifest = photo_manifest(tmp_path / "d")
    cfg = make_config("sd3", run_name="no-t5", data=str(manifest), base_model=str(tiny_sd3_no_t5_folder), steps=3,
                      batch_size=2, save_every=3, log_every=1, n_samples=1, mixed_precision="no", device="cpu", lr=1e-3)
    folder = train(cfg, progress=False)
    final = load_file(str(folder / "final" / "adapter.safetensors"))
    assert max(final[k].abs().max().item() for k in final if "gate" in k) > 0           # it trained
    assert len(noised) == 3 and len(seen) >= 3
    for (noisy, _, net_t), (given, t, context, added) in zip(noised, seen):
        assert torch.equal(given, noisy) and torch.equal(t, net_t)
        assert t.dtype.is_floating_point and ((t > 0) & (t <= 1000)).all() and (t != t.round()).any()
        assert context.shape == (2, CLIP_TOKENS + SD3_T5_TOKENS, SD3_JOINT_WIDTH) and not context[:, CLIP_TOKENS:].any()
        assert added["pooled_projections"].shape == (2, 32)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert (folder / "samples" / "step_0000003.png").is_file()


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error naming the folder and the part, before any work

def _copy(tiny_sd3_folder, tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(tiny_sd3_folder, folder)
    return folder


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2", "text_encoder", "tokenizer"])
def test_an_sd3_folder_missing_a_clip_encoder_or_tokenizer_is_refused_by_name_before_any_work(
        tmp_path, monkeypatch, tiny_sd3_folder, capsys, part):
    import adapterlib.model.base
    folder = _copy(tiny_sd3_folder, tmp_path)
    shutil.rmtree(folder / part)
    with monkeypatch.context() as m:            # refused from the folder's files, before any weight loads
        m.setattr(adapterlib.model.base, "_load_parts", lambda *a: pytest.fail("the base started loading"))
        with pytest.raises(FileNotFoundError, match=rf"{folder} lacks {part}/.*a Stable Diffusion 3 folder has "
                                                    r"transformer/, text_encoder/ \+ tokenizer/, text_encoder_2/"):
            load_base(folder)
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = photo_manifest(tmp_path / "d", n=2)
    assert main(["train", "--preset", "sd3", "--base_model", str(folder), "--data", str(manifest),
                 "--run_name", "broken"]) == 2
    assert f"lacks {part}/" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "broken" / "checkpoints").exists() and not (tmp_path / "runs" / "_cache").exists()


def test_a_t5_without_its_tokenizer_is_refused_naming_tokenizer_3(tmp_path, tiny_sd3_folder):
    folder = _copy(tiny_sd3_folder, tmp_path)
    shutil.rmtree(folder / "tokenizer_3")
    with pytest.raises(FileNotFoundError, match=rf"{folder} lacks tokenizer_3/ \(text_encoder_3/ is there\)"):
        load_base(folder)


def test_another_transformer_a_ddpm_scheduler_a_missing_vae_or_misfitting_encoders_are_refused(tmp_path,
                                                                                        tiny_sd3_folder):
    folder = _copy(tiny_sd3_folder, tmp_path)
    config = folder / "transformer" / "config.json"
    original = config.read_text()
    _edit(config, _class_name="PixArtTransformer2DModel")
    with pytest.raises(ValueError, match=rf"{folder}: its transformer is a PixArtTransformer2DModel; adapterlib takes "
                                         r"UNet bases .*, Stable Diffusion 3 / 3.5 MM-DiTs \(SD3Transformer2DModel\) "
                                         r"and FLUX.1 \(FluxTransformer2DModel\)"):
        load_base(folder)
    _edit(config, _class_name="FluxTransformer2DModel")        # checked as a FLUX folder: its text_encoder_2 is no T5
    with pytest.raises(ValueError, match=rf"{folder}: its text_encoder_2/ is a clip_text_model model; FLUX's second "
                                         r"text encoder is a T5"):
        load_base(folder)
    config.write_text(original)
    _edit(config, pooled_projection_dim=48)
    with pytest.raises(ValueError, match=rf"{folder}: its text encoders \(hidden widths 32 together, projections 32\) do "
                                         r"not fit its transformer \(joint_attention_dim 48, pooled_projection_dim 48\)"):
        load_base(folder)
    _edit(config, pooled_projection_dim=32, joint_attention_dim=16)
    with pytest.raises(ValueError, match=r"hidden widths 32 together.*joint_attention_dim 16"):
        load_base(folder)
    config.write_text(original)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    _edit(scheduler, _class_name="EulerDiscreteScheduler")
    with pytest.raises(ValueError, match=rf"{folder}: its scheduler is a EulerDiscreteScheduler; an SD3 base is trained "
                                         r"with flow matching \(FlowMatchEulerDiscreteScheduler\)"):
        load_base(folder)
    _edit(scheduler, _class_name="FlowMatchEulerDiscreteScheduler")
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=rf"{folder}: a latent transformer \(16 input channels\) needs its VAE"):
        load_base(folder)


def test_a_unet_preset_or_unet_blocks_on_sd3_are_refused_before_any_work(tmp_path, monkeypatch, tiny_sd3_folder,
                                                                         capsys):
    """A UNet's preset (sd15: its decoder blocks, its timesteps) on an SD3 folder, or the sd3 preset with a UNet's
    block choice: each refused saying what to choose, before a cache or a checkpoint is written."""
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = photo_manifest(tmp_path / "d", n=2)
    common = ["--base_model", str(tiny_sd3_folder), "--data", str(manifest)]
    assert main(["train", "--preset", "sd15", *common, "--run_name", "unet-preset"]) == 2
    assert re.search(rf"preset 'sd15' is for a unet base; {tiny_sd3_folder} is an SD3 \(MM-DiT\) base \(mmdit\): use "
                     r"one of \['shapes-dit', 'sd3'\]", capsys.readouterr().err)
    assert main(["train", "--preset", "sd3", *common, "--adapter_blocks", "decoder", "--run_name", "decoder"]) == 2
    assert "adapter_blocks 'decoder' is a UNet's choice" in capsys.readouterr().err
    for run in ("unet-preset", "decoder"):
        assert not (tmp_path / "runs" / run / "checkpoints").exists()
    assert not (tmp_path / "runs" / "_cache").exists()


def test_an_sd15_adapter_loaded_onto_sd3_or_resumed_on_it_is_refused_before_any_work(
        tmp_path, monkeypatch, tiny_sd_folder, tiny_sd3_folder, sd3):
    from adapterlib.training.checkpoint import load_checkpoint
    from adapterlib.training.train import resume_config, train
    runs, base_folder, caches = sd15_run_on_a_swapped_base(tmp_path, monkeypatch, tiny_sd_folder, tiny_sd3_folder)
    with pytest.raises(ValueError, match=rf"adapter .*sd.* does not fit the base {tiny_sd3_folder} \(an SD3 \(MM-DiT\) "
                                         r"base\): the adapter was trained with phrase width 32, context width 32, 4 "
                                         r"transformer blocks, this base has phrase width 32, context width 16, 4"):
        load_checkpoint("sd", base=sd3)
    assert not any(block._forward_hooks for block in transformer_blocks(sd3.net).values())
    with pytest.raises(ValueError, match=rf"preset 'sd15' is for a unet base; {base_folder} is an SD3 \(MM-DiT\) base"):
        train(resume_config("sd", steps=4), resume=True, progress=False)
    assert set((runs / "_cache").iterdir()) == caches     # refused before any cache was built


# ---------------------------------------------------------------------------------------------
# the shipped tiny MM-DiT

def test_the_shipped_tiny_dit_is_a_pixel_space_sd3_transformer_and_its_preset_trains_resumes_and_evaluates(
        tmp_path, monkeypatch, capsys):
    """`shapes-dit` loads by name (an SD3 transformer on the 32-px Shapes images, two CLIPs, no T5 tokens, flow
    matching), `train --preset shapes-dit` puts a layer on the middle third of its joint blocks and trains on the generated Shapes
    world with the layered box loss (a pixel base), resumes exactly, and `evaluate` measures it on held-out v2 with
    the colour detector, as on the tiny UNet."""
    dit = load_base("shapes-dit")
    assert (dit.family, dit.is_flow, dit.vae, dit.resolution, dit.t5_tokens) == ("mmdit", True, None, 32, 0)
    assert dit.text_encoder_3 is None and dit.net.config.in_channels == 3
    assert "How it was made" in (dit.path and open(f"{dit.path}/README.md").read())
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    fields = ["--preset", "shapes-dit", "--n_train", "64", "--batch_size", "4", "--save_every", "2", "--log_every",
              "1", "--n_samples", "2", "--warmup", "1", "--lr_schedule", "constant"]   # cosine: a resume that
    # adds steps stretches the decay, so a 2-step run resumed to 4 is not a 4-step run
    assert main(["train", *fields, "--steps", "4", "--run_name", "whole"]) == 0
    assert main(["train", *fields, "--steps", "2", "--run_name", "half"]) == 0
    assert main(["train", "--resume", "half", "--steps", "4"]) == 0
    whole, resumed = (load_file(str(tmp_path / "runs" / n / "final" / "adapter.safetensors")) for n in ("whole", "half"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    config = json.loads((tmp_path / "runs" / "whole" / "config.json").read_text())
    assert (config["base_model"], config["adapter_blocks"], config["box_loss_region"]) == \
        ("shapes-dit", "middle", "layered")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "runs" / "whole" / "final" / "adapter.safetensors"), "pt") as saved:
        architecture = json.loads(saved.metadata()["adapter_config"])
    assert architecture["blocks"] == [f"transformer_blocks.{i}" for i in range(6)]
    assert architecture["adapted_blocks"] == ["transformer_blocks.2", "transformer_blocks.3"]   # the middle third
    capsys.readouterr()
    assert main(["evaluate", "whole", "--limit", "3", "--sampling-steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["layouts"], result["detector"], result["n_images"]) == ("heldout-v2", "color", 3)
