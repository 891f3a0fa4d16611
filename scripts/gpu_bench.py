"""Adapter training-step throughput at Stable Diffusion 1.5 size, next to the frozen-UNet floor.

    OUT=dir python scripts/gpu_bench.py            # on a GPU (run the peer bench in the same call)
    SMALL=1 python scripts/gpu_bench.py            # CPU smoke test of this script

Same step as shared/bench/gpu_peer_bench.py: random SD 1.5 UNet (64x64 latents), 30 grounding
slots (~30% present), frozen base in bf16, fp32 adapter under bf16 autocast, forward + backward to
the adapter + fused AdamW. Prints one table; writes $OUT/adapter_bench.json."""
import json, os, time

import torch
from diffusers import UNet2DConditionModel

from adapterlib.adapter import AdaptedUNet, Grounding, SpatialAdapter

SMALL = os.environ.get("SMALL") == "1"
dev = "cuda" if torch.cuda.is_available() else "cpu"
res, MAXOBJ, N = (16, 30, 2) if SMALL else (64, 30, 20)
cfg = (dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, layers_per_block=1,
            attention_head_dim=4) if SMALL else dict(cross_attention_dim=768, attention_head_dim=8))
ctx_dim = cfg["cross_attention_dim"]
amp = torch.bfloat16 if dev == "cuda" else torch.float32

torch.manual_seed(0)
unet = UNet2DConditionModel(**cfg).to(dev, amp).requires_grad_(False)


def batch(bs):
    g = Grounding(phrases=torch.randn(bs, MAXOBJ, ctx_dim, device=dev),
                  boxes=torch.rand(bs, MAXOBJ, 4, device=dev).sort(-1).values[..., [0, 1, 2, 3]],
                  present=torch.rand(bs, MAXOBJ, device=dev) < 0.3,
                  keep_text=torch.ones(bs, MAXOBJ, dtype=torch.bool, device=dev))
    g.boxes = torch.stack([g.boxes[..., 0], g.boxes[..., 1], g.boxes[..., 0] + 0.3, g.boxes[..., 1] + 0.3], -1).clamp(max=1)
    return (torch.randn(bs, 4, res, res, device=dev), torch.randint(0, 1000, (bs,), device=dev),
            torch.randn(bs, 77, ctx_dim, device=dev), g)


def timed(fn, n):
    for _ in range(3):
        fn()
    if dev == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if dev == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


rows = []
def record(name, bs, sec, params=0):
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    rows.append(dict(name=name, batch=bs, s_per_step=sec, samples_per_s=bs / sec, peak_gib=mem, adapter_params=params))
    print(json.dumps(rows[-1]), flush=True)


print("device", torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch", torch.__version__, flush=True)
for bs in ([2] if SMALL else [2, 16]):
    b = batch(bs)
    # the floor: frozen UNet forward + backward to the input (what any adapter must at least pay)
    x_req = b[0].clone().requires_grad_(True)
    def floor():
        with torch.autocast(dev, amp, enabled=dev == "cuda"):
            out = unet(x_req, b[1], encoder_hidden_states=b[2]).sample
        out.float().pow(2).mean().backward()
    if dev == "cuda": torch.cuda.reset_peak_memory_stats()
    record("frozen UNet floor", bs, timed(floor, N))
    for attention in ("self", "cross", "masked"):
        for ff in (True, False):
            adapter = SpatialAdapter(unet, ctx_dim, attention=attention, feedforward=ff).to(dev).attach(unet)
            model = AdaptedUNet(unet, adapter)
            params = list(adapter.trainable_parameters().values())
            opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
            for p in adapter.gate_parameters().values():
                p.data.fill_(0.1)                   # open gates: every path computes and gets gradient
            def step():
                with torch.autocast(dev, amp, enabled=dev == "cuda"):
                    out = model(b[0], b[1], b[2], b[3], 1.0)
                torch.nn.functional.mse_loss(out.float(), b[0]).backward()
                opt.step(); opt.zero_grad(set_to_none=True)
            if dev == "cuda": torch.cuda.reset_peak_memory_stats()
            record(f"adapterlib {attention}{' + FF' if ff else ''}", bs, timed(step, N), sum(p.numel() for p in params))
            adapter.detach(); del model, adapter, opt
            if dev == "cuda": torch.cuda.empty_cache()

if os.environ.get("OUT"):
    json.dump(dict(rows=rows, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__),
              open(os.path.join(os.environ["OUT"], "adapter_bench.json"), "w"), indent=1)
print("\n| variant | batch | s/step | samples/s | of the floor | peak GiB |")
floor = {r["batch"]: r["samples_per_s"] for r in rows if r["name"].startswith("frozen")}
for r in rows:
    print(f"| {r['name']} | {r['batch']} | {r['s_per_step']:.4f} | {r['samples_per_s']:.1f} | "
          f"{r['samples_per_s'] / floor[r['batch']]:.2f} | {r['peak_gib']:.1f} |")
