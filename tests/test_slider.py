"""The gate slider, headless: its callback is a plain function of the widget values."""
import pytest
import torch

from adapterlib.model.adapter import build_adapter
from adapterlib.model.base import load_base
from adapterlib.evaluation.evaluate import heldout_layouts
from adapterlib.data.manifest import png_bytes
from adapterlib.analysis.figures import boxed_grid
from adapterlib.model.sample import generate
from adapterlib.notebook.slider import GateSlider

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


def test_the_sliders_grounding_guidance_reaches_the_sampler(base, adapter):
    layouts = heldout_layouts(1)
    record, seed = layouts.records[0], layouts.seeds[0]
    slider = GateSlider(base, adapter, layouts, steps=STEPS, grounding_guidance="off")
    off = generate(base, [record], [seed], adapter=adapter, steps=STEPS, grounding_guidance="off")
    assert slider.image.value == png_bytes(boxed_grid(off, [record], upscale=slider.upscale, ncols=1))
    assert slider.image.value != png_bytes(GateSlider(base, adapter, layouts, steps=STEPS).render(**slider.values()))


def test_choosing_a_layout_starts_at_its_evaluation_seed(slider):
    slider.seed.value = 42
    slider.layout.value = 2
    assert slider.seed.value == slider.layouts.seeds[2] == 2
    assert slider.image.value == png_bytes(slider.render(**slider.values()))


def test_the_slider_displays_without_a_browser(slider):
    bundle = slider._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/plain" in bundle


def test_the_image_is_shown_at_its_own_pixel_size(slider):
    image = slider.render(**slider.values())
    assert (slider.image.layout.width, slider.image.layout.height) == (f"{image.width}px", f"{image.height}px")


def test_the_status_line_says_rendering_while_a_new_image_is_computed(slider):
    seen = []
    slider.status.observe(lambda change: seen.append(change["new"]), names="value")
    slider.scale.value = 0.75
    assert seen[0].startswith("\u23f3 rendering scale 0.75") and "rendering" not in seen[-1]


# ---------------------------------------------------------------------------------------------
# the live plot of notebook 02 and the run notebook 05 picks (fake run folders: no training)

def _fake_run(root, name, *, steps, logged, final=None, checkpoint=None):
    import json
    from adapterlib.runs import CHECKPOINT_FILES, METRIC_COLUMNS, checkpoint_dir
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"steps": steps}))
    rows = [",".join(str(s if c == "step" else 0.5) for c in METRIC_COLUMNS) for s in logged]
    (run / "metrics.csv").write_text("\n".join([",".join(METRIC_COLUMNS), *rows]) + "\n")
    if checkpoint is not None:
        folder = checkpoint_dir(run, checkpoint)
        folder.mkdir(parents=True)
        for f in CHECKPOINT_FILES:
            (folder / f).write_text("x")
    if final is not None:
        (run / "final").mkdir()
        (run / "final" / "adapter.safetensors").write_text("x")
        (run / "final" / "info.json").write_text(json.dumps({"step": final}))
    return run


def test_the_live_plot_always_draws_the_first_and_the_final_step(tmp_path, monkeypatch):
    import IPython.display
    from adapterlib.notebook.monitor import LivePlot
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: shown.append(obj) or _Handle(shown))
    run = _fake_run(tmp_path, "r", steps=20, logged=[5])
    plot = LivePlot(every_s=3600)
    plot(run)
    _fake_run(tmp_path, "r2", steps=20, logged=[5, 10])
    plot(tmp_path / "r2")                                    # within every_s, not the end: not drawn
    assert len(shown) == 1
    _fake_run(tmp_path, "done", steps=20, logged=[5, 10, 15, 20])
    plot(tmp_path / "done")                                  # the final step: drawn whatever the interval
    assert len(shown) == 2 and shown[-1].data == LivePlot().png(tmp_path / "done")


class _Handle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, obj):
        self.shown.append(obj)


def test_notebook_05_picks_the_longest_finished_run_not_a_newer_short_one(tmp_path):
    import os
    import time
    from adapterlib.runs import find_latest_run
    default = _fake_run(tmp_path, "default", steps=1500, logged=[1500], final=1500, checkpoint=1500)
    short = _fake_run(tmp_path, "test-2-steps", steps=2, logged=[2], final=2, checkpoint=2)
    unfinished = _fake_run(tmp_path, "half", steps=3000, logged=[250], checkpoint=250)
    now = time.time()
    for age, run in enumerate([unfinished, short, default]):   # the unfinished run is the newest
        for _, path in [(0, p) for p in (run / "checkpoints").iterdir()]:
            os.utime(path, (now - age * 60, now - age * 60))
    assert find_latest_run(tmp_path) == unfinished                       # resume: the newest checkpoint
    assert find_latest_run(tmp_path, finished_first=True) == default     # analysis: the longest finished run
