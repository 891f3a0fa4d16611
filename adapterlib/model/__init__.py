"""Floor 2, the model: the frozen base (`base`; its folders read and checked before loading in `folders`), the device and dtype policy (`precision`), the spatial adapter
(`adapter`) and diffusers' GLIGEN modules (`gligen`), the hooks both live in (`hooks`), seeded sampling (`sample`), and the detectors that measure
grounding (`detectors`; GroundingDINO in `grounding_dino`; SAM's box-prompted masks in `segment`; the local
transformers folders of all three checked and loaded by `model_folder`). Imports data and the leaves."""
