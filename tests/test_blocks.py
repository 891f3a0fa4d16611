"""Which transformer blocks get a gated layer (`adapter_blocks`): the named choices select the documented blocks,
a block without a layer carries no hook and gets no gradient, the choice is fixed on resume and round-trips
through checkpoints, and a choice that matches nothing is refused before any work."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from adapterlib.evaluation import bench, workloads
from adapterlib.model.adapter import AdaptedUNet, build_adapter, select_blocks
from adapterlib.model.hooks import transformer_blocks
from adapterlib.model.base import load_base
from adapterlib.training.checkpoint import load_adapter, load_checkpoint, save_adapter
from adapterlib.training.config import ARCHITECTURE_FIELDS, RESUME_FIXED, make_config
from adapterlib.model.sample import ground
from adapterlib.training.train import resume_config, train

TINY = dict(steps=2, batch_size=2, n_train=16, save_every=2, log_every=1, n_samples=0, warmup=1)


def groups(names):
    """Block names -> their top-level groups ("down_blocks.2", "mid_block", "up_blocks.1")."""
    return {".".join(n.split(".")[:2]) if not n.startswith("mid_block") else "mid_block" for n in names}


@pytest.fixture(scope="module")
def sd15_unet():
    with torch.device("meta"):                    # the architecture only: no weights are allocated
        return UNet2DConditionModel(**workloads.sd15_unet_config())


def test_named_choices_select_the_documented_blocks_on_sd15(sd15_unet):
    assert len(select_blocks(sd15_unet, "all")) == 16
    assert groups(select_blocks(sd15_unet, "decoder")) == {"mid_block", "up_blocks.1", "up_blocks.2", "up_blocks.3"}
    assert len(select_blocks(sd15_unet, "decoder")) == 10
    assert groups(select_blocks(sd15_unet, "low")) == {"down_blocks.2", "mid_block", "up_blocks.1"}   # 16x16 and 8x8
    assert len(select_blocks(sd15_unet, "low")) == 6
    assert select_blocks(sd15_unet, "migc") == select_blocks(sd15_unet, "mid_block,up_blocks.1")     # MIGC's four
    assert len(select_blocks(sd15_unet, "migc")) == 4
    assert select_blocks(sd15_unet, "up_blocks.1.attentions.0") == ["up_blocks.1.attentions.0.transformer_blocks.0"]


def test_named_choices_select_the_documented_blocks_on_the_tiny_base(base):
    assert len(select_blocks(base.unet, "all")) == 7
    assert groups(select_blocks(base.unet, "decoder")) == {"mid_block", "up_blocks.0", "up_blocks.1"}
    assert groups(select_blocks(base.unet, "low")) == {"down_blocks.2", "mid_block", "up_blocks.0"}   # the 8x8 ones
    assert groups(select_blocks(base.unet, "migc")) == {"mid_block", "up_blocks.0"}


def test_a_choice_matching_no_block_is_an_error_naming_it(base, tiny_sd_folder):
    with pytest.raises(ValueError, match="'up_blocks.7' matches no transformer block.*up_blocks.1"):
        build_adapter(base, adapted_blocks="mid_block,up_blocks.7")
    assert not any(b._forward_hooks for b in transformer_blocks(base.unet).values())   # nothing left attached
    with pytest.raises(ValueError, match="adapter_blocks = 'decodr'.*'decodr' is not a block"):
        make_config("shapes", adapter_blocks="decodr")                 # the config refuses it before any work
    with pytest.raises(ValueError, match="'mid_block,': '' is not a block"):
        make_config("shapes", adapter_blocks="mid_block,")
    with pytest.raises(ValueError, match="'low' selects no transformer block"):   # the tiny SD: nothing at 1/4 side
        select_blocks(load_base(tiny_sd_folder).unet, "low")


def test_an_unadapted_block_carries_no_hook(base):
    adapter = build_adapter(base, adapted_blocks="decoder")
    try:
        hooks = {n: len(b._forward_hooks) for n, b in transformer_blocks(base.unet).items()}
        assert {n for n, k in hooks.items() if k} == set(adapter.block_names) == set(select_blocks(base.unet, "decoder"))
        assert all(k == 1 for n, k in hooks.items() if n in adapter.block_names)
        assert len(adapter.layers) == len(adapter.block_names) == 5
    finally:
        adapter.detach()


def tensors_in(value):
    if torch.is_tensor(value):
        return [value]
    return [t for v in value for t in tensors_in(v)] if isinstance(value, (tuple, list)) else []


def down_outputs(unet, run):
    """Every tensor the down blocks (and the mid block) output during `run()`, by block."""
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, []).extend(tensors_in(output))
        return hook
    handles = [b.register_forward_hook(keep(f"down_blocks.{i}")) for i, b in enumerate(unet.down_blocks)]
    handles.append(unet.mid_block.register_forward_hook(keep("mid_block")))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("blocks", ["decoder", "all"])
def test_with_decoder_blocks_the_backward_pass_stops_at_the_mid_block(base, records, blocks):
    """Decoder blocks: no down block's output is part of the autograd graph (so no gradient is computed through
    the down blocks), while with every block the down blocks' outputs need one; three SGD steps later the base's
    weights are bitwise equal and the adapter moved."""
    adapter = build_adapter(base, adapted_blocks=blocks)
    try:
        with torch.no_grad():
            for gate in adapter.gate_parameters().values():
                gate.fill_(0.5)
        model = AdaptedUNet(base.unet, adapter)
        frozen = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
        before = {n: p.detach().clone() for n, p in adapter.trainable_parameters().items()}
        opt = torch.optim.SGD(list(adapter.trainable_parameters().values()), lr=1.0)
        g = torch.Generator().manual_seed(0)
        cfg = base.unet.config
        latents = torch.randn(len(records), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        t = torch.randint(0, 1000, (len(records),), generator=g)
        context = base.encode_captions([r.caption for r in records])

        def step():
            opt.zero_grad()
            model(latents, t, context, ground(base, records)).pow(2).mean().backward()
            opt.step()
        for _ in range(2):
            step()
        seen = down_outputs(base.unet, step)
        down = [t for name, ts in seen.items() if name.startswith("down_blocks") for t in ts]
        assert down and seen["mid_block"][0].requires_grad
        if blocks == "decoder":
            assert not any(t.requires_grad or t.grad_fn is not None for t in down)
        else:                                       # the check can fail: with every block they are in the graph
            assert any(t.requires_grad for name, ts in seen.items() if name == "down_blocks.1" for t in ts)
        assert all(torch.equal(p, frozen[n]) for n, p in base.unet.named_parameters())
        assert any(not torch.equal(p, before[n]) for n, p in adapter.trainable_parameters().items())
    finally:
        adapter.detach()


def test_the_choice_round_trips_through_an_adapter_file_and_every_block_reads_as_all(base, tmp_path):
    adapter = build_adapter(base, adapted_blocks="migc")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    save_adapter(adapter, tmp_path / "a.safetensors")
    adapter.detach()
    loaded = load_adapter(tmp_path / "a.safetensors", base)
    try:
        assert loaded.block_names == adapter.block_names and loaded.config == adapter.config
        assert {n for n, b in transformer_blocks(base.unet).items() if b._forward_hooks} == set(adapter.block_names)
        assert all(torch.equal(p, dict(adapter.named_parameters())[n]) for n, p in loaded.named_parameters())
    finally:
        loaded.detach()
    every = build_adapter(base)
    every.detach()
    assert "adapted_blocks" not in every.config      # as a checkpoint written before the choice existed


def test_a_run_keeps_its_blocks_through_checkpoints_and_resume_refuses_a_change(runs):
    assert "adapter_blocks" in RESUME_FIXED and "adapter_blocks" in ARCHITECTURE_FIELDS
    run = train(make_config("shapes", run_name="dec", adapter_blocks="decoder", **TINY), progress=False)
    assert json.loads((run / "config.json").read_text())["adapter_blocks"] == "decoder"
    ckpt = load_checkpoint("dec")
    try:
        assert ckpt.adapter.block_names == select_blocks(ckpt.base.unet, "decoder")
    finally:
        ckpt.adapter.detach()
    with pytest.raises(ValueError, match=r"adapter_blocks \(saved 'decoder', asked 'all'\)"):
        resume_config("dec", adapter_blocks="all")
    saved = json.loads((run / "config.json").read_text())
    del saved["adapter_blocks"]                       # a run saved before the field existed ...
    (run / "config.json").write_text(json.dumps(saved))
    assert resume_config("dec").adapter_blocks == "all"          # ... resumes with every block


def test_bench_rows_carry_their_blocks_and_bad_choices_are_refused():
    result = bench.run_bench("tiny", device="cpu", batch=1, rounds=1, steps_per_round=1, warmup=0,
                             variants=[("masked", True)], blocks=["decoder", "mid_block,up_blocks.1"])
    rows = {r["name"]: r for r in result["rows"]}
    default, ff, cells = bench.DEFAULT_BLOCKS["tiny"], bench.DEFAULT_FF_MULT["tiny"], bench.DEFAULT_SUBCELL["tiny"]
    assert result["ours_blocks"] == default and result["ours_variant"] == bench.variant_name("masked", True, default, ff,
                                                                                            cells)
    decoder, listed = (bench.variant_name("masked", True, b, ff, cells) for b in ("decoder", "mid_block,up_blocks.1"))
    assert {decoder, listed, result["ours_variant"]} <= set(rows) and listed.endswith("[mid_block,up_blocks.1]")
    assert rows[decoder]["blocks"] == "decoder"
    assert rows[listed]["trainable_params"] < rows[decoder]["trainable_params"]
    assert bench.parse_blocks("all, decoder,mid_block+up_blocks.1") == ("all", "decoder", "mid_block,up_blocks.1")
    with pytest.raises(ValueError, match="'encoder' is not a block"):
        bench.parse_blocks("all,encoder")
