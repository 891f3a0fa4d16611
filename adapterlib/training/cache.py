"""Where a training step's inputs come from: the encoding cache, or the images themselves.

A step needs, per sample, the "latent" the UNet denoises (a VAE sample, or for a pixel-space base the
image in [-1, 1]), the caption's hidden states (or the empty caption's, under caption dropout) and one
embedding per phrase. The frozen VAE and text encoder give the same answer every epoch, so they run
once, in batches, and their outputs go to disk (`build_cache`):

    runs/_cache/<key>/meta.json                  what was cached, from what, and every shard's size + SHA-256
    runs/_cache/<key>/records.jsonl              the records as trained on (boxes after the crop) + row indices
    runs/_cache/<key>/images-00000.safetensors   VAE latent moments `mean`, `std` (a pixel base: `pixels` uint8)
    runs/_cache/<key>/captions-00000.safetensors caption hidden states, one row per distinct caption
    runs/_cache/<key>/phrases.safetensors        one embedding per distinct phrase, and the empty caption's

Everything loads without pickle (safetensors, JSON). The key hashes what the encodings depend on: the
weights of the base's VAE, text encoder and tokenizer (their bytes, not the folder's name), the
resolution, the crop policy, the storage dtype, the object limit, the bad-record policy, the manifest's
bytes and each image file's size. Any change gives another folder; a shard that is missing, or whose size
or checksum is wrong (a killed build, a truncated copy) is found on open and rebuilt alone.

What a cache freezes: the VAE stores the latent distribution's moments, so every epoch still draws a new
latent sample (from the training Generator). A horizontal flip is applied at training time to the
cached latents (or pixels) and the boxes together, with the same coin as on images (`data.sample_rng`);
for a VAE this is a flip in latent space, which a VAE's convolutional encoder approximately commutes
with. crop="random" is not cached (a cache would freeze one crop): such a run reads its images every
step, through a DataLoader whose workers decode them off the main process (`ImageSource`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from adapterlib.model.folders import SDXL_PARTS
from adapterlib.data.manifest import ManifestImages, TransformReport, read_manifest_report, resolve_image
from adapterlib.files import atomic_write, hash_file, write_json

CACHE_VERSION = 1
SHARD_ROWS = 2048          # images / captions per shard
ENCODE_BATCH = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheError(RuntimeError):
    """A cache that cannot be built or read (the message names the folder and the file)."""


# ---------------------------------------------------------------------------------------------
# the key

def base_identity(base_path: str | Path) -> str:
    """SHA-256 over the bytes of the files the cached encodings depend on: the VAE, the text encoder and
    the tokenizer (not the UNet: the adapter trains against it, it does not shape the inputs)."""
    base_path = Path(base_path)
    h = hashlib.sha256()
    for part in ("vae", "text_encoder", "tokenizer", *SDXL_PARTS):    # SD folders have no SDXL part: same key
        folder = base_path / part
        if not folder.is_dir():
            continue
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f"{part}/{f.relative_to(folder).as_posix()}\0".encode())
            hash_file(f, h)
    if (base_path / "text_encoder_2").is_dir():          # SDXL: the empty caption's policy is in model_index.json
        index = base_path / "model_index.json"
        h.update(b"model_index.json\0" + (index.read_bytes() if index.is_file() else b""))
    return h.hexdigest()


def cache_key(base_path, manifest: Path, *, resolution: int, crop: str, dtype: str, max_objects: int,
              on_bad_record: str) -> tuple[str, dict]:
    """(hex key, the parts it hashes) for a cache of `manifest` encoded by the base at `base_path`."""
    manifest = Path(manifest)
    records, _ = read_manifest_report(manifest, require_image=False, on_bad_record=on_bad_record, max_objects=max_objects)
    sizes = []
    for r in records:
        try:
            sizes.append(resolve_image(manifest, r).stat().st_size if r.image is not None else -1)
        except (OSError, ValueError):
            sizes.append(-1)          # a missing image: the build reports it (or skips it) by the policy
    parts = dict(version=CACHE_VERSION, base=base_identity(base_path), resolution=int(resolution), crop=crop,
                 dtype=dtype, max_objects=int(max_objects), on_bad_record=on_bad_record,
                 manifest=hash_file(manifest).hexdigest(),
                 image_sizes=hashlib.sha256(json.dumps(sizes).encode()).hexdigest())
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


# ---------------------------------------------------------------------------------------------
# building

def cacheable(crop: str) -> bool:
    """Whether a crop policy can be cached (a random crop cannot: the cache would freeze one crop)."""
    return crop != "random"


def build_cache(base, manifest: str | Path, root: str | Path, *, crop: str = "none", dtype: str = "float32",
                max_objects: int, on_bad_record: str = "error", progress: bool = True, verify: bool = False) -> Path:
    """The cache folder of `manifest` under `root/_cache/`, built (or completed) if needed; returns it.

    `base` is a loaded BaseModel (its VAE and text encoder run here, on its device). A complete cache is
    reused as it is; one with missing or damaged shards (a wrong size; with `verify`, a wrong SHA-256)
    gets those shards rebuilt."""
    if not cacheable(crop):
        raise CacheError("crop='random' is not cached: a cache would freeze one crop per image "
                         "(train with cache=False, or crop='center')")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {list(DTYPES)}")
    manifest = Path(manifest)
    key, parts = cache_key(base.path, manifest, resolution=base.resolution, crop=crop, dtype=dtype,
                           max_objects=max_objects, on_bad_record=on_bad_record)
    folder = Path(root) / "_cache" / key[:24]
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and not damaged_shards(folder, meta, checksums=verify):
            return folder
    return _build(base, manifest, folder, key, parts, crop, dtype, max_objects, on_bad_record, progress)


def _build(base, manifest, folder, key, parts, crop, dtype, max_objects, on_bad_record, progress) -> Path:
    from tqdm import tqdm
    say = (lambda text: print(f"[cache] {text}", file=sys.__stderr__, flush=True)) if progress else (lambda text: None)
    data = ManifestImages(manifest, base.resolution, on_bad_record=on_bad_record, progress=progress,
                          max_objects=max_objects, crop=crop)
    folder.mkdir(parents=True, exist_ok=True)
    # rows: one per distinct image file, caption and phrase (COCO's five captions share one image)
    image_rows, caption_rows, phrase_rows = {}, {}, {}
    first_of_image, out_records = [], []
    for i, r in enumerate(data.records):
        path = str(resolve_image(manifest, r))
        if path not in image_rows:
            image_rows[path] = len(image_rows)
            first_of_image.append(i)
        caption_rows.setdefault(r.caption, len(caption_rows))
    old = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else None
    damaged = set(damaged_shards(folder, old, checksums=True)) if old and old.get("key") == key else None
    shards = []

    def wanted(name):
        return damaged is None or name in damaged or not (folder / name).is_file()

    def write(name, tensors):                              # two builders of one cache never share a file
        atomic_write(folder / name, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                                                          str(tmp)))

    store = DTYPES[dtype]
    n_images, n_captions = len(image_rows), len(caption_rows)
    say(f"encoding {len(data)} records ({n_images} images, {n_captions} captions) into {folder}")
    bar = tqdm(total=n_images + n_captions, desc="cache", unit="item", disable=not progress, file=sys.stderr,
               mininterval=0.5)

    def encode_shards(kind: str, n: int, encode) -> None:
        """The shards of `n` rows of `kind`, each from `encode(lo, hi)` (a dict of tensors), unless intact."""
        for start in range(0, n, SHARD_ROWS):
            name, stop = f"{kind}-{start // SHARD_ROWS:05d}.safetensors", min(n, start + SHARD_ROWS)
            shards.append(dict(file=name, kind=kind, start=start, stop=stop))
            if not wanted(name):
                bar.update(stop - start)
                continue
            chunks = {}
            for lo in range(start, stop, ENCODE_BATCH):
                hi = min(stop, lo + ENCODE_BATCH)
                with torch.no_grad():
                    for k, v in encode(lo, hi).items():
                        chunks.setdefault(k, []).append(v)
                bar.update(hi - lo)
            write(name, {k: torch.cat(v) for k, v in chunks.items()})

    # the VAE's latent moments (or a pixel-space base's pixels), then the captions' hidden states
    try:                                # the bar closed before any error is printed (a full disk: one line)
        encode_shards("images", n_images, lambda lo, hi: _encode_images(base, data, first_of_image[lo:hi], store))
        captions = list(caption_rows)
        encode_shards("captions", n_captions, lambda lo, hi: _encode_captions(base, captions[lo:hi], store))
    finally:
        bar.close()
    # --- the records as trained on (the crop applied to their boxes), and their phrases
    for i, r in enumerate(data.records):
        if crop != "none":
            _, (r,) = data.load([i])
        for o in r.objects:
            phrase_rows.setdefault(o.phrase, len(phrase_rows))
        out_records.append(dict(r.to_json(), _image_row=image_rows[str(resolve_image(manifest, data.records[i]))],
                                _caption_row=caption_rows[r.caption],
                                _phrase_rows=[phrase_rows[o.phrase] for o in r.objects],
                                _cropped_away=len(data.records[i].objects) - len(r.objects)))
    dropped = sum(r["_cropped_away"] for r in out_records)
    phrases = list(phrase_rows)
    if wanted("phrases.safetensors"):
        with torch.no_grad():
            emb = [base.encode_phrases(phrases[b:b + ENCODE_BATCH]).to(store) for b in range(0, len(phrases), ENCODE_BATCH)]
            empty = _encode_captions(base, [""], store)
        dim = base.phrase_dim
        empty = {"empty_caption": empty["hidden"], **({"empty_pooled": empty["pooled"]} if "pooled" in empty else {})}
        write("phrases.safetensors", {"phrases": torch.cat(emb) if emb else torch.zeros(0, dim, dtype=store), **empty})
    shards.append(dict(file="phrases.safetensors", kind="phrases", start=0, stop=len(phrases)))
    atomic_write(folder / "records.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n"
                                                                              for r in out_records)))
    shards.append(dict(file="records.jsonl", kind="records", start=0, stop=len(out_records)))
    for s in shards:
        s["bytes"] = (folder / s["file"]).stat().st_size
        s["sha256"] = hash_file(folder / s["file"]).hexdigest()
    write_json(folder / "meta.json", dict(
        key=key, parts=parts, manifest=str(manifest), base=str(base.path), records=len(out_records),
        images=n_images, captions=n_captions, phrases=len(phrases), latent="pixels" if base.vae is None else "moments",
        scaling_factor=None if base.vae is None else float(base.vae.config.scaling_factor),
        skipped=data.skipped, dropped_by_crop=dropped, shards=shards))
    rebuilt = "all" if damaged is None else (sorted(damaged) or "nothing")
    say(f"done: {len(out_records)} records, {n_images} images, {n_captions} captions, {len(phrases)} phrases "
        f"(built: {rebuilt})")
    return folder


def _encode_captions(base, captions: list[str], store: torch.dtype) -> dict[str, torch.Tensor]:
    """The captions' hidden states (`hidden`), and on SDXL and SD3 their pooled embeddings (`pooled`)."""
    if not base.pooled:
        return {"hidden": base.encode_captions(captions).to(store)}
    hidden, pooled = base.encode_text(captions)
    return {"hidden": hidden.to(store), "pooled": pooled.to(store)}


def time_ids(report: TransformReport, resolution: int) -> list[int]:
    """SDXL's size and crop conditioning of one sample, as diffusers' SDXL training example computes it: the
    image file's (height, width), the square crop's (top, left) in the resized image (after a flip, measured
    from the flipped image's left edge, as the example crops after flipping), and the target (height, width)."""
    (top, left), (_, resized_w) = report.crop_top_left, report.resized_size
    if report.flipped:
        left = resized_w - resolution - left
    return [*report.original_size, top, left, resolution, resolution]


def time_ids_batch(reports, resolution: int) -> torch.Tensor:
    return torch.tensor([time_ids(r, resolution) for r in reports], dtype=torch.float32).reshape(-1, 6)


def _encode_images(base, data: ManifestImages, indices: list[int], store: torch.dtype) -> dict[str, torch.Tensor]:
    """The images at `indices`: as they are (pixel-space base) or the VAE's latent mean and std; on SDXL with
    their time ids, unflipped and flipped (a cached sample is flipped at training time)."""
    images, _, reports = data.load_reports(indices)
    out = _encode_pixels(base, images, store)
    if base.is_sdxl:
        out["time_ids"] = time_ids_batch(reports, data.resolution)
        out["time_ids_flipped"] = time_ids_batch([dataclasses.replace(r, flipped=True) for r in reports], data.resolution)
    return out


def _encode_pixels(base, images: np.ndarray, store: torch.dtype) -> dict[str, torch.Tensor]:
    """(B, H, W, 3) uint8 -> the pixels as they are (pixel-space base) or the VAE's latent mean and std."""
    if base.vae is None:
        return {"pixels": torch.from_numpy(images)}
    x = torch.from_numpy(images).to(base.device).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = base.vae.encode(x.to(base.vae.dtype)).latent_dist
    return {"mean": dist.mean.to(store), "std": dist.std.to(store)}


def damaged_shards(folder: Path, meta: dict, *, checksums: bool) -> list[str]:
    """The files of the cache at `folder` that are missing, of the wrong size, or (with `checksums`)
    whose SHA-256 differs from meta.json's."""
    bad = []
    for s in meta.get("shards", []):
        path = folder / s["file"]
        if not path.is_file() or path.stat().st_size != s["bytes"]:
            bad.append(s["file"])
        elif checksums and hash_file(path).hexdigest() != s["sha256"]:
            bad.append(s["file"])
    return bad
