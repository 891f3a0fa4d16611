"""`python -m adapterlib export RUN [--checkpoint STEP] --out DIR`: a run's adapter as a self-describing folder.

    DIR/adapter.safetensors     the checkpoint's adapter weights, byte for byte (architecture in the metadata)
    DIR/adapter_config.json     the adapter's architecture, the base, the data, the step and the whole recipe
    DIR/README.md               a model card: base model, data, steps, recipe, the grounding measured at export
    DIR/diffusers/              a `gligen` run on a latent base only: diffusers' StableDiffusionGLIGENPipeline
                                folder (the base's VAE, text encoder, tokenizer, and a gated UNet holding the
                                base's weights, the fusers and the position net)

`checkpoint.load_adapter(DIR, base)` loads DIR back; `StableDiffusionGLIGENPipeline.from_pretrained(DIR /
"diffusers")` samples a gligen export with diffusers alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapterlib.training.checkpoint import adapter_config, load_adapter, load_run_base
from adapterlib.files import dumps
from adapterlib.runs import read_config, resolve_checkpoint, resolve_run

RECIPE = ("steps", "batch_size", "lr", "lr_schedule", "warmup", "gate_lr_scale", "weight_decay", "phrase_dropout",
          "caption_dropout", "scale_min", "scale_max", "box_loss_weight", "box_loss_region", "timesteps", "seed",
          "mixed_precision")


def export(run, out, *, checkpoint: str = "latest", measure: int = 0, device: str | None = "auto",
           overwrite: bool = False, layouts: str | Path | None = None, detector: str | Path | None = None) -> dict:
    """Write the export folder `out` for `run` at `checkpoint`; returns what was written. `measure` > 0: the
    grounding of the first `measure` layouts is measured now and written into the card, exactly as `python -m
    adapterlib evaluate RUN --limit N` measures it: on the run's own layouts (`evaluate.run_layouts`: its `heldout`
    field, ...) by the run's own detector (`evaluate.run_detector`: its `detector` field, else the colour
    detector), or on `layouts` / by `detector` when given; a detector that can measure none of the layouts'
    objects is an error before the base loads. `device`: "auto" (CUDA when available), "cpu", "cuda:N"."""
    run_dir = resolve_run(run)
    step, path = resolve_checkpoint(run_dir, str(checkpoint))
    config = read_config(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty: give a new folder (or --overwrite)")
    if measure < 0:
        raise ValueError(f"--measure {measure}: give a positive number of layouts (or 0: not measured)")
    weights = path / "adapter.safetensors"
    arch = adapter_config(weights)
    written = {"adapter": str(out / "adapter.safetensors")}
    base = None
    measured = None
    if measure > 0:
        measuring = _measuring(run_dir, measure, layouts, detector, device)    # before the base loads
    needs_base = measure > 0 or arch.get("attention") == "gligen"
    if needs_base:
        base = load_run_base(run_dir, device)
        adapter = load_adapter(path, base)           # refuses a checkpoint of another base before writing anything
    if measure > 0:
        measured = _measure(run_dir, base, adapter, measure, *measuring, layouts_given=layouts,
                            detector_given=detector)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(weights, tmp / "adapter.safetensors")
    info = dict(variant=arch["attention"], adapter=arch, base_model=config["base_model"], data=config["data"],
                step=step, run=run_dir.name, checkpoint=str(path), train_config=config)
    diffusers_note = ""
    if arch.get("attention") == "gligen":
        if base.vae is None:
            diffusers_note = (f"No diffusers folder: the base {config['base_model']} works in pixel space (no VAE), "
                              "and diffusers' StableDiffusionGLIGENPipeline needs a latent (VAE) base.")
        else:
            write_gligen_pipeline(base, adapter, tmp / "diffusers")
            written["diffusers"] = str(out / "diffusers")
            diffusers_note = ("`diffusers/` is a StableDiffusionGLIGENPipeline folder (the base's parts, and a gated "
                              "UNet holding the base's weights and these fusers): "
                              "`StableDiffusionGLIGENPipeline.from_pretrained(DIR / 'diffusers')`.")
    if measured is not None:
        info["grounding_at_export"] = measured
    (tmp / "adapter_config.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (tmp / "README.md").write_text(model_card(info, diffusers_note))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if base is not None:
        adapter.detach()
    return {**written, "folder": str(out), "step": step, "variant": arch["attention"]}


def _measuring(run_dir: Path, n: int, layouts, detector, device):
    """What `--measure N` measures on and by, as `evaluate RUN` chooses them (`evaluation.command`): the
    layouts (given, else the run's own), the detector spec (given, else the run's `detector` field, else
    "color") and the loaded detector, checked able to measure the layouts' objects, all before any sampling."""
    from adapterlib.evaluation import evaluate
    from adapterlib.training.worlds import load_detector
    chosen = evaluate.named_layouts(layouts, n) if layouts not in (None, "") else evaluate.run_layouts(run_dir, n)
    spec = evaluate.run_detector(run_dir, detector)
    loaded = load_detector(spec, device)
    evaluate.check_measurable(loaded, chosen)
    return chosen, spec, loaded


def _measure(run_dir: Path, base, adapter, n: int, layouts, spec: str, detector, *, layouts_given=None,
             detector_given=None) -> dict:
    from adapterlib.evaluation import evaluate
    _, summary = evaluate.evaluate(layouts, reference="adapter", base=base, adapter=adapter, detector=detector)
    command = f"python -m adapterlib evaluate {run_dir} --checkpoint <step> --limit {n}"
    if layouts_given not in (None, ""):
        command += f" --layouts {layouts_given}"
    if detector_given not in (None, ""):
        command += f" --detector {spec}"
    return {**json.loads(dumps(summary)), "layouts": layouts.source, "n_layouts": len(layouts),
            "detector": spec, "detector_name": detector.name, "command": command}


def detector_words(spec: str) -> str:
    """How a card names the detector of its measurement."""
    if spec in ("", "color"):
        return "the Shapes colour detector (`color`: it finds an object by the colour word in its phrase)"
    return f"the zero-shot detector `{spec}`"


def write_gligen_pipeline(base, adapter, folder: Path) -> Path:
    """diffusers' StableDiffusionGLIGENPipeline folder for a gligen adapter on a latent base."""
    from diffusers import StableDiffusionGLIGENPipeline

    from adapterlib.model.gligen import gated_unet
    pipe = StableDiffusionGLIGENPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                         unet=gated_unet(base.unet, adapter), scheduler=sampling_scheduler(base),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sampling_scheduler(base):
    """The scheduler the base folder ships (SD: PNDM), else the training schedule (`base.scheduler`, DDPM)."""
    import diffusers
    config = Path(base.path) / "scheduler" / "scheduler_config.json"
    if config.is_file():
        kind = getattr(diffusers, json.loads(config.read_text()).get("_class_name", ""), None)
        if kind is not None:
            return kind.from_config(kind.load_config(config.parent))
    return base.scheduler


def model_card(info: dict, diffusers_note: str = "") -> str:
    cfg = info["train_config"]
    recipe = "\n".join(f"| {k} | {cfg[k]!r} |" for k in RECIPE if k in cfg)
    arch = info["adapter"]
    measured = info.get("grounding_at_export")
    if measured:
        rows = "\n".join(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
                         for k, v in measured.items() if k not in ("command", "detector_name"))
        by = detector_words(measured.get("detector", "color"))
        grounding = (f"Measured at export on {measured['n_layouts']} layouts ({measured['layouts']}), "
                     f"25 DDIM steps, guidance 3, scale 1, by {by}:\n\n| measure | value |\n|---|---|\n{rows}\n\n"
                     f"Reproduce: `{measured['command'].replace('<step>', str(info['step']))}`\n")
    else:
        grounding = ("Not measured at export. Measure it with "
                     f"`python -m adapterlib evaluate {info['run']} --checkpoint {info['step']}` "
                     "(or export with `--measure N`).\n")
    return f"""# Spatial adapter `{info['variant']}` ({info['run']}, step {info['step']})

A grounding adapter (phrases + boxes -> gated layers) for a frozen text-to-image UNet, trained with adapterlib.

- **Base model**: `{info['base_model']}` (the adapter's weights are for this base; another base of the same
  architecture, e.g. a fine-tune, loads them too, with no guarantee of quality)
- **Data**: `{info['data']}`
- **Steps**: {info['step']}
- **Adapter**: attention `{arch['attention']}`, a gated layer on {len(arch.get('adapted_blocks', arch['blocks']))} of the base's {len(arch['blocks'])} transformer blocks, at most
  {arch['max_objects']} objects, phrase width {arch['text_dim']}, token width {arch['token_dim']}

## Recipe

| field | value |
|---|---|
{recipe}

(every field: `adapter_config.json`, `train_config`)

## Grounding

{grounding}
## Use

```python
from adapterlib.model.base import load_base
from adapterlib.training.checkpoint import load_adapter
from adapterlib.model.sample import generate
base = load_base("{info['base_model']}")
adapter = load_adapter("THIS_FOLDER", base)       # attached to base.unet
```

{diffusers_note}
"""

