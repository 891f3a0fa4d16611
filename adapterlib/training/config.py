"""The one training config: a flat dataclass whose field names are the notebooks' papermill parameters
and the command line's flags.

A config is a preset (`shapes`, the embedded default; `sd15`, the training plan's values for Stable
Diffusion 1.5 on one GPU; `sdxl`, the same on Stable Diffusion XL; `sd3`, on Stable Diffusion 3 / 3.5 (an MM-DiT);
`flux`, on FLUX.1; `shapes-dit`, the default on the shipped tiny MM-DiT; `smoke`, a seconds-long run for tests)
with overrides. Every field given
(`-p NAME VALUE` to papermill, `--NAME VALUE` to `python -m adapterlib train`) reaches the config and
the run's config.json; a name that is not a field is an error that lists the fields.

On resume, the fields split once into two parts (`RESUME_FIXED`, `RESUME_FREE`): the fixed ones
define the run (architecture, data, optimisation) and may not change; the free ones (length,
logging, where it runs) may.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from adapterlib.data.manifest import check_max_objects
from adapterlib.options import (ARCHITECTURE, BLOCK_CHOICES, BLOCK_PARTS, DEVICES, FIELD_CHOICES, MAX_OBJECTS,
                                check_attention_options)


@dataclass
class TrainConfig:
    # --- the run
    preset: str = "shapes"               # the PRESETS entry the other fields started from
    run_name: str = ""                   # "" -> "<preset>-<date>-<time>"
    base_model: str = "shapes-tiny"      # the shipped tiny base, or a diffusers-style SD folder path; "" (the sd15,
                                         # sdxl, sd3 and flux presets'): none given, which the config refuses (give the
                                         # folder); shapes-dit, shapes-flux: the shipped tiny MM-DiT, FLUX
    data: str = "shapes-v2"              # a manifest (.jsonl) path, or a generated Shapes set: "shapes-v2" (1-6 objects,
                                         # some overlapping, smaller in front), "shapes-crowds" (half of them placed
                                         # anywhere) or "shapes" (the first world: 1-3, apart);
                                         # "" (the sd15 preset's): none given, which training refuses
    n_train: int = 20_000                # size of the generated Shapes set (data "shapes-v2", "shapes-crowds", "shapes")
    seed: int = 0                        # data order, noise, timesteps, dropouts, scales: one random stream
    device: str = "auto"                 # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    mixed_precision: str = "bf16"        # bf16 | fp16 | no; CPU always runs fp32
    # --- the training plan's parameters (docs/guide/training-plan.md)
    steps: int = 2400                    # optimiser steps (each of batch_size samples)
    batch_size: int = 16                 # samples a step (the global batch over every process)
    gradient_accumulation_steps: int = 1  # that batch in this many micro-batches (forward + backward each), then one
    # optimizer step: the same update with a micro-batch's activations (batch_size / processes must divide by it)
    lr: float = 1e-3                     # AdamW learning rate (the gates: lr * gate_lr_scale)
    phrase_dropout: float = 0.1          # a dropped phrase becomes the learned null phrase
    scale_min: float = 0.5               # injection scale drawn per sample from [scale_min, scale_max]
    scale_max: float = 1.0               # (a sample's scale multiplies every gate in its forward)
    save_every: int = 250                # checkpoint interval (steps)
    # --- what a researcher needs besides
    caption_dropout: float = 0.5         # GLIGEN's 50%: without the caption, only the boxes say what goes where
    weight_decay: float = 0.0            # never on the gates (decay pulls them back to zero)
    gate_lr_scale: float = 10.0          # gates learn at lr * gate_lr_scale: they start at 0 and everything
                                         # behind them gets gradient only once they open
    warmup: int = 100                    # linear learning-rate warm-up (steps)
    lr_schedule: str = "constant"        # after the warm-up: constant | cosine (down to 0 at `steps`; a resume that adds
                                         # steps stretches the rest of the decay over them)
    box_loss_weight: float = 1.0         # loss = MSE over the image + this x the mean over objects of the MSE inside each
                                         # object's box: every object counts alike, however small (losses.box_loss)
    box_loss_region: str = "box"         # the box loss's region of each object: box | visible (its own pixels in the
                                         # training image, found by its phrase's colour) | exclusive (its box less the
                                         # pixels other objects show) | layered (visible for an object hidden in part,
                                         # exclusive otherwise); all but box: Shapes data, a pixel base
    box_loss_ring: int = 0               # cells of the prediction's grid just outside each box, outside every box, added
                                         # to the object's region: the box's edge, where an object spilling over it
                                         # shows (0: none; losses.edge_ring)
    base_guidance: float = 3.5           # a guidance-distilled base (FLUX.1-dev) trains with this as its guidance input
                                         # (its card's 3.5, FluxPipeline's); every other base has no such input
    timesteps: str = "uniform"           # uniform | cubic: t = (1 - u^3) T, most steps at high noise, where the layout is
                                         # decided (T2I-Adapter's schedule; losses.draw_timesteps) | logit-normal (SD3's
                                         # density; on a flow base t picks the schedule's sigma)
    grad_clip: float = 1.0               # the adapter's gradient norm is clipped to this
    adapter_attention: str = "masked"    # self | cross | masked | gligen (diffusers' own GLIGEN modules: adapterlib/model/gligen.py)
    adapter_norm: str = "layernorm"      # layernorm | rmsnorm (the training plan's remedy for gate collapse)
    adapter_feedforward: bool = True     # a gated feed-forward after each gated attention (GLIGEN's)
    adapter_ff_mult: int = 4             # the gated feed-forward's width, a multiple of the block's (GLIGEN's: 4);
                                         # 2 halves its cost (docs/guide/blocks.md)
    init_from: str = ""                  # adapter_attention gligen: start from the fusers and position net of a diffusers
                                         # GLIGEN folder (e.g. masterful/gligen-1-4-generation-text-box on disk) to fine-tune it
    adapter_depth: str = "none"          # masked attention, a token inside several boxes: none (all of them) |
                                         # smaller-front (only the smallest: smaller objects in front) | learned (a
                                         # per-head weight on the box's -log(area), zero at init: training decides)
    adapter_subcell: bool = False        # masked attention: a cell's value from an object's token also carries the part
                                         # of the cell its box covers (edges inside a cell; adapter.cell_cover)
    adapter_blocks: str = "all"          # which transformer blocks get a gated layer: all | decoder (mid + up blocks) |
                                         # low (a quarter of the input's side or less) | migc (mid + first up block with
                                         # transformer blocks) | first-half | last-half | middle (the middle third; an
                                         # MM-DiT's choices) | double | single (FLUX's double- / single-stream
                                         # blocks) | a comma list of block names / prefixes (adapter.select_blocks)
    max_objects: int = MAX_OBJECTS       # the object limit: the manifest reader's, the adapter's (data.MAX_OBJECTS)
    crop: str = "none"                   # none (stretch to a square) | center | random (per sample, per epoch):
                                         # shorter side to the resolution, square crop, boxes clipped (data.transform_sample)
    flip: bool = False                   # horizontal flip with probability 0.5, boxes flipped; phrases left as they are
    cache: bool = True                   # encode images (VAE moments), captions and phrases once, to disk
                                         # (runs/_cache/; encodings.py); crop="random" is never cached
    num_workers: int = 2                 # DataLoader workers decoding images when they are read every step
    compile: bool = False                # torch.compile the adapted UNet (a GPU speed option; minutes to compile)
    gradient_checkpointing: bool = False  # drop the network's activations after the forward, recompute them in the
                                         # backward: less memory for a second forward; the same gradients
    tensorboard: bool = False            # also log metrics and checkpoint samples to RUN/tensorboard/ (needs tensorboard;
                                         # the earlier switch for report_to tensorboard)
    report_to: str = "none"              # trackers that get metrics.csv's rows and the checkpoint samples: none |
                                         # tensorboard | wandb | tensorboard,wandb (wandb: pip install wandb; offline
                                         # with WANDB_MODE=offline)
    log_every: int = 25                  # a metrics.csv row every this many steps
    n_samples: int = 8                   # samples (with boxes drawn) written at each checkpoint
    checkpoint_grounding: bool = True    # measure those samples by the run's detector: grounding_* in metrics.csv
    # --- how the run is measured (checkpoint tests, notebooks 04/05, evaluate; docs/guide/real-data.md)
    heldout: str = ""                    # the layouts it is judged on: a manifest path (e.g. an imported COCO val), v1,
                                         # v2 or crowds; "" -> its Shapes world's held-out set, or for a manifest run its own
                                         # first training records, marked "(training records: not held out)"
    detector: str = ""                   # what measures grounding: "" (or "color") the Shapes colour detector, or a
                                         # folder with a local zero-shot OWL-ViT / OWLv2 model (real images)
    # --- reliability
    on_bad_record: str = "error"         # error | skip: a manifest record that fails its checks (skip: counted, logged)
    keep_last: int = 0                   # keep only the newest N checkpoints (0: keep all; the newest valid one always stays)
    max_nonfinite_steps: int = 10        # this many non-finite losses in a row stop the run (precision / lr are off)

    def __post_init__(self):
        check_types(self)
        if not self.base_model.strip():
            raise ValueError(
                f"base_model is empty: the {self.preset!r} preset trains a Stable Diffusion base, and names none (it "
                f"would not fall back to the 32-px shapes-tiny). Give its diffusers folder: --base_model FOLDER "
                f"(python -m adapterlib train), -p base_model FOLDER (papermill), base_model=FOLDER (make_config)")
        if not self.run_name:
            self.run_name = f"{self.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        for name in ("phrase_dropout", "caption_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1]")
        if not 0 <= self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 <= scale_min <= scale_max, got {self.scale_min} and {self.scale_max}")
        if not self.scale_max > 0:
            raise ValueError("scale_max = 0: every gate would be multiplied by 0 and the adapter would never learn")
        for name, allowed in FIELD_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: choose one of {allowed}")
        check_blocks_spec(self.adapter_blocks)
        trackers(self)                           # a tracker we do not know: an error now
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ValueError(f"device = {self.device!r}: choose auto, cpu, cuda or cuda:N")
        for name in ("lr", "grad_clip", "gate_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be > 0")
        for name in ("warmup", "box_loss_weight", "box_loss_ring", "weight_decay", "n_samples", "seed", "keep_last", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")
        check_max_objects(self.max_objects)
        if self.adapter_attention == "gligen":
            for name, value in GLIGEN_FIXED.items():
                if getattr(self, name) != value:
                    raise ValueError(f"adapter_attention = 'gligen' is diffusers' GLIGEN as it is (a fuser in every "
                                     f"transformer block, its own feed-forward, as its diffusers export needs): give "
                                     f"{name} = {value!r}, not {getattr(self, name)!r}")
        check_attention_options(self.adapter_attention, self.adapter_depth, self.adapter_subcell)
        if self.init_from and self.adapter_attention != "gligen":
            raise ValueError(f"init_from = {self.init_from!r} (a diffusers GLIGEN folder) needs adapter_attention = "
                             f"'gligen', not {self.adapter_attention!r}")
        for name in ("steps", "batch_size", "save_every", "log_every", "n_train", "max_nonfinite_steps",
                     "adapter_ff_mult", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"batch_size = {self.batch_size} does not split into gradient_accumulation_steps = "
                             f"{self.gradient_accumulation_steps} equal micro-batches: give a batch_size that is a "
                             "multiple of it")
        from adapterlib.training.evalspec import check_detector, check_heldout
        check_heldout(self.heldout)              # both checked here, before any work: a typo found now, not
        check_detector(self.detector)            # after the training, at the first checkpoint test

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_text(self, fields: tuple[str, ...] | None = None) -> str:
        """Human-readable, one `name = value` a line (the training plan's train_config.txt); `fields`: only those."""
        return "".join(f"{k} = {v!r}\n" for k, v in self.to_dict().items() if fields is None or k in fields)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
TRACKERS = ("tensorboard", "wandb")


def trackers(cfg) -> list[str]:
    """The trackers a run reports to: `report_to`'s (none, or a comma list of TRACKERS), and tensorboard when the
    earlier switch `tensorboard` is on; an unknown name is an error naming the choices."""
    names = [n.strip() for n in str(cfg.report_to).split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to = {cfg.report_to!r}: {', '.join(map(repr, unknown))} is not a tracker; give none, "
                         f"or a comma list of {', '.join(TRACKERS)}")
    if getattr(cfg, "tensorboard", False) and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names

# The resume policy, stated once: every field is in exactly one part (tests/test_config.py checks it).
# Fixed: what the run *is* -- its identity, the base and the adapter's architecture, the data and its
# order, the optimisation recipe. Changing one of these is a new run, under a new run_name.
RESUME_FIXED = ("preset", "run_name", "base_model", "data", "n_train", "seed", "batch_size",
                "gradient_accumulation_steps", "lr",
                "phrase_dropout", "scale_min", "scale_max", "caption_dropout", "weight_decay", "gate_lr_scale",
                "warmup", "lr_schedule", "box_loss_weight", "box_loss_region", "box_loss_ring", "base_guidance", "timesteps", "grad_clip", "adapter_attention",
                "adapter_norm", "adapter_feedforward", "adapter_ff_mult", "adapter_depth", "adapter_subcell",
                "adapter_blocks", "max_objects", "on_bad_record", "crop", "flip", "init_from")
# Free: how long it runs, how often it logs and saves, where (a run may move to another machine), how its
# inputs are read (cache, workers), and its safety nets.
# How it is measured (heldout, detector) is free too: training never reads them, so a run trained without
# them can be given a held-out set or a detector later, and a moved held-out manifest pointed to again.
RESUME_FREE = ("steps", "save_every", "log_every", "n_samples", "device", "mixed_precision", "keep_last",
               "max_nonfinite_steps", "cache", "num_workers", "compile", "tensorboard", "report_to", "heldout",
               "detector", "checkpoint_grounding", "gradient_checkpointing")
# The subset of RESUME_FIXED that a checkpoint's adapter is built from (options.ARCHITECTURE).
ARCHITECTURE_FIELDS = tuple(ARCHITECTURE)

PRESETS = {
    # the embedded default, sized for a 2-core CPU (see README for what it reaches and why these values); the
    # cosine decay, the layered box loss, the decoder-only blocks and the 2x feed-forward (docs/guide/blocks.md) are this
    # recipe's (measured on Shapes), so a run saved before `lr_schedule`, `box_loss_region`, `adapter_blocks`,
    # `adapter_ff_mult` or `adapter_subcell` existed, which has no such field, still resumes with what it trained with
    # (the field's default). The sub-cell map with the ring of background outside each box in the box loss: held-out
    # v2 mIoU 0.80 -> 0.97 of the ceiling's, at no cost in time (docs/notes/crowds.md)
    "shapes": dict(lr_schedule="cosine", box_loss_region="layered", adapter_blocks="decoder", adapter_ff_mult=2,
                   adapter_subcell=True, box_loss_ring=1),
    # Stable Diffusion 1.5 on one GPU: the training plan's values (steps, batch, lr, dropouts, scales, checkpoints) with
    # the recipe that grounds on Shapes (masked attention, the per-object box loss over boxes, the cosine decay, gates
    # at 10x, the mid and up blocks only: docs/guide/blocks.md); your base and data must be given (base_model=FOLDER: the
    # config refuses none; data=PATH: training refuses none). Why each: docs/notes/recipe.md
    "sd15": dict(base_model="", data="", steps=25_000, batch_size=2, lr=1e-4, phrase_dropout=0.1, scale_min=0.5, scale_max=1.0,
                 save_every=2000, warmup=500, log_every=50, mixed_precision="bf16", adapter_attention="masked",
                 box_loss_weight=1.0, box_loss_region="box", lr_schedule="cosine", gate_lr_scale=10.0,
                 adapter_blocks="decoder"),
    # seconds on a CPU: what the tests and nbval run (chosen by the test harness, never a user default)
    "smoke": dict(steps=40, batch_size=4, n_train=256, save_every=20, log_every=5, n_samples=4, warmup=10),
}

# Stable Diffusion XL base (docs/guide/sdxl.md): sd15's values and recipe at the base's own resolution (SDXL base: 1024 px,
# 128x128 latents), batch 2 and bf16 as on SD 1.5 (bf16 keeps SDXL's VAE in range; under fp16 the VAE stays fp32), and
# a centre crop rather than a stretch: the crop's offset and the original size reach the UNet as SDXL's conditioning
PRESETS["sdxl"] = {**PRESETS["sd15"], "crop": "center"}

# The tiny MM-DiT on Shapes (`shapes-dit`, an SD3 transformer in pixel space): the shapes recipe on the middle third
# of the DiT's joint blocks (a stack has no decoder; on Shapes `middle` grounded as every block did at 1.5x the
# speed: docs/notes/dit.md) and flow matching's own objective (`timesteps` uniform draws sigma uniformly, as the
# base was trained); without the sub-cell map and its ring (not yet measured on an MM-DiT, whose tokens carry their
# positions)
PRESETS["shapes-dit"] = {**PRESETS["shapes"], "base_model": "shapes-dit", "adapter_blocks": "middle",
                         "adapter_subcell": False, "box_loss_ring": 0}

# Stable Diffusion 3 / 3.5 (docs/guide/sd3.md): sd15's values and recipe on the middle third of the MM-DiT's joint
# blocks (the tiny DiT's choice; ContextGen's on FLUX; at SD3 width a third of every block's adapter memory and
# about the frozen step's cost: docs/notes/recipe.md), SD3's logit-normal timestep density (diffusers' SD3 examples'
# default), a centre crop at the base's resolution
PRESETS["sd3"] = {**PRESETS["sd15"], "adapter_blocks": "middle", "timesteps": "logit-normal", "crop": "center"}

# FLUX.1 (docs/guide/flux.md): sd3's values and recipe (SD3's logit-normal density, a centre crop) on the middle third
# of its 19 double- + 38 single-stream blocks (single-stream 0-18: ContextGen's measured choice on FLUX; the tiny DiT's
# best O-mIoU), with the 2x feed-forward: at FLUX's width (3,072) a 4x layer is 122.7M parameters, a 2x one 85.0M
# (docs/notes/memory.md; why: docs/notes/flux.md)
PRESETS["flux"] = {**PRESETS["sd3"], "adapter_ff_mult": 2}

# Which family of base each user preset is for: a run of one on another family's base is refused before any work
# The tiny FLUX on Shapes (`shapes-flux`, a FLUX transformer in pixel space: 2 double- + 4 single-stream blocks): the
# shapes-dit recipe, the middle third of its blocks (its first two single-stream ones; docs/notes/flux.md)
PRESETS["shapes-flux"] = {**PRESETS["shapes-dit"], "base_model": "shapes-flux"}

PRESET_FAMILY = {"shapes": "unet", "sd15": "unet", "sdxl": "unet", "shapes-dit": "mmdit", "sd3": "mmdit",
                 "shapes-flux": "flux", "flux": "flux"}


def check_preset_fits(cfg: TrainConfig, base) -> None:
    """A preset made for one family of base (a UNet, an SD3 MM-DiT, FLUX: PRESET_FAMILY) refused on another, before
    any work: its blocks, timesteps and recipe are that family's."""
    family = PRESET_FAMILY.get(cfg.preset)
    if family is not None and family != base.family:
        fits = [p for p, f in PRESET_FAMILY.items() if f == base.family]
        raise ValueError(f"preset {cfg.preset!r} is for a {family} base; {cfg.base_model} is {base.kind} base "
                         f"({base.family}): use one of {fits} (--preset NAME, -p preset NAME)")


# What `adapter_attention gligen` (diffusers' GLIGEN modules as they are) fixes: a fuser in every block, its own
# feed-forward (width 4). `make_config` gives a gligen run these where the user names none; any other is refused.
GLIGEN_FIXED = dict(adapter_blocks="all", adapter_ff_mult=4)

# The sizes `python -m adapterlib bench` measures, each with the preset that trains such a base (whose blocks and
# feed-forward width its "ours" row takes)
BENCH_SIZES = {"tiny": "shapes", "sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}

# The presets a user picks (`smoke` is the test harness's), in the order `train --help` lists their values
USER_PRESETS = ("shapes", "sd15", "sdxl", "shapes-dit", "sd3", "shapes-flux", "flux")


def preset_value(preset: str, name: str):
    """The value field `name` has in `preset` before any override: the preset's own, else the field's default."""
    return PRESETS[preset].get(name, TrainConfig.__dataclass_fields__[name].default)


# The preset used when none is named. Unset for users ("shapes"); the test harness sets it to "smoke".
DEFAULT_PRESET_ENV = "ADAPTERLIB_DEFAULT_PRESET"


def default_preset() -> str:
    return os.environ.get(DEFAULT_PRESET_ENV) or "shapes"


def unknown_fields_error(names, own=(), fields=FIELDS) -> ValueError:
    if set(fields) != set(FIELDS):                       # a notebook that takes some of the fields
        unused = sorted(set(names) & set(FIELDS))
        unused = f" ({unused}: config fields this notebook does not use)" if unused else ""
        return ValueError(f"unknown parameter(s) {sorted(names)}{unused}: this notebook takes "
                          f"{sorted({*own, *fields})}")
    own = f" and this notebook's own parameters {sorted(own)}" if own else ""
    return ValueError(f"unknown parameter(s) {sorted(names)}: not config fields{own}. The config fields are "
                      f"{list(FIELDS)}")


def make_config(preset: str = "", **overrides) -> TrainConfig:
    """A preset ("" or None: the default preset) with overrides; unknown names are an error that
    lists the fields. `adapter_attention gligen` takes GLIGEN_FIXED's values for the fields not given; another
    attention than the masked one, without `adapter_subcell` given, runs without the preset's sub-cell map."""
    preset = preset or default_preset()
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose one of {list(PRESETS)}")
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise unknown_fields_error(unknown)
    values = {**PRESETS[preset], **overrides, "preset": preset}
    if overrides.get("adapter_attention") == "gligen":    # GLIGEN's own placement and width, not the preset's
        values.update({name: value for name, value in GLIGEN_FIXED.items() if name not in overrides})
    if overrides.get("adapter_attention", "masked") != "masked" and "adapter_subcell" not in overrides:
        values["adapter_subcell"] = False                 # the preset's sub-cell map is the masked attention's
    return TrainConfig(**values)


def resume_changes(saved: dict, changes: dict, where) -> dict:
    """The changes a resume may make to the saved config: those to RESUME_FREE fields. A change to a
    RESUME_FIXED field is an error naming each one; unknown names are an error listing the fields. A field
    missing from `saved` (a run saved before the field existed, e.g. crop / flip) has its default value."""
    unknown = set(changes) - set(FIELDS)
    if unknown:
        raise unknown_fields_error(unknown)
    saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in saved}, **saved}
    refused = sorted(k for k, v in changes.items() if k in RESUME_FIXED and saved.get(k) != v)
    if refused:
        detail = ", ".join(f"{k} (saved {saved.get(k)!r}, asked {changes[k]!r})" for k in refused)
        raise ValueError(f"resume of {where}: cannot change {detail}: these define the run (architecture, data, "
                         f"optimisation); only {list(RESUME_FREE)} may change on resume. Start a new run_name instead")
    return {k: v for k, v in changes.items() if saved.get(k) != v}


def field_comments() -> dict[str, list[str]]:
    """Each field's comment in TrainConfig's source (the text after `#` on its line and on the comment-only lines
    under it), by field: the one place a field is described, which notebook 02's parameters cell is generated from
    (`parameters_cell`)."""
    import inspect

    comments, current = {}, None
    for line in inspect.getsource(TrainConfig).splitlines():
        code, _, comment = line.partition("#")
        name = code.strip().partition(":")[0]
        if name in FIELDS and ":" in code:
            current = name
            comments[name] = [comment.strip()] if comment.strip() else []
        elif current and not code.strip() and comment.strip() and not comment.startswith(" ---"):
            comments[current].append(comment.strip())
        else:
            current = None
    return comments


def parameters_cell() -> str:
    """Notebook 02's parameters cell: `preset`, then every field but `preset` as None (the preset's value), each
    with its comment from TrainConfig's source. tests/test_headless.py holds the notebook to it word for word;
    `python -m adapterlib.training.config` rewrites the cell."""
    width = max(map(len, FIELDS))
    lines = ['preset = ""   # "" -> shapes (the embedded default) | sd15 | sdxl | sd3 | flux (give base_model and '
             'data) | shapes-dit | shapes-flux | smoke',
             "# Every field of adapterlib.training.config.TrainConfig; None = the preset's value (generated from the",
             "# config's source by `python -m adapterlib.training.config`: edit the comments there).",]
    for name, comment in field_comments().items():
        if name == "preset":
            continue
        head = f"{name:<{width}} = None"
        # papermill reads a line with a second "=" as no parameter at all: such a comment starts on the next line
        first = comment[:1] if comment and "=" not in comment[0] else []
        lines.append(f"{head}   # {first[0]}" if first else head)
        lines += [f"{'':<{len(head)}}   # {more}" for more in comment[len(first):]]
    return "\n".join(lines)


def write_parameters_cell(notebook: str | Path) -> bool:
    """Rewrite the notebook's cell tagged `parameters` with `parameters_cell()`; True when it changed."""
    path = Path(notebook)
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = parameters_cell().split("\n")
    new = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    if cell["source"] == new:
        return False
    cell["source"] = new
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


class NotebookParameters:
    """Collects a notebook's papermill parameters, whatever their names, for `config`.

    Made in the cell *before* the parameters cell, it remembers which names exist; the config cell
    then takes every name defined since (in the parameters cell, by papermill's injected cell, or
    by hand) and not None as a parameter. Names that are config fields the notebook takes (all of them, or
    those it uses: `config(fields=...)`) become overrides; the notebook's own parameters are returned as they
    are; any other name is an error. The parameters cells list every field they take as None, so papermill
    knows each name and the preset decides the rest."""

    def __init__(self, namespace: dict):
        self.namespace, self.before = namespace, set(namespace)

    def given(self) -> dict:
        """Every parameter defined since this object was made and not None (None: "not given", so a
        parameters cell can list every field; IPython's _-names, modules and functions excluded)."""
        return {k: v for k, v in self.namespace.items()
                if k not in self.before and not k.startswith("_") and isinstance(v, (str, int, float, bool, list, dict))}

    def split(self, own: tuple[str, ...], fields: tuple[str, ...] = FIELDS) -> tuple[dict, dict]:
        """(the notebook's own parameters, config overrides); a name neither `own` nor one of `fields` (the
        config fields the notebook takes: all by default) is an error."""
        given = self.given()
        unknown = set(given) - set(own) - set(fields)
        if unknown:
            raise unknown_fields_error(unknown, own, fields)
        return ({k: v for k, v in given.items() if k in own},
                {k: v for k, v in given.items() if k in fields and k not in own})

    def config(self, fields: tuple[str, ...] = FIELDS) -> "TrainConfig":
        """The config of a notebook whose own parameter is `preset`: that preset ("" -> the default
        preset) with every other given name as a field override. `fields`: the config fields the notebook
        uses (default: all); any other name is an error, so a notebook never takes a value it ignores."""
        own, overrides = self.split(own=("preset",), fields=fields)
        return make_config(own.get("preset", ""), **overrides)

    def only(self, own: tuple[str, ...]) -> dict:
        """For a notebook that builds no config: its own parameters; any other name is an error."""
        given = self.given()
        unknown = set(given) - set(own)
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}: this notebook takes {sorted(own)}")
        return given


def check_blocks_spec(spec: str) -> None:
    """`adapter_blocks` before any work: a named choice, or a comma list of block names / prefixes each starting
    with down_blocks, mid_block or up_blocks (whether each matches a block of the base is checked on the base)."""
    items = [i.strip() for i in spec.split(",")]
    if spec.strip() in BLOCK_CHOICES:
        return
    bad = [i for i in items if not i or i.split(".")[0] not in BLOCK_PARTS or not all(i.split("."))]
    if bad:
        raise ValueError(f"adapter_blocks = {spec!r}: {', '.join(map(repr, bad))} is not a block. Choose one of "
                         f"{BLOCK_CHOICES}, or a comma list of block names / prefixes starting with one of "
                         f"{BLOCK_PARTS} (e.g. 'mid_block,up_blocks.1')")


def check_types(cfg) -> None:
    """A value of the wrong type is an error, not a silent cast (papermill's `-p lr 1` arrives as int:
    ints are accepted for float fields, nothing else is converted)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, want = getattr(cfg, f.name), hints[f.name]
        ok = (isinstance(value, bool) if want is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
              isinstance(value, int) and not isinstance(value, bool) if want is int else
              isinstance(value, want))
        if not ok:
            raise TypeError(f"config field {f.name!r} must be {want.__name__}, got {value!r} "
                            f"({type(value).__name__})")


if __name__ == "__main__":          # python -m adapterlib.training.config: notebook 02's parameters cell from the source
    from adapterlib.paths import repo_path
    target = repo_path("notebooks/02_train.ipynb")
    print(f"{target}: {'rewritten' if write_parameters_cell(target) else 'already the config'}")
