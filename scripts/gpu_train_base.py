"""Train the shipped tiny Shapes base on a lent GPU within a time budget, then measure it.

    OUT=/some/dir python scripts/gpu_train_base.py --budget-s 270                 # the shipped base: both worlds (mix)
    OUT=/some/dir python scripts/gpu_train_base.py --budget-s 290 --world shapes  # the first world only
    OUT=/some/dir python scripts/gpu_train_base.py --budget-s 300 --world mix --init-from shapes-tiny --lr 3e-4 \
        --ema-decay 0.995                                       # fine-tune the shipped base on it

    OMP_NUM_THREADS=1 OUT=/some/dir python scripts/gpu_train_base.py --family dit --steps 1300 --batch-size 64 \
        --n-images 100000 --ema-decay 0.995                       # the tiny MM-DiT (shapes-dit) on the CPU
    OMP_NUM_THREADS=1 OUT=/some/dir python scripts/gpu_train_base.py --family flux --steps 1000 --batch-size 64 \
        --n-images 100000 --ema-decay 0.995                       # the tiny FLUX (shapes-flux) on the CPU

Writes $OUT/shapes-tiny/ (or $OUT/shapes-dit/: the diffusers-style base folder), $OUT/base_eval.json and a sample
grid. The same recipe runs on CPU through notebooks/00_base_model.ipynb (much slower); `--steps N` skips the probe
that sizes the run to `--budget-s`."""
import argparse, json, os, time
from pathlib import Path

import torch

from adapterlib.model import sample

from adapterlib import shapes
from adapterlib.model.base import load_base
from adapterlib.shapes.detector import evaluate_grounding
from adapterlib.shapes.tiny_base import PretrainConfig, train_base

ap = argparse.ArgumentParser()
ap.add_argument("--budget-s", type=float, default=300)
ap.add_argument("--batch-size", type=int, default=256)
ap.add_argument("--n-images", type=int, default=200_000)
ap.add_argument("--world", default=PretrainConfig.world, help="shapes | shapes-v2 | mix (tiny_base.BASE_WORLDS; "
                "default: mix, the shipped base's)")
ap.add_argument("--init-from", default="", help="a base to fine-tune (name or folder); default: from scratch")
ap.add_argument("--lr", type=float, default=PretrainConfig.lr)
ap.add_argument("--ema-decay", type=float, default=PretrainConfig.ema_decay)
ap.add_argument("--family", default="unet", choices=["unet", "dit", "flux"],
                help="unet: shapes-tiny; dit: shapes-dit; flux: shapes-flux")
ap.add_argument("--steps", type=int, default=0, help="train this many steps (0: as many as --budget-s allows)")
ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (0: a tenth of the run, at most 500)")
ap.add_argument("--eval-limit", type=int, default=0, help="only the first N held-out layouts (0: all; a rehearsal)")
args = ap.parse_args()
out = Path(os.environ.get("OUT", "/tmp/out"))
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
print("device", torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch", torch.__version__, flush=True)

name = {"unet": "shapes-tiny", "dit": "shapes-dit", "flux": "shapes-flux"}[args.family]
# 1) probe the step time, then size the run to the budget (the cosine schedule needs the total)
steps, sec_per_step = args.steps, None
if not steps:
    probe = PretrainConfig(steps=60, batch_size=args.batch_size, n_images=2000, log_every=30, world=args.world,
                           init_from=args.init_from, family=args.family)
    t0 = time.perf_counter()
    train_base(probe, "/tmp/probe", device=dev)
    rows = json.loads(Path("/tmp/probe/training.json").read_text())["history"]
    sec_per_step = (rows[-1]["wall_s"] - rows[0]["wall_s"]) / 30
    steps = int(args.budget_s / sec_per_step)
    print(f"probe: {sec_per_step*1000:.1f} ms/step at batch {args.batch_size} -> {steps} steps", flush=True)

# 2) the real run
cfg = PretrainConfig(steps=steps, batch_size=args.batch_size, n_images=args.n_images,
                     warmup=args.warmup or max(1, min(500, steps // 10)), family=args.family,
                     log_every=max(1, steps // 25), world=args.world, init_from=args.init_from, lr=args.lr,
                     ema_decay=args.ema_decay)
base = train_base(cfg, out / name, device=dev)
if sec_per_step is None:
    sec_per_step = json.loads((out / name / "training.json").read_text())["train_seconds"] / steps

# 3) measure: colour presence and grounding of the base alone on the held-out captions
base = load_base(out / name, device=dev)
result = {}
for version in (1, 2):                      # held-out v1 (the first world) and v2 (overlaps, up to six objects)
    records = shapes.heldout_records(version=version)[:args.eval_limit or None]
    seeds = list(range(len(records)))
    tag = "" if version == 1 else "v2_"
    for guidance in (1.5, 3.0, 5.0):
        t0 = time.perf_counter()
        images = sample.generate(base, records, seeds, guidance=guidance, steps=25, batch_size=220)
        _, summary = evaluate_grounding(images, records)
        summary["seconds"] = time.perf_counter() - t0
        result[f"{tag}guidance_{guidance}"] = summary
        print(f"held-out v{version} guidance", guidance, json.dumps(summary), flush=True)
        if guidance == 3.0 and len(images) >= 64:   # an 8x8 grid of samples, to look at
            from PIL import Image
            grid = images[:64].reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
            Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(out / f"base_samples{'' if version == 1 else '_v2'}.png")
    _, gt = evaluate_grounding(shapes.heldout_images(records), records)
    result[f"{tag}ground_truth"] = gt
result.update(steps=steps, batch_size=args.batch_size, sec_per_step=sec_per_step,
              device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")
(out / "base_eval.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result), flush=True)
