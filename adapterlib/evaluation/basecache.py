"""The base alone's samples of an evaluation, kept on disk: sampled once per base, layouts, seeds and settings.

Every evaluation of a run compares the adapter with the base alone on the same layouts and seeds, and the
base alone does not change between checkpoints, runs or calls: `python -m adapterlib evaluate RUN` sampled
it again each time (1-1.5 minutes of held-out v2 on a CPU). `base_images` samples it once and keeps the
images under the runs root:

    RUNS/_cache/base-images/<key>/meta.json       what the key hashes, and each image's SHA-256
    RUNS/_cache/base-images/<key>/00000.png ...   the images, lossless (8-bit RGB PNG: exactly the samples)

Nothing pickled: PNG and JSON. The key hashes everything the images depend on: the base's files (the bytes
of every file in its part folders, unet/ vae/ text_encoder/ tokenizer/ scheduler/ ...; `base_identity`,
with a file's SHA-256 remembered by its size and modification time so that a 4 GB base is not re-read on
each call), the device type and the parts' dtypes, the torch and diffusers versions, the layouts' content
(caption, phrases, boxes), the seeds, and the settings the base alone depends on (DDIM steps, guidance,
the sampling batch size; not scale, tau or grounding guidance, which act only through an adapter). A changed
setting is another key, so it samples again; an image whose checksum is wrong is a miss (sampled again).
A base changed in memory after it was loaded is not noticed: pass `cache=False` (`evaluate.images_for`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from adapterlib.data.manifest import Record
from adapterlib.files import sha256, write_json

CACHE_VERSION = 1
FOLDER = "base-images"          # under RUNS/_cache/
HASHES = "file-hashes.json"     # {absolute path: [size, mtime_ns, sha256]}


def cache_root(root: str | Path | None = None) -> Path:
    from adapterlib.runs import runs_root
    return Path(root if root is not None else runs_root()) / "_cache" / FOLDER


def base_identity(base_path: str | Path, root: str | Path | None = None) -> str | None:
    """SHA-256 over the relative names and bytes of every file in the base folder's part folders (all its
    subfolders: unet/, vae/, text_encoder/, tokenizer/, scheduler/, and any other); None when the path is
    not a folder with parts (a base built in memory: not cached). Each file's hash is remembered in
    `cache_root(root)/file-hashes.json` under its path, size and modification time."""
    base_path = Path(base_path)
    files = sorted(f for part in sorted(base_path.iterdir()) if part.is_dir()
                   for f in part.rglob("*") if f.is_file()) if base_path.is_dir() else []
    if not files:
        return None
    memo_path = cache_root(root) / HASHES
    try:
        memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    except (OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(), False
    for f in files:
        stat, key = f.stat(), str(f.resolve())
        known = memo.get(key)
        if not (isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]):
            memo[key], changed = [stat.st_size, stat.st_mtime_ns, sha256(f)], True
        h.update(f"{f.relative_to(base_path).as_posix()}\0{memo[key][2]}\0".encode())
    if changed:                                 # an optimisation only: a failed write (a race) costs a re-hash
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(memo_path, memo)
        except OSError:
            pass
    return h.hexdigest()


def layouts_digest(records: list[Record], seeds: list[int]) -> str:
    """SHA-256 of the layouts' content (caption, each object's phrase and box) and their seeds."""
    content = [[r.caption, [[o.phrase, [float(v) for v in o.box]] for o in r.objects], int(s)]
               for r, s in zip(records, seeds)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def cache_key(base, records: list[Record], seeds: list[int], *, steps: int, guidance: float, batch_size: int,
              root: str | Path | None = None) -> tuple[str, dict] | None:
    """(hex key, the parts it hashes) of the base alone's samples, or None when the base has no files."""
    import diffusers
    import torch

    identity = base_identity(base.path, root)
    if identity is None:
        return None
    parts = dict(version=CACHE_VERSION, base=identity, base_path=str(base.path), device=base.device.type,
                 dtypes=sorted({str(p.dtype) for m in base.modules() for p in m.parameters()}),
                 torch=torch.__version__, diffusers=diffusers.__version__,
                 layouts=layouts_digest(records, seeds), n=len(records),
                 steps=int(steps), guidance=float(guidance), batch_size=int(batch_size))
    hashed = {k: v for k, v in parts.items() if k != "base_path"}   # the same files elsewhere: the same images
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest(), parts


def base_images(base, records: list[Record], seeds: list[int], *, cache: bool = True, root: str | Path | None = None,
                batch_size: int = 64, **sampling) -> np.ndarray:
    """The base alone's samples (N, H, W, 3) uint8 of `records` with `seeds` (`sample.generate` without an
    adapter; settings as keywords: steps, guidance; scale, tau and grounding_guidance are accepted and do not
    matter), read from the cache when it holds them, else sampled and written there (`cache=False`: sampled,
    nothing read or written). `root`: the runs root (default `runs.runs_root()`)."""
    from adapterlib.model.sample import Sampling, generate

    s = Sampling.of(**sampling)
    key = cache_key(base, records, seeds, steps=s.steps, guidance=s.guidance, batch_size=batch_size,
                    root=root) if cache and len(records) else None
    if key is None:
        return generate(base, records, seeds, sampling=s, batch_size=batch_size)
    folder = cache_root(root) / key[0][:24]
    images = read_images(folder, key[0])
    if images is not None:
        return images
    images = generate(base, records, seeds, sampling=s, batch_size=batch_size)
    write_images(folder, key[0], key[1], images)
    return images


def read_images(folder: Path, key: str) -> np.ndarray | None:
    """The cached images of `key` in `folder`, or None (absent, another key, a file missing or damaged)."""
    from PIL import Image

    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None
        images = []
        for entry in meta["images"]:
            path = folder / entry["file"]
            if sha256(path) != entry["sha256"]:
                return None
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        return np.stack(images) if images else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_images(folder: Path, key: str, parts: dict, images: np.ndarray) -> None:
    """Write the images and meta.json to a temporary folder, then move it into place in one rename (a
    reader never sees half an entry; when two writers race, the first one's entry stays)."""
    from PIL import Image

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = []
    for i, image in enumerate(np.asarray(images)):
        name = f"{i:05d}.png"
        Image.fromarray(image).save(tmp / name)
        entries.append(dict(file=name, sha256=sha256(tmp / name)))
    write_json(tmp / "meta.json", dict(key=key, parts=parts, shape=list(np.asarray(images).shape), images=entries))
    try:
        if folder.exists():                     # a damaged or stale entry under this key: replaced
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:                        # another writer got there first: its entry is as good
        print(f"[base cache] {folder}: not written ({e})", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
