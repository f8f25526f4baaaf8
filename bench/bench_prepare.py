"""Benchmark of dataset preparation. Prints figures; asserts nothing about time.

    .venv/bin/python bench/bench_prepare.py [--images 300] [--entries 100000] [--files 10000]

1. ``prepare`` on ``--images`` generated JPEGs (200-700 px) with the tiny VAE, for 0 and 2 decoding workers:
   images/s and the share of the wall time the VAE was busy.
2. ``--entries`` synthetic metadata entries, in memory: bucket assignment from sizes, one epoch's batch plan,
   metadata save + load (JSON, validation) and ``clean``; wall time and peak Python memory (tracemalloc).
3. ``--files`` tiny image files with caption sidecars on disk: header reads (sizes without decoding) and
   ``merge-captions``, to show the per-file I/O rate.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def _smooth(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def bench_prepare(root: Path, n: int) -> None:
    from sdtune.data.metadata import save_metadata
    from sdtune.data.prepare import PrepareOptions, prepare_latents
    from sdtune.models.tiny import build_tiny

    train = root / "train"
    train.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(200, 700, 2))
        Image.fromarray(_smooth(rng, w, h)).save(train / f"img{i:04d}.jpg", quality=90)
    save_metadata(root / "meta.json", {f"img{i:04d}": {"caption": "a picture"} for i in range(n)})
    vae = build_tiny("sd1").vae
    print(f"prepare: {n} JPEGs of 200-700 px, buckets within 256x256 (sides 128..512, step 64), tiny SD1 VAE, CPU")
    for workers in (0, 2):
        for f in train.glob("*.npz"):
            f.unlink()
        opts = PrepareOptions(train, root / "meta.json", root / "out.json", "unused", batch_size=4,
                              max_data_loader_n_workers=workers, max_resolution="256,256", min_bucket_reso=128,
                              max_bucket_reso=512)
        s = prepare_latents(opts, vae=vae)
        print(f"  workers={workers}: {s.encoded} encoded in {s.seconds:.2f} s = {s.encoded / s.seconds:.1f} images/s; "
              f"VAE busy {s.encode_seconds:.2f} s ({100 * s.encode_seconds / s.seconds:.0f}% of the time)")
    s = prepare_latents(PrepareOptions(train, root / "meta.json", root / "out.json", "unused", batch_size=4,
                                       max_resolution="256,256", min_bucket_reso=128, max_bucket_reso=512,
                                       skip_existing=True), vae=vae)
    print(f"  --skip_existing, all valid: {s.reused} reused in {s.seconds:.2f} s = {s.reused / s.seconds:.0f} images/s")


def _timed(label: str, fn: Callable[[], object]) -> object:
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    fn()
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  {label:<44} {seconds:7.2f} s   peak {peak / 2**20:7.1f} MiB")
    return out


def bench_entries(root: Path, n: int) -> None:
    from sdtune.data.buckets import AspectBuckets, share_batches
    from sdtune.data.clean import clean_images, load_rules
    from sdtune.data.metadata import load_metadata, save_metadata

    rng = np.random.default_rng(0)
    sizes = rng.integers(256, 4000, (n, 2)).tolist()
    keys = [f"image_{i:06d}" for i in range(n)]
    print(f"{n:,} synthetic entries (sizes only, nothing decoded):")

    def assign() -> AspectBuckets:
        buckets = AspectBuckets()
        for key, (w, h) in zip(keys, sizes):
            buckets.assign(key, w, h)
        return buckets

    buckets = _timed("bucket assignment", assign)
    _timed("epoch plan (batch 4, 4 ranks)", lambda: share_batches(buckets.batches(0, 0, 4), 4, 0))
    images = {k: {"caption": "a young woman in a field", "tags": "1girl, long_hair, shirt, white_shirt, rating:safe",
                  "train_resolution": list(buckets.bucket_of(k))} for k in keys}
    path = root / "meta.json"
    _timed("metadata save (atomic JSON)", lambda: save_metadata(path, images))
    print(f"  {'(file size)':<44} {path.stat().st_size / 2**20:7.1f} MiB")
    _timed("metadata load (parse, migrate, validate)", lambda: load_metadata(path))
    rules = load_rules()
    _timed("clean (captions and tags)", lambda: clean_images(images, rules))


def bench_files(root: Path, n: int) -> None:
    from sdtune.data.images import image_size, list_images
    from sdtune.data.metadata import merge_folder

    folder = root / "files"
    folder.mkdir()
    png = root / "one.png"
    Image.new("RGB", (640, 480), (10, 20, 30)).save(png)
    data = png.read_bytes()
    for i in range(n):
        (folder / f"img{i:06d}.png").write_bytes(data)
        (folder / f"img{i:06d}.caption").write_text("a caption", encoding="utf-8")
    print(f"{n:,} image files with caption sidecars on disk:")
    paths = _timed("list images", lambda: list_images(folder))
    _timed("read sizes from headers", lambda: [image_size(p) for p in paths])
    _timed("merge-captions (read sidecars, write JSON)",
           lambda: merge_folder(folder, root / "merged.json", "caption", ".caption"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a").mkdir()
        (root / "b").mkdir()
        (root / "c").mkdir()
        bench_prepare(root / "a", args.images)
        bench_entries(root / "b", args.entries)
        bench_files(root / "c", args.files)


if __name__ == "__main__":
    main()
