"""Everything specific to the embedded default, the synthetic Shapes world, in one place:

- `world`: layouts and their renders (a pure function of a seed and the `WorldOptions`), data sets, the
  held-out layouts (v1; v2 stratified by object count and overlap; the random crowds, version 3);
- `detector`: the colour detector that measures grounding on Shapes images;
- `tiny_base`: the tiny text-to-image base model of this world and how it is trained.

The generic path (base loading, the adapter, training, sampling, the evaluation core) imports none
of this: a run reaches it only through `adapterlib.training.worlds`, when its data is "shapes".
"""
from .world import (BACKGROUND, COLORS, CROWDS_OPTIONS, CROWDS_PATH, CROWDS_SEED0, HELDOUT_PATH, HELDOUT_SEED0, HELDOUT_V2_BUCKETS, HELDOUT_V2_OPTIONS,
                    HELDOUT_V2_PATH, HELDOUT_V2_PER_BUCKET, HELDOUT_V2_SEED0, RESOLUTION, SHAPES,
                    V2_TRAINING_OPTIONS, WORLDS, Layout, ShapeObject, World, WorldOptions, heldout_images,
                    heldout_records, options_for_seed, options_tag, render, render_batch, sample_layout, to_record,
                    write_crowds, write_dataset, write_heldout, write_heldout_v2)

__all__ = ["BACKGROUND", "COLORS", "CROWDS_OPTIONS", "CROWDS_PATH", "CROWDS_SEED0", "HELDOUT_PATH", "HELDOUT_SEED0", "HELDOUT_V2_BUCKETS", "HELDOUT_V2_OPTIONS",
           "HELDOUT_V2_PATH", "HELDOUT_V2_PER_BUCKET", "HELDOUT_V2_SEED0", "RESOLUTION", "SHAPES",
           "V2_TRAINING_OPTIONS", "WORLDS", "Layout", "ShapeObject", "World", "WorldOptions", "heldout_images",
           "heldout_records", "options_for_seed", "options_tag", "render", "render_batch", "sample_layout",
           "to_record", "write_crowds", "write_dataset", "write_heldout", "write_heldout_v2"]
