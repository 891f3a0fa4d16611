"""Floor 6, measuring: grounding on held-out layouts (`evaluate`, with the base's cached samples in `basecache`),
the published protocols (`protocols`: COCO-MIG), the checkpoint test (`checkpoint_test`), notebook 01's checks
(`checks`), training-step throughput (`bench`, on the sizes' networks and batches of `workloads`), the `evaluate`
command's paths (`command`) and the breakdowns it prints below its summary (`report`)."""
