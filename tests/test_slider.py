"""The gate slider, headless: its callback is a plain function of the widget values."""
import pytest
import torch

from adapterlib.adapter import build_adapter
from adapterlib.base import load_base
from adapterlib.evaluate import heldout_layouts
from adapterlib.data import png_bytes
from adapterlib.figures import boxed_grid
from adapterlib.sample import generate
from adapterlib.slider import GateSlider

STEPS = 3


@pytest.fixture
def adapter(open_adapter):
    return open_adapter


@pytest.fixture
def slider(base, adapter):
    return GateSlider(base, adapter, heldout_layouts(3), steps=STEPS)


def test_setting_a_control_regenerates_the_image(slider):
    first = bytes(slider.image.value)           # ipywidgets holds the PNG as a memoryview
    assert first.startswith(b"\x89PNG")
    slider.scale.value = 0.5
    after_scale = bytes(slider.image.value)
    assert after_scale != first
    slider.seed.value = 11
    assert slider.image.value != after_scale
    assert slider.image.value == png_bytes(slider.render(scale=0.5, layout=0, seed=11, tau=1.0))


def test_scale_zero_shows_the_base_image(slider, base):
    slider.scale.value = 0.0
    record, seed = slider.layouts.records[0], slider.layouts.seeds[0]
    alone = boxed_grid(generate(base, [record], [seed], steps=STEPS), [record], upscale=slider.upscale, ncols=1)
    assert slider.image.value == png_bytes(alone)


def test_render_is_a_pure_function_of_its_arguments(slider):
    args = dict(scale=1.5, layout=1, seed=4, tau=0.5)
    first = png_bytes(slider.render(**args))
    slider.scale.value, slider.tau.value, slider.seed.value = 0.25, 1.0, 9     # widgets move, args do not
    assert png_bytes(slider.render(**args)) == first
    assert png_bytes(slider.render(**{**args, "tau": 1.0})) != first


def test_choosing_a_layout_starts_at_its_evaluation_seed(slider):
    slider.seed.value = 42
    slider.layout.value = 2
    assert slider.seed.value == slider.layouts.seeds[2] == 2
    assert slider.image.value == png_bytes(slider.render(**slider.values()))


def test_the_slider_displays_without_a_browser(slider):
    bundle = slider._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/plain" in bundle
