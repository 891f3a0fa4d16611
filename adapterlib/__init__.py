"""adapterlib: train spatial adapters (phrases + boxes -> gated grounding layers) on frozen diffusion models.

The map of the package, floor by floor, lowest first. A module imports its own floor and the floors below it, never
above (tests/test_structure.py holds this); the notebooks and `python -m adapterlib` (`__main__`) stand on top.

    leaves      `options`  every option list a field or flag takes (adapters, blocks, data, precision, ...)
                `paths`    where things live: the repository, the shipped files, `figures/`
                `files`    strict JSON, the one atomic write (temp file, fsync, rename) and the one file hash
                `runs`     run folders: names, the runs root, configs, checkpoints listed, metrics.csv
    data/       `manifest` the JSON Lines format and its image transforms (crop, the one flip);
                `importers` COCO and ODVG into it; `buckets` a layout's object count x overlap
    model/      `base` the frozen base (a UNet or an SD3 MM-DiT: the shipped tiny ones or a diffusers folder; the
                training objective, DDPM's or flow matching's); `precision` device and dtypes;
                `adapter` the spatial adapter; `gligen` diffusers' GLIGEN modules; `sample` the one denoising loop;
                `detectors` what measures grounding
    shapes/     the embedded default: the synthetic world, its colour detector, the tiny bases' recipe (UNet, DiT)
    analysis/   `gates` gate statistics and training phases; `figures` every figure
    training/   `config` the one config and its presets; `evalspec` a run's held-out set and detector checked;
                `worlds` the seam to the Shapes world; `cache` the encoding cache (key, build, check); `batches` a
                step's inputs (from the cache or the images, in the data order); `losses` the losses and schedules;
                `checkpoint`; `lock` one writer; `progress`; `distributed`; `train` the loop
    evaluation/ `evaluate` grounding on held-out layouts; `basecache` the base's samples kept; `checkpoint_test`;
                `checks` (notebook 01); `bench` throughput of the training step
    interop/    `pipeline` a diffusers pipeline; `export` an adapter folder (and diffusers' GLIGEN format)
    notebook/   `monitor` the live plot and a run's status; `slider` the gate slider

Run folders, checkpoints and exports hold no module paths (safetensors, JSON, and `torch.load(weights_only=True)`
state), so moving a module never breaks a saved run.
"""
