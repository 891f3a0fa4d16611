"""The one training config: a flat dataclass whose field names are the notebooks' papermill parameters."""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    # --- the run
    preset: str = "shapes"               # the PRESETS entry the other fields started from
    run_name: str = ""                   # "" -> "<preset>-<date>-<time>"
    base_model: str = "shapes-tiny"      # the shipped tiny base, or a diffusers-style SD folder path
    data: str = "shapes"                 # a manifest (.jsonl) path, or "shapes": a generated Shapes set
    n_train: int = 20_000                # size of the generated Shapes set (data == "shapes")
    seed: int = 0
    device: str = "auto"                 # "auto": cuda when available, else cpu
    mixed_precision: str = "bf16"        # bf16 | fp16 | no; CPU always runs fp32
    # --- the seed plan's parameters
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    phrase_dropout: float = 0.1          # a dropped phrase becomes the learned null phrase
    scale_min: float = 0.5               # injection scale drawn per sample from [scale_min, scale_max]
    scale_max: float = 1.0
    save_every: int = 250
    # --- what a researcher needs besides
    caption_dropout: float = 0.5         # GLIGEN's 50%: without the caption, only the boxes say what goes where
    weight_decay: float = 0.0            # never on the gates (decay pulls them back to zero)
    gate_lr_scale: float = 10.0          # gates learn at lr * gate_lr_scale: they start at 0 and everything
                                         # behind them gets gradient only once they open
    warmup: int = 100
    grad_clip: float = 1.0
    adapter_attention: str = "masked"    # self | cross | masked
    adapter_norm: str = "layernorm"      # layernorm | rmsnorm (the seed's remedy for gate collapse)
    adapter_feedforward: bool = True
    max_objects: int = 30
    log_every: int = 25
    n_samples: int = 8                   # samples (with boxes drawn) written at each checkpoint

    def __post_init__(self):
        check_types(self)
        if not self.run_name:
            self.run_name = f"{self.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        for name in ("phrase_dropout", "caption_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1]")
        if not 0 <= self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 <= scale_min <= scale_max, got {self.scale_min} and {self.scale_max}")
        choices = dict(adapter_attention=("self", "cross", "masked"), adapter_norm=("layernorm", "rmsnorm"),
                       mixed_precision=("bf16", "fp16", "no"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: choose one of {allowed}")
        for name in ("steps", "batch_size", "save_every", "log_every", "max_objects"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        """Human-readable, one `name = value` a line (the seed's train_config.txt)."""
        return "".join(f"{k} = {v!r}\n" for k, v in self.to_dict().items())

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))


# Fields that change the adapter's architecture or the data it sees: resume refuses to change them.
ARCHITECTURE_FIELDS = ("base_model", "adapter_attention", "adapter_norm", "adapter_feedforward", "max_objects")
RESUME_FIXED_FIELDS = ARCHITECTURE_FIELDS + ("data", "n_train", "seed", "batch_size")

PRESETS = {
    # the embedded default, sized for a 2-core CPU (see README for what it reaches and why these values)
    "shapes": {},
    # the seed plan's values for Stable Diffusion 1.5 on one GPU
    "sd15": dict(steps=25_000, batch_size=2, lr=1e-4, phrase_dropout=0.1, scale_min=0.5, scale_max=1.0,
                 save_every=2000, gate_lr_scale=1.0, warmup=500, log_every=50, mixed_precision="bf16",
                 adapter_attention="self"),
}


def make_config(preset: str = "shapes", **overrides) -> TrainConfig:
    """A preset with overrides; unknown names are an error that lists the fields."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose one of {list(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}; fields are "
                         f"{[f.name for f in dataclasses.fields(TrainConfig)]}")
    return TrainConfig(**{**PRESETS[preset], **overrides, "preset": preset})


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
