"""An exported adapter on other bases (adapterlib/interop/pipeline.py, `GroundedPipeline.from_adapter`): a fine-tune of
the base it was trained on (the same architecture, other UNet weights) loads with a warning and samples; a LoRA loaded
with the pipeline's own `load_lora_weights` acts while the adapter's hooks still act; another architecture is a
ValueError naming the folder, the base and the dimension that differs, before anything is built."""
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from adapterlib.interop.export import export
from adapterlib.interop.pipeline import GroundedPipeline
from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.model.hooks import transformer_blocks
from adapterlib.model.sample import initial_noise

from helpers import write_run

PROMPT, PHRASES, BOXES = "a red circle and a blue square", ["red circle", "blue square"], [(0.0, 0.0, 0.5, 0.6),
                                                                                         (0.4, 0.3, 1.0, 1.0)]
SETTINGS = dict(num_inference_steps=4, guidance_scale=3.0, output_type="np")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd_folder):
    """An export folder of an opened masked adapter trained (written) on the tiny SD folder."""
    root = tmp_path_factory.mktemp("other-bases")
    sd = load_base(tiny_sd_folder)
    torch.manual_seed(0)
    adapter = build_adapter(sd)
    with torch.no_grad():                      # every gate open, so that the adapter visibly changes the images
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERLIB_RUNS", str(root / "runs"))
        run = write_run(root / "runs", "sd-masked", tiny_sd_folder, adapter)
        adapter.detach()
        export(run, root / "out")
    return root / "out"


def sample(pipe, scale=1.0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, phrases=PHRASES, boxes=BOXES, scale=scale, latents=initial_noise(pipe._base(), [3]),
                **SETTINGS).images[0].astype(int)


def differs(a, b) -> int:
    return int(np.abs(a - b).max())


def copy_with_unet(tiny_sd_folder, folder, **config_changes):
    """A copy of the tiny SD folder whose UNet is rebuilt (random weights, safetensors) with `config_changes`."""
    shutil.copytree(tiny_sd_folder, folder)
    config = {k: v for k, v in UNet2DConditionModel.load_config(tiny_sd_folder, subfolder="unet").items()
              if not k.startswith("_")}
    torch.manual_seed(1)
    UNet2DConditionModel.from_config({**config, **config_changes}).save_pretrained(folder / "unet",
                                                                                  safe_serialization=True)
    return folder


# --- 1. a fine-tune of the base: the same config, other weights

@pytest.fixture(scope="module")
def finetuned_folder(tmp_path_factory, tiny_sd_folder):
    folder = tmp_path_factory.mktemp("ft") / "finetuned-sd"
    shutil.copytree(tiny_sd_folder, folder)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * p.std().nan_to_num(0.0).clamp(min=1e-3) * torch.randn(p.shape, generator=g))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def test_a_finetuned_base_of_the_same_architecture_loads_with_a_warning_and_samples(exported, tiny_sd_folder,
                                                                                   finetuned_folder):
    ours = load_file(str(finetuned_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(tiny_sd_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys() and max((ours[k] - theirs[k]).abs().max() for k in ours) > 0
    config = lambda folder: {k: v for k, v in UNet2DConditionModel.load_config(folder, subfolder="unet").items()
                             if not k.startswith("_")}
    assert config(finetuned_folder) == config(tiny_sd_folder)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        original = GroundedPipeline.from_adapter(exported, tiny_sd_folder)
    assert not [w for w in caught if "trained on" in str(w.message)]         # its own base: no warning
    with pytest.warns(UserWarning, match=rf"trained on {re.escape(str(tiny_sd_folder))}; it is applied to "
                                         rf"{re.escape(str(finetuned_folder))}, a base of the same architecture"):
        pipe = GroundedPipeline.from_adapter(exported, str(finetuned_folder))
    try:
        saved = load_file(str(exported / "adapter.safetensors"))
        assert all(torch.equal(pipe.adapter.state_dict()[k].cpu(), v) for k, v in saved.items())
        assert pipe.adapter.attached_to(pipe.unet)
        grounded, base_alone = sample(pipe), sample(pipe, scale=0.0)
        assert np.isfinite(grounded).all() and grounded.std() > 0
        assert differs(grounded, base_alone) > 1            # the adapter acts on the fine-tune
        assert differs(grounded, sample(original)) > 1      # the fine-tune's own weights act
    finally:
        pipe.adapter.detach()
        original.adapter.detach()


# --- 2. a LoRA through the pipeline's own load_lora_weights

def write_lora(tiny_sd_folder, folder, pipeline=StableDiffusionPipeline):
    """A rank-4 peft LoRA on the tiny UNet's attention projections (its B random, so that it acts), in diffusers'
    LoRA format (what diffusers' LoRA training scripts write, through `pipeline.save_lora_weights`)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert layers and all("lora" in k for k in layers)
    pipeline.save_lora_weights(save_directory=folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def test_a_lora_loaded_by_the_pipeline_acts_and_the_adapter_still_acts(exported, tiny_sd_folder, tmp_path):
    lora = write_lora(tiny_sd_folder, tmp_path / "lora")
    pipe = GroundedPipeline.from_adapter(exported, tiny_sd_folder)
    try:
        blocks = transformer_blocks(pipe.unet)
        hooked = {name: len(b._forward_hooks) for name, b in blocks.items()}
        assert all(hooked.values())                            # the adapter's hooks, on every block
        without = sample(pipe)
        pipe.load_lora_weights(lora)
        assert any("lora_A" in n for n, _ in pipe.unet.named_modules())          # the LoRA is in
        after = transformer_blocks(pipe.unet)
        assert list(after) == list(blocks) and all(after[n] is blocks[n] for n in blocks)   # blocks not replaced
        assert {name: len(b._forward_hooks) for name, b in after.items()} == hooked
        assert pipe.adapter.attached_to(pipe.unet)
        with_lora, base_alone = sample(pipe), sample(pipe, scale=0.0)
        assert differs(with_lora, without) > 1                 # the LoRA acts
        assert differs(with_lora, base_alone) > 1              # the adapter still acts, on the LoRA'd base
        pipe.unload_lora_weights()
        assert not any("lora_A" in n for n, _ in pipe.unet.named_modules())
        assert differs(sample(pipe), without) <= 1             # unloaded: the adapter alone again
    finally:
        pipe.adapter.detach()


def test_load_lora_weights_refuses_an_sdxl_base_and_the_way_it_names_loads_the_lora(tiny_sdxl_folder, tmp_path):
    lora = write_lora(tiny_sdxl_folder, tmp_path / "lora", StableDiffusionXLPipeline)
    pipe = GroundedPipeline.from_base(load_base(tiny_sdxl_folder), None)
    pipe.set_progress_bar_config(disable=True)
    image = lambda: pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SETTINGS).images[0].astype(int)
    without = image()
    with pytest.raises(ValueError, match=rf"load_lora_weights: the base {re.escape(str(tiny_sdxl_folder))} is an "
                                         r"SDXL base.*pipe\.unet\.load_lora_adapter\(LORA, prefix='unet', "
                                         r"use_safetensors=True\) \(SDXL\)"):
        pipe.load_lora_weights(lora)
    assert not any("lora_A" in n for n, _ in pipe.unet.named_modules())          # refused before anything loaded
    pipe.unet.load_lora_adapter(lora, prefix="unet", use_safetensors=True)        # what the message says
    assert differs(image(), without) > 1


# --- 3. another architecture: a ValueError naming the folder, the base and the dimension

def wider_text(tiny_sd_folder, folder):
    """The tiny SD folder with a 48-wide text encoder and a UNet cross-attending to it."""
    copy_with_unet(tiny_sd_folder, folder, cross_attention_dim=48)
    config = CLIPTextConfig.from_pretrained(tiny_sd_folder / "text_encoder")
    config.hidden_size, config.intermediate_size = 48, 96
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda src, dst: copy_with_unet(src, dst, transformer_layers_per_block=2),
     r"the number of transformer blocks: 4 in the adapter, 8 in this base"),
    (lambda src, dst: copy_with_unet(src, dst, block_out_channels=(64, 64)),
     r"the width of transformer block down_blocks\.0\.attentions\.0\.transformer_blocks\.0: 32 in the adapter, 64 "
     r"in this base; the width of transformer block up_blocks\.1\.attentions\.0\.transformer_blocks\.0: 32"),
    (wider_text, r"the phrase width \(the text encoder's phrase embedding\): 32 in the adapter, 48 in this base; "
                 r"the cross-attention width .*: 32 in the adapter, 48 in this base\."),
], ids=["block-count", "block-width", "cross-attention-width"])
def test_another_architecture_is_refused_naming_folder_base_and_dimension(exported, tiny_sd_folder, tmp_path, make,
                                                                          message):
    other = load_base(make(tiny_sd_folder, tmp_path / "other"))
    with pytest.raises(ValueError, match=rf"adapter {re.escape(str(exported / 'adapter.safetensors'))} does not fit "
                                         rf"the base {re.escape(other.path)} \(an SD 1.x/2.x base\): {message}"):
        GroundedPipeline.from_adapter(exported, other)
    assert not any(b._forward_hooks for b in transformer_blocks(other.unet).values())   # nothing was attached
