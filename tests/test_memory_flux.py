"""scripts/memory_ladder.py --flux computes FLUX.1-dev's memory from parts; here its arithmetic is checked against the
real modules on the tests' tiny FLUX: the parameter counts built on the meta device are the built adapter's, and the
activations summed class by class are what one forward of that network saves (plain and checkpointed)."""
import importlib.util

import pytest
import torch

from adapterlib.model.adapter import SpatialAdapter, select_blocks
from adapterlib.model.hooks import transformer_blocks
from adapterlib.paths import REPO_ROOT
from helpers import flux_transformer_config


@pytest.fixture(scope="module")
def ladder():
    spec = importlib.util.spec_from_file_location("memory_ladder", REPO_ROOT / "scripts" / "memory_ladder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config() -> dict:
    return flux_transformer_config(num_layers=3, num_single_layers=3)


def test_the_meta_counts_are_the_built_adapters(ladder):
    from diffusers import FluxTransformer2DModel
    counts = ladder.flux_trainable(tiny_config(), text_dim=16)
    assert set(counts) == {(c, ff) for c in ladder.FLUX_CHOICES for ff in (4, 2, None)}
    torch.manual_seed(0)
    net = FluxTransformer2DModel(**tiny_config())                 # real weights on the CPU this time
    for (choice, ff), n in counts.items():
        built = SpatialAdapter(net, 16, adapted_blocks=choice, feedforward=ff is not None, ff_mult=ff or 4)
        assert n == sum(p.numel() for p in built.trainable_parameters().values()), (choice, ff)
    assert counts["all", 4] > counts["all", 2] > counts["all", None]
    # 6 blocks of one width: double, single and either half 3 layers, middle 2 (blocks 2-3)
    assert counts["double", 2] == counts["single", 2] == counts["first-half", 2] > counts["middle", 2]


def test_flux1_devs_counts_and_layers(ladder):
    base = ladder.flux_base_parameters()
    assert round(base["transformer"] / 1e9, 2) == 11.90 and round(base["t5_xxl"] / 1e9, 2) == 4.76
    assert round(base["clip_l"] / 1e6) == 123 and round(base["vae"] / 1e6) == 84
    counts = ladder.flux_trainable(choices=("double", "middle"), ffs=(2,))
    assert counts["double", 2] == counts["middle", 2]                           # 19 layers each, all of width 3,072


def test_the_activations_summed_by_class_are_what_a_forward_saves(ladder):
    """The classes measured on three choices sum, for every choice, to what that choice's forward saves on the same
    network, plain and checkpointed (what is held for the backward when the forward ends), and at batch 2."""
    net = ladder.build_flux(tiny_config(), (3, 3))
    names = list(transformer_blocks(net))
    measure = lambda choice, batch=1, **kw: ladder.flux_block_bytes(net, choice, 2, batch, 8, text_tokens=8,
                                                                   text_dim=16, **kw)
    classes = ladder.flux_classes([measure(c) for c in ladder.MEASURE_CHOICES])
    for choice in ladder.FLUX_CHOICES:
        summed = ladder.flux_activations(classes, names, select_blocks(net, choice))
        plain, checkpointed = measure(choice), measure(choice, checkpointing=True)
        assert summed["plain"] == pytest.approx(plain["total"], rel=0.01), choice
        assert summed["checkpointed"] == pytest.approx(checkpointed["total"], rel=0.01), choice
        assert 0 < checkpointed["inputs"] < checkpointed["total"] < plain["total"]
        assert 0 < summed["recompute"] < summed["plain"]
    # batch 2 has its own classes: autocast's bf16 copies of the adapter's weights and the rotary tables are once a
    # step, so a batch of 2 keeps less than twice a batch of 1
    twos = [ladder.flux_block_bytes(net, c, 2, 2, 8, text_tokens=8, text_dim=16) for c in ladder.MEASURE_CHOICES]
    two = ladder.flux_classes(twos)
    for choice in ladder.FLUX_CHOICES:
        summed = ladder.flux_activations(two, names, select_blocks(net, choice))["plain"]
        assert summed == pytest.approx(measure(choice, batch=2)["total"], rel=0.01), choice
    assert measure("middle")["total"] < twos[-1]["total"] < 2 * measure("middle")["total"]
    with pytest.raises(ValueError, match="one batch size"):
        ladder.flux_classes([twos[0], measure("double")])
    # every class FLUX.1-dev's cells need is among them (57 blocks; the same rules, no measurement missing)
    with torch.device("meta"):
        from diffusers import FluxTransformer2DModel
        full = FluxTransformer2DModel(**ladder.flux_config())
    for _, choice in ladder.FLUX_CELLS:
        assert ladder.flux_activations(classes, list(transformer_blocks(full)), select_blocks(full, choice))["plain"] > 0
    with pytest.raises(ValueError, match="no measurement of a block of class"):
        ladder.flux_activations({**classes, "saved": {}}, names, select_blocks(net, "middle"))
