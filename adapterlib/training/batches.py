"""A training step's inputs, read: from the encoding cache (`CachedSource`, built by `cache.build_cache`) or from
the images themselves (`ImageSource`: crop="random", or cache=False), in the data order (`step_batches`: a pure
function of the seed and the samples seen, so a resumed run reads what an uninterrupted one would), and a batch
turned into what the UNet takes (`text_inputs`, `sample_latents`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from adapterlib.data.manifest import GroundedObject, ManifestImages, Record, flip_record, names_a_side, sample_rng
from adapterlib.training.cache import (DTYPES, SHARD_ROWS, CacheError, build_cache, cacheable, damaged_shards,
                                       time_ids_batch)

# ---------------------------------------------------------------------------------------------
# the two sources of a training step's inputs

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
                     time_ids=time_ids_batch(reports, self.data.resolution))

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
        dtype = {v: k for k, v in DTYPES.items()}[compute_dtype]
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
