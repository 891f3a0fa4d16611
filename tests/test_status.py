"""`run_status` and `python -m adapterlib status` on run folders being written, stopped and finished."""
import json
import os

from adapterlib.__main__ import main
from adapterlib.notebook.monitor import run_status
from adapterlib.runs import RunLog, read_metrics

LAYERS = ["gate_0_attn", "gate_0_ff"]


def write_run(run_dir, n_rows, *, steps=100, raw_max=0.2, log_every=5):
    """A run folder as train() writes it, with `n_rows` logged rows (through the loop's own RunLog)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dict(steps=steps, batch_size=2, warmup=10, log_every=log_every)))
    log = RunLog(run_dir, LAYERS, None)
    log.text(f"started at step 0 of {steps} on cpu")
    for i in range(1, n_rows + 1):
        gate = 0.002 * i
        log.row(dict(step=i * log_every, loss=0.05, loss_avg=0.05, lr=1e-4, grad_norm=0.1, gate_mean=gate,
                     gate_max=gate, gate_raw_max=raw_max, samples_per_s=4.0, wall_s=i * 2.5, skipped=0,
                     gate_0_attn=gate, gate_0_ff=-gate))
    return run_dir


def test_status_of_a_run_being_written_ignores_the_half_written_row(tmp_path):
    run = write_run(tmp_path / "live", 8)
    with (run / "metrics.csv").open("a") as f:
        f.write("45,0.04,0.0")                                   # the writer is mid-line
    status = run_status(run)
    assert status["state"] == "running"
    assert (status["step"], status["total_steps"], status["progress"]) == (40, 100, 0.4)
    assert status["eta_s"] == (100 - 40) * 2 / 4.0                # remaining samples / samples per s
    assert status["warnings"] == []


def test_status_says_stalled_when_no_metrics_arrive(tmp_path):
    run = write_run(tmp_path / "quiet", 8)
    status = run_status(run, stalled_after_s=60, now=(run / "metrics.csv").stat().st_mtime + 3600)
    assert status["state"] == "stalled"
    assert any(w.startswith("stalled") for w in status["warnings"])


def test_status_of_an_interrupted_run(tmp_path):
    run = write_run(tmp_path / "stopped", 8)
    RunLog(run, LAYERS, 40).text("interrupted at step 40 (Interrupted('signal 15')); resume with notebooks/03_resume.ipynb")
    assert run_status(run)["state"] == "interrupted"


def test_status_of_a_finished_run_warns_of_over_activation(tmp_path, capsys):
    run = write_run(tmp_path / "done", 20, raw_max=1.4)
    (run / "final").mkdir()
    (run / "final" / "adapter.safetensors").write_bytes(b"")
    (run / "final" / "info.json").write_text(json.dumps({"step": 100, "skipped": 0}))
    os.utime(run / "metrics.csv", (0, 0))                        # old, but finished is not stalled
    assert main(["status", str(run), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    status = json.loads(out[-1])
    assert status["state"] == "finished" and status["eta_s"] == 0.0 and status["step"] == 100
    assert any(w.startswith("over-activation at step 5") for w in status["warnings"])
    assert any(line.startswith("WARNING     over-activation") for line in out[:-1])


def test_status_of_a_run_with_no_rows_yet(tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(steps=100, batch_size=2)))
    status = run_status(run)
    assert status["state"] == "running" and status["step"] is None
    assert read_metrics(run).empty


def test_status_of_a_folder_that_is_not_a_run_is_an_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
