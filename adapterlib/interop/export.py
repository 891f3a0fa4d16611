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


def export(run, out, *, checkpoint: str = "latest", measure: int = 0, device: str | None = "cpu",
           overwrite: bool = False) -> dict:
    """Write the export folder `out` for `run` at `checkpoint`; returns what was written. `measure` > 0: the
    grounding of the first `measure` of the run's layouts is measured now and written into the card."""
    run_dir = resolve_run(run)
    step, path = resolve_checkpoint(run_dir, str(checkpoint))
    config = read_config(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty: give a new folder (or --overwrite)")
    weights = path / "adapter.safetensors"
    arch = adapter_config(weights)
    written = {"adapter": str(out / "adapter.safetensors")}
    base = None
    measured = None
    needs_base = measure > 0 or arch.get("attention") == "gligen"
    if needs_base:
        base = load_run_base(run_dir, device)
        adapter = load_adapter(path, base)           # refuses a checkpoint of another base before writing anything
    if measure > 0:
        measured = _measure(run_dir, base, adapter, measure)
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


def _measure(run_dir: Path, base, adapter, n: int) -> dict:
    from adapterlib.evaluation import evaluate
    layouts = evaluate.run_layouts(run_dir, n)
    _, summary = evaluate.evaluate(layouts, reference="adapter", base=base, adapter=adapter)
    return {**json.loads(dumps(summary)), "layouts": layouts.source, "n_layouts": len(layouts),
            "command": f"python -m adapterlib evaluate {run_dir} --checkpoint <step> --limit {n}"}


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
                         for k, v in measured.items() if k != "command")
        grounding = (f"Measured at export on {measured['n_layouts']} of the run's layouts ({measured['layouts']}), "
                     f"25 DDIM steps, guidance 3, scale 1, colour detector:\n\n| measure | value |\n|---|---|\n{rows}\n\n"
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
- **Adapter**: attention `{arch['attention']}`, {len(arch['blocks'])} transformer blocks, at most
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

