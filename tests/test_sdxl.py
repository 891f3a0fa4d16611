"""Stable Diffusion XL as a base (docs/guide/sdxl.md), on a tiny SDXL-architecture folder built from configs
(tests/tiny_sdxl.py): it is diffusers' own SDXL (the pipeline runs it, our caption encodings are its
prompt encodings), its size / crop conditioning follows the crop, the cache stores what the encoders give,
training from the cache is training from the images, a run imported from COCO trains, resumes exactly and is
evaluated, and bad SDXL input is refused before any work."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapterlib.training import batches, cache
from adapterlib.__main__ import main
from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.data.manifest import GroundedObject, ManifestImages, Record, transform_sample

from helpers import SDXL_RESOLUTION, build_tiny_owl_folder, import_train_resume, photo_manifest, sd15_run_on_a_swapped_base, unet_config


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_folder):
    return load_base(tiny_sdxl_folder)


# ---------------------------------------------------------------------------------------------
# the base

def test_the_tiny_folder_is_diffusers_sdxl_and_our_caption_encodings_are_its_prompt_encodings(tiny_sdxl_folder, sdxl):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red dog", num_inference_steps=2, height=SDXL_RESOLUTION, width=SDXL_RESOLUTION, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, SDXL_RESOLUTION, SDXL_RESOLUTION, 3) and np.isfinite(image).all()
    assert sdxl.is_sdxl and sdxl.resolution == SDXL_RESOLUTION and sdxl.vae.config.scaling_factor == 0.13025
    with torch.no_grad():
        context, pooled = sdxl.encode_text(["a red dog", ""])
        prompt, negative, prompt_pooled, negative_pooled = pipe.encode_prompt("a red dog", do_classifier_free_guidance=True)
    assert context.shape == (2, 77, 32) and pooled.shape == (2, 16)       # 16 + 16 wide context, encoder 2's pooled
    torch.testing.assert_close(context[:1], prompt)
    torch.testing.assert_close(pooled[:1], prompt_pooled)
    # the empty caption is the pipeline's unconditional input: zeros (force_zeros_for_empty_prompt)
    assert torch.equal(context[1:], negative) and torch.equal(pooled[1:], negative_pooled) and not pooled[1].any()
    phrases = sdxl.encode_phrases(["red", "dog"])
    assert phrases.shape == (2, sdxl.phrase_dim) == (2, 16)
    torch.testing.assert_close(phrases[1:], pipe.encode_prompt("dog", do_classifier_free_guidance=False)[2])


def test_an_fp16_sdxl_keeps_its_vae_fp32_and_bf16_casts_it(tiny_sdxl_folder):
    half = load_base(tiny_sdxl_folder, dtype=torch.float16)
    assert (half.unet.dtype, half.text_encoder_2.dtype, half.vae.dtype) == (torch.float16, torch.float16, torch.float32)
    assert half.vae_upcast
    bf16 = load_base(tiny_sdxl_folder, dtype=torch.bfloat16)
    assert bf16.vae.dtype == torch.bfloat16 and not bf16.vae_upcast


def test_time_ids_are_the_original_size_the_crop_offset_and_the_target_size():
    image = Image.new("RGB", (48, 40))                 # width 48, height 40
    record = Record("x", (GroundedObject("a", (0.1, 0.1, 0.5, 0.5)),), image="x.png")
    R = 16
    _, _, report = transform_sample(image, record, R, crop="center")
    # shorter side 40 -> 16: the resized image is 19 x 16, the centre crop starts 1 px from its left
    assert (report.original_size, report.resized_size, report.crop_top_left) == ((40, 48), (16, 19), (0, 1))
    assert cache.time_ids(report, R) == [40, 48, 0, 1, 16, 16]
    # flipped after the crop: the offset measured from the flipped image's left edge (19 - 16 - 1)
    flipped = transform_sample(image, record, R, crop="center", flip=True, rng=_rng_flipping())[2]
    assert flipped.flipped and cache.time_ids(flipped, R) == [40, 48, 0, 2, 16, 16]
    # stretched (crop none): no offset
    assert cache.time_ids(transform_sample(image, record, R)[2], R) == [40, 48, 0, 0, 16, 16]


def _rng_flipping():
    for seed in range(100):
        if np.random.default_rng(seed).random() < 0.5:
            return np.random.default_rng(seed)


def test_a_fresh_adapter_on_sdxl_is_the_base_exactly_and_its_phrases_are_1280_wide_at_full_size(sdxl):
    from adapterlib.evaluation import checks
    from adapterlib.shapes import heldout_records
    adapter = build_adapter(sdxl)
    try:
        assert adapter.config["text_dim"] == sdxl.phrase_dim and adapter.config["token_dim"] == 32
        records = heldout_records(2)
        assert checks.identity_at_init(sdxl, adapter, records) == 0.0
        summary = checks.run_all(sdxl, adapter, records, "cpu", "no")
        assert (summary.result == "PASS").all(), summary.to_string()
    finally:
        adapter.detach()


# ---------------------------------------------------------------------------------------------
# the cache

def test_the_sdxl_cache_stores_the_encoders_outputs_and_each_images_time_ids(tmp_path, sdxl):
    manifest = photo_manifest(tmp_path / "d")
    folder = cache.build_cache(sdxl, manifest, tmp_path / "runs", crop="center", max_objects=30, progress=False)
    source = batches.CachedSource(folder, flip=True, seed=3)
    batch = source.batch([0, 1, 2, 3], [0, 1, 2, 3])
    images = ManifestImages(manifest, sdxl.resolution, progress=False, crop="center", flip=True, seed=3)
    _, records, reports = images.load_reports([0, 1, 2, 3], [0, 1, 2, 3])
    assert {r.flipped for r in reports} == {True, False}              # both kinds in the batch
    assert batch.records == records
    assert torch.equal(batch.time_ids, torch.tensor([cache.time_ids(r, 16) for r in reports], dtype=torch.float32))
    with torch.no_grad():
        context, pooled = sdxl.encode_text([r.caption for r in records])
        phrases = sdxl.encode_phrases([o.phrase for r in records for o in r.objects])
    torch.testing.assert_close(batch.captions, context)
    torch.testing.assert_close(batch.pooled, pooled)
    torch.testing.assert_close(batch.phrases, phrases)
    assert not batch.empty_caption.any() and not batch.empty_pooled.any() and batch.empty_pooled.shape == (1, 16)


def test_caption_dropout_on_sdxl_gives_the_empty_captions_zeros_cached_or_not(tmp_path, sdxl):
    manifest = photo_manifest(tmp_path / "d")
    folder = cache.build_cache(sdxl, manifest, tmp_path / "runs", crop="center", max_objects=30, progress=False)
    drop = torch.tensor([True, False])
    both = (batches.CachedSource(folder).batch([0, 1], [0, 1]),
            batches.ImageSource(ManifestImages(manifest, 16, progress=False, crop="center")).batch([0, 1], [0, 1]))
    out = [batches.text_inputs(sdxl, b, drop, torch.device("cpu"), torch.float32, None) for b in both]
    for context, _, added in out:
        assert not context[0].any() and not added["text_embeds"][0].any() and added["text_embeds"][1].any()
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][2]["text_embeds"], out[1][2]["text_embeds"])
    assert torch.equal(out[0][2]["time_ids"], out[1][2]["time_ids"])


def test_training_on_sdxl_from_the_cache_is_training_from_the_images(tmp_path, monkeypatch, tiny_sdxl_folder):
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = photo_manifest(tmp_path / "d")
    finals = {}
    for cached in (True, False):
        cfg = make_config("sdxl", run_name=f"c{cached}", data=str(manifest), base_model=str(tiny_sdxl_folder), steps=4,
                          batch_size=3, save_every=4, log_every=2, n_samples=0, cache=cached, num_workers=0, lr=1e-3)
        folder = train(cfg, progress=False)
        assert ("cached" in json.loads((folder / "data_report.json").read_text())["inputs"]) == cached
        finals[cached] = load_file(str(folder / "final" / "adapter.safetensors"))
    assert max(finals[True][k].abs().max().item() for k in finals[True] if "gate" in k) > 0   # it trained
    for k in finals[True]:
        torch.testing.assert_close(finals[True][k], finals[False][k], atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# as a user runs it: import -> cache -> train -> --resume -> evaluate, and the sampler

def test_coco_import_cache_train_resume_evaluate_on_a_tiny_sdxl(tmp_path, monkeypatch, tiny_sdxl_folder, capsys):
    runs, _, _ = import_train_resume(tmp_path, monkeypatch, capsys, "sdxl", tiny_sdxl_folder)
    config = json.loads((runs / "whole" / "config.json").read_text())
    assert (config["preset"], config["crop"], config["batch_size"]) == ("sdxl", "center", 2)
    detector = build_tiny_owl_folder(tmp_path / "owl")
    assert main(["evaluate", "whole", "--limit", "2", "--sampling-steps", "2", "--detector", str(detector)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_images"] == 2 and "ap50" in result


DOG_AND_CAT = Record("a dog and a cat", (GroundedObject("dog", (0.0, 0.0, 0.5, 0.5)),
                                          GroundedObject("cat", (0.5, 0.5, 1.0, 1.0))))


@pytest.fixture
def open_sdxl_adapter(sdxl):
    """A fresh adapter on the tiny SDXL with every gate at 1 (so it acts), detached afterwards."""
    torch.manual_seed(0)
    adapter = build_adapter(sdxl)
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    yield adapter
    adapter.detach()


def test_generate_on_sdxl_grounds_through_the_adapter_and_scale_0_is_the_base(sdxl, open_sdxl_adapter):
    from adapterlib.model.sample import generate
    records, adapter = [DOG_AND_CAT], open_sdxl_adapter
    plain = generate(sdxl, records, [0], steps=3)
    assert plain.shape == (1, 16, 16, 3)
    assert np.array_equal(generate(sdxl, records, [0], adapter=adapter, steps=3, scale=0.0), plain)
    assert not np.array_equal(generate(sdxl, records, [0], adapter=adapter, steps=3), plain)
    assert not np.array_equal(generate(sdxl, records, [0], adapter=adapter, steps=3, grounding_guidance="off"),
                              plain)


def test_the_pipeline_on_sdxl_gives_generates_images_and_any_scheduler_swaps_in(sdxl, open_sdxl_adapter):
    """GroundedPipeline on an SDXL base: both encoders, the pooled embedding and the size / crop ids reach the UNet
    as in `generate` (the same images with its DDIM and noise), and a diffusers scheduler swaps in."""
    from diffusers import DPMSolverMultistepScheduler
    from adapterlib.interop.pipeline import GroundedPipeline
    from adapterlib.model.sample import generate, initial_noise
    records = [DOG_AND_CAT, Record("a dog", (GroundedObject("dog", (0.2, 0.2, 0.8, 0.9)),))]
    adapter = open_sdxl_adapter
    pipe = GroundedPipeline.from_base(sdxl, adapter)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_2 is sdxl.text_encoder_2 and pipe.tokenizer_2 is sdxl.tokenizer_2
    call = dict(prompt=[r.caption for r in records], phrases=[[o.phrase for o in r.objects] for r in records],
                boxes=[[o.box for o in r.objects] for r in records], num_inference_steps=3)
    ours = pipe(**call, latents=initial_noise(sdxl, [0, 1]), output_type="np").images
    assert np.array_equal(ours, generate(sdxl, records, [0, 1], adapter=adapter, steps=3))
    assert not np.array_equal(ours, generate(sdxl, records, [0, 1], steps=3))          # the adapter acts
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (sdxl.resolution, sdxl.resolution)


# ---------------------------------------------------------------------------------------------
# the bench at SDXL size

def test_the_bench_sdxl_unet_is_sdxl_base_and_its_rows_pass_the_added_conditioning(monkeypatch):
    from diffusers import UNet2DConditionModel

    from adapterlib.evaluation import bench, workloads
    from adapterlib.model.hooks import transformer_blocks
    with torch.device("meta"):
        unet = UNet2DConditionModel(**workloads.sdxl_unet_config())
    assert len(transformer_blocks(unet)) == 70
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.57     # SDXL base's 2.567 B
    # every row runs with the added conditioning (a tiny text_time UNet in place of the full size)
    monkeypatch.setattr(workloads, "sdxl_unet_config", unet_config)
    monkeypatch.setattr(workloads, "SDXL_POOLED", 16)
    built = []
    monkeypatch.setattr(workloads, "_sdxl_added", lambda unet, *a, _f=workloads._sdxl_added: built.append(unet) or _f(unet, *a))
    result = bench.run_bench("sdxl", device="cpu", batch=1, rounds=1, steps_per_round=1, warmup=1,
                             variants=(("masked", True),), side=16)          # --side: latents 16x16, 128-px ids
    assert [r["name"] for r in result["rows"]] == ["floor", "peer", bench.variant_name("masked", True,
                                                                                       bench.DEFAULT_BLOCKS["sdxl"])]
    assert all(r["samples_per_s"] > 0 for r in result["rows"]) and result["size"] == "sdxl"
    assert result["side"] == 16 and built[0].config.sample_size == 16
    assert workloads._sdxl_added(built[0], 1, torch.Generator(), "cpu")["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]]
    with pytest.raises(ValueError, match="side 12: give a latent side that is a multiple of 8"):
        workloads.make_workload("sdxl", side=12)
    with pytest.raises(ValueError, match="side 16: the shipped tiny base has its own"):
        workloads.make_workload("tiny", side=16)


# ---------------------------------------------------------------------------------------------
# bad input: each a clear error naming the folder or the mismatch, before any work

@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2"])
def test_an_sdxl_folder_missing_its_second_encoder_or_tokenizer_is_refused_by_name(tmp_path, tiny_sdxl_folder, part):
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_folder, folder)
    shutil.rmtree(folder / part)
    with pytest.raises(FileNotFoundError, match=rf"{folder}.* lacks {part}/.*text_encoder_2/ \+ tokenizer_2/"):
        load_base(folder)


def test_a_refiner_folder_is_refused_as_a_refiner(tmp_path, tiny_sdxl_folder):
    from diffusers import UNet2DConditionModel
    folder = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl_folder, folder)
    for part in ("text_encoder", "tokenizer", "unet"):
        shutil.rmtree(folder / part)
    UNet2DConditionModel(**unet_config(time_ids=5, cross_attention_dim=16)).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(requires_aesthetics_score=True, text_encoder=[None, None], tokenizer=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{folder} is an SDXL refiner .*Give the Stable Diffusion XL base folder"):
        load_base(folder)
    (folder / "model_index.json").unlink()                 # told by its parts alone: one encoder, 5 ids
    with pytest.raises(ValueError, match="is an SDXL refiner"):
        load_base(folder)


def test_an_sd15_adapter_loaded_onto_sdxl_or_resumed_on_it_is_refused_before_any_work(
        tmp_path, monkeypatch, tiny_sd_folder, tiny_sdxl_folder, sdxl):
    from adapterlib.training.checkpoint import load_checkpoint
    from adapterlib.training.train import resume_config, train
    runs, base_folder, caches = sd15_run_on_a_swapped_base(tmp_path, monkeypatch, tiny_sd_folder, tiny_sdxl_folder)
    with pytest.raises(ValueError, match=rf"adapter .*sd.* does not fit the base {tiny_sdxl_folder} \(an SDXL base\): "
                                         r"the adapter was trained with phrase width 32, context width 32, 4 "
                                         r"transformer blocks, this base has phrase width 16, context width 32, 8"):
        load_checkpoint("sd", base=sdxl)
    with pytest.raises(ValueError, match=rf"does not fit the base {base_folder} \(an SDXL base\)"):
        train(resume_config("sd", steps=4), resume=True, progress=False)
    assert set((runs / "_cache").iterdir()) == caches     # refused before any cache was built
    assert [p.name for p in (runs / "sd" / "checkpoints").iterdir()] == ["step_0000002"]


# ---------------------------------------------------------------------------------------------
# the notebooks, as on SD 1.5 (tests/test_sd_path.py)

