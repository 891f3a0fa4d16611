"""Every option list a field, flag or builder takes, stated once, and the rules between them (a leaf: it imports
nothing).

The config checks its fields against `FIELD_CHOICES`, the adapter, the manifest reader and the precision policy
check their arguments against the same tuples, so a new choice is added here and nowhere else.
"""
MAX_OBJECTS = 30                                     # objects a record may hold: the manifest's, the adapter's slots

ATTENTIONS = ("self", "cross", "masked")             # our adapter's attention variants
ADAPTER_ATTENTIONS = (*ATTENTIONS, "gligen")         # the field also takes diffusers' own GLIGEN modules
NORMS = ("layernorm", "rmsnorm")
# masked attention, a token inside several boxes: none (it attends to every box covering it) | smaller-front (only
# the smallest covering box: smaller objects in front) | learned (a learned per-head weight on the covering box's
# -log(area), zero at init: training decides)
DEPTHS = ("none", "smaller-front", "learned")
# the named block choices (a UNet's: decoder, low, migc; a stack's, an MM-DiT's above all: first-half, last-half,
# middle); else a comma list of blocks
BLOCK_CHOICES = ("all", "decoder", "low", "migc", "first-half", "last-half", "middle", "double", "single")
# where a listed block name starts (diffusers' UNet; an SD3 transformer's joint blocks; FLUX's single-stream blocks)
BLOCK_PARTS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")

TIMESTEPS = ("uniform", "cubic", "logit-normal")
LR_SCHEDULES = ("constant", "cosine")
BOX_LOSS_REGIONS = ("box", "visible", "exclusive", "layered")

CROPS = ("none", "center", "random")
ON_BAD_RECORD = ("error", "skip")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")                    # or cuda:N

# Classifier-free guidance over the grounding (sampling's `grounding_guidance`, the pipeline's and the CLI's): what the
# unconditional branch is. base: the base alone (empty caption, no adapter), so the guidance strengthens the boxes and
# phrases together with the caption (the default) | null: the adapter with every object the null one (diffusers'
# StableDiffusionGLIGENPipeline) | off: the conditional branch's own grounding, so only the caption is guided
GROUNDING_GUIDANCE = ("base", "null", "off")

# The training config's fields that take one of a list, and the list
FIELD_CHOICES = dict(adapter_attention=ADAPTER_ATTENTIONS, adapter_norm=NORMS, adapter_depth=DEPTHS,
                     timesteps=TIMESTEPS, lr_schedule=LR_SCHEDULES, box_loss_region=BOX_LOSS_REGIONS,
                     mixed_precision=MIXED_PRECISIONS, on_bad_record=ON_BAD_RECORD, crop=CROPS)

# The architecture: the config fields a checkpoint's adapter is built from, each with its `build_adapter` option
# (base_model is the base itself; None: not an adapter option). Fixed on resume.
ARCHITECTURE = dict(base_model=None, adapter_attention="attention", adapter_norm="norm",
                    adapter_feedforward="feedforward", adapter_ff_mult="ff_mult", adapter_depth="depth",
                    adapter_subcell="subcell", adapter_blocks="adapted_blocks", max_objects="max_objects")


def check_attention_options(attention: str, depth: str = "none", subcell: bool = False) -> None:
    """The masked attention's own options need their attention: checked by the config before any work and by the
    adapter's layer for a direct `build_adapter` caller, with one message (in the config's field names)."""
    if depth == "learned" and attention == "self":
        raise ValueError("adapter_depth = 'learned' weighs each token's covering boxes: it needs a cross or masked "
                         "adapter_attention, not 'self'")
    if subcell and attention != "masked":
        raise ValueError(f"adapter_subcell = True reads each box's cells: it needs adapter_attention = 'masked', not "
                         f"{attention!r} (give adapter_subcell = False)")
