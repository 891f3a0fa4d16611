"""The gate slider: drag the injection scale (and pick the layout, seed and tau) to regenerate one image.

    slider = GateSlider(base, adapter, heldout_layouts(20))
    slider          # in JupyterLab: the controls and the image

What the widgets do is one plain function of their values, `slider.render(scale, layout, seed, tau)`
-> PIL image (boxes drawn, enlarged); the widgets only call it on change. So the behaviour is tested
headless by setting `.value` on a control and reading `slider.image.value` (PNG bytes), and the
notebook runs under papermill and nbval, where no browser ever draws the widgets.

In a browser the image is shown at its own pixel size (never stretched to the cell width, so the
controls and the image fit on one screen and the enlarged pixels stay sharp), and the status line says
"rendering ..." while a new image is computed (1-2 s).
"""
from __future__ import annotations

import contextlib
import time

import ipywidgets as widgets

from adapterlib.data.manifest import png_bytes
from adapterlib.evaluation.evaluate import Layouts
from adapterlib.analysis.figures import boxed_grid
from adapterlib.model.sample import generate

DEFAULT_STEPS = 20   # DDIM steps: about 0.8 s an image for the shipped base on one CPU thread


def render_image(base, adapter, record, seed: int, *, scale: float, tau: float, steps: int = DEFAULT_STEPS,
                 guidance: float = 3.0, grounding_guidance: str = "base", upscale: int = 8):
    """One sample of `record` at `seed` with the adapter at `scale` for the first `tau` of the steps (and
    `grounding_guidance`, `options.GROUNDING_GUIDANCE`), enlarged `upscale` times with the requested boxes drawn
    (a PIL image)."""
    image = generate(base, [record], [int(seed)], adapter=adapter, scale=float(scale), tau=float(tau),
                     steps=steps, guidance=guidance, grounding_guidance=grounding_guidance)
    return boxed_grid(image, [record], upscale=upscale, ncols=1)


class GateSlider:
    """Controls for scale (0-2), layout, seed and tau, and the image they produce.

    Choosing a layout also sets the seed to that layout's evaluation seed (held-out layout i: seed
    i), so the slider shows the same image the evaluation measured; change the seed afterwards to
    see another sample of the same layout."""

    def __init__(self, base, adapter, layouts: Layouts, *, steps: int = DEFAULT_STEPS, guidance: float = 3.0,
                 upscale: int = 8, scale: float = 1.0, tau: float = 1.0, grounding_guidance: str = "base"):
        if len(layouts) == 0:
            raise ValueError("GateSlider needs at least one layout")
        self.base, self.adapter, self.layouts = base, adapter, layouts
        self.steps, self.guidance, self.upscale = steps, guidance, upscale
        self.grounding_guidance = grounding_guidance     # what guidance's unconditional branch is (fixed)
        self.scale = widgets.FloatSlider(value=scale, min=0.0, max=2.0, step=0.05, description="scale",
                                         continuous_update=False)
        self.layout = widgets.Dropdown(options=[(f"{i}: {r.caption}", i) for i, r in enumerate(layouts.records)],
                                       value=0, description="layout")
        self.seed = widgets.IntText(value=layouts.seeds[0], description="seed")
        self.tau = widgets.FloatSlider(value=tau, min=0.0, max=1.0, step=0.05, description="tau",
                                       continuous_update=False)
        self.image = widgets.Image(format="png", layout=widgets.Layout(object_fit="contain"))
        self.status = widgets.Label(layout=widgets.Layout(min_height="1.6em"))
        self._holding = False
        for control in self.controls:
            control.observe(self._on_change, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.scale, self.tau]), widgets.HBox([self.layout, self.seed]),
                                    self.image, self.status])
        self.update()

    @property
    def controls(self) -> list[widgets.ValueWidget]:
        return [self.scale, self.layout, self.seed, self.tau]

    def values(self) -> dict:
        return dict(scale=self.scale.value, layout=self.layout.value, seed=self.seed.value, tau=self.tau.value)

    def render(self, scale: float, layout: int, seed: int, tau: float):
        """The image for these widget values (a PIL image): nothing else is read."""
        return render_image(self.base, self.adapter, self.layouts.records[layout], seed, scale=scale, tau=tau,
                            steps=self.steps, guidance=self.guidance, grounding_guidance=self.grounding_guidance,
                            upscale=self.upscale)

    def update(self) -> None:
        """Render the current values into the image widget (the status line says so meanwhile)."""
        v = self.values()
        what = f"scale {v['scale']:.2f}, tau {v['tau']:.2f}, layout {v['layout']}, seed {v['seed']}"
        self.status.value = f"\u23f3 rendering {what} ..."        # sent to the browser before the work starts
        start = time.perf_counter()
        image = self.render(**v)
        self.image.value = png_bytes(image)
        # the image's own pixel size: a flex box would otherwise stretch it to the cell width (and blur it)
        self.image.layout.width, self.image.layout.height = f"{image.width}px", f"{image.height}px"
        self.status.value = f"{what}: {time.perf_counter() - start:.2f} s ({self.steps} DDIM steps)"

    def _on_change(self, change) -> None:
        if self._holding:
            return
        if change["owner"] is self.layout:       # a new layout starts at its evaluation seed
            with self._hold():
                self.seed.value = self.layouts.seeds[change["new"]]
        self.update()

    @contextlib.contextmanager
    def _hold(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def _repr_mimebundle_(self, **kwargs):
        # displaying the slider displays its widgets (a static text fallback where no frontend runs)
        return self.widget._repr_mimebundle_(**kwargs)
