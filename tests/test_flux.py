"""FLUX.1 as a base (docs/guide/flux.md), on tiny FLUX-architecture folders written by diffusers' own FluxPipeline
(tests/helpers.py: a guidance-distilled one, as FLUX.1-dev, and one without the guidance input, as schnell): it is
diffusers' FLUX (the pipeline runs it, our caption encodings are its prompt encodings, our sampler without an adapter
gives its images), the training objective is rectified flow on the resolution-shifted sigmas, a fresh adapter on its
double- and single-stream blocks is the base exactly and an opened one acts on the chosen blocks' image tokens only, a
run imported from COCO caches, trains, resumes exactly, is evaluated, sampled and exported, and bad FLUX input is
refused before any work, naming the part. (Two processes training what one does: tests/test_distributed.py.)"""
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

from helpers import (FLUX_DOUBLE, FLUX_RESOLUTION, FLUX_SAMPLE_SIZE, FLUX_SINGLE, FLUX_T5_TOKENS, FLUX_T5_WIDTH,
                     FLUX_VAE_SCALE, FLUX_VAE_SHIFT, FLUX_WIDTH, TEXT_WIDTH, block_outputs, build_tiny_owl_folder,
                     import_train_resume, photo_manifest, sample_and_export)

DOUBLE = [f"transformer_blocks.{i}" for i in range(FLUX_DOUBLE)]
SINGLE = [f"single_transformer_blocks.{i}" for i in range(FLUX_SINGLE)]
BLOCKS = DOUBLE + SINGLE
CHANNELS = 4                                   # the tiny VAE's latent channels (FLUX.1's: 16), packed 2x2 -> 16
DOG_AND_CAT = Record("a dog and a cat", (GroundedObject("dog", (0.0, 0.0, 0.5, 0.5)),
                                          GroundedObject("cat", (0.5, 0.5, 1.0, 1.0))))
A_RED_BOX = Record("a red box", (GroundedObject("red box", (0.2, 0.1, 0.9, 0.8)),))


@pytest.fixture(scope="module")
def flux(tiny_flux_folder):
    return load_base(tiny_flux_folder)


def _open(adapter):
    """Every gate at 1, so the adapter acts (a fresh one is the base exactly)."""
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    return adapter


def _pipeline(folder):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _packed(pipe, latents):
    """FluxPipeline takes its starting noise packed into 2x2 patches."""
    B, C, h, w = latents.shape
    return pipe._pack_latents(latents, B, C, h, w)


# ---------------------------------------------------------------------------------------------
# the base

@pytest.mark.parametrize("distilled", [True, False], ids=["dev", "schnell"])
def test_the_tiny_folder_is_diffusers_flux_and_our_caption_encodings_are_its_prompt_encodings(request, distilled):
    folder = request.getfixturevalue("tiny_flux_folder" if distilled else "tiny_flux_plain_folder")
    base = load_base(folder)
    pipe = _pipeline(folder)
    image = pipe("a red dog", num_inference_steps=2, height=FLUX_RESOLUTION, width=FLUX_RESOLUTION, output_type="np",
                 max_sequence_length=base.t5_tokens, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, FLUX_RESOLUTION, FLUX_RESOLUTION, 3) and np.isfinite(image).all()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert (base.is_flux, base.is_sd3, base.is_sdxl, base.is_flow, base.family, base.distilled) == \
        (True, False, False, True, "flux", distilled)
    assert base.net is base.transformer and base.unet is None and base.text_encoder_3 is None
    assert base.latent_shape == (CHANNELS, FLUX_SAMPLE_SIZE) and base.resolution == FLUX_RESOLUTION
    assert base.t5_tokens == FLUX_T5_TOKENS and base.kind == "a FLUX (MM-DiT)"
    assert (base.vae.config.scaling_factor, base.latent_shift) == (FLUX_VAE_SCALE, FLUX_VAE_SHIFT)
    captions = ["a red dog", "a blue cat and a green box", ""]
    with torch.no_grad():
        context, pooled = base.encode_text(captions)
        prompt, prompt_pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=base.t5_tokens)
    assert context.shape == (3, FLUX_T5_TOKENS, FLUX_T5_WIDTH) and pooled.shape == (3, TEXT_WIDTH)
    torch.testing.assert_close(context, prompt)                 # the T5's states are the caption's tokens
    torch.testing.assert_close(pooled, prompt_pooled)           # the CLIP's pooled output is the pooled vector
    added = base.added_cond(pooled)
    assert set(added) == ({"pooled_projections", "guidance"} if distilled else {"pooled_projections"})
    if distilled:
        assert added["guidance"].tolist() == [3.5] * 3          # FLUX.1-dev's card value, unless the run gives another
        assert base.added_cond(pooled, guidance=2.0)["guidance"].tolist() == [2.0] * 3
    phrases = base.encode_phrases(["red", "dog"])
    assert phrases.shape == (2, base.phrase_dim) == (2, TEXT_WIDTH)      # the CLIP's pooled output, as for a caption
    with torch.no_grad():
        torch.testing.assert_close(phrases[1:], pipe.encode_prompt("dog", None,
                                                                   max_sequence_length=base.t5_tokens)[1])


@pytest.mark.parametrize("distilled", [True, False], ids=["dev", "schnell"])
def test_our_sampler_without_an_adapter_gives_diffusers_flux_pipelines_images(request, distilled):
    """The flow-matching Euler loop (`generate`: FluxPipeline's sigmas 1 .. 1/steps shifted by mu of the image's token
    count, latents packed into 2x2 patches with their rotary ids, the VAE's shift and scaling undone) is FluxPipeline's
    from the same noise: a distilled base takes the guidance as its input in one branch; the other runs classifier-free
    guidance over the empty caption (FluxPipeline's true_cfg_scale with an empty negative prompt)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adapterlib.model.sample import sampler
    folder = request.getfixturevalue("tiny_flux_folder" if distilled else "tiny_flux_plain_folder")
    base = load_base(folder)
    scheduler = sampler(base)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.use_dynamic_shifting
    records = [DOG_AND_CAT, A_RED_BOX]
    ours = generate(base, records, [0, 1], steps=3, guidance=3.5)
    pipe = _pipeline(folder)
    settings = dict(guidance_scale=3.5) if distilled else dict(true_cfg_scale=3.5, negative_prompt=["", ""])
    theirs = pipe([r.caption for r in records], num_inference_steps=3, output_type="np", height=FLUX_RESOLUTION,
                  width=FLUX_RESOLUTION, latents=_packed(pipe, initial_noise(base, [0, 1])),
                  max_sequence_length=base.t5_tokens, **settings).images
    assert ours.shape == (2, FLUX_RESOLUTION, FLUX_RESOLUTION, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - generate(base, records, [0, 1], steps=3, guidance=1.0)).max() > 1   # guided


def test_the_flow_matching_objective_is_rectified_flow_on_sigmas_shifted_for_the_bases_resolution(flux):
    """`noised` at integer t in [0, T) (larger: noisier): x_t = (1 - s) x0 + s noise, target noise - x0, the
    network's timestep s * 1000 (`predict` divides it by 1000 as FluxPipeline does), with s the schedule's sigma of
    level t shifted by mu for the base's image token count (FluxPipeline's calculate_shift), as its sampler shifts."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    config = flux.scheduler.config
    tokens = (FLUX_SAMPLE_SIZE // 2) ** 2
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    assert flux.flow_mu() == pytest.approx(mu)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, CHANNELS, FLUX_SAMPLE_SIZE, FLUX_SAMPLE_SIZE, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    T = config.num_train_timesteps
    t = torch.tensor([0, 250, 700, T - 1])
    noisy, target, net_t = flux.noised(x0, noise, t)
    u = (t + 1).double() / T                                      # the unshifted sigma of level t
    s = (np.exp(mu) / (np.exp(mu) + (1 / u - 1))).float()         # the exponential time shift by mu
    torch.testing.assert_close(net_t.float(), s * T)
    b = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - b) * x0 + b * noise)
    torch.testing.assert_close(target, noise - x0)
    assert s[-1].item() == pytest.approx(1.0) and (s.diff() > 0).all()
    unshifted = (t + 1).float() / T
    assert 0 < mu < 0.5 and (s[:-1] > unshifted[:-1]).all()     # toward noise, less than at 256 tokens (mu 0.5)


# ---------------------------------------------------------------------------------------------
# the adapter on the double- and single-stream blocks

def _inputs(base, records, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(records), CHANNELS, FLUX_SAMPLE_SIZE, FLUX_SAMPLE_SIZE, generator=g)
    noisy, _, t = base.noised(x0, torch.randn(x0.shape, generator=g), torch.tensor([300, 800][:len(records)]))
    with torch.no_grad():
        context, pooled = base.encode_text([r.caption for r in records])
    return noisy, t, context, base.added_cond(pooled)


@pytest.mark.parametrize("subcell", [False, True])          # the sub-cell map on the joint blocks' token grid
def test_a_fresh_adapter_on_flux_is_the_base_exactly_and_opened_it_acts(flux, subcell):
    from adapterlib.evaluation import checks
    records = [DOG_AND_CAT, A_RED_BOX]
    adapter = build_adapter(flux, subcell=subcell)
    try:
        assert adapter.block_names == BLOCKS and len(adapter.layers) == FLUX_DOUBLE + FLUX_SINGLE
        assert adapter.config["text_dim"] == flux.phrase_dim == TEXT_WIDTH
        assert adapter.config["token_dim"] == FLUX_WIDTH          # FLUX's joint width: heads x head width
        noisy, t, context, added = _inputs(flux, records)
        grounding = ground(flux, records, max_objects=adapter.max_objects)
        model = AdaptedUNet(flux.net, adapter)
        with torch.no_grad():
            plain = flux.predict(noisy, t, context, added)
            fresh = model(noisy, t, context, grounding, added=added)
        assert plain.shape == noisy.shape and (fresh - plain).abs().max().item() == 0.0
        assert checks.identity_at_init(flux, adapter, records) == 0.0
        summary = checks.run_all(flux, adapter, records, "cpu", "no")
        assert (summary.result == "PASS").all(), summary.to_string()
        _open(adapter)
        with torch.no_grad():
            acting = model(noisy, t, context, grounding, added=added)
            off = model(noisy, t, context, grounding, scale=0.0, added=added)
        assert (acting - plain).abs().max().item() > 1e-3
        assert torch.equal(off, plain)
    finally:
        adapter.detach()
    assert not any(block._forward_hooks for block in transformer_blocks(flux.net).values())


def test_the_dtype_check_covers_the_transformer_and_the_t5(flux):
    """The frozen-base check reads every part the base has: a FLUX transformer or T5 weight that would train, or is
    not in the compute dtype, is named."""
    from adapterlib.evaluation.checks import _dtype_problems, dtype_table
    adapter = build_adapter(flux)
    try:
        assert {"base.transformer", "base.text_encoder_2"} <= set(dtype_table(flux, adapter).module)
        assert _dtype_problems(flux, adapter, torch.float32) == []
        weight = next(flux.transformer.parameters())
        weight.requires_grad_(True)
        try:
            assert any("frozen base.transformer." in what for what, _ in _dtype_problems(flux, adapter, torch.float32))
        finally:
            weight.requires_grad_(False)
        problems = _dtype_problems(flux, adapter, torch.bfloat16)
        assert {"transformer", "text_encoder_2"} <= {what.split(".")[1] for what, _ in problems}
    finally:
        adapter.detach()


@pytest.mark.parametrize("spec, chosen", [
    ("all", [0, 1, 2, 3, 4]), ("double", [0, 1]), ("single", [2, 3, 4]), ("first-half", [0, 1, 2]),
    ("middle", [1, 2, 3]), ("last-half", [2, 3, 4]), ("single_transformer_blocks.1", [3]),
    ("transformer_blocks.1,single_transformer_blocks.2", [1, 4])])
def test_a_block_choice_on_flux_puts_layers_on_those_blocks_and_changes_only_their_image_tokens(flux, spec, chosen):
    """The chosen blocks get a layer; with the gates open, every block before the first chosen one gives the base's
    output exactly, and the first chosen one changes its image tokens and passes its caption tokens unchanged (a
    single-stream block's one sequence is split back into both before the hook sees it)."""
    names = [BLOCKS[i] for i in chosen]
    chosen_blocks, outputs = block_outputs(flux, spec, _inputs(flux, [DOG_AND_CAT]), [DOG_AND_CAT])
    assert chosen_blocks == names
    for name in BLOCKS[:chosen[0]]:
        plain, adapted = outputs[name]
        assert torch.equal(image_tokens(plain), image_tokens(adapted)), name
    plain, adapted = outputs[names[0]]
    assert image_tokens(plain).shape[1] == (FLUX_SAMPLE_SIZE // 2) ** 2      # the 4x4 grid of 2x2 patches
    assert not torch.equal(image_tokens(plain), image_tokens(adapted))
    assert torch.equal(plain[0], adapted[0])


def test_the_masked_region_of_a_box_is_its_patch_cells_in_fluxs_packed_order(flux):
    """A box in the top-left quarter grounds the top-left 2x2 of the 4x4 token grid, in the row-major order
    `predict` packs the patches in (its rotary ids (0, row, column))."""
    from adapterlib.model.adapter import Injection
    grounding = ground(flux, [Record("a dog", (GroundedObject("dog", (0.0, 0.0, 0.5, 0.5)),))])
    injection = Injection(torch.zeros(1, grounding.boxes.shape[1], FLUX_WIDTH), grounding.present, grounding.boxes,
                          torch.ones(1, 1, 1), (FLUX_SAMPLE_SIZE, FLUX_SAMPLE_SIZE))
    region = injection.region((FLUX_SAMPLE_SIZE // 2) ** 2)[0, :, 0].reshape(4, 4)
    assert region.tolist() == [[True, True, False, False], [True, True, False, False],
                               [False] * 4, [False] * 4]


def test_unet_block_choices_and_gligen_are_refused_on_flux_and_flux_choices_elsewhere(flux, tiny_sd3_folder):
    for spec in ("decoder", "low", "migc"):
        with pytest.raises(ValueError, match=rf"adapter_blocks '{spec}' is a UNet's choice .*a stack of 5 joint blocks"):
            build_adapter(flux, adapted_blocks=spec)
    with pytest.raises(ValueError, match=rf"adapter_attention 'gligen' .*{flux.path} is a FLUX \(MM-DiT\) base"):
        build_adapter(flux, attention="gligen")
    with pytest.raises(ValueError, match=r"adapter_blocks 'single' is FLUX's choice .*no single-stream blocks"):
        build_adapter(load_base(tiny_sd3_folder), adapted_blocks="single")
    assert not any(block._forward_hooks for block in transformer_blocks(flux.net).values())    # nothing left attached


# ---------------------------------------------------------------------------------------------
# as a user runs it: import -> cache -> train -> --resume -> evaluate -> sample -> export

def test_coco_import_cache_train_resume_evaluate_sample_export_on_a_tiny_flux(tmp_path, monkeypatch, tiny_flux_folder,
                                                                               capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from adapterlib.interop.pipeline import GroundedPipeline
    runs, manifest, whole = import_train_resume(tmp_path, monkeypatch, capsys, "flux", tiny_flux_folder,
                                                "--base_guidance", "2.5")
    config = json.loads((runs / "whole" / "config.json").read_text())
    assert (config["adapter_blocks"], config["adapter_ff_mult"], config["base_guidance"], config["base_model"]) == \
        ("middle", 2, 2.5, str(tiny_flux_folder))
    assert "trains with guidance 2.5 as its input" in (runs / "whole" / "train.log").read_text()
    detector = build_tiny_owl_folder(tmp_path / "owl")
    assert main(["evaluate", "whole", "--limit", "2", "--sampling-steps", "2", "--layouts", manifest,
                 "--detector", str(detector)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_images"] == 2 and "ap50" in result
    # sampling through the run's pipeline (FLUX's flow-matching sampler), then the export
    pipe = GroundedPipeline.from_run("whole", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.unet is None
    assert pipe.transformer is not None and pipe.t5_tokens == FLUX_T5_TOKENS and pipe.sample_size == FLUX_SAMPLE_SIZE
    assert pipe.adapter.block_names == BLOCKS[1:4]                           # the middle third of 5
    sample_and_export(tmp_path, pipe, tiny_flux_folder, whole, [DOG_AND_CAT, A_RED_BOX])


def test_training_on_flux_feeds_the_guidance_and_the_flow_timesteps_to_every_forward(tmp_path, monkeypatch,
                                                                                      tiny_flux_folder):
    """Every training forward of the transformer gets the flow objective's noisy input and timestep sigma * 1000
    (`base.noised`), the T5 tokens as its caption and the run's guidance value as its input."""
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
    cfg = make_config("flux", run_name="g", data=str(manifest), base_model=str(tiny_flux_folder), steps=3,
                      batch_size=2, save_every=3, log_every=1, n_samples=1, mixed_precision="no", device="cpu", lr=1e-3,
                      base_guidance=4.0)
    folder = train(cfg, progress=False)
    final = load_file(str(folder / "final" / "adapter.safetensors"))
    assert max(final[k].abs().max().item() for k in final if "gate" in k) > 0           # it trained
    assert len(noised) == 3 and len(seen) >= 3
    for (noisy, _, net_t), (given, t, context, added) in zip(noised, seen):
        assert torch.equal(given, noisy) and torch.equal(t, net_t)
        assert given.shape == (2, CHANNELS, FLUX_SAMPLE_SIZE, FLUX_SAMPLE_SIZE)
        assert t.dtype.is_floating_point and ((t > 0) & (t <= 1000)).all() and (t != t.round()).any()
        assert context.shape == (2, FLUX_T5_TOKENS, FLUX_T5_WIDTH)
        assert added["pooled_projections"].shape == (2, TEXT_WIDTH) and added["guidance"].tolist() == [4.0, 4.0]
    assert all(torch.isfinite(v).all() for v in final.values())


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error naming the folder and the part, before any work

def _copy(folder, tmp_path):
    copy = tmp_path / "flux"
    shutil.copytree(folder, copy)
    return copy


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2", "text_encoder", "tokenizer", "scheduler"])
def test_a_flux_folder_missing_a_part_is_refused_by_name_before_any_work(tmp_path, monkeypatch, tiny_flux_folder,
                                                                        capsys, part):
    import adapterlib.model.base
    folder = _copy(tiny_flux_folder, tmp_path)
    shutil.rmtree(folder / part)
    with monkeypatch.context() as m:            # refused from the folder's files, before any weight loads
        m.setattr(adapterlib.model.base, "_load_parts", lambda *a: pytest.fail("the base started loading"))
        with pytest.raises(FileNotFoundError, match=rf"{folder} lacks {part}/.*a FLUX.1 folder has transformer/, "
                                                    r"text_encoder/ \+ tokenizer/ \(CLIP\), text_encoder_2/"):
            load_base(folder)
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = photo_manifest(tmp_path / "d", n=2)
    assert main(["train", "--preset", "flux", "--base_model", str(folder), "--data", str(manifest),
                 "--run_name", "broken"]) == 2
    assert f"lacks {part}/" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "broken" / "checkpoints").exists() and not (tmp_path / "runs" / "_cache").exists()


def test_a_ddpm_scheduler_a_missing_vae_a_clip_for_the_t5_or_misfitting_encoders_are_refused(tmp_path,
                                                                                            tiny_flux_folder):
    folder = _copy(tiny_flux_folder, tmp_path)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    _edit(scheduler, _class_name="EulerDiscreteScheduler")
    with pytest.raises(ValueError, match=rf"{folder}: its scheduler is a EulerDiscreteScheduler; a FLUX base is "
                                         r"trained with flow matching"):
        load_base(folder)
    _edit(scheduler, _class_name="FlowMatchEulerDiscreteScheduler")
    config = folder / "transformer" / "config.json"
    original = config.read_text()
    _edit(config, joint_attention_dim=32)
    with pytest.raises(ValueError, match=rf"{folder}: its text encoders \(CLIP hidden width 16, T5 width 24\) do not "
                                         r"fit its transformer \(pooled_projection_dim 16, joint_attention_dim 32\)"):
        load_base(folder)
    config.write_text(original)
    t5 = folder / "text_encoder_2" / "config.json"
    saved = t5.read_text()
    _edit(t5, model_type="clip_text_model")
    with pytest.raises(ValueError, match=rf"{folder}: its text_encoder_2/ is a clip_text_model model; FLUX's second "
                                         r"text encoder is a T5"):
        load_base(folder)
    t5.write_text(saved)
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=rf"{folder}: a latent FLUX transformer \(16 input channels: 2x2 "
                                                r"patches of the VAE's latents\) needs its VAE"):
        load_base(folder)


def test_a_diffusers_whose_single_stream_blocks_take_one_joined_sequence_is_refused_naming_the_version(
        tmp_path, monkeypatch, tiny_flux_folder):
    """diffusers before 0.35 ran FLUX's single-stream blocks on [caption; image] joined, returning it joined: a hook
    there cannot tell the image tokens apart, so such a diffusers is refused before anything loads."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    monkeypatch.setattr(FluxSingleTransformerBlock, "forward", lambda self, hidden_states, temb, image_rotary_emb=None,
                        joint_attention_kwargs=None: hidden_states)
    with pytest.raises(RuntimeError, match=rf"{tiny_flux_folder} is a FLUX folder, and this diffusers .* FLUX needs "
                                           r"diffusers >= 0.35"):
        load_base(tiny_flux_folder)


def test_another_familys_preset_on_flux_or_the_flux_preset_elsewhere_is_refused_before_any_work(
        tmp_path, monkeypatch, tiny_flux_folder, tiny_sd3_folder, capsys):
    """The sd3 preset (an SD3 MM-DiT's recipe) or a UNet's on a FLUX folder, and the flux preset on an SD3 folder:
    each refused saying which presets fit, before a cache or a checkpoint is written."""
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = photo_manifest(tmp_path / "d", n=2)
    assert main(["train", "--preset", "sd3", "--base_model", str(tiny_flux_folder), "--data", str(manifest),
                 "--run_name", "sd3-on-flux"]) == 2
    assert re.search(rf"preset 'sd3' is for a mmdit base; {tiny_flux_folder} is a FLUX \(MM-DiT\) base \(flux\): use "
                     r"one of \['shapes-flux', 'flux'\]", capsys.readouterr().err)
    assert main(["train", "--preset", "flux", "--base_model", str(tiny_sd3_folder), "--data", str(manifest),
                 "--run_name", "flux-on-sd3"]) == 2
    assert re.search(r"preset 'flux' is for a flux base; .* is an SD3 \(MM-DiT\) base \(mmdit\): use one of "
                     r"\['shapes-dit', 'sd3'\]", capsys.readouterr().err)
    for run in ("sd3-on-flux", "flux-on-sd3"):
        assert not (tmp_path / "runs" / run / "checkpoints").exists()
    assert not (tmp_path / "runs" / "_cache").exists()


def test_gradient_checkpointing_on_flux_gives_the_plain_gradients_on_both_kinds_of_block(flux):
    """diffusers' checkpointed segments of a FLUX transformer (each double- and single-stream block) recompute with
    the adapter's injection put back: every trainable parameter of layers on both kinds of block gets the plain
    backward's gradient (what the memory table's checkpointed cells count on)."""
    from adapterlib.model.hooks import set_gradient_checkpointing
    adapter = _open(build_adapter(flux, adapted_blocks="all"))
    try:
        model = AdaptedUNet(flux.net, adapter)
        noisy, t, context, added = _inputs(flux, [DOG_AND_CAT, A_RED_BOX])
        grounding = ground(flux, [DOG_AND_CAT, A_RED_BOX])
        grads = []
        for enabled in (False, True):
            set_gradient_checkpointing(flux.net, adapter, enabled)
            assert flux.net.gradient_checkpointing == enabled      # diffusers' segments: each block checkpointed
            adapter.zero_grad(set_to_none=True)
            with torch.enable_grad():
                model(noisy, t, context, grounding, added=added).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in adapter.trainable_parameters().items() if p.grad is not None})
        assert set(grads[0]) == set(grads[1])
        assert {n.split(".")[1] for n in grads[1] if n.startswith("layers.")} == {str(i) for i in range(len(BLOCKS))}
        assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-6
    finally:
        set_gradient_checkpointing(flux.net, adapter, False)
        adapter.detach()


# ---------------------------------------------------------------------------------------------
# the shipped tiny FLUX

def test_the_shipped_tiny_flux_is_a_pixel_space_flux_transformer_and_its_preset_trains_resumes_and_evaluates(
        tmp_path, monkeypatch, capsys):
    """`shapes-flux` loads by name (a FLUX transformer on the 32-px Shapes images: 2 double- + 4 single-stream blocks,
    a CLIP and a T5, flow matching), `train --preset shapes-flux` puts a layer on the middle third of its blocks (its
    first two single-stream blocks), trains on the generated Shapes world with the layered box loss, resumes exactly,
    and `evaluate` measures it on held-out v2 with the colour detector."""
    tiny = load_base("shapes-flux")
    assert (tiny.family, tiny.is_flow, tiny.vae, tiny.resolution, tiny.latent_shape, tiny.distilled) == \
        ("flux", True, None, 32, (3, 32), False)
    assert list(transformer_blocks(tiny.net)) == [f"transformer_blocks.{i}" for i in range(2)] + \
        [f"single_transformer_blocks.{i}" for i in range(4)]
    assert "How it was made" in open(f"{tiny.path}/README.md").read()
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    fields = ["--preset", "shapes-flux", "--n_train", "64", "--batch_size", "4", "--save_every", "2", "--log_every",
              "1", "--n_samples", "2", "--warmup", "1", "--lr_schedule", "constant"]
    assert main(["train", *fields, "--steps", "4", "--run_name", "whole"]) == 0
    assert main(["train", *fields, "--steps", "2", "--run_name", "half"]) == 0
    assert main(["train", "--resume", "half", "--steps", "4"]) == 0
    whole, resumed = (load_file(str(tmp_path / "runs" / n / "final" / "adapter.safetensors")) for n in ("whole", "half"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    config = json.loads((tmp_path / "runs" / "whole" / "config.json").read_text())
    assert (config["base_model"], config["adapter_blocks"], config["box_loss_region"]) == \
        ("shapes-flux", "middle", "layered")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "runs" / "whole" / "final" / "adapter.safetensors"), "pt") as saved:
        architecture = json.loads(saved.metadata()["adapter_config"])
    assert architecture["adapted_blocks"] == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    capsys.readouterr()
    assert main(["evaluate", "whole", "--limit", "3", "--sampling-steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["layouts"], result["detector"], result["n_images"]) == ("heldout-v2", "color", 3)
