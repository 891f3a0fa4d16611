"""A diffusers `DiffusionPipeline` for every adapter variant: a run, an exported folder or a diffusers GLIGEN
folder, on a base.

    from adapterlib.interop.pipeline import GroundedPipeline
    pipe = GroundedPipeline.from_run("my-run")                        # or .from_adapter(EXPORT_DIR, base=SD_DIR)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # any diffusers scheduler
    pipe = pipe.to("cuda", torch.bfloat16)                          # the base cast, the adapter kept fp32 (autocast)
    images = pipe(["a red circle", "two squares"], phrases=[["red circle"], ["square", "square"]],
                  boxes=[[(0.1, 0.1, 0.5, 0.5)], [(0, 0, .4, .4), (.5, .5, 1, 1)]], scale=1.0, tau=1.0,
                  negative_prompt="", num_inference_steps=25, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0)).images

With its default scheduler (our sampler's DDIM) and `latents=sample.initial_noise(base, seeds)`, a call gives
`sample.generate`'s images: both sample through the one loop, `sample.denoise`. `grounding_guidance` says what
classifier-free guidance subtracts (`options.GROUNDING_GUIDANCE`, as everywhere): "base" (the base alone: guidance
strengthens the grounding with the caption; our default), "null" (the grounding with every object replaced by the
null one: diffusers' StableDiffusionGLIGENPipeline) or "off" (the same grounding: only the caption is guided). The
earlier keyword `unconditional="base" | "grounded" | "null"` still works, with a DeprecationWarning ("grounded" is
"off"). Inputs are checked before any work: a bad box, phrase count, prompt list or setting is a ValueError naming
the argument.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from adapterlib.model.adapter import build_adapter, grounding_width
from adapterlib.model.hooks import block_width, transformer_blocks
from adapterlib.model.base import T5_TOKENS, BaseModel, load_base
from adapterlib.training.checkpoint import adapter_config, load_adapter, load_checkpoint
from adapterlib.data.manifest import GroundedObject, Record
from adapterlib.model import sample
from adapterlib.options import GROUNDING_GUIDANCE
from adapterlib.model.sample import Sampling, check_settings

# the earlier keyword `unconditional=`, its values as `grounding_guidance`'s
UNCONDITIONAL = {"base": "base", "grounded": "off", "null": "null"}
# the pipeline's names of the sampling settings (diffusers'), in the checks' messages
ARGUMENTS = dict(steps="num_inference_steps", guidance="guidance_scale")


@dataclass
class GroundedPipelineOutput(BaseOutput):
    images: list  # PIL images, or (B, H, W, 3) uint8 with output_type="np"


def architecture_differences(path: Path, base: BaseModel) -> list[str]:
    """What differs between the architecture the adapter saved at `path` was built for (its adapter_config and
    its tensors' shapes) and `base`'s, one phrase per dimension: the phrase width, the cross-attention width, the
    number (or names) of transformer blocks, an adapted block's width or attention width. Empty: it fits."""
    from safetensors import safe_open
    saved = adapter_config(path)
    blocks = transformer_blocks(base.net)
    out = []
    for what, theirs, ours in (("the phrase width (the text encoder's phrase embedding)", saved.get("text_dim"),
                                base.phrase_dim),
                               ("the cross-attention width (the grounding tokens' width, the network's "
                                "cross_attention_dim)", saved.get("token_dim"), grounding_width(base.net))):
        if theirs is not None and theirs != ours:
            out.append(f"{what}: {theirs} in the adapter, {ours} in this base")
    names, structure = list(saved.get("blocks") or []), len(out)
    if names and len(names) != len(blocks):
        out.append(f"the number of transformer blocks: {len(names)} in the adapter, {len(blocks)} in this base")
    elif names and names != list(blocks):
        first = next(i for i, (a, b) in enumerate(zip(names, blocks)) if a != b)
        out.append(f"the transformer blocks' names: block {first} is {names[first]} in the adapter, "
                   f"{list(blocks)[first]} in this base")
    if len(out) > structure:
        return out                      # the blocks themselves differ: their widths say nothing more
    widths = []
    layer_blocks = saved.get("adapted_blocks") or names          # layer i is on block layer_blocks[i]
    first_key = "linear" if saved.get("attention") == "gligen" else "to_objects"   # (block width, token width)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for i, name in enumerate(layer_blocks):
            block, key = blocks.get(name), f"layers.{i}.{first_key}.weight"
            if block is None or key not in keys:
                continue
            theirs, ours = f.get_slice(key).get_shape()[0], block_width(block)
            if theirs != ours:
                widths.append(f"the width of transformer block {name}: {theirs} in the adapter, {ours} in this base")
                continue
            inner = f"layers.{i}.attn.to_q.weight"           # GLIGEN's fuser (UNet blocks only): heads x head width
            if inner in keys and (theirs := f.get_slice(inner).get_shape()[0]) != block.attn1.inner_dim:
                widths.append(f"the attention width (heads x head width) of transformer block {name}: {theirs} in "
                              f"the adapter, {block.attn1.inner_dim} in this base")
    if len(widths) > 3:
        widths = widths[:3] + [f"and {len(widths) - 3} more blocks' widths"]
    return out + widths


class GroundedPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """The base's parts (vae may be None: a pixel-space base; text_encoder_2 / tokenizer_2: SDXL's and SD3's, FLUX's T5; an
    MM-DiT base (SD3, FLUX) has `transformer` in place of `unet`; SD3 its optional T5, text_encoder_3 / tokenizer_3), a scheduler,
    and an attached adapter. On an SD 1.x/2.x (or pixel-space UNet) base, `load_lora_weights` (and `fuse_lora`,
    `set_adapters`, `unload_lora_weights`) are StableDiffusionPipeline's: a LoRA goes into `unet` / `text_encoder`,
    inside the transformer blocks the adapter's hooks are on, which stay."""
    _optional_components = ["vae", "unet", "text_encoder_2", "tokenizer_2", "transformer", "text_encoder_3",
                            "tokenizer_3"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, adapter=None, base_path: str = "",
                 text_encoder_2=None, tokenizer_2=None, zero_empty_prompt: bool = False, transformer=None,
                 text_encoder_3=None, tokenizer_3=None, t5_tokens: int = T5_TOKENS, sample_size: int | None = None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.t5_tokens = t5_tokens      # SD3, FLUX: the T5 part of a caption (BaseModel.t5_tokens)
        self.sample_size = sample_size  # FLUX: the latent side (BaseModel.sample_size)
        self.adapter = adapter          # not a registered component: it stays fp32 whatever .to() casts
        self.base_path = base_path
        self.zero_empty_prompt = zero_empty_prompt     # SDXL: an empty prompt is zeros (the folder's own setting)

    # --- building
    @classmethod
    def from_base(cls, base: BaseModel, adapter) -> "GroundedPipeline":
        scheduler = sample.sampler(base)          # our sampler's: DDIM, or SD3's flow-matching Euler
        return cls(base.vae, base.text_encoder, base.tokenizer, base.unet, scheduler, adapter, base.path,
                   base.text_encoder_2, base.tokenizer_2, base.zero_empty_prompt, base.transformer,
                   base.text_encoder_3, base.tokenizer_3, base.t5_tokens, base.sample_size)

    @classmethod
    def from_run(cls, run=None, checkpoint: str | int = "latest", *, device: str | None = None) -> "GroundedPipeline":
        """A run's adapter (latest | final | a step) on the run's base."""
        ckpt = load_checkpoint(run, checkpoint, device=device)
        return cls.from_base(ckpt.base, ckpt.adapter)

    @classmethod
    def from_adapter(cls, folder, base, *, device: str | None = "cpu") -> "GroundedPipeline":
        """An exported adapter folder (or a checkpoint folder), or a diffusers GLIGEN folder, on `base` (a
        BaseModel or a base name/folder). Another base than the one it was trained on is allowed when the
        architecture matches (a fine-tune of it); a warning says so. Another architecture is a ValueError naming
        the folder, the base and each dimension that differs, before anything is built."""
        folder = Path(folder)
        base = base if isinstance(base, BaseModel) else load_base(base, device=device or "cpu")
        if (folder / "adapter.safetensors").is_file():
            differ = architecture_differences(folder / "adapter.safetensors", base)
            if differ:
                raise ValueError(f"adapter {folder / 'adapter.safetensors'} does not fit the base {base.path} "
                                 f"({base.kind} base): {'; '.join(differ)}. An adapter loads on the base it was "
                                 "trained on or a fine-tune of it (the same architecture); for this base, train one")
            info = folder / "adapter_config.json"
            trained_on = json.loads(info.read_text()).get("base_model") if info.is_file() else None
            adapter = load_adapter(folder, base)
            if trained_on and Path(str(trained_on)).name != Path(base.path).name and trained_on != base.path:
                warnings.warn(f"the adapter in {folder} was trained on {trained_on}; it is applied to {base.path}, a "
                              "base of the same architecture: it loads, its grounding there is not measured")
        else:
            from adapterlib.model.gligen import load_gligen_weights, read_gligen_folder
            if (folder / "unet").is_dir() or (folder / "config.json").is_file():
                read_gligen_folder(folder)            # another architecture, no position net, a .bin: refused here
                adapter = build_adapter(base, attention="gligen")
                try:
                    load_gligen_weights(adapter, folder)
                except Exception:
                    adapter.detach()
                    raise
            else:
                raise FileNotFoundError(f"{folder}: no adapter.safetensors (an export or checkpoint folder) and no "
                                        "unet/config.json (a diffusers GLIGEN folder)")
        return cls.from_base(base, adapter)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """StableDiffusionPipeline's LoRA loading (`StableDiffusionLoraLoaderMixin.load_lora_weights`): a LoRA
        folder, file or state dict into `unet` and `text_encoder`. SD 1.x/2.x-family (and pixel-space UNet) bases
        only: an SDXL or SD3 base is refused, before anything is read."""
        if self.text_encoder_2 is not None or self.transformer is not None:
            base = self._base()
            raise ValueError(f"load_lora_weights: the base {base.path} is {base.kind} base; this pipeline loads SD "
                             "1.x/2.x LoRAs (StableDiffusionPipeline's loader: unet and text_encoder). Load the "
                             "network's part alone: pipe.unet.load_lora_adapter(LORA, prefix='unet', "
                             "use_safetensors=True) (SDXL), pipe.transformer.load_lora_adapter(LORA, "
                             "prefix='transformer', use_safetensors=True) (SD3, FLUX)")
        return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def to(self, *args, **kwargs) -> "GroundedPipeline":
        super().to(*args, **kwargs)
        base = self._base()
        if base.is_sdxl and base.net.dtype == torch.float16:
            base.to(dtype=torch.float16)        # SDXL's VAE back to fp32 where its config says force_upcast
        if self.adapter is not None:
            self.adapter.to(device=base.device, dtype=torch.float32)
        return self

    # --- the checks, before any work
    def _inputs(self, prompt, phrases, boxes, negative_prompt):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: give a string or a list of strings, got {prompt!r}")
        n = len(prompts)
        phrases = [] if phrases is None else phrases
        boxes = [] if boxes is None else boxes
        nested = lambda v: len(v) > 0 and all(isinstance(x, (list, tuple)) and (not x or not isinstance(x[0], (int, float)))
                                               for x in v)
        phrases = [list(phrases)] * n if not (phrases and isinstance(phrases[0], (list, tuple))) else [list(p) for p in phrases]
        boxes = [list(boxes)] * n if not nested(boxes) else [list(b) for b in boxes]
        if len(phrases) != n or len(boxes) != n:
            raise ValueError(f"phrases / boxes: {len(phrases)} and {len(boxes)} lists for {n} prompts; give one list "
                             "per prompt (or one list for every prompt)")
        limit = self.adapter.max_objects if self.adapter is not None else 0
        records = []
        for i, (caption, ph, bx) in enumerate(zip(prompts, phrases, boxes)):
            if len(ph) != len(bx):
                raise ValueError(f"prompt {i}: {len(ph)} phrases but {len(bx)} boxes; give one box per phrase")
            if ph and self.adapter is None:
                raise ValueError("phrases and boxes need an adapter: this pipeline has none")
            if len(ph) > limit:
                raise ValueError(f"phrases[{i}]: {len(ph)} phrases, more than this adapter's max_objects ({limit})")
            for j, (p, b) in enumerate(zip(ph, bx)):
                if not isinstance(p, str) or not p.strip():
                    raise ValueError(f"phrases[{i}][{j}] = {p!r}: give a non-empty string")
                if len(b) != 4 or not all(isinstance(v, (int, float)) for v in b):
                    raise ValueError(f"boxes[{i}][{j}] = {b!r}: give 4 numbers x0, y0, x1, y1 in [0, 1]")
                x0, y0, x1, y1 = (float(v) for v in b)
                if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                    raise ValueError(f"boxes[{i}][{j}] = {list(b)}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                                     "(fractions of the image's width and height)")
            records.append(Record(caption, tuple(GroundedObject(p, tuple(float(v) for v in b)) for p, b in zip(ph, bx))))
        negatives = [negative_prompt or ""] * n if negative_prompt is None or isinstance(negative_prompt, str) \
            else list(negative_prompt)
        if len(negatives) != n:
            raise ValueError(f"negative_prompt: {len(negatives)} for {n} prompts")
        return records, negatives

    def _base(self) -> BaseModel:
        return BaseModel(self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae, self.base_path,
                         self.text_encoder_2, self.tokenizer_2, self.zero_empty_prompt, self.transformer,
                         self.text_encoder_3, self.tokenizer_3, self.t5_tokens, self.sample_size)

    @torch.no_grad()
    def __call__(self, prompt, phrases=None, boxes=None, *, scale: float = 1.0, tau: float = 1.0,
                 negative_prompt=None, num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 generator=None, latents: torch.Tensor | None = None, grounding_guidance: str = "base",
                 output_type: str = "pil", callback=None, unconditional: str | None = None) -> GroundedPipelineOutput:
        """Images of `prompt` (a string or a list), each with its `phrases` and `boxes` (x0, y0, x1, y1 in [0, 1]),
        sampled by `sample.denoise` with this pipeline's scheduler. On a guidance-distilled base (FLUX.1-dev)
        `guidance_scale` is the transformer's guidance input and one branch is sampled, as FluxPipeline does
        (`negative_prompt` and `grounding_guidance` then do not apply). `unconditional`: deprecated, see the module."""
        if unconditional is not None:
            if unconditional not in UNCONDITIONAL:
                raise ValueError(f"unconditional = {unconditional!r}: choose one of {tuple(UNCONDITIONAL)} (its "
                                 f"name now is grounding_guidance, one of {GROUNDING_GUIDANCE})")
            grounding_guidance = UNCONDITIONAL[unconditional]
            warnings.warn(f"unconditional={unconditional!r} is grounding_guidance={grounding_guidance!r}",
                          DeprecationWarning, stacklevel=3)     # 3: the caller, past torch.no_grad's wrapper
        records, negatives = self._inputs(prompt, phrases, boxes, negative_prompt)
        check_settings(steps=num_inference_steps, tau=tau, scale=scale, grounding_guidance=grounding_guidance,
                       names=ARGUMENTS)          # Sampling checks them too: here the messages name our arguments
        sampling = Sampling(steps=num_inference_steps, guidance=guidance_scale, scale=scale, tau=tau,
                            grounding_guidance=grounding_guidance)
        base, n = self._base(), len(records)
        channels, side = base.latent_shape
        shape = (n, channels, side, side)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=base.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: shape {tuple(latents.shape)}, this base needs {shape}")
        images = sample.denoise(base, records, latents, sampling, adapter=self.adapter, scheduler=self.scheduler,
                                negatives=negatives, timesteps_device=base.device, generator=generator,
                                callback=callback, progress=self.progress_bar)
        return GroundedPipelineOutput(images=images if output_type == "np" else [Image.fromarray(a) for a in images])
