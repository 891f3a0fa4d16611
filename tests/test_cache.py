"""The encoding cache (adapterlib/training/cache.py): what it stores equals what the encoders give, it is reused,
any change to what it depends on gives a new one, a damaged shard is found and rebuilt alone, and training
from it is training from the images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterlib.training import batches
from adapterlib.model.base import load_base
from adapterlib.data.manifest import ManifestImages
from adapterlib.training.batches import CachedSource, ImageSource, step_batches
from adapterlib.training.cache import CacheError, build_cache
from helpers import photo_manifest


def _shapes_manifest(folder: Path, n: int = 12) -> Path:
    from adapterlib.shapes import write_dataset
    return write_dataset(folder, n, seed=0)


@pytest.fixture(scope="module")
def shapes_base():
    return load_base("shapes-tiny")


@pytest.fixture(scope="module")
def sd_base(tiny_sd_folder):
    return load_base(tiny_sd_folder)


def _build(base, manifest, root, **kw):
    return build_cache(base, manifest, root, max_objects=kw.pop("max_objects", 30), progress=False, **kw)


def test_cached_pixels_captions_and_phrases_are_the_encoders_outputs(tmp_path, shapes_base):
    manifest = _shapes_manifest(tmp_path / "d")
    source = CachedSource(_build(shapes_base, manifest, tmp_path / "runs"))
    images = ManifestImages(manifest, shapes_base.resolution, progress=False)
    assert [r.caption for r in source.records] == [r.caption for r in images.records]
    batch = source.batch([3, 0, 7], [0, 1, 2])
    pixels, records = images.load([3, 0, 7])
    assert torch.equal(batch.pixels, torch.from_numpy(pixels))      # a pixel base: the images, exactly
    with torch.no_grad():
        captions = shapes_base.encode_captions([r.caption for r in records])
        phrases = shapes_base.encode_phrases([o.phrase for r in records for o in r.objects])
        empty = shapes_base.encode_captions([""])
    torch.testing.assert_close(batch.captions, captions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.phrases, phrases, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.empty_caption, empty, atol=1e-5, rtol=1e-5)


def test_vae_moments_are_cached_and_every_epoch_draws_a_new_latent(tmp_path, sd_base):
    manifest = photo_manifest(tmp_path / "d")
    folder = _build(sd_base, manifest, tmp_path / "runs", crop="center")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["latent"] == "moments" and meta["images"] == 6 and meta["captions"] == 2   # captions deduplicated
    source = CachedSource(folder)
    batch = source.batch([1, 4], [0, 1])
    images, records = ManifestImages(manifest, sd_base.resolution, progress=False, crop="center").load([1, 4])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = sd_base.vae.encode(x).latent_dist
    torch.testing.assert_close(batch.mean, dist.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.std, dist.std, atol=1e-5, rtol=1e-5)
    assert [r.objects for r in batch.records] == [r.objects for r in records]    # boxes after the crop
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cpu")
    first = batches.sample_latents(sd_base, batch, g, dev, torch.float32, None)
    second = batches.sample_latents(sd_base, batch, g, dev, torch.float32, None)
    assert not torch.equal(first, second)                              # a new sample each time
    expected = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(first, expected * sd_base.vae.config.scaling_factor, atol=1e-5, rtol=1e-5)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_complete_cache_is_reused_and_loads_without_pickle(tmp_path, shapes_base):
    manifest = _shapes_manifest(tmp_path / "d")
    folder = _build(shapes_base, manifest, tmp_path / "runs")
    before = _mtimes(folder)
    assert _build(shapes_base, manifest, tmp_path / "runs") == folder
    assert _mtimes(folder) == before                                  # nothing rewritten
    assert {p.suffix for p in folder.iterdir()} <= {".safetensors", ".json", ".jsonl"}


def test_any_change_it_depends_on_gives_another_cache(tmp_path, tiny_sd_folder):
    manifest = photo_manifest(tmp_path / "d")
    base = load_base(tiny_sd_folder)
    root = tmp_path / "runs"
    folder = _build(base, manifest, root)
    assert _build(base, manifest, root, crop="center") != folder
    assert _build(base, manifest, root, dtype="bfloat16") != folder
    # the manifest's content: one caption changed
    lines = manifest.read_text().splitlines()
    edited = tmp_path / "d" / "edited.jsonl"
    edited.write_text("\n".join([lines[0].replace("a red box", "a crimson box")] + lines[1:]) + "\n")
    assert _build(base, edited, root) != folder
    # the base's weights, not its path: the same folder with one text-encoder weight changed
    other = tmp_path / "other-sd"
    shutil.copytree(tiny_sd_folder, other)
    weights = other / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights))
    assert _build(load_base(other), manifest, root) != folder
    # the same weights under another folder name: the same cache
    same = tmp_path / "same-sd"
    shutil.copytree(tiny_sd_folder, same)
    assert _build(load_base(same), manifest, root) == folder


def test_a_truncated_or_missing_shard_is_found_and_rebuilt_alone(tmp_path, sd_base):
    manifest = photo_manifest(tmp_path / "d")
    folder = _build(sd_base, manifest, tmp_path / "runs")
    images = folder / "images-00000.safetensors"
    good = images.read_bytes()
    images.write_bytes(good[: len(good) // 2])                        # a killed copy
    with pytest.raises(CacheError, match="images-00000"):
        CachedSource(folder)
    captions_before = (folder / "captions-00000.safetensors").stat().st_mtime_ns
    assert _build(sd_base, manifest, tmp_path / "runs") == folder
    assert images.read_bytes() == good                                # rebuilt, the same bytes
    assert (folder / "captions-00000.safetensors").stat().st_mtime_ns == captions_before   # left alone
    (folder / "phrases.safetensors").unlink()
    _build(sd_base, manifest, tmp_path / "runs")
    CachedSource(folder)
    # same size, different bytes: only --verify (checksums) sees it
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    _build(sd_base, manifest, tmp_path / "runs")
    assert images.read_bytes() != good
    _build(sd_base, manifest, tmp_path / "runs", verify=True)
    assert images.read_bytes() == good


def test_flip_on_the_cache_is_the_flip_on_the_images(tmp_path, shapes_base):
    manifest = _shapes_manifest(tmp_path / "d")
    cached = CachedSource(_build(shapes_base, manifest, tmp_path / "runs"), flip=True, seed=3)
    plain = ImageSource(ManifestImages(manifest, shapes_base.resolution, progress=False, flip=True, seed=3))
    flipped = 0
    for step in range(4):
        idx, pos = batches.batch_indices(3, len(plain), step * 5, 5), list(range(step * 5, step * 5 + 5))
        a, b = cached.batch(idx, pos), plain.batch(idx, pos)
        assert torch.equal(a.pixels, b.pixels)
        assert [r.objects for r in a.records] == [r.objects for r in b.records]
    assert cached.flipped == plain.flipped > 0


def test_random_crops_are_not_cached(tmp_path, shapes_base):
    manifest = _shapes_manifest(tmp_path / "d")
    with pytest.raises(CacheError, match="random"):
        _build(shapes_base, manifest, tmp_path / "runs", crop="random")
    source, note = batches.training_source(
        shapes_base, manifest, tmp_path / "runs", cache=True, crop="random", flip=False, seed=0, max_objects=30,
        on_bad_record="error", compute_dtype=torch.float32, progress=False)
    assert isinstance(source, ImageSource) and "random" in note


def test_workers_decode_the_same_batches_as_the_main_process(tmp_path, shapes_base):
    manifest = _shapes_manifest(tmp_path / "d")
    def batches(workers):
        source = ImageSource(ManifestImages(manifest, 32, progress=False, crop="center", flip=True, seed=1))
        out = list(step_batches(source, seed=1, batch_size=4, start=2, stop=6, workers=workers))
        return out, source.flipped
    (main, flips), (worker, worker_flips) = batches(0), batches(2)
    assert len(main) == len(worker) == 4
    for a, b in zip(main, worker):
        assert torch.equal(a.pixels, b.pixels) and a.records == b.records
    assert flips == worker_flips > 0                                  # counted in the main process


@pytest.mark.parametrize("base_name", ["shapes", "sd"])
def test_training_from_the_cache_is_training_from_the_images(tmp_path, monkeypatch, base_name, tiny_sd_folder):
    """Same run with and without the cache: the same random draws and the same inputs up to the encoders'
    batching (the cache encodes 32 at a time, the image path one batch), so the final adapters agree to
    float rounding (measured: 0 on the pixel base, 5e-7 on the tiny SD). The pixel base flips too (exact
    on pixels); on a VAE the cache flips latents, which is not the latent of the flipped image, so the SD
    run compares without flip."""
    from adapterlib.training.config import make_config
    from adapterlib.training.train import train
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = _shapes_manifest(tmp_path / "d") if base_name == "shapes" else photo_manifest(tmp_path / "d")
    base_model = "shapes-tiny" if base_name == "shapes" else str(tiny_sd_folder)
    finals = {}
    for cached in (True, False):
        cfg = make_config("smoke", run_name=f"c{cached}", data=str(manifest), base_model=base_model, steps=6,
                          batch_size=3, save_every=6, log_every=3, n_samples=0, flip=base_name == "shapes", cache=cached, num_workers=0)
        folder = train(cfg, progress=False)
        report = json.loads((folder / "data_report.json").read_text())
        assert ("cached" in report["inputs"]) == cached
        finals[cached] = load_file(str(folder / "final" / "adapter.safetensors"))
    assert max(finals[True][k].abs().max().item() for k in finals[True] if "gate" in k) > 0   # it trained
    for k in finals[True]:
        torch.testing.assert_close(finals[True][k], finals[False][k], atol=2e-5, rtol=0)


def test_cache_command_builds_what_training_uses(tmp_path, monkeypatch, capsys):
    from adapterlib.__main__ import main
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path / "runs"))
    manifest = _shapes_manifest(tmp_path / "d")
    assert main(["cache", "--preset", "smoke", "--data", str(manifest)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["records"] == 12 and Path(result["folder"]).parent == tmp_path / "runs" / "_cache"
    base = load_base("shapes-tiny")
    source, note = batches.training_source(
        base, manifest, tmp_path / "runs", cache=True, crop="none", flip=False, seed=0, max_objects=30,
        on_bad_record="error", compute_dtype=torch.float32, progress=False)
    assert str(source.folder) == result["folder"]
