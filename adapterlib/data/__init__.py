"""Floor 1, data: the manifest format (`manifest`), importers from COCO and ODVG (`importers`), and the buckets a
layout falls in (`buckets`). Imports nothing of adapterlib but the top-level leaves."""
