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
from safetensors import safe_open
from safetensors.torch import save_file

from adapterlib.model.base import SDXL_PARTS
from adapterlib.data.manifest import (GroundedObject, ManifestImages, Record, TransformReport, flip_record,
                                      names_a_side, read_manifest_report, resolve_image, sample_rng)
from adapterlib.files import atomic_write, hash_file, write_json

CACHE_VERSION = 1
SHARD_ROWS = 2048          # images / captions per shard
ENCODE_BATCH = 32
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {list(_DTYPES)}")
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

    store = _DTYPES[dtype]
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
    encode_shards("images", n_images, lambda lo, hi: _encode_images(base, data, first_of_image[lo:hi], store))
    captions = list(caption_rows)
    encode_shards("captions", n_captions, lambda lo, hi: _encode_captions(base, captions[lo:hi], store))
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
    """The captions' hidden states (`hidden`), and on SDXL their pooled embeddings (`pooled`)."""
    if not base.is_sdxl:
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


def _time_ids(reports, resolution: int) -> torch.Tensor:
    return torch.tensor([time_ids(r, resolution) for r in reports], dtype=torch.float32).reshape(-1, 6)


def _encode_images(base, data: ManifestImages, indices: list[int], store: torch.dtype) -> dict[str, torch.Tensor]:
    """The images at `indices`: as they are (pixel-space base) or the VAE's latent mean and std; on SDXL with
    their time ids, unflipped and flipped (a cached sample is flipped at training time)."""
    images, _, reports = data.load_reports(indices)
    out = _encode_pixels(base, images, store)
    if base.is_sdxl:
        out["time_ids"] = _time_ids(reports, data.resolution)
        out["time_ids_flipped"] = _time_ids([dataclasses.replace(r, flipped=True) for r in reports], data.resolution)
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


# ---------------------------------------------------------------------------------------------
# reading: the two sources of a training step's inputs

@dataclasses.dataclass
class Batch:
    """One step's inputs before the random draws: the records (boxes as trained on), and either cached
    encodings or the images (uint8) to encode. `flips` says which samples to flip."""
    records: list[Record]
    pixels: torch.Tensor | None = None        # (B, H, W, 3) uint8: images (uncached) or a pixel base's cache
    mean: torch.Tensor | None = None          # (B, C, h, w) VAE latent moments (cached)
    std: torch.Tensor | None = None
    captions: torch.Tensor | None = None      # (B, L, D) cached caption hidden states
    phrases: torch.Tensor | None = None       # (objects, D) cached phrase embeddings, records' order
    empty_caption: torch.Tensor | None = None # (1, L, D) the empty caption's hidden states (cached)
    report: tuple[int, int, int] = (0, 0, 0)  # crop drops, flips, side words (from the image path)
    # SDXL: the cached pooled caption embeddings (B, P) and the empty caption's (1, P); each sample's size and
    # crop conditioning (B, 6) (`time_ids`: from the cache, or from the crop as the images are read)
    pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


class CachedSource:
    """Training inputs read from a cache folder (memory-mapped safetensors; no image is opened)."""

    def __init__(self, folder: str | Path, *, flip: bool = False, seed: int = 0):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise CacheError(f"{self.folder}: no meta.json (not a complete cache; build it with "
                             "`python -m adapterlib cache ...`)")
        self.meta = json.loads(meta_path.read_text())
        bad = damaged_shards(self.folder, self.meta, checksums=False)
        if bad:
            raise CacheError(f"{self.folder}: damaged or missing {bad} (rebuild: `python -m adapterlib cache ...`)")
        self.flip, self.seed = bool(flip), int(seed)
        self.records, self._rows = [], []
        for line in (self.folder / "records.jsonl").read_text().splitlines():
            obj = json.loads(line)
            rows = (obj.pop("_image_row"), obj.pop("_caption_row"), obj.pop("_phrase_rows"), obj.pop("_cropped_away"))
            self.records.append(Record(id=obj.get("id"), image=obj.get("image"), caption=obj.get("caption", ""),
                                       objects=tuple(GroundedObject(o["phrase"], tuple(o["box"]))
                                                     for o in obj.get("objects", [])), seed=obj.get("seed")))
            self._rows.append(rows)
        self.skipped = list(self.meta.get("skipped", []))
        # what the crop / flip policy did in the batches read through this instance, as ManifestImages counts
        self.dropped_by_crop = self.flipped = self.side_words_flipped = 0
        self._files = {}
        with safe_open(str(self.folder / "phrases.safetensors"), framework="pt") as f:
            self.phrase_table = f.get_tensor("phrases")
            self.empty_caption = f.get_tensor("empty_caption")
            self.empty_pooled = f.get_tensor("empty_pooled") if "empty_pooled" in f.keys() else None

    def __len__(self) -> int:
        return len(self.records)

    def _rows_of(self, kind: str, rows: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for row in rows:
            shard = row // SHARD_ROWS
            name = f"{kind}-{shard:05d}.safetensors"
            if name not in self._files:
                self._files[name] = safe_open(str(self.folder / name), framework="pt")
            f, r = self._files[name], row - shard * SHARD_ROWS
            for k in f.keys():
                out.setdefault(k, []).append(f.get_slice(k)[r:r + 1])
        return {k: torch.cat(v) for k, v in out.items()}

    def batch(self, indices: list[int], positions: list[int]) -> Batch:
        records = [self.records[i] for i in indices]
        self.dropped_by_crop += sum(self._rows[i][3] for i in indices)
        images = self._rows_of("images", [self._rows[i][0] for i in indices])
        ids, ids_flipped = images.pop("time_ids", None), images.pop("time_ids_flipped", None)     # SDXL caches
        captions = self._rows_of("captions", [self._rows[i][1] for i in indices])
        rows = [p for i in indices for p in self._rows[i][2]]
        phrases = self.phrase_table[rows] if rows else self.phrase_table[:0]
        if self.flip:
            coins = [sample_rng(self.seed, p, len(self)).random() < 0.5 for p in positions]
            for b, flipped in enumerate(coins):
                if flipped:
                    records[b] = flip_record(records[b])
                    if ids is not None:
                        ids[b] = ids_flipped[b]
                    for k, v in images.items():      # pixels (B, H, W, 3): width is dim 2; moments (B, C, h, w): dim 3
                        images[k][b] = v[b].flip(1 if k == "pixels" else 2)
            self.flipped += sum(coins)
            self.side_words_flipped += sum(names_a_side(o.phrase) for r, c in zip(records, coins) if c for o in r.objects)
        return Batch(records, pixels=images.get("pixels"), mean=images.get("mean"), std=images.get("std"),
                     captions=captions["hidden"], phrases=phrases, empty_caption=self.empty_caption,
                     pooled=captions.get("pooled"), empty_pooled=self.empty_pooled, time_ids=ids)


class ImageSource:
    """Training inputs read from the images every step (crop="random", or cache=False)."""

    def __init__(self, data: ManifestImages):
        self.data = data
        self.records, self.skipped = data.records, data.skipped

    def __len__(self) -> int:
        return len(self.data)

    @property
    def dropped_by_crop(self) -> int:
        return self.data.dropped_by_crop

    @property
    def flipped(self) -> int:
        return self.data.flipped

    @property
    def side_words_flipped(self) -> int:
        return self.data.side_words_flipped

    def batch(self, indices: list[int], positions: list[int]) -> Batch:
        before = (self.data.dropped_by_crop, self.data.flipped, self.data.side_words_flipped)
        images, records, reports = self.data.load_reports(indices, positions)
        after = (self.data.dropped_by_crop, self.data.flipped, self.data.side_words_flipped)
        return Batch(records, pixels=torch.from_numpy(images), report=tuple(a - b for a, b in zip(after, before)),
                     time_ids=_time_ids(reports, self.data.resolution))

    def count(self, batch: Batch) -> None:
        """Add the counts of a batch loaded in a worker process (its counters are the worker's)."""
        d, f, s = batch.report
        self.data.dropped_by_crop += d
        self.data.flipped += f
        self.data.side_words_flipped += s


# ---------------------------------------------------------------------------------------------
# the training loop's view: a source, its batches in the data order, a step's inputs

def training_source(base, manifest: Path, root: Path, *, cache: bool, crop: str, flip: bool, seed: int,
                    max_objects: int, on_bad_record: str, compute_dtype: torch.dtype, progress: bool = True):
    """(source, a sentence saying where the inputs come from): the cache (built on first use) when
    `cache` and the crop policy allow it, else the images (read every step)."""
    if cache and cacheable(crop):
        dtype = {v: k for k, v in _DTYPES.items()}[compute_dtype]
        folder = build_cache(base, manifest, root, crop=crop, dtype=dtype, max_objects=max_objects,
                             on_bad_record=on_bad_record, progress=progress)
        return CachedSource(folder, flip=flip, seed=seed), f"encodings cached in {folder}"
    data = ManifestImages(manifest, base.resolution, on_bad_record=on_bad_record, progress=progress,
                          max_objects=max_objects, crop=crop, flip=flip, seed=seed)
    why = "cache=False" if not cache else "crop='random' is not cached"
    return ImageSource(data), f"images read every step ({why})"


def batch_indices(seed: int, n: int, start: int, size: int) -> list[int]:
    """Indices of samples start .. start+size-1 in an endless sequence of seeded epoch permutations."""
    out, cache = [], {}
    for pos in range(start, start + size):
        epoch = pos // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(cache[epoch][pos % n]))
    return out


def _all(rows):
    return rows


class _StepBatches(torch.utils.data.Dataset):
    """Item k: the batch of step `start + k` (a pure function of seed and step: exact resume); `take` keeps
    this process's rows of the global batch (`distributed.Shard.take`; one process: all)."""

    def __init__(self, source, seed: int, batch_size: int, start: int, stop: int, take=_all):
        self.source, self.seed, self.batch_size, self.start, self.stop = source, seed, batch_size, start, stop
        self.take = take

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int) -> Batch:
        first = (self.start + k) * self.batch_size
        indices = batch_indices(self.seed, len(self.source), first, self.batch_size)
        return self.source.batch(self.take(indices), self.take(list(range(first, first + self.batch_size))))


def _as_is(batch):
    return batch


def step_batches(source, *, seed: int, batch_size: int, start: int, stop: int, workers: int = 0, take=_all):
    """The batches of steps start .. stop-1, in order (`batch_size` is the global batch; `take` keeps this
    process's rows). Images are decoded by `workers` DataLoader worker processes (0: in this process); a
    cache is read here (memory-mapped rows, no decoding)."""
    steps = _StepBatches(source, seed, batch_size, start, stop, take)
    if workers <= 0 or isinstance(source, CachedSource):
        yield from (steps[k] for k in range(len(steps)))
        return
    loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_as_is, prefetch_factor=2)
    for batch in loader:
        source.count(batch)          # the crop / flip counts happened in a worker
        yield batch


def text_inputs(base, batch: Batch, drop: torch.Tensor, device, compute_dtype, amp_dtype):
    """(caption hidden states (B, L, D), phrase embeddings (objects, D), the UNet's added conditioning) of a
    batch: read from the cache, or encoded now. Samples whose `drop` is set get the empty caption (caption
    dropout). The added conditioning is None for SD; for SDXL, `base.added_cond` of the pooled captions (the
    empty caption's where dropped) and the batch's size / crop `time_ids`."""
    if batch.captions is not None:
        context = torch.where(drop[:, None, None], batch.empty_caption, batch.captions)
        pooled = None
        if batch.pooled is not None:
            pooled = torch.where(drop[:, None], batch.empty_pooled, batch.pooled).to(device, compute_dtype)
        return context.to(device, compute_dtype), batch.phrases.to(device), base.added_cond(pooled, batch.time_ids)
    captions = ["" if d else r.caption for d, r in zip(drop.tolist(), batch.records)]
    with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
        context, pooled = base.encode_text(captions)
        return (context, base.encode_phrases([o.phrase for r in batch.records for o in r.objects]),
                base.added_cond(pooled, batch.time_ids))


def sample_latents(base, batch: Batch, generator: torch.Generator, device, compute_dtype, amp_dtype,
                   draw=None) -> torch.Tensor:
    """What the UNet denoises, (B, C, h, w) fp32: a pixel base's image in [-1, 1], or a sample of the VAE's
    latent distribution (cached moments, or the VAE run now) drawn from `generator`, times its scaling.
    `draw(shape)` gives the standard normal draws (several processes: this process's rows of the global
    batch's draws); default: `torch.randn(shape, generator=generator)`."""
    if batch.mean is None:
        x0 = batch.pixels.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        if base.vae is None:
            return x0
        upcast = base.vae.dtype != compute_dtype          # SDXL's fp32 VAE under fp16 (force_upcast); SD: never
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None and not upcast):
            dist = base.vae.encode(x0.to(base.vae.dtype)).latent_dist
        mean, std = dist.mean, dist.std
    else:
        mean, std = batch.mean, batch.std
    eps = (draw(mean.shape) if draw is not None else torch.randn(mean.shape, generator=generator)).to(device)
    return (mean.to(device).float() + std.to(device).float() * eps) * base.vae.config.scaling_factor
