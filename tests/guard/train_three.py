"""Train the three guard runs on the shipped tiny base and print their final adapters' sha256 as one JSON line.

Run as a script by tests/test_guard.py, once with the code being tested and once with the pinned commit's code (its
`adapterlib/` put first on PYTHONPATH), on the same machine in the same test, so the two are bitwise comparable
whatever the CPU. It imports only `make_config` and `train`, from where either layout keeps them.
"""
import hashlib
import json
import sys
import tempfile
import os

import torch

os.environ["ADAPTERLIB_RUNS"] = tempfile.mkdtemp(prefix="adapterlib-guard-")
try:                                            # the package layout from issue 32 on
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
except ImportError:                             # the flat layout before it
    from adapterlib.config import make_config
    from adapterlib.train import train

import adapterlib

torch.set_num_threads(1)
SETTINGS = dict(steps=6, batch_size=2, n_train=16, save_every=4, log_every=1, n_samples=2, warmup=2)
RUNS = {
    "masked-all-4x": dict(adapter_blocks="all", adapter_ff_mult=4),
    "self-box-all-4x": dict(adapter_blocks="all", adapter_ff_mult=4, adapter_attention="self", box_loss_region="box"),
    "preset": {},                               # the shapes preset as it stands (decoder blocks, 2x feed-forward, sub-cell map)
}
out = {"package": os.path.dirname(adapterlib.__file__), "capability": torch.backends.cpu.get_cpu_capability()}
for name, extra in RUNS.items():
    folder = train(make_config("shapes", run_name=name, **SETTINGS, **extra), progress=False)
    out[name] = hashlib.sha256((folder / "final" / "adapter.safetensors").read_bytes()).hexdigest()
print(json.dumps(out))
sys.stdout.flush()
