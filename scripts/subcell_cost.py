"""What the sub-cell map costs one gated layer: forward + backward of a masked layer with and without it, ms.

    OMP_NUM_THREADS=2 python scripts/subcell_cost.py [--batch 16] [--objects 7]

Rows: the tiny base's widths and grids (64 and 128 wide; 16x16 and 8x8 tokens), 2x feed-forward, gates open. The
map's features are built once per forward and grid in training (shared by every layer); here they are built once
and reused, as one layer sees them. docs/notes/results.md quotes it.
"""
import argparse
import time

import torch

from adapterlib.model.adapter import GatedLayer, cell_features, region_mask


def layer_ms(dim: int, side: int, subcell: bool, batch: int, objects: int, repeats: int = 50) -> float:
    torch.manual_seed(0)
    corners = torch.rand(batch, objects, 2, 2).sort(dim=2).values               # (B, N, [lo, hi], [x, y])
    boxes = torch.cat([corners[:, :, 0], corners[:, :, 1]], dim=-1)              # x0, y0, x1, y1
    layer = GatedLayer(dim, 128, 4, "masked", "layernorm", True, ff_mult=2, subcell=subcell)
    torch.nn.init.constant_(layer.gate_attn, 0.5), torch.nn.init.constant_(layer.gate_ff, 0.5)
    x = torch.randn(batch, side * side, dim, requires_grad=True)
    tokens, present = torch.randn(batch, objects, 128), torch.ones(batch, objects, dtype=torch.bool)
    region, scale = region_mask(boxes, side, side), torch.ones(batch, 1, 1)
    cells = cell_features(boxes, side, side) if subcell else None
    for i in range(repeats + 10):
        if i == 10:
            start = time.perf_counter()
        layer(x, tokens, present, region, scale, boxes, cells).sum().backward()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objects", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.objects} objects")
    print("width  grid   without (ms)  with (ms)  ratio")
    for dim, side in ((64, 16), (128, 16), (128, 8)):
        off, on = (layer_ms(dim, side, s, args.batch, args.objects) for s in (False, True))
        print(f"{dim:5d}  {side}x{side:<3d} {off:12.2f}  {on:9.2f}  {on / off:5.2f}")


if __name__ == "__main__":
    main()
