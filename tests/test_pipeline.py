"""Our diffusers pipeline (adapterlib/interop/pipeline.py): the sampler's images, any scheduler, batches of prompts with
different object counts, diffusers' GLIGEN pipeline's images for a GLIGEN folder, and bad input refused early."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionGLIGENPipeline

from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.interop.export import export
from adapterlib.interop.pipeline import GroundedPipeline
from adapterlib.model.sample import generate, initial_noise

from helpers import opened, write_run

PHRASES = [["red circle"], ["blue square", "green triangle", "red circle"]]
BOXES = [[(0.1, 0.1, 0.6, 0.6)], [(0.0, 0.0, 0.4, 0.4), (0.5, 0.5, 1.0, 1.0), (0.2, 0.5, 0.5, 0.9)]]
PROMPTS = ["a red circle", "a blue square, a green triangle and a red circle"]


def records():
    return [Record(c, tuple(GroundedObject(p, b) for p, b in zip(ph, bx))) for c, ph, bx in zip(PROMPTS, PHRASES, BOXES)]


def test_the_pipeline_gives_the_samplers_images_for_a_batch_with_different_object_counts(base, open_adapter):
    pipe = GroundedPipeline.from_base(base, open_adapter)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(PROMPTS, phrases=PHRASES, boxes=BOXES, num_inference_steps=5, latents=initial_noise(base, [4, 5]),
                output_type="np").images
    sampled = generate(base, records(), [4, 5], adapter=open_adapter, steps=5)
    plain = generate(base, records(), [4, 5], steps=5)
    assert np.array_equal(ours, sampled)
    assert np.abs(ours.astype(int) - plain).max() > 50             # the adapter acts
    alone = pipe(PROMPTS[1], phrases=PHRASES[1], boxes=BOXES[1], num_inference_steps=5,
                 latents=initial_noise(base, [5]), output_type="np").images
    assert np.abs(alone[0].astype(int) - ours[1]).max() <= 1        # its batch-mate does not change an image


@pytest.mark.parametrize("grounding_guidance", ["base", "null", "off"])
def test_the_pipeline_and_generate_are_one_loop_giving_the_same_images(base, open_adapter, monkeypatch,
                                                                        grounding_guidance):
    from adapterlib.model import sample
    calls, original = [], sample.denoise

    def spy(*args, **kwargs):
        calls.append(type(kwargs.get("scheduler")).__name__)
        return original(*args, **kwargs)
    monkeypatch.setattr(sample, "denoise", spy)
    settings = dict(scale=0.8, tau=0.6, grounding_guidance=grounding_guidance)
    pipe = GroundedPipeline.from_base(base, open_adapter)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(PROMPTS, phrases=PHRASES, boxes=BOXES, num_inference_steps=5, guidance_scale=2.5, output_type="np",
                latents=initial_noise(base, [4, 5]), **settings).images
    sampled = generate(base, records(), [4, 5], adapter=open_adapter, steps=5, guidance=2.5, **settings)
    assert calls == ["DDIMScheduler", "NoneType"]           # the pipeline (its DDIM), then generate (our DDIM)
    assert np.array_equal(ours, sampled)
    other = "off" if grounding_guidance != "off" else "base"
    assert not np.array_equal(ours, generate(base, records(), [4, 5], adapter=open_adapter, steps=5, guidance=2.5,
                                             **{**settings, "grounding_guidance": other}))


def test_the_earlier_unconditional_keyword_still_works_with_a_warning(base, open_adapter):
    pipe = GroundedPipeline.from_base(base, open_adapter)
    pipe.set_progress_bar_config(disable=True)
    call = dict(phrases=PHRASES[1], boxes=BOXES[1], num_inference_steps=3, output_type="np")
    for old, new in (("grounded", "off"), ("null", "null"), ("base", "base")):
        with pytest.warns(DeprecationWarning, match=f"unconditional='{old}' is grounding_guidance='{new}'"):
            before = pipe(PROMPTS[1], unconditional=old, latents=initial_noise(base, [2]), **call).images
        assert np.array_equal(before, pipe(PROMPTS[1], grounding_guidance=new, latents=initial_noise(base, [2]),
                                           **call).images)


def test_a_diffusers_scheduler_swaps_in_and_the_output_is_pil(base, open_adapter):
    pipe = GroundedPipeline.from_base(base, open_adapter)
    pipe.set_progress_bar_config(disable=True)
    ddim = pipe(PROMPTS[0], phrases=PHRASES[0], boxes=BOXES[0], num_inference_steps=6,
                generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    dpm = pipe(PROMPTS[0], phrases=PHRASES[0], boxes=BOXES[0], num_inference_steps=6, negative_prompt="blue",
               generator=torch.Generator().manual_seed(0)).images
    assert dpm[0].size == ddim[0].size == (base.resolution, base.resolution)
    assert np.abs(np.asarray(dpm[0], int) - np.asarray(ddim[0])).max() > 0


def test_bf16_casts_the_base_and_keeps_the_adapter_fp32(base, open_adapter):
    pipe = GroundedPipeline.from_base(load_base("shapes-tiny"), None)
    adapter = build_adapter(pipe._base())
    pipe.adapter = adapter
    try:
        pipe.set_progress_bar_config(disable=True)
        full = pipe(PROMPTS[0], phrases=PHRASES[0], boxes=BOXES[0], num_inference_steps=3,
                    latents=initial_noise(base, [1]), output_type="np").images
        pipe.to(torch.bfloat16)
        assert pipe.unet.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in adapter.parameters())
        half = pipe(PROMPTS[0], phrases=PHRASES[0], boxes=BOXES[0], num_inference_steps=3,
                    latents=initial_noise(base, [1]), output_type="np").images
        assert np.abs(half.astype(int) - full).mean() < 8
    finally:
        adapter.detach()


def test_a_gligen_folder_samples_as_diffusers_gligen_pipeline_with_guidance(runs, tmp_path, tiny_sd_folder):
    sd = load_base(tiny_sd_folder)
    adapter = opened(build_adapter(sd, attention="gligen"), value=2.0)
    run = write_run(runs, "sd-gligen", tiny_sd_folder, adapter)
    adapter.detach()
    export(run, tmp_path / "out")
    pipe = GroundedPipeline.from_adapter(tmp_path / "out" / "diffusers", sd)
    pipe.set_progress_bar_config(disable=True)
    theirs_pipe = StableDiffusionGLIGENPipeline.from_pretrained(tmp_path / "out" / "diffusers")
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs_pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    phrases, boxes = ["red", "and"], [[0.0, 0.0, 0.5, 0.6], [0.4, 0.3, 1.0, 1.0]]
    kw = dict(num_inference_steps=4, guidance_scale=3.0)
    ours = pipe("a red and a cir", phrases=phrases, boxes=boxes, grounding_guidance="null", output_type="np",
                latents=initial_noise(sd, [3]), **kw).images[0]
    theirs = np.asarray(theirs_pipe("a red and a cir", gligen_phrases=phrases, gligen_boxes=boxes,
                                    gligen_scheduled_sampling_beta=1.0, latents=initial_noise(sd, [3]), **kw).images[0])
    base_guided = pipe("a red and a cir", phrases=phrases, boxes=boxes, output_type="np",
                       latents=initial_noise(sd, [3]), **kw).images[0]
    pipe.adapter.detach()
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    assert np.abs(base_guided.astype(int) - theirs).max() > 1     # what the unconditional branch is matters


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.mark.parametrize("kwargs, message", [
    (dict(boxes=[[(0.1, 0.1, 1.2, 0.5)]]), r"boxes\[0\]\[0\] = \[0.1, 0.1, 1.2, 0.5\]: need 0 <= x0 < x1 <= 1"),
    (dict(boxes=[[(0.5, 0.1, 0.2, 0.5)]]), r"boxes\[0\]\[0\].*x0 < x1"),
    (dict(phrases=[["a", "b"]]), r"prompt 0: 2 phrases but 1 boxes"),
    (dict(phrases=[["a"] * 31], boxes=[[(0, 0, 1, 1)] * 31]), r"phrases\[0\]: 31 phrases, more than .*max_objects \(30\)"),
    (dict(prompt=["x", "y"], phrases=[["a"]], boxes=[[(0, 0, 1, 1)]]), r"phrases / boxes: 1 and 1 lists for 2 prompts"),
    (dict(scale=1, unconditional="none"), r"unconditional = 'none'"),
    (dict(grounding_guidance="grounded"), r"grounding_guidance = 'grounded': choose one of \('base', 'null', 'off'\)"),
    (dict(num_inference_steps=0), r"num_inference_steps = 0: give at least 1"),
    (dict(tau=1.5), r"tau = 1.5: give a share of the steps in \[0, 1\]"),
    (dict(scale=-1), r"scale = -1: give a scale >= 0"),
])
def test_bad_input_is_refused_naming_the_argument_before_any_work(base, open_adapter, kwargs, message):
    pipe = GroundedPipeline.from_base(base, open_adapter)
    args = {**dict(prompt="a red circle", phrases=[["red circle"]], boxes=[[(0.1, 0.1, 0.5, 0.5)]]), **kwargs}
    calls = []
    hook = base.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            pipe(args.pop("prompt"), **args)
    finally:
        hook.remove()
    assert calls == []


def test_a_folder_that_is_no_adapter_is_refused_naming_it(base, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no adapter.safetensors"):
        GroundedPipeline.from_adapter(tmp_path / "empty", base)
    base.unet.save_pretrained(tmp_path / "plain" / "unet")
    with pytest.raises(ValueError, match="attention_type 'default'"):
        GroundedPipeline.from_adapter(tmp_path / "plain", base)


def test_an_adapter_of_another_architecture_is_refused_naming_the_folder(base, runs, tmp_path, tiny_sd_folder):
    adapter = build_adapter(base)                                   # the shipped tiny base's masked adapter
    run = write_run(runs, "tiny-masked", "shapes-tiny", adapter)
    adapter.detach()
    export(run, tmp_path / "out")
    with pytest.raises(ValueError, match=r"out/adapter.safetensors does not fit the base .*transformer blocks"):
        GroundedPipeline.from_adapter(tmp_path / "out", tiny_sd_folder)
