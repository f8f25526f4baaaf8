"""Per-image work for the review page, run in worker processes: hash, size, thumbnail, latent cache check.

Thumbnails are named by the image's content hash and size (``thumbs/<hash>-<size>.jpg``), so a second run reuses
them (only the header is read then) and identical images share one. Each job returns an ``ImageFacts`` and never
raises for a bad image: the reason comes back in ``error`` and is listed on the page.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from sdtune.atomic import atomic_path
from sdtune.data.buckets import Reso
from sdtune.data.images import ImageError, image_size, open_image
from sdtune.data.latent_cache import LatentFileError, cache_staleness, content_hash, latent_path, load_latent_file

THUMB_QUALITY = 85

# Latent cache states, in the words the page uses.
VALID, MISSING, DAMAGED, STALE, UNUSED = "valid", "missing", "damaged", "stale", "not used"


@dataclass(frozen=True)
class ImageJob:
    """One image for :func:`inspect_image`, with what its thumbnail and latent cache are checked against."""

    path: Path
    bucket: Reso | None  # the metadata's train_resolution
    thumb_dir: Path
    thumb_size: int
    max_pixels: int
    vae_print: str | None = None  # fingerprint of the VAE training will use (None: not checked)


@dataclass
class ImageFacts:
    """What :func:`inspect_image` found about one image: hash, size, thumbnail, latent cache state, or the error."""

    path: Path
    content_hash: str = ""
    size: Reso | None = None  # (width, height), EXIF orientation applied
    error: str = ""  # why the image cannot be used ("" when it can)
    thumb: str | None = None  # file name in the thumbnail folder
    latent: str = MISSING
    latent_note: str = ""
    cached_resized: Reso | None = None  # from a cache file whose bucket matches the metadata's
    cached_crop: tuple[int, int, int, int] | None = None
    flipped: bool | None = None  # the cache holds the mirrored latents too


def thumb_name(digest: str, size: int) -> str:
    """A thumbnail's file name: the image's content hash and the thumbnail size."""
    return f"{digest}-{size}.jpg"


def make_thumbnail(image: Image.Image, target: Path, size: int) -> None:
    """The whole image (not the crop: the page draws the crop over it), at most ``size`` px a side, atomically."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    with atomic_path(target) as tmp:
        thumb.save(tmp, "JPEG", quality=THUMB_QUALITY)


def check_latents(path: Path, bucket: Reso | None, vae_print: str | None) -> tuple[str, str, object]:
    """(state, note, the cache when training would use it as it is) of ``path``'s latent file.

    Judged by training's own check (``latents.cache_staleness``, as ``FineTuneData.encode_missing`` runs it): a
    missing, unreadable or stale file is encoded again in memory at start-up. ``vae_print`` is the fingerprint of
    the VAE training will use; None (no model given) takes the file's own, so the VAE is then not checked.
    """
    file = latent_path(path)
    if not file.is_file():
        return MISSING, f"no {file.name}: training encodes it in memory at start-up (run sdtune prepare to cache it)", None
    try:
        cache = load_latent_file(file)
    except LatentFileError as exc:
        return DAMAGED, f"{exc}; training encodes it again at start-up", None
    if bucket is None:
        return UNUSED, f"{file.name} exists but the metadata has no train_resolution, so training skips the image", None
    expected = (cache.latents.shape[0], bucket[1] // 8, bucket[0] // 8) if cache.latents.ndim == 3 else None
    if tuple(cache.train_resolution) == tuple(bucket) and (
            cache.latents.shape != expected or not np.isfinite(cache.latents).all()):
        return DAMAGED, (f"{file.name}: latents of shape {tuple(cache.latents.shape)} or not finite; training would "
                         "use them as they are: run sdtune prepare again"), None
    reason = cache_staleness(cache, path, bucket, vae_print if vae_print is not None else cache.vae_fingerprint)
    if reason is not None:
        return STALE, f"{file.name}: {reason}; training encodes it again at start-up", None
    vae_note = "" if vae_print is not None else " (the VAE is not checked: no model given)"
    return VALID, f"{file.name} matches the image, its bucket and crop{vae_note}", cache


def inspect_image(job: ImageJob) -> ImageFacts:
    """Read one image: hash it, make its thumbnail (unless one of the same bytes exists) and judge its latent cache."""
    facts = ImageFacts(job.path)
    try:
        data = job.path.read_bytes()
    except OSError as exc:
        facts.error = f"cannot be read ({exc.strerror or exc})"
        return facts
    facts.content_hash = content_hash(data)
    name = thumb_name(facts.content_hash, job.thumb_size)
    target = job.thumb_dir / name
    try:
        if target.is_file():  # made from these very bytes by an earlier run: the header gives the size
            facts.size = image_size(job.path, job.max_pixels)
        else:
            image = open_image(job.path, job.max_pixels, data=data)
            facts.size = image.size
            make_thumbnail(image, target, job.thumb_size)
        facts.thumb = name
    except ImageError as exc:
        facts.error = exc.reason
    facts.latent, facts.latent_note, cache = check_latents(job.path, job.bucket, job.vae_print)
    if cache is not None:
        facts.cached_resized = tuple(cache.resized_size)
        facts.cached_crop = tuple(cache.crop_ltrb)
        facts.flipped = cache.latents_flipped is not None
    return facts


def inspect_images(jobs: list[ImageJob], workers: int) -> Iterable[ImageFacts]:
    """``inspect_image`` for every job, in order; in ``workers`` processes (0 or 1, or a small dataset: here).

    Worker processes pay an import of sdtune (and torch) each, so fewer than 64 images a worker run here.
    """
    if workers <= 1 or len(jobs) < 64 * 2:
        return map(inspect_image, jobs)
    workers = min(workers, os.cpu_count() or 1, len(jobs) // 64)
    return _pooled(jobs, workers)


def _pooled(jobs: list[ImageJob], workers: int, mp_context=None) -> Iterable[ImageFacts]:
    """``mp_context``: the multiprocessing start method (default: the platform's; Windows and macOS spawn)."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp_context) as pool:
        yield from pool.map(inspect_image, jobs, chunksize=32)
