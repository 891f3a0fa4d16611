"""The base model loads through one function: the shipped tiny model, a saved tiny base, an SD folder."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from adapterlib.model import sample

from adapterlib import shapes
from adapterlib.model.base import SHIPPED_BASE, load_base
from adapterlib.shapes.tiny_base import build_tiny_base
from helpers import SD_RESOLUTION


def _unet_output(base, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction on a fixed noisy input and caption context (text encoder included)."""
    channels, side = base.unet.config.in_channels, base.unet.config.sample_size
    x = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        context = base.encode_captions(["a red circle and a blue square", ""])
        return base.unet(x, torch.tensor([10, 900]), encoder_hidden_states=context).sample


def test_tiny_base_round_trips_through_save_and_load(tmp_path):
    base = build_tiny_base(seed=0).freeze()
    loaded = load_base(base.save(tmp_path / "tiny"))
    assert loaded.vae is None and loaded.resolution == shapes.RESOLUTION
    assert torch.equal(loaded.tokenize(["a red circle"]), base.tokenize(["a red circle"]))
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert loaded.scheduler.config.prediction_type == base.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.equal(_unet_output(loaded), _unet_output(base))
    assert not any(p.requires_grad for m in loaded.modules() for p in m.parameters())  # loaded frozen


def test_sd_folder_loads_through_the_same_function(tiny_sd_folder):
    base = load_base(tiny_sd_folder)
    assert base.vae is not None and base.unet.config.in_channels == 4
    assert base.resolution == base.unet.config.sample_size * 2 == SD_RESOLUTION
    # SD's PNDM scheduler config becomes the DDPM training schedule with the same betas
    assert isinstance(base.scheduler, DDPMScheduler) and base.scheduler.config.beta_schedule == "scaled_linear"
    ids = base.tokenize(["a red circle"])
    assert ids.shape == (1, 77) and ids[0, 0] == base.tokenizer.bos_token_id
    phrases = base.encode_phrases(["red circle", "blue square"])   # pooled at each phrase's EOS token
    assert phrases.shape == (2, 32) and not torch.allclose(phrases[0], phrases[1])

    records = shapes.heldout_records(2)
    images = sample.generate(base, records, seeds=[0, 1], steps=2)
    assert images.shape == (2, SD_RESOLUTION, SD_RESOLUTION, 3) and images.dtype == np.uint8


def test_missing_folder_error_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_base(missing)
    (tmp_path / "empty").mkdir()   # a folder that exists but is not a diffusers-style model
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        load_base(tmp_path / "empty")


def test_shipped_base_loads():
    """The trained tiny base ships inside the package, with a model card, and loads by name."""
    base = load_base()
    assert base.vae is None and base.resolution == shapes.RESOLUTION
    assert any(SHIPPED_BASE.glob("*.md")), f"no model card (*.md) in {SHIPPED_BASE}"
    ids = base.tokenize([r.caption for r in shapes.heldout_records(20)])
    assert not (ids == base.tokenizer.unk_token_id).any()   # every held-out word is in the vocabulary


def test_base_training_renders_its_world_and_fine_tunes_a_base(tmp_path):
    from adapterlib.data.buckets import bucket_of
    from adapterlib.shapes.tiny_base import PretrainConfig, render_world, train_base
    images, records = render_world("mix", 40)
    assert images.shape == (40, 32, 32, 3) and len(records) == 40
    first, v2 = records[:20], records[20:]
    assert [r.objects for r in first] == [r.objects for r in shapes.render_batch(range(20))[1]]
    assert [r.objects for r in v2] == [r.objects for r in
                                       shapes.render_batch(range(20, 40), options=shapes.V2_TRAINING_OPTIONS)[1]]
    assert max(len(r.objects) for r in v2) > 3 and any(bucket_of(r)[1] for r in v2)   # the harder world is in it
    with pytest.raises(ValueError, match="world"):
        PretrainConfig(world="shapes-v3")
    # a fine-tune starts from the given base's weights (one step at lr ~0: its weights barely move)
    cfg = PretrainConfig(steps=1, batch_size=2, n_images=4, warmup=1, lr=1e-12, world="mix", init_from="shapes-tiny",
                         log_every=1)
    tuned = train_base(cfg, tmp_path / "tuned", log=lambda *_: None)
    shipped = load_base("shapes-tiny")
    assert torch.allclose(_unet_output(tuned), _unet_output(shipped), atol=1e-4)
    assert not torch.allclose(_unet_output(build_tiny_base()), _unet_output(shipped), atol=1e-2)


def test_the_recipe_defaults_are_the_shipped_base_recipe():
    """PretrainConfig() trains what was shipped (both worlds, the same optimiser and data), but for the step count
    and its warm-up, which scripts/gpu_train_base.py sizes to the GPU budget."""
    import dataclasses
    import json
    from adapterlib.shapes.tiny_base import PretrainConfig
    shipped = json.loads((SHIPPED_BASE / "training.json").read_text())["config"]
    default = dataclasses.asdict(PretrainConfig())
    assert shipped["world"] == default["world"] == "mix" and shipped["init_from"] == ""
    assert {k for k in shipped if shipped[k] != default[k]} == {"steps", "warmup", "log_every"}
