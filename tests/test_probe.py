"""The checkpoint test on a tiny CPU run: grid and numbers written under the run, reused when cached."""
import json

import pytest

from adapterlib.__main__ import main
from adapterlib.training.config import make_config
from adapterlib.evaluation.checkpoint_test import grounding_vs_step, probe_checkpoint
from adapterlib.training.train import train

TINY = dict(steps=6, batch_size=2, n_train=16, save_every=4, log_every=1, n_samples=0, warmup=2)
FAST = dict(n=3, steps=3)                                    # 3 layouts, 3 DDIM steps


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERLIB_RUNS", str(tmp_path_factory.mktemp("runs")))
        return train(make_config("shapes", run_name="tiny", **TINY), progress=False)   # checkpoints 4, 6


def test_probe_writes_grid_and_results_under_the_run(run_dir):
    results = probe_checkpoint(run_dir, "latest", **FAST)
    out = run_dir / "checkpoint_test" / "step_0000006"
    assert (out / "grid.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert saved["step"] == 6 and saved["seeds"] == [0, 1, 2] and len(saved["success_per_image"]) == 3
    assert saved["grounding"]["n_images"] == 3
    assert saved["gates"]["gate_mean"] > 0                   # it trained: the gates left zero


def test_probe_is_reused_with_the_same_settings_and_redone_with_others(run_dir):
    probe_checkpoint(run_dir, 6, **FAST)
    results = run_dir / "checkpoint_test" / "step_0000006" / "results.json"
    stamp = results.stat().st_mtime_ns
    probe_checkpoint(run_dir, 6, **FAST)
    assert results.stat().st_mtime_ns == stamp
    probe_checkpoint(run_dir, 6, n=2, steps=3)
    assert json.loads(results.read_text())["settings"]["n"] == 2


def test_grounding_vs_step_has_step0_and_every_checkpoint(run_dir, capsys):
    table = grounding_vs_step(run_dir, **FAST)
    assert table.step.tolist() == [0, 4, 6]
    assert table.gate_mean.iloc[0] == 0.0                    # step 0: the zero-init adapter, the base alone
    assert main(["evaluate", str(run_dir), "--checkpoint", "all", "--limit", "3", "--sampling-steps", "3"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["step"] for row in last["rows"]] == [0, 4, 6]
    assert last["rows"][2]["success_rate"] == table.success_rate.iloc[2]
