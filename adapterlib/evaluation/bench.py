"""Training-step throughput, in one process: our adapter next to diffusers' own GLIGEN and the frozen-network floor.

    result = run_bench("tiny", batch=16, objects=3, rounds=5)     # the shipped base, pixel space 32x32
    result = run_bench("sd15", device="cuda", batch=16)          # a random-weight SD 1.5-size UNet, 64x64 latents
    result = run_bench("sdxl", device="cuda", batch=4)           # a random-weight SDXL-size UNet, 128x128 latents
    result = run_bench("sd3", device="cuda", batch=4, blocks=["first-half", "middle"])   # SD3-medium's MM-DiT, 128x128
    result = run_bench("flux", device="cuda", batch=1, blocks=["middle", "double"])      # FLUX.1-dev, 128x128 latents
    result = run_bench("flux", device="cpu", batch=1)      # on the CPU: 1 double + 2 single of its 19 + 38 blocks, 32x32
    print(format_table(result))

Every row is one full training step on the same batch, the same frozen weights and the same device:
- `floor`: the frozen network's (UNet's or MM-DiT's) forward and backward, gradient to the input only: what any
  adapter at least pays (no trainable parameter, no optimizer);
- `peer`: diffusers' GLIGEN, `UNet2DConditionModel(attention_type="gated")` on the base's config with
  the base's weights loaded, `fuser` (a gated self-attention + feed-forward per transformer block) and
  `position_net` trained, grounded through `cross_attention_kwargs={"gligen": ...}`. UNet sizes only: GLIGEN is
  made for a UNet's transformer blocks, so on sd3 and flux (MM-DiTs) the rows are the floor and ours, `x_peer` None,
  a `gligen` variant left out, and the result's `peer_note` says so;
- `ours <attention>[+FF[xM]] [<blocks>]`: `AdaptedUNet(unet, adapter)` for each adapter variant
  (`adapter.build_adapter`'s attention and feedforward options) at each block choice (`blocks`: all, decoder,
  low, migc or a list on a UNet; all, first-half, middle, last-half or a list on the MM-DiT; on FLUX also double
  and single, its double- and single-stream blocks; the name carries it unless it is all) and feed-forward width (`ff_mults`; the name
  carries it, `xM`, unless it is 4), only the adapter's parameters trained; `ours gligen` is the peer's own
  modules (fusers + position net) lent to the frozen base through our forward (adapterlib/model/gligen.py): its
  cost against `peer` is what our route adds or saves (GLIGEN's 30 slots, as diffusers' pipeline pads);
- `train_step` (optional): the training loop's own step, `step.step_loss` + `step.update` on a
  `train.make_training` of the size's preset (its whole recipe: box loss, dropouts, AdamW groups, schedule,
  clipping), fed one batch from the preset's own data source (the encoding cache); reading batches is left out;
- `extra` rows: the caller's own, `extra={name: make}` with `make(workload)` returning the row's step
  callable (e.g. a step fed from cached encodings), timed in the same rounds.
Forward, backward to the trainable parameters, and an AdamW step (fused on CUDA). On CUDA the frozen
weights are bf16 and the trainable ones fp32 under bf16 autocast (the training default); on the CPU all
fp32. Gates are opened to 0.1 in both adapters (the cost is the same at 0; open, every gradient is non-zero).

Timing: a warm-up, then `rounds` rounds; each round runs every row `steps_per_round` times in turn (the
starting row rotates each round), so a load change on a shared machine hits every row alike; a row's
number is the median over rounds. Every adapter stays attached to the one frozen network for the whole
bench (a compiled graph must not see its hooks change); outside its own forward an adapter's hook
returns the block's output as it is, so the floor and the other rows pass through it.
Peak memory is CUDA's `max_memory_allocated` over a row's steps (all resident models included) and the
part of it above what was allocated when the row started (its activations, gradients, temporaries);
on the CPU both are None.

The frozen network and batch of each size: adapterlib/evaluation/workloads.py.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from adapterlib.model.adapter import AdaptedUNet, SpatialAdapter
from adapterlib.options import ATTENTIONS
from adapterlib.model.base import _predict_flux
from adapterlib.training.config import BENCH_SIZES, PRESET_FAMILY, TrainConfig, check_blocks_spec, preset_value
from adapterlib.evaluation.workloads import SIZES, Workload, make_workload
from adapterlib.model.gligen import GligenAdapter
from adapterlib.model.hooks import transformer_blocks

# the sizes with diffusers' GLIGEN beside ours (the peer, and the `gligen` variant): a UNet's; not the MM-DiTs (sd3, flux)
HAS_PEER = {size: PRESET_FAMILY[p] == "unet" for size, p in BENCH_SIZES.items()}
VARIANTS = tuple((a, ff) for a in ("masked", "self", "cross") for ff in (True, False)) + (("gligen", True),)
DEFAULT_VARIANT = (TrainConfig.adapter_attention, TrainConfig.adapter_feedforward)
# "ours" at each size: the default variant with the blocks and feed-forward width of the preset that trains that base
DEFAULT_BLOCKS = {size: preset_value(p, "adapter_blocks") for size, p in BENCH_SIZES.items()}
DEFAULT_FF_MULT = {size: preset_value(p, "adapter_ff_mult") for size, p in BENCH_SIZES.items()}
# ... and its sub-cell map where the preset has one (masked rows only; named "+cells")
DEFAULT_SUBCELL = {size: preset_value(p, "adapter_subcell") for size, p in BENCH_SIZES.items()}
GATE_OPEN = 0.1


def variant_name(attention: str, feedforward: bool, blocks: str = "all", ff_mult: int = 4, subcell: bool = False) -> str:
    if attention == "gligen":              # diffusers' GLIGEN modules on our frozen base (always with its dense part)
        return "ours gligen"
    ff = ("+FF" + ("" if ff_mult == 4 else f"x{ff_mult}")) if feedforward else ""
    return f"ours {attention}{'+cells' if subcell else ''}{ff}" + ("" if blocks == "all" else f" [{blocks}]")


def parse_ff_mults(text: str) -> tuple[int, ...]:
    """"4,2" -> (4, 2): the feed-forward widths of our rows with FF, each a whole multiple >= 1."""
    try:
        out = tuple(dict.fromkeys(int(item) for item in text.split(",") if item.strip()))
    except ValueError:
        raise ValueError(f"ff-mult {text!r}: give whole numbers, e.g. 4,2") from None
    if not out or min(out) < 1:
        raise ValueError(f"ff-mult {text!r}: give at least one width multiple, each >= 1")
    return out


def parse_blocks(text: str) -> tuple[str, ...]:
    """"all,decoder,low" -> ("all", "decoder", "low"); an explicit list of blocks is one choice, joined by "+"
    ("mid_block+up_blocks.1"). Each is checked as `adapter_blocks` is (its blocks: on the network; a UNet's
    decoder / low / migc on the MM-DiT is an error when its row is built)."""
    out = tuple(dict.fromkeys(item.strip().replace("+", ",") for item in text.split(",") if item.strip()))
    if not out:
        raise ValueError("no block choice given")
    for spec in out:
        check_blocks_spec(spec)
    return out


def parse_variants(text: str) -> tuple[tuple[str, bool], ...]:
    """"masked+ff,self" -> (("masked", True), ("self", False)); a name not in ATTENTIONS is an error."""
    out = []
    for item in (s.strip().lower() for s in text.split(",") if s.strip()):
        attention, _, rest = item.partition("+")
        if attention not in (*ATTENTIONS, "gligen") or rest not in ("", "ff"):
            raise ValueError(f"variant {item!r}: give <attention>[+ff] with attention one of {ATTENTIONS}, or gligen")
        out.append((attention, rest == "ff" or attention == "gligen"))
    if not out:
        raise ValueError("no variant given")
    return tuple(out)


@dataclass
class Step:
    """One row: `run()` is one training step on the workload's batch."""
    name: str
    run: Callable[[], object]
    trainable: dict[str, nn.Parameter]
    model: nn.Module | None = None           # what the step calls (AdaptedUNet for ours, the gated UNet for the peer,
                                             # the frozen network for the floor)
    compiled: bool = False
    blocks: str | None = None                # our rows: the block choice
    ff_mult: int | None = None               # our rows with FF: the feed-forward's width multiple


def _optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


def _maybe_compile(model: nn.Module, compile: bool):
    return torch.compile(model) if compile else model


def floor_step(w: Workload, *, compile: bool = False) -> Step:
    """The frozen network's (UNet's or MM-DiT's) forward and backward, gradient to the input only. Its call is
    `base.predict`'s, spelled out: a compiled wrapper hides the class `predict` tells them apart by (FLUX's: the
    same packing into 2x2 patches with rotary ids, `base._predict_flux`)."""
    net, dit, flux = _maybe_compile(w.unet, compile), w.is_dit, w.is_flux

    def run():
        x = w.noisy.clone().requires_grad_(True)
        with w.autocast():
            out = (_predict_flux(net, x, w.t, w.context, w.added) if flux else
                   (net(hidden_states=x, timestep=w.t, encoder_hidden_states=w.context, **w.added) if dit else
                    net(x, w.t, encoder_hidden_states=w.context, added_cond_kwargs=w.added)).sample)
        F.mse_loss(out.float(), w.target).backward()
    return Step("floor", run, {}, w.unet, compile)


def is_peer_trainable(name: str) -> bool:
    """diffusers' GLIGEN trains its gated layers (`fuser` in each transformer block) and `position_net`."""
    return name.startswith("position_net.") or ".fuser." in name


def gligen_peer(unet: nn.Module) -> nn.Module:
    """diffusers' GLIGEN on `unet`'s config (`attention_type="gated"`) holding `unet`'s own frozen weight tensors
    (shared, not copied: the peer costs no second UNet in memory, which an SDXL-size pair on a 24 GB machine needs;
    the frozen weights are never written): a weight of `unet` the gated model has no place for, or a gated-model
    weight other than fuser / position_net left unloaded, is an error. The trainable ones fp32, freshly initialised,
    on `unet`'s device. A network other than a UNet (the MM-DiT) has no GLIGEN: an error."""
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"diffusers' GLIGEN (the bench's peer) is made for a UNet's transformer blocks; "
                         f"{type(unet).__name__} has none: no peer row at this size")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        peer = UNet2DConditionModel(**{**config, "attention_type": "gated"})
    missing, unexpected = peer.load_state_dict(unet.state_dict(), strict=False, assign=True)
    unloaded = [k for k in missing if not is_peer_trainable(k)]
    if unexpected or unloaded:
        raise ValueError(f"the gated UNet does not match the base: unexpected {unexpected[:5]}, "
                         f"unloaded {unloaded[:5]}")
    for name, module in peer.named_modules():     # the fusers and the position net: still on meta, made real
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not any(t.is_meta for t in own):
            continue
        if not is_peer_trainable(name + "."):
            raise ValueError(f"the gated UNet's {name or 'root'} has a tensor the base's state_dict does not hold")
        module.to_empty(device=unet.device, recurse=False)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()             # Linear, LayerNorm: their own initialisation
        else:
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                torch.nn.init.zeros_(t)           # GLIGEN's own: gates (alpha_attn/dense) and null features start at 0
    for name, p in peer.named_parameters():
        trainable = is_peer_trainable(name)
        p.requires_grad_(trainable)
        if trainable:
            p.data = p.data.float()
    return peer.eval()


def peer_step(w: Workload, *, compile: bool = False, peer: nn.Module | None = None) -> Step:
    """diffusers' GLIGEN step: boxes, phrase embeddings and presence masks through `cross_attention_kwargs`."""
    peer = gligen_peer(w.unet) if peer is None else peer
    for name, p in peer.named_parameters():
        if name.endswith(("alpha_attn", "alpha_dense")):
            p.data.fill_(GATE_OPEN)
    trainable = {n: p for n, p in peer.named_parameters() if p.requires_grad}
    opt = _optimizer(list(trainable.values()), w.device)
    model = _maybe_compile(peer, compile)
    gligen = {"boxes": w.grounding.boxes, "positive_embeddings": w.peer_phrases, "masks": w.grounding.present.float()}

    def run():
        with w.autocast():
            out = model(w.noisy, w.t, encoder_hidden_states=w.context, cross_attention_kwargs={"gligen": gligen},
                        added_cond_kwargs=w.added).sample
        F.mse_loss(out.float(), w.target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Step("peer", run, trainable, peer, compile)


def make_adapter(w: Workload, attention: str, feedforward: bool, blocks: str = "all",
                 ff_mult: int = 4, subcell: bool = False) -> SpatialAdapter:
    """An fp32 adapter for the workload's UNet (as `build_adapter` makes one), attached, gates opened."""
    kind = GligenAdapter if attention == "gligen" else SpatialAdapter      # GLIGEN: every block, width 4, as diffusers
    adapter = kind(w.unet, w.text_dim, attention=attention, feedforward=feedforward, adapted_blocks=blocks,
                   ff_mult=ff_mult, subcell=subcell)
    adapter = adapter.to(w.device, torch.float32).attach(w.unet)
    for p in adapter.gate_parameters().values():
        p.data.fill_(GATE_OPEN)
    return adapter


def adapter_step(w: Workload, attention: str, feedforward: bool, *, blocks: str = "all", ff_mult: int = 4,
                 compile: bool = False, subcell: bool = False) -> Step:
    """Our step through `AdaptedUNet(unet, adapter).forward(noisy, t, context, grounding, scale)`."""
    adapter = make_adapter(w, attention, feedforward, blocks, ff_mult, subcell)
    model = AdaptedUNet(w.unet, adapter)
    trainable = adapter.trainable_parameters()
    opt = _optimizer(list(trainable.values()), w.device)
    call = _maybe_compile(model, compile)

    def run():
        with w.autocast():
            out = call(w.noisy, w.t, w.context, w.grounding, w.scale, w.added)
        F.mse_loss(out.float(), w.target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Step(variant_name(attention, feedforward, blocks, ff_mult, subcell), run, trainable, model, compile, blocks,
                ff_mult if feedforward and attention != "gligen" else None)


def train_step(w: Workload, root: str | Path | None = None) -> Step:
    """The training loop's own step, timed: `step.step_loss` then `step.update` (the calls `train._loop` makes),
    on a `train.make_training` of the size's preset at the workload's batch (its blocks, feed-forward width,
    box loss and region, dropouts, timestep density, AdamW groups, schedule, clipping, guard). The batch is one
    the preset's data source gives (the encoding cache of a few generated Shapes records, under `root`, default a
    temporary folder), read once: reading batches is left out. Needs the loaded base: size `tiny`."""
    import tempfile

    from adapterlib.model.adapter import architecture_options, build_adapter
    from adapterlib.training import batches, worlds
    from adapterlib.training.config import make_config
    from adapterlib.training.distributed import Shard
    from adapterlib.training.step import step_loss, update
    from adapterlib.training.train import make_training

    if w.base is None:
        raise ValueError(f"the train_step row needs a loaded base with its text encoder (size 'tiny'), not size "
                         f"{w.size!r}")
    cfg = make_config(BENCH_SIZES[w.size], run_name="bench", batch_size=w.batch, device=str(w.device),
                      n_train=w.batch)
    root = Path(root if root is not None else tempfile.mkdtemp(prefix="adapterlib-bench-"))
    manifest = worlds.training_manifest(cfg.data, cfg.n_train, root)
    source, _ = batches.training_source(w.base, manifest, root, cache=cfg.cache, crop=cfg.crop, flip=cfg.flip,
                                      seed=cfg.seed, max_objects=cfg.max_objects, on_bad_record=cfg.on_bad_record,
                                      compute_dtype=w.base.unet.dtype, progress=False)
    batch = next(batches.step_batches(source, seed=cfg.seed, batch_size=cfg.batch_size, start=0, stop=1))
    adapter = build_adapter(w.base, **architecture_options(cfg))
    for p in adapter.gate_parameters().values():
        p.data.fill_(GATE_OPEN)
    training = make_training(cfg, Shard(w.device), w.base, adapter)
    counted = None
    if training.sync_free:
        from adapterlib.training.step import NonFiniteCount
        counted = NonFiniteCount(w.device)
    gen = torch.Generator().manual_seed(cfg.seed)

    def run():
        loss, batch_loss = step_loss(training, batch, gen)
        training.opt.zero_grad(set_to_none=True)
        update(training, loss, batch_loss, counted)
    return Step("train_step", run, training.params, training.model, blocks=cfg.adapter_blocks,
                ff_mult=cfg.adapter_ff_mult)


# ---------------------------------------------------------------------------------------------
# timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: Mapping[str, Callable[[], object]], device: torch.device, *, rounds: int = 5,
            steps_per_round: int = 10, warmup: int = 2, fallible: Sequence[str] = ()) -> dict[str, dict]:
    """Interleaved timing: per name, seconds per step of each round and CUDA memory. A name in
    `fallible` (a compiled row) that raises during its warm-up is left out of the rounds with the reason
    as its `note`; any other error propagates."""
    if rounds < 1 or steps_per_round < 1 or warmup < 0:
        raise ValueError(f"rounds {rounds}, steps_per_round {steps_per_round}, warmup {warmup}: need >= 1, >= 1, >= 0")
    cuda = device.type == "cuda"
    out = {name: dict(seconds=[], peak=None, above=None, note="") for name in steps}
    live = []
    for name, fn in steps.items():
        try:
            for _ in range(warmup):
                fn()
            _sync(device)
            live.append(name)
        except Exception as e:   # noqa: BLE001 -- a compiled row that cannot compile is reported, not fatal
            if name not in fallible:
                raise
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            out[name]["note"] = f"n/a: {type(e).__name__}: {first_line}"
    for r in range(rounds if live else 0):
        for name in live[r % len(live):] + live[:r % len(live)]:       # the starting row rotates
            fn, row = steps[name], out[name]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            _sync(device)
            row["seconds"].append((time.perf_counter() - t0) / steps_per_round)
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                row["peak"] = max(row["peak"] or 0, peak)
                row["above"] = max(row["above"] or 0, peak - before)
    return out


def run_bench(size: str = "tiny", *, device: str | torch.device = "auto", batch: int = 16, objects: int | None = None,
              rounds: int = 5, steps_per_round: int = 10, warmup: int = 2, compile: bool = False,
              variants: Sequence[tuple[str, bool]] = VARIANTS, blocks: Sequence[str] | None = None,
              ff_mults: Sequence[int] | None = None, with_train_step: bool = False, side: int | None = None,
              extra: Mapping[str, Callable[[Workload], Callable[[], object]]] | None = None, seed: int = 0,
              depth: int | None = None) -> dict:
    """Measure every row (module docstring) in one process; a JSON-ready dict: `rows` (one per row: name,
    samples_per_s, s_per_step, per-round seconds, peak/step memory in MiB or None, trainable_params,
    x_floor and x_peer against the floor and peer of the same mode, eager or compiled, note) and the
    headline numbers (`ours_samples_per_s` is the default variant, masked+FF, eager, at the size's default blocks and
    feed-forward width, `DEFAULT_BLOCKS` and `DEFAULT_FF_MULT`, with its sub-cell map where the preset has one
    (`DEFAULT_SUBCELL`; every masked row of the size then has it, named `+cells`): the `shapes` preset's for tiny, the `sd15` preset's for
    sd15, the `sdxl` preset's for sdxl, the `sd3` preset's for sd3, the `flux` preset's for flux).
    On sd3 and flux (MM-DiTs) there is no peer (`gligen_peer`): no `peer` row, `x_peer`, `peer_samples_per_s` and
    `ours_x_peer` None, a `gligen` variant left out; `peer_note` says so (None at a size with the peer).
    `blocks`: the block choices of our rows (every variant at each; the size's default is always measured).
    `ff_mults`: the feed-forward widths of our rows with FF (each at every block choice; the size's default, the
    preset's `adapter_ff_mult`, is always measured).
    `side`: the latents' side at sd15 / sdxl / sd3 / flux size; `depth`: sd3's joint blocks, flux's double-stream
    blocks (and twice as many single-stream ones); on the CPU flux is reduced unless told (`make_workload`; the
    result's `size_note` says how, None for the real network).
    `extra`: {name: make(workload) -> step()}: more rows, each step one training step on
    `workload.batch` samples, timed in the same rounds."""
    if rounds < 1 or steps_per_round < 1 or warmup < 0:
        raise ValueError(f"rounds {rounds}, steps_per_round {steps_per_round}, warmup {warmup}: need >= 1, >= 1, >= 0")
    if with_train_step and size != "tiny":
        raise ValueError(f"the train_step row needs a loaded base with its text encoder (size 'tiny'), "
                         f"not size {size!r}")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {SIZES}")
    variants = tuple(dict.fromkeys(variants))
    peer_note = None
    if not HAS_PEER[size]:
        asked = any(a == "gligen" for a, _ in variants)
        variants = tuple(v for v in variants if v[0] != "gligen")
        peer_note = (f"no GLIGEN on {size}: diffusers' GLIGEN is made for a UNet's transformer blocks, {size} is an "
                     f"MM-DiT; no peer row (x peer n/a)" + (", variant gligen left out" if asked else ""))
    if DEFAULT_VARIANT not in variants:
        variants = (DEFAULT_VARIANT, *variants)
    default_blocks = DEFAULT_BLOCKS[size]
    blocks = tuple(dict.fromkeys((default_blocks, *(blocks or ()))))
    for spec in blocks:
        check_blocks_spec(spec)
    default_ff = DEFAULT_FF_MULT[size]
    ff_mults = tuple(dict.fromkeys((default_ff, *(ff_mults or ()))))
    cells = DEFAULT_SUBCELL[size]
    ours_rows = list(dict.fromkeys((a, ff, b, m if ff else 4, cells and a == "masked") if a != "gligen" else
                                   (a, ff, "all", 4, False) for a, ff in variants for b in blocks for m in ff_mults))
    ours = variant_name(*DEFAULT_VARIANT, default_blocks, default_ff, cells)
    modes = (False, True) if compile else (False,)
    taken = {name + tag for name in ("floor", "peer", *(variant_name(*r) for r in ours_rows))
             for tag in ("", " compiled")} | {"train_step"}
    if set(extra or {}) & taken:
        raise ValueError(f"extra rows {sorted(set(extra) & taken)}: those names are taken")
    w = make_workload(size, device, batch, objects, seed, side, depth)
    rows: dict[str, Step] = {}
    peer = gligen_peer(w.unet) if HAS_PEER[size] else None
    for compiled in modes:
        tag = " compiled" if compiled else ""
        peers = [peer_step(w, compile=compiled, peer=peer)] if peer is not None else []
        for step in (floor_step(w, compile=compiled), *peers,
                     *(adapter_step(w, a, ff, blocks=b, ff_mult=m, compile=compiled, subcell=c)
                       for a, ff, b, m, c in ours_rows)):
            rows[step.name + tag] = step
    if with_train_step:
        rows["train_step"] = train_step(w)
    for name, make in (extra or {}).items():
        rows[name] = Step(name, make(w), {})
    timed = measure({n: s.run for n, s in rows.items()}, w.device, rounds=rounds, steps_per_round=steps_per_round,
                    warmup=warmup, fallible=[n for n, s in rows.items() if s.compiled])
    mib = lambda b: None if b is None else round(b / 2 ** 20, 1)
    table = []
    for name, step in rows.items():
        t = timed[name]
        sec = statistics.median(t["seconds"]) if t["seconds"] else None
        table.append(dict(name=name, compiled=step.compiled, blocks=step.blocks, ff_mult=step.ff_mult,
                          samples_per_s=None if sec is None else batch / sec,
                          s_per_step=sec, round_s=t["seconds"], peak_mib=mib(t["peak"]), step_mib=mib(t["above"]),
                          trainable_params=sum(p.numel() for p in step.trainable.values()), note=t["note"]))
    by_name = {r["name"]: r["samples_per_s"] for r in table}
    for r in table:
        tag = " compiled" if r["compiled"] else ""
        for key, ref in (("x_floor", "floor"), ("x_peer", "peer")):
            base = by_name.get(ref + tag)
            r[key] = r["samples_per_s"] / base if r["samples_per_s"] and base else None
    return dict(
        ours_samples_per_s=by_name[ours], peer_samples_per_s=by_name.get("peer"), floor_samples_per_s=by_name["floor"],
        ours_x_peer=by_name[ours] / by_name["peer"] if peer is not None else None,
        ours_x_floor=by_name[ours] / by_name["floor"],
        peer_compiled_samples_per_s=by_name.get("peer compiled"), ours_variant=ours, ours_blocks=default_blocks,
        ours_ff_mult=default_ff, peer_note=peer_note, size_note=w.note,
        size=size, batch=batch, side=w.noisy.shape[-1], blocks_in_network=len(transformer_blocks(w.unet)),
        objects=w.grounding.present.shape[1], objects_present=int(w.grounding.present.sum()),
        device=str(w.device), device_name=torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), torch=torch.__version__, diffusers=diffusers.__version__,
        dtype=str(w.unet.dtype).removeprefix("torch."),
        autocast=None if w.amp is None else str(w.amp).removeprefix("torch."),
        rounds=rounds, steps_per_round=steps_per_round, compile=compile,
        memory="cuda max_memory_allocated (peak_mib: all resident; step_mib: above the row's start)"
        if w.device.type == "cuda" else None,
        rows=table)


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table."""
    num = lambda v, f: format("n/a", ">" + f.split(".")[0]) if v is None else format(v, f)
    width = max(24, *(len(r["name"]) for r in result["rows"]))
    lines = [f"{'row':<{width}} {'samples/s':>10} {'ms/step':>9} {'peak MiB':>9} {'step MiB':>9} {'x floor':>8} "
             f"{'x peer':>7} {'trainable':>10}  note"]
    for r in result["rows"]:
        speed = r["samples_per_s"]
        lines.append(f"{r['name']:<{width}} {num(speed, '10.1f' if speed is None or speed >= 1 else '10.3g')} "
                     f"{num(None if r['s_per_step'] is None else 1000 * r['s_per_step'], '9.1f')} "
                     f"{num(r['peak_mib'], '9.0f')} {num(r['step_mib'], '9.0f')} {num(r['x_floor'], '8.2f')} "
                     f"{num(r['x_peer'], '7.2f')} {r['trainable_params']:>10,}  {r['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the plan's run projected from a result

PLAN_STEPS, PLAN_BATCH = 25_000, 2        # the training plan's SD 1.5 run (docs/guide/training-plan.md)


def projected_minutes(samples_per_s: float, steps: int = PLAN_STEPS, batch: int = PLAN_BATCH) -> float:
    """Minutes of training steps for `steps` x `batch` samples at `samples_per_s` (data loading, encoders
    and checkpoints not included; samples/s measured at another batch size is taken as it is)."""
    return steps * batch / samples_per_s / 60
