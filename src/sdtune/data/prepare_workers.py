"""``sdtune prepare``'s workers: one ``Job`` per image; ``ImageJobs`` reads, hashes, decodes, resizes and crops it
(and makes its mask) in DataLoader worker processes and hands back a ``Loaded`` for the encode step
(``sdtune.data.prepare``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdtune.data.buckets import Placement, Reso
from sdtune.data.images import ImageError, open_image_and_alpha
from sdtune.data.latent_cache import (
    cache_key,
    content_hash,
    foreign_latent_file,
    has_mask,
    latent_path,
    resize_and_crop,
    stored_cache_key,
)
from sdtune.data.masks import MaskError, MaskInput, latent_mask

if TYPE_CHECKING:
    from sdtune.data.prepare import PrepareOptions


@dataclass(frozen=True)
class Job:
    """One image for the encode step: its number in the run, path, metadata key, original size and placement."""

    index: int
    path: Path
    key: str
    original_size: Reso
    placement: Placement
    mask_file: Path | None = None  # its --mask_dir mask


@dataclass
class Loaded:
    """What a worker hands back for one image: pixels to encode, a valid cache to reuse, or an error."""

    index: int
    cache_key: str = ""
    image_hash: str = ""
    image_stat: tuple[int, int] = (0, 0)  # size in bytes, mtime in ns, taken before the bytes were read
    pixels: np.ndarray | None = None
    reused: bool = False
    error: str = ""
    mask: np.ndarray | None = None  # [H/8, W/8], with --alpha_mask / --mask_dir
    mask_input: MaskInput = MaskInput()
    has_mask: bool = False  # the reused or new cache holds a mask


class ImageJobs(torch.utils.data.Dataset):
    """Reads, hashes, decodes, resizes and crops one image per item (in DataLoader workers).

    Never raises for a bad image: an exception in a worker would end the whole run, so failures come back as
    ``Loaded.error`` and are reported at the end.
    """

    def __init__(self, jobs: list[Job], options: PrepareOptions, vae_print: str) -> None:
        self.jobs = jobs
        self.options = options
        self.vae_print = vae_print

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Loaded:
        job, o = self.jobs[i], self.options
        foreign = foreign_latent_file(latent_path(job.path))
        if foreign is not None:  # never overwritten: it may be the user's only copy of another tool's cache
            return Loaded(i, error=foreign)
        try:
            st = job.path.stat()  # before reading: a change after this shows as a changed stat next time
            data = job.path.read_bytes()
            mask_input = MaskInput.read(job.mask_file, o.alpha_mask)
        except OSError as exc:
            return Loaded(i, error=f"{job.path}: cannot be read ({exc.strerror or exc})")
        except MaskError as exc:
            return Loaded(i, error=str(exc))
        digest = content_hash(data)
        key = cache_key(digest, job.placement, o.flip_aug, self.vae_print, o.mixed_precision, mask_input.source)
        if o.skip_existing and stored_cache_key(latent_path(job.path)) == key:
            return Loaded(i, key, reused=True, has_mask=mask_input.source is not None and has_mask(latent_path(
                job.path)))
        try:
            image, alpha = open_image_and_alpha(job.path, o.max_image_pixels, data=data)
            if image.size != job.original_size:
                return Loaded(i, error=f"{job.path}: changed while preparing ({job.original_size} -> {image.size}); "
                                       "run prepare again")
            mask = mask_input.pixel_mask(job.path, job.original_size, alpha, o.max_image_pixels)
        except (ImageError, MaskError) as exc:
            return Loaded(i, error=str(exc))
        return Loaded(i, key, digest, (st.st_size, st.st_mtime_ns), pixels=resize_and_crop(image, job.placement),
                      mask=None if mask is None else latent_mask(mask, job.placement), mask_input=mask_input,
                      has_mask=mask is not None)


def as_list(batch: list[Loaded]) -> list[Loaded]:
    """DataLoader collate: keep the items as they are (a batch may mix encodable and failed images)."""
    return batch


__all__ = ["ImageJobs", "Job", "Loaded", "as_list"]
