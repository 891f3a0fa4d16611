"""The sub-cell map (`adapter_subcell`): the value a cell takes from an object's token also carries the part of the cell
the object's box covers. What it reads (`cell_cover`), what it changes in a layer, identity at init, checkpoints, the
command line, the `shapes` preset, and resume (a run saved before the field resumes without it)."""
import json

import pytest
import torch

from adapterlib.__main__ import main
from adapterlib.evaluation import checks
from adapterlib.model.adapter import AdaptedUNet, GatedLayer, build_adapter, region_mask
from adapterlib.model.sample import ground
from adapterlib.training.checkpoint import adapter_config, load_checkpoint
from adapterlib.training.config import PRESETS, TrainConfig, make_config
from adapterlib.training.train import resume_config


def open_gates(adapter, value=0.5):
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(value)


def adapted(base, adapter, records, grounding):
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(len(records), 3, 32, 32, generator=g)
    t, context = torch.tensor([500] * len(records)), base.encode_captions([r.caption for r in records])
    with torch.no_grad():
        return AdaptedUNet(base.unet, adapter)(noisy, t, context, grounding, 1.0)


def test_cell_cover_is_each_box_clipped_to_each_cell_in_the_cells_coordinates():
    from adapterlib.model.adapter import cell_cover
    # a 4x2 grid; the box's left edge halfway into column 1, its right edge on column 2's right edge, all rows
    box = torch.tensor([[[0.375, 0.0, 0.75, 1.0]]])
    cover = cell_cover(box, 2, 4)                                            # (1, 8, 1, 4)
    assert cover.shape == (1, 8, 1, 4)
    row = cover[0, :4, 0]
    assert torch.equal(row[1], torch.tensor([0.5, 0.0, 1.0, 1.0]))           # right half of column 1
    assert torch.equal(row[2], torch.tensor([0.0, 0.0, 1.0, 1.0]))           # column 2: all of it
    assert row[0][0] == row[0][2] == 1.0 and row[3][0] == row[3][2] == 0.0   # untouched: an empty box on the border
    assert torch.equal(cover[0, 4:], cover[0, :4])                           # both rows alike
    touched = (cover[..., 2] > cover[..., 0]) & (cover[..., 3] > cover[..., 1])
    assert torch.equal(touched, region_mask(box, 2, 4))                      # what it covers: the region mask's cells


def test_subcell_map_tells_apart_cells_the_masked_layer_sees_alike():
    """Two cells with the same features, both touched by one box: the masked layer gives them the same output; with
    the sub-cell map a cell the box covers wholly and one it half covers differ. The map at zero is the masked
    layer exactly."""
    from adapterlib.model.adapter import cell_features
    torch.manual_seed(0)
    plain = GatedLayer(16, 8, 2, "masked", "layernorm", True)
    subcell = GatedLayer(16, 8, 2, "masked", "layernorm", True, subcell=True)
    subcell.load_state_dict(plain.state_dict(), strict=False)
    for layer in (plain, subcell):
        torch.nn.init.constant_(layer.gate_attn, 1.0), torch.nn.init.constant_(layer.gate_ff, 1.0)
    box = torch.tensor([[[0.125, 0.0, 0.5, 1.0]]])                    # column 0 half covered, column 1 whole (4x1 grid)
    x = torch.randn(1, 1, 16).expand(1, 4, 16)                       # every cell alike
    args = (x, torch.randn(1, 1, 8), torch.ones(1, 1, dtype=torch.bool), region_mask(box, 1, 4), torch.ones(1, 1, 1), box)
    cells = cell_features(box, 1, 4)
    with torch.no_grad():
        p, s = plain(*args), subcell(*args, cells)
        assert torch.allclose(p[0, 0], p[0, 1]) and not torch.allclose(s[0, 0], s[0, 1], atol=1e-4)
        assert torch.allclose(s[0, 2:], p[0, 2:], atol=1e-6)          # outside the box: no object, no map
        subcell.cell_value.zero_()
        assert torch.allclose(subcell(*args, cells), p, atol=1e-6)


def test_subcell_adapter_is_the_identity_at_init_round_trips_and_needs_masked_attention(base, records, tmp_path):
    from adapterlib.training.checkpoint import load_adapter, save_checkpoint
    adapter = build_adapter(base, subcell=True)
    try:
        assert checks.identity_at_init(base, adapter, records) == 0.0
        open_gates(adapter)
        g = ground(base, records)
        out = adapted(base, adapter, records, g)
        path = save_checkpoint(tmp_path, 1, adapter, dict(step=1), {})
    finally:
        adapter.detach()
    loaded = load_adapter(path, base)
    try:
        assert loaded.config["subcell"] is True and all(l.cell_value is not None for l in loaded.layers)
        assert torch.equal(adapted(base, loaded, records, g), out)
    finally:
        loaded.detach()
    with pytest.raises(ValueError, match="adapter_subcell = True reads each box's cells: it needs adapter_attention = 'masked', not 'cross'"):
        build_adapter(base, attention="cross", subcell=True)
    with pytest.raises(ValueError, match="adapter_subcell"):
        build_adapter(base, attention="gligen", subcell=True)


def test_the_command_line_reaches_the_run_the_preset_has_it_and_an_older_run_resumes_without(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    assert PRESETS["shapes"]["adapter_subcell"] is True and make_config("shapes").adapter_subcell is True
    assert TrainConfig.adapter_subcell is False and make_config("shapes-dit").adapter_subcell is False
    for attention in ("self", "cross", "gligen"):    # the preset's map is the masked attention's: off with another
        assert make_config("shapes", adapter_attention=attention).adapter_subcell is False
    with pytest.raises(ValueError, match="adapter_subcell = True reads each box's cells: it needs adapter_attention"):
        make_config("shapes", adapter_attention="cross", adapter_subcell=True)
    assert main(["train", "--preset", "smoke", "--run_name", "sc", "--steps", "2", "--save_every", "2",
                 "--n_samples", "0", "--adapter_subcell", "true"]) == 0
    run = tmp_path / "sc"
    assert json.loads((run / "config.json").read_text())["adapter_subcell"] is True
    assert adapter_config(run / "final" / "adapter.safetensors")["subcell"] is True
    ckpt = load_checkpoint("sc")
    try:
        assert all(layer.cell_value is not None for layer in ckpt.adapter.layers)
    finally:
        ckpt.adapter.detach()
    with pytest.raises(ValueError, match=r"adapter_subcell \(saved True, asked False\)"):
        resume_config("sc", adapter_subcell=False)
    saved = json.loads((run / "config.json").read_text())
    del saved["adapter_subcell"]                       # a run saved before the field existed (the default's too) ...
    (run / "config.json").write_text(json.dumps(saved))
    assert resume_config("sc").adapter_subcell is False             # ... resumes without the map, as it trained
