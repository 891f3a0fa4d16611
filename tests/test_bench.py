"""The throughput bench measures what it says: the peer is diffusers' own GLIGEN on the base's weights,
our rows go through AdaptedUNet and train only the adapter, the CLI's last line is the JSON scripts read.
No timing is asserted: only that every number is there and positive."""
import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense

from adapterlib.evaluation import bench, workloads
from adapterlib.__main__ import main
from adapterlib.model.adapter import AdaptedUNet


@pytest.fixture(scope="module")
def workload():
    return workloads.make_workload("tiny", "cpu", batch=2, objects=3)


def grads_reaching(params: dict, run) -> set[str]:
    """The names in `params` whose .grad is written during `run()` (read before the optimizer clears it)."""
    seen = set()
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: seen.add(n)) for n, p in params.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_cli_last_line_is_json_with_every_row_positive(capsys):
    args = ["--size", "tiny", "--device", "cpu", "--batch", "2", "--rounds", "1", "--steps-per-round", "1",
            "--warmup", "1"]
    assert main(["bench", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("ours_samples_per_s", "peer_samples_per_s", "floor_samples_per_s", "ours_x_peer", "ours_x_floor"):
        assert result[key] > 0 and math.isfinite(result[key]), key
    assert result["ours_variant"] == "ours masked+cells+FFx2 [decoder]"   # the shapes preset's adapter (docs/notes/blocks.md)
    assert (result["batch"], result["objects"], result["device_name"]) == (2, 3, "cpu")
    assert result["torch"] == torch.__version__
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["floor", "peer"]
    assert set(names[2:]) == {bench.variant_name(a, ff, "decoder", 2, a == "masked") for a, ff in bench.VARIANTS}
    for row in result["rows"]:
        assert row["samples_per_s"] > 0 and row["s_per_step"] > 0 and len(row["round_s"]) == 1, row
        assert row["peak_mib"] is None                          # the CPU reports no peak memory
    by_name = {r["name"]: r for r in result["rows"]}
    assert by_name["ours masked+cells+FFx2 [decoder]"]["samples_per_s"] == result["ours_samples_per_s"]
    assert by_name["floor"]["trainable_params"] == 0 and by_name["peer"]["trainable_params"] > 0
    assert any(line.startswith("peer ") for line in lines)      # the table is printed before the JSON


def test_the_peer_is_diffusers_gated_gligen_on_the_base_weights(workload):
    step = bench.peer_step(workload)
    peer = step.model
    assert type(peer) is UNet2DConditionModel and peer.config.attention_type == "gated"
    blocks = [m for m in peer.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(isinstance(b.fuser, GatedSelfAttentionDense) for b in blocks)
    names = {n for n, _ in peer.named_parameters()}
    trained = {n for n in names if n.startswith("position_net.") or ".fuser." in n}
    assert trained and set(step.trainable) == trained             # exactly fuser + position_net
    base = workload.unet.state_dict()
    assert set(base) == names - trained                          # every other weight is a base weight ...
    for key, value in base.items():                              # ... the base's own tensor, shared, not copied
        assert peer.state_dict()[key].data_ptr() == value.data_ptr(), key
    assert not any(t.is_meta for t in (*peer.parameters(), *peer.buffers()))
    assert all(p.dtype == torch.float32 and p.device == workload.device for p in step.trainable.values())
    # one step: the gradient reaches every trained parameter (grounded through cross_attention_kwargs)
    assert grads_reaching(step.trainable, step.run) == trained
    assert not any(p.requires_grad for n, p in peer.named_parameters() if n not in trained)


def test_the_peer_refuses_a_base_weight_it_has_no_place_for():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    assert bench.gligen_peer(unet).config.attention_type == "gated"
    unet.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected.*extra"):
        bench.gligen_peer(unet)


@pytest.mark.parametrize("attention,feedforward", [("masked", True), ("self", False)])
def test_our_rows_go_through_adapted_unet_and_train_only_the_adapter(workload, monkeypatch, attention, feedforward):
    step = bench.adapter_step(workload, attention, feedforward)
    assert isinstance(step.model, AdaptedUNet) and step.model.unet is workload.unet
    adapter = step.model.adapter
    assert step.trainable == adapter.trainable_parameters()
    calls = []
    forward = AdaptedUNet.forward
    monkeypatch.setattr(AdaptedUNet, "forward", lambda self, *a, **k: calls.append(a) or forward(self, *a, **k))
    before = {n: p.detach().clone() for n, p in step.trainable.items()}
    assert grads_reaching(step.trainable, step.run) == set(step.trainable)   # every adapter parameter gets a gradient
    assert len(calls) == 1 and calls[0][3] is workload.grounding           # (noisy, t, context, grounding, scale)
    assert not any(p.requires_grad for p in workload.unet.parameters())    # the base gets none
    assert any(not torch.equal(before[n], p) for n, p in step.trainable.items())   # and AdamW stepped


def test_the_floor_trains_nothing_and_differentiates_to_the_input(workload):
    step = bench.floor_step(workload)
    inputs = []
    handle = workload.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        step.run()
    finally:
        handle.remove()
    assert step.trainable == {} and step.model is workload.unet
    assert inputs[0] is not workload.noisy and inputs[0].grad.abs().sum() > 0   # a copy of the batch, differentiated
    assert all(p.grad is None for p in workload.unet.parameters())


def test_a_failing_fallible_row_is_reported_and_the_others_measured():
    def broken():
        raise RuntimeError("no compiler here\nsecond line")
    out = bench.measure({"ok": lambda: None, "compiled": broken}, torch.device("cpu"), rounds=2, steps_per_round=1,
                        warmup=1, fallible=["compiled"])
    assert out["compiled"]["note"] == "n/a: RuntimeError: no compiler here" and out["compiled"]["seconds"] == []
    assert len(out["ok"]["seconds"]) == 2 and out["ok"]["note"] == ""
    with pytest.raises(RuntimeError, match="no compiler"):               # an eager row's error is never hidden
        bench.measure({"eager": broken}, torch.device("cpu"), rounds=1)


def test_extra_and_train_step_rows_are_timed_in_the_same_rounds():
    made = []

    def make(w):
        made.append(w)
        return bench.adapter_step(w, "cross", False).run
    result = bench.run_bench("tiny", device="cpu", batch=2, rounds=2, steps_per_round=1, warmup=0,
                             variants=[("masked", True)], with_train_step=True, extra={"cached": make})
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["floor", "peer", "ours masked+cells+FFx2 [decoder]", "train_step", "cached"]
    assert made[0].batch == 2 and made[0].unet is made[0].base.unet        # the extra row got the same workload
    for name in ("train_step", "cached"):
        assert rows[name]["samples_per_s"] > 0 and len(rows[name]["round_s"]) == 2
    assert rows["train_step"]["trainable_params"] == rows["ours masked+cells+FFx2 [decoder]"]["trainable_params"]


def test_the_train_step_row_is_the_training_loops_own_step(monkeypatch, tmp_path):
    """bench's `train_step` row calls step.step_loss and step.update (what train._loop calls each step) on a
    train.make_training of the preset: the same optimiser groups, schedule and box loss as a run."""
    from adapterlib.training import step as step_module, train as train_module
    calls, made = [], []
    for module, name in ((step_module, "step_loss"), (step_module, "update"), (train_module, "make_training")):
        real = getattr(module, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            out = _real(*a, **k)
            made.append(out) if _name == "make_training" else None
            return out
        monkeypatch.setattr(module, name, spy)
    w = workloads.make_workload("tiny", device="cpu", batch=4)
    step = bench.train_step(w, root=tmp_path)
    assert calls == ["make_training"]
    step.run()
    step.run()
    assert calls == ["make_training", "step_loss", "update", "step_loss", "update"]
    training = made[0]
    assert training.cfg.preset == "shapes" and training.cfg.batch_size == 4 and training.sched.last_epoch == 2
    groups = training.opt.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(groups[0]["lr"] * training.cfg.gate_lr_scale)
    assert step.trainable is training.params and step.model is training.model


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="rounds 0"):
        bench.run_bench("sd15", rounds=0)
    with pytest.raises(ValueError, match="train_step row needs"):
        bench.run_bench("sd15", with_train_step=True)
    with pytest.raises(ValueError, match="size 'xl'"):
        workloads.make_workload("xl")
    with pytest.raises(ValueError, match=r"extra rows \['peer'\]"):
        bench.run_bench("sd15", extra={"peer": lambda w: w})
    with pytest.raises(ValueError, match="variant 'dense'"):
        bench.parse_variants("masked+ff,dense")
    assert bench.parse_variants("masked+FF, self") == (("masked", True), ("self", False))


@pytest.mark.parametrize("flag", ["--steps-per-round", "--steps"])
def test_cli_steps_per_round_reaches_the_bench_and_steps_is_its_earlier_name(flag, monkeypatch, capsys):
    """bench's timed steps are --steps-per-round (train --steps is a run's length, evaluate --sampling-steps the
    sampler's); --steps still works, with a note."""
    seen = {}

    def fake(size, **kw):
        seen.update(kw)
        raise SystemExit(0)
    monkeypatch.setattr(bench, "run_bench", fake)
    with pytest.raises(SystemExit):
        main(["bench", "--size", "tiny", flag, "3"])
    assert seen["steps_per_round"] == 3
    assert ("--steps is --steps-per-round" in capsys.readouterr().err) == (flag == "--steps")


# ---------------------------------------------------------------------------------------------
# the bench at SD3 size: SD3-medium's MM-DiT, the floor and ours at each block choice, no GLIGEN peer

def tiny_sd3_config() -> dict:
    """A 6-block SD3 transformer in place of SD3-medium's 24 (the bench's rows, seconds on a CPU)."""
    return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=6, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                pos_embed_max_size=16)


def test_the_bench_sd3_transformer_is_sd3_medium():
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock

    from adapterlib.model.hooks import transformer_blocks
    config = workloads.sd3_transformer_config()
    assert config == dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                          caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
    with torch.device("meta"):                                  # the architecture, without 8 GB of weights
        net = SD3Transformer2DModel(**config)
    blocks = transformer_blocks(net)
    assert list(blocks) == [f"transformer_blocks.{i}" for i in range(24)]
    assert all(isinstance(b, JointTransformerBlock) for b in blocks.values())
    assert round(sum(p.numel() for p in net.parameters()) / 1e9, 2) == 2.03     # SD3-medium's 2.028 B
    assert (workloads.SD3_CONTEXT, workloads.SD3_POOLED) == (77 + 256, 2048)            # CLIP + T5 tokens; 768 + 1280
    assert bench.DEFAULT_BLOCKS["sd3"] == "middle" and not bench.HAS_PEER["sd3"]     # the sd3 preset's
    assert all(bench.HAS_PEER[size] for size in ("tiny", "sd15", "sdxl"))


def test_the_bench_sd3_rows_run_the_mmdit_floor_and_ours_at_each_block_choice(monkeypatch):
    monkeypatch.setattr(workloads, "sd3_transformer_config", tiny_sd3_config)
    seen = []
    result = bench.run_bench("sd3", device="cpu", batch=1, rounds=1, steps_per_round=1, warmup=0, side=16,
                             variants=(("masked", True), ("gligen", True)), blocks=("all", "first-half"),
                             extra={"workload": lambda w: seen.append(w) or (lambda: None)})
    w = seen[0]
    assert w.is_dit and w.unet.config.sample_size == 16 and w.text_dim == 2048 and w.peer_phrases is None
    assert w.noisy.shape == w.target.shape == (1, 16, 16, 16) and w.context.shape == (1, 333, 32)
    assert w.t.dtype == torch.float32 and 0 <= w.t.item() < 1000
    assert w.added["pooled_projections"].shape == (1, 24)
    rows = {r["name"]: r for r in result["rows"]}
    names = [bench.variant_name("masked", True, b) for b in ("middle", "all", "first-half")]   # the preset's first
    assert list(rows) == ["floor", *names, "workload"]          # no peer row; the gligen variant left out
    for name in ("floor", *names):
        assert rows[name]["samples_per_s"] > 0 and rows[name]["x_peer"] is None, name
    assert all(rows[n]["x_floor"] > 0 for n in names) and rows["floor"]["trainable_params"] == 0
    params = [rows[n]["trainable_params"] for n in names]
    assert params[1] > params[2] > params[0] > 0                # 6 blocks, 3 (the first half), 2 (the middle third)
    assert [rows[n]["blocks"] for n in names] == ["middle", "all", "first-half"]
    assert result["ours_variant"] == names[0] and result["ours_x_floor"] > 0 and result["side"] == 16
    assert result["peer_samples_per_s"] is None and result["ours_x_peer"] is None
    assert "no GLIGEN on sd3" in result["peer_note"] and "variant gligen left out" in result["peer_note"]
    with pytest.raises(ValueError, match="GLIGEN .* is made for a UNet's transformer blocks"):
        bench.peer_step(w)                                       # the peer asked for directly: a clear error


def test_the_cli_on_sd3_says_there_is_no_peer_and_refuses_a_unets_block_choice(monkeypatch, capsys):
    monkeypatch.setattr(workloads, "sd3_transformer_config", tiny_sd3_config)
    args = ["bench", "--size", "sd3", "--device", "cpu", "--side", "16", "--batch", "1", "--rounds", "1",
            "--steps-per-round", "1", "--warmup", "0", "--variants", "gligen,masked+ff"]
    assert main([*args, "--blocks", "last-half"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert [r["name"] for r in result["rows"]] == ["floor", "ours masked+FF [middle]", "ours masked+FF [last-half]"]
    assert result["peer_note"] in lines and not any(line.startswith("peer ") for line in lines)
    assert main([*args, "--blocks", "decoder"]) == 2
    assert "adapter_blocks 'decoder' is a UNet's choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the bench at FLUX size: FLUX.1-dev's transformer (reduced on the CPU), the floor and ours at each block choice

def tiny_flux_config() -> dict:
    """The tests' tiny FLUX transformer (helpers: width 16, 4 latent channels packed 2x2, guidance-distilled) in place
    of FLUX.1-dev's; the bench sets its depth."""
    from helpers import flux_transformer_config
    return flux_transformer_config()


FLUX_CHOICES = ("all", "double", "single", "middle", "first-half", "last-half")


def test_the_bench_flux_transformer_is_flux1_dev():
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from adapterlib.model.hooks import transformer_blocks
    config = workloads.flux_transformer_config()
    assert config == dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):                                  # the architecture, without 48 GB of weights
        net = FluxTransformer2DModel(**config)
    blocks = transformer_blocks(net)
    assert list(blocks) == ([f"transformer_blocks.{i}" for i in range(19)] +
                            [f"single_transformer_blocks.{i}" for i in range(38)])
    assert sum(isinstance(b, FluxTransformerBlock) for b in blocks.values()) == 19
    assert sum(isinstance(b, FluxSingleTransformerBlock) for b in blocks.values()) == 38
    assert round(sum(p.numel() for p in net.parameters()) / 1e9, 2) == 11.90    # FLUX.1-dev's 11.9 B
    assert (workloads.FLUX_POOLED, workloads.FLUX_CPU_DEPTH, workloads.FLUX_CPU_SIDE) == (768, 1, 32)
    assert bench.DEFAULT_BLOCKS["flux"] == "middle" and bench.DEFAULT_FF_MULT["flux"] == 2   # the flux preset's
    assert not bench.HAS_PEER["flux"]
    assert workloads.reduced_config("flux", config, 2) == {**config, "num_layers": 2, "num_single_layers": 4}


def test_the_bench_flux_on_the_cpu_is_reduced_unless_told_and_says_so(monkeypatch):
    monkeypatch.setattr(workloads, "flux_transformer_config", tiny_flux_config)
    w = workloads.make_workload("flux", device="cpu", batch=2)
    cfg = w.unet.config
    assert (cfg.num_layers, cfg.num_single_layers) == (1, 2)                # FLUX_CPU_DEPTH, FLUX's 1:2
    assert w.is_flux and w.is_dit and w.text_dim == 768 and w.peer_phrases is None
    assert w.noisy.shape == w.target.shape == (2, 4, 32, 32)               # (B, in_channels / 4, side, side)
    assert w.context.shape == (2, 512, cfg.joint_attention_dim)            # FLUX.1-dev's 512 T5 tokens
    assert w.added["pooled_projections"].shape == (2, cfg.pooled_projection_dim)
    assert w.added["guidance"].tolist() == [3.5, 3.5]                      # a guidance-distilled base's input
    assert w.t.dtype == torch.float32 and ((0 <= w.t) & (w.t < 1000)).all()
    assert w.note == ("reduced flux: 1 double- + 2 single-stream blocks of 2 + 3, latents 32x32 (256 px); every "
                      "other setting the real network's (the CPU's default, not given: --depth, --side)")
    told = workloads.make_workload("flux", device="cpu", batch=1, depth=2, side=8)
    assert (told.unet.config.num_layers, told.unet.config.num_single_layers) == (2, 4)
    assert told.noisy.shape == (1, 4, 8, 8) and "not given" not in told.note
    with pytest.raises(ValueError, match="depth 2: a reduced depth is an MM-DiT's"):
        workloads.make_workload("sd15", device="cpu", depth=2)


def test_the_bench_flux_rows_run_the_floor_and_ours_at_each_of_fluxs_block_choices(monkeypatch):
    from adapterlib.model.adapter import SpatialAdapter
    monkeypatch.setattr(workloads, "flux_transformer_config", tiny_flux_config)
    seen = []
    result = bench.run_bench("flux", device="cpu", batch=1, rounds=1, steps_per_round=1, warmup=0, depth=2, side=8,
                             variants=(("masked", True), ("gligen", True)), blocks=FLUX_CHOICES,
                             extra={"workload": lambda w: seen.append(w) or (lambda: None)})
    w = seen[0]
    rows = {r["name"]: r for r in result["rows"]}
    names = {b: bench.variant_name("masked", True, b, 2) for b in FLUX_CHOICES}
    assert list(rows) == ["floor", names["middle"], *(names[b] for b in FLUX_CHOICES if b != "middle"), "workload"]
    for name in ("floor", *names.values()):
        assert rows[name]["samples_per_s"] > 0 and rows[name]["x_peer"] is None, name
    assert rows["floor"]["trainable_params"] == 0 and rows["floor"]["x_floor"] == 1
    assert all(rows[n]["x_floor"] > 0 and rows[n]["ff_mult"] == 2 for n in names.values())
    # each row's parameters are the adapter's built for that choice: 6 blocks of one width, so a grounding
    # tokenizer plus one equal layer per adapted block (all 6, single 4, halves 3, double 2, middle 2: blocks 2-3)
    params = {b: rows[names[b]]["trainable_params"] for b in FLUX_CHOICES}
    for b in FLUX_CHOICES:
        built = SpatialAdapter(w.unet, 768, adapted_blocks=b, ff_mult=2)
        assert params[b] == sum(p.numel() for p in built.parameters()), b
    layers = {"all": 6, "single": 4, "first-half": 3, "last-half": 3, "double": 2, "middle": 2}
    layer = (params["all"] - params["double"]) // 4
    assert layer > 0 and all(params[b] == params["double"] + (k - 2) * layer for b, k in layers.items())
    assert result["ours_variant"] == names["middle"] and result["ours_blocks"] == "middle"
    assert result["ours_ff_mult"] == 2 and result["side"] == 8 and result["blocks_in_network"] == 6
    assert result["peer_samples_per_s"] is None and result["ours_x_peer"] is None
    assert "no GLIGEN on flux" in result["peer_note"] and "variant gligen left out" in result["peer_note"]
    assert result["size_note"].startswith("reduced flux: 2 double- + 4 single-stream blocks")


def test_the_cli_on_flux_prints_the_reduction_and_takes_fluxs_block_choices(monkeypatch, capsys):
    monkeypatch.setattr(workloads, "flux_transformer_config", tiny_flux_config)
    args = ["bench", "--size", "flux", "--device", "cpu", "--side", "8", "--batch", "1", "--rounds", "1",
            "--steps-per-round", "1", "--warmup", "0", "--variants", "masked+ff"]
    assert main([*args, "--blocks", "double,single"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert [r["name"] for r in result["rows"]] == ["floor", "ours masked+FFx2 [middle]", "ours masked+FFx2 [double]",
                                                   "ours masked+FFx2 [single]"]
    assert result["size_note"] in lines and "not given: --depth)" in result["size_note"]   # --side was given
    assert result["blocks_in_network"] == 3 and result["peer_note"] in lines
    assert main([*args, "--blocks", "decoder"]) == 2
    assert "adapter_blocks 'decoder' is a UNet's choice" in capsys.readouterr().err
