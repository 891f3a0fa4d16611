"""Floor 6, measuring: grounding on held-out layouts (`evaluate`, with the base's cached samples in `basecache`),
the published protocols (`protocols`: COCO-MIG), the checkpoint test (`checkpoint_test`), notebook 01's checks
(`checks`) and training-step throughput (`bench`)."""
