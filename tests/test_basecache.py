"""The base alone's samples of an evaluation are kept on disk (adapterlib/evaluation/basecache.py): a second
`evaluate RUN` reads them instead of sampling (same numbers), a changed setting, layout or base samples
again, a damaged image is sampled again, and the cached images are exactly the sampled ones."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import adapterlib.model.sample
from adapterlib.__main__ import main
from adapterlib.evaluation.basecache import base_identity, base_images, cache_root
from adapterlib.training.config import make_config
from adapterlib.evaluation.evaluate import heldout_layouts
from adapterlib.training.train import train

TINY = dict(steps=2, batch_size=2, n_train=16, save_every=2, log_every=1, n_samples=0, warmup=1)


@pytest.fixture
def base_calls(monkeypatch):
    """Counts the calls of `sample.generate` that sample the base alone (no adapter)."""
    calls = []
    real = adapterlib.model.sample.generate

    def counting(base, records, seeds, *, adapter=None, **kwargs):
        if adapter is None:
            calls.append(len(records))
        return real(base, records, seeds, adapter=adapter, **kwargs)
    monkeypatch.setattr(adapterlib.model.sample, "generate", counting)
    return calls


def _evaluate(capsys, *args) -> dict:
    assert main(["evaluate", "tiny", "--limit", "3", "--sampling-steps", "2", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_second_evaluation_reuses_the_base_alone_and_a_changed_setting_does_not(runs, base_calls, capsys):
    train(make_config("shapes", run_name="tiny", **TINY), progress=False)
    first = _evaluate(capsys)
    assert base_calls == [3]
    entries = [p for p in cache_root(runs).iterdir() if p.is_dir()]
    assert len(entries) == 1 and len(list(entries[0].glob("*.png"))) == 3
    assert json.loads((entries[0] / "meta.json").read_text())["parts"]["steps"] == 2

    second = _evaluate(capsys)
    assert base_calls == [3]                                # read from the cache: not sampled again
    assert second == first                                  # the same numbers, base alone and adapter

    _evaluate(capsys, "--scale", "0.5")                     # an adapter setting: the base alone is the same
    assert base_calls == [3]
    _evaluate(capsys, "--guidance", "2.0")                  # a setting the base alone depends on: sampled again
    assert base_calls == [3, 3]
    _evaluate(capsys, "--limit", "2")                       # other layouts: sampled again
    assert base_calls == [3, 3, 2]
    assert len([p for p in cache_root(runs).iterdir() if p.is_dir()]) == 3


def test_cached_images_are_exactly_the_sampled_ones_and_a_damaged_one_is_sampled_again(runs, base, base_calls):
    layouts = heldout_layouts(2)
    fresh = base_images(base, layouts.records, layouts.seeds, cache=False, steps=2)
    written = base_images(base, layouts.records, layouts.seeds, steps=2)
    read = base_images(base, layouts.records, layouts.seeds, steps=2, scale=0.3, tau=0.5)   # ignored by the base
    assert base_calls == [2, 2]
    assert np.array_equal(fresh, written) and np.array_equal(written, read) and read.dtype == np.uint8
    entry = next(p for p in cache_root(runs).iterdir() if p.is_dir())
    (entry / "00001.png").write_bytes(b"not a png")
    again = base_images(base, layouts.records, layouts.seeds, steps=2)
    assert base_calls == [2, 2, 2] and np.array_equal(again, fresh)
    assert base_images(base, layouts.records, layouts.seeds, steps=2) is not None and base_calls == [2, 2, 2]


def test_the_base_is_identified_by_its_files(runs, tmp_path):
    from adapterlib.model.base import SHIPPED_BASE
    copy = shutil.copytree(SHIPPED_BASE, tmp_path / "copy")
    assert base_identity(copy, runs) == base_identity(SHIPPED_BASE, runs)     # the same bytes: the same base
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("{", '{"note": 1, ', 1))
    assert base_identity(copy, runs) != base_identity(SHIPPED_BASE, runs)
    assert base_identity(tmp_path / "no-such-base", runs) is None
