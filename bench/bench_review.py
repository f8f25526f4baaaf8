"""Benchmark of ``sdtune review`` at 10,000 images. Prints figures; asserts nothing about time.

    .venv/bin/python bench/bench_review.py [--entries 10000] [--workers 2] [--no_browser]

A generated dataset of ``--entries`` JPEGs (48-200 px, several aspect ratios) with captions and WD14-style tags
(300 distinct, a few captions over 75 tokens, some duplicates), its metadata with ``train_resolution`` from the
bucket code, and a latent cache file per image (zeros of the right shape, with the cache key and image fields
``prepare`` writes, so each one is checked as a valid cache). Then:

1. page generation, cold (every thumbnail made) with ``--workers`` processes and warm (thumbnails reused);
2. in headless Chromium (selenium; skipped with a note when missing): time until the page's script has drawn the
   first page of the grid (``performance.now()`` at ready, and the wall time of ``driver.get`` + wait), then a tag
   filter and a page turn.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TAGS = [f"tag {i}" for i in range(300)]
LIMITS = dict(max_resolution="128,128", min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=16)


def make_dataset(root: Path, n: int) -> tuple[Path, Path]:
    from sdtune.data.buckets import AspectBuckets
    from sdtune.data.latent_cache import LATENT_FORMAT_VERSION, LatentCache, cache_key, content_hash, write_latent_file
    from sdtune.data.metadata import save_metadata

    train = root / "train"
    train.mkdir()
    rng = np.random.default_rng(0)
    buckets = AspectBuckets((128, 128), 64, 256, 16)
    images = {}
    weights = 1.0 / np.arange(1, len(TAGS) + 1)  # Zipf-like tag frequencies, as real tag sets have
    weights /= weights.sum()
    for i in range(n):
        stem = f"img{i:05d}"
        if i % 500 == 499:  # a duplicate of the previous picture
            data = (train / f"img{i - 1:05d}.jpg").read_bytes()
        else:
            w, h = (int(v) for v in rng.integers(48, 200, 2))
            colour = rng.integers(0, 255, 3)
            pixels = np.empty((h, w, 3), np.uint8)
            pixels[:] = colour
            pixels[h // 4: h // 2, w // 4: w // 2] = 255 - colour
            Image.fromarray(pixels).save(train / f"{stem}.jpg", quality=85)
            data = (train / f"{stem}.jpg").read_bytes()
        (train / f"{stem}.jpg").write_bytes(data)
        with Image.open(train / f"{stem}.jpg") as im:
            size = im.size
        placement = buckets.place(*size)
        tags = ", ".join(rng.choice(TAGS, size=int(rng.integers(5, 25)), replace=False, p=weights))
        caption = f"a picture number {i}" + (", with a very long description" * 20 if i % 50 == 0 else "")
        images[stem] = {"caption": caption, "tags": tags, "train_resolution": list(placement.bucket)}
        bw, bh = placement.bucket
        st = (train / f"{stem}.jpg").stat()
        write_latent_file(train / f"{stem}.npz", LatentCache(
            latents=np.zeros((4, bh // 8, bw // 8), np.float32), latents_flipped=None, original_size=size,
            resized_size=placement.resized, crop_ltrb=placement.crop_ltrb, train_resolution=placement.bucket,
            vae_fingerprint="bench", format_version=LATENT_FORMAT_VERSION,
            cache_key=cache_key(content_hash(data), placement, False, "bench", "no"),
            image_hash=content_hash(data), image_bytes=st.st_size, image_mtime_ns=st.st_mtime_ns))  # as prepare does
    meta = root / "meta_lat.json"
    save_metadata(meta, images)
    return train, meta


def bench_generation(train: Path, meta: Path, out: Path, workers: int) -> Path:
    from sdtune.review.collect import ReviewOptions
    from sdtune.review.command import write_review

    opts = dict(in_json=meta, train_data_dir=train, out=out, train_batch_size=4, **LIMITS)
    for label, w in (("cold, %d workers" % workers, workers), ("warm (thumbnails cached)", workers)):
        t0 = time.perf_counter()
        page, review = write_review(ReviewOptions(workers=w, **opts))
        seconds = time.perf_counter() - t0
        s = review.summary()
        print(f"  generation {label}: {seconds:.1f} s = {len(review.items) / seconds:.0f} images/s "
              f"({s['images']} images, {s['buckets']} buckets, {s['over_limit']} over 75 tokens, "
              f"{s['duplicates']} duplicates, {s['cache_problems']} cache problems)")
    thumbs = sum(f.stat().st_size for f in (out / "thumbs").iterdir())
    print(f"  index.html {page.stat().st_size / 1e6:.1f} MB, thumbnails {thumbs / 1e6:.1f} MB")
    return page


def bench_browser(page: Path) -> None:
    from sdtune.review.browser import console_errors, find_browser, page_url, start_chrome, wait_ready

    browser, missing = find_browser()
    if browser is None:
        print(f"  browser: skipped ({missing})")
        return
    driver = start_chrome(browser)
    try:
        for attempt in ("first", "second"):
            t0 = time.perf_counter()
            driver.get(page_url(page))
            wait_ready(driver, timeout=300)
            wall = time.perf_counter() - t0
            ready = int(driver.execute_script("return document.body.dataset.readyMs"))
            cards = driver.execute_script("return document.querySelectorAll('#grid .card').length")
            print(f"  page load ({attempt}): grid drawn {ready} ms after navigation start; driver.get + wait "
                  f"{wall:.2f} s; {cards} cards on the first page")
        for label, script in (
            ("tag filter (most frequent tag)", "document.querySelector('button.tag').click()"),
            ("next page", "document.getElementById('clear-tag').click(); document.getElementById('next').click()"),
        ):
            ms = driver.execute_script(f"var t = performance.now(); {script}; return performance.now() - t;")
            print(f"  {label}: {ms:.0f} ms, status: {driver.find_element('id', 'status').text}")
        errors = console_errors(driver)
        print(f"  console errors: {len(errors)}" + (f" ({errors[0]['message']})" if errors else ""))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no_browser", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        train, meta = make_dataset(root, args.entries)
        print(f"review: {args.entries} JPEGs of 48-200 px with captions, tags and latent caches "
              f"(dataset made in {time.perf_counter() - t0:.0f} s)")
        page = bench_generation(train, meta, root / "review", args.workers)
        if not args.no_browser:
            bench_browser(page)


if __name__ == "__main__":
    main()
