"""A full disk is a clear stop: a cache build or a checkpoint that runs out of space ends the command with one line
naming the path and what it was writing (no traceback), leaves no partial file behind, and the next call, with space
again, completes from what was whole. A full disk is played by a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), which
fails a write as a full disk does (EFBIG; torch.save's "unexpected pos"; safetensors' io error)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapterlib.files import OutOfSpace, is_out_of_space, out_of_space
from adapterlib.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE plays the full disk on Linux")

LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
           "from adapterlib.__main__ import main; sys.exit(main(sys.argv[1:]))")


def _adapterlib(runs, *args, limit: int | None = None):
    code = LIMITED.format(limit=limit) if limit else "import sys; from adapterlib.__main__ import main; sys.exit(main(sys.argv[1:]))"
    env = {"ADAPTERLIB_RUNS": str(runs), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(done, command: str) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"adapterlib {command}: error: out of disk space writing "), last
    return last


def test_a_cache_build_that_runs_out_of_space_stops_with_one_line_and_the_next_call_completes(tmp_path):
    runs = tmp_path / "runs"
    args = ["cache", "--n_train", "64"]
    line = _one_line_error(_adapterlib(runs, *args, limit=100_000), "cache")
    assert "_cache" in line and ".safetensors" in line and "df -h" in line
    assert not list((runs / "_cache").rglob("*.tmp"))                       # no partial file left
    done = _adapterlib(runs, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["records"] == 64


@pytest.mark.parametrize("limit, part", [(1_000_000, "adapter weights"), (2_500_000, "optimizer state (torch.save)")])
def test_a_checkpoint_that_runs_out_of_space_stops_with_one_line_and_resume_completes(tmp_path, limit, part):
    runs = tmp_path / "runs"
    common = ["--n_train", "16", "--batch_size", "2", "--save_every", "2", "--log_every", "1", "--n_samples", "0"]
    done = _adapterlib(runs, "train", "--run_name", "r", "--steps", "2", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    line = _one_line_error(_adapterlib(runs, "train", "--resume", "r", "--steps", "4", limit=limit), "train")
    assert "the checkpoint of step 4" in line and "step_0000004" in line
    assert "the checkpoint of step 2 is intact: resume from it" in line
    assert "checkpoint failed: out of disk space" in (runs / "r" / "train.log").read_text()
    assert sorted(p.name for p in (runs / "r" / "checkpoints").iterdir()) == ["step_0000002"]   # no partial folder
    done = _adapterlib(runs, "train", "--resume", "r", "--steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((runs / "r" / "final" / "info.json").read_text())["step"] == 4


def test_out_of_space_is_recognised_through_what_libraries_raise(tmp_path):
    import errno
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200"))
    assert is_out_of_space(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull })'))
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not is_out_of_space(RuntimeError("shape mismatch"))
    with pytest.raises(OutOfSpace, match=r"^out of disk space writing the thing to .*x\.bin \(No space left"):
        with out_of_space("the thing", tmp_path / "x.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RuntimeError, match="shape mismatch"):                # other errors pass through as they are
        with out_of_space("the thing", tmp_path / "x.bin"):
            raise RuntimeError("shape mismatch")
