"""Floor 1, data: the manifest format (`manifest`), importers from COCO and ODVG (`importers`), the buckets a
layout falls in (`buckets`), and COCO-MIG's layout file (`mig`). Imports nothing of adapterlib but the top-level
leaves."""
