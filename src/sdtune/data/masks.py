"""Loss masks for ``--masked_loss``, made by ``sdtune prepare`` and cached with the latents.

Two sources, one per run of ``prepare``:

* ``--alpha_mask``: the image's own alpha channel (opaque = train, transparent = ignore), as sd-scripts' dataset
  option of the same name. An image without transparency gets no mask.
* ``--mask_dir DIR``: a mask image per training image, found by the image's stem (``img01.png`` -> ``DIR/img01.*``,
  any extension sdtune reads; with ``--recursive`` in the same sub-folder of DIR as the image is in the training
  folder). It is read as luminance: white = train, black = ignore, greys weight in between (sd-scripts' masked loss
  takes the R channel of its conditioning images; for grey masks the two are the same). EXIF orientation is applied
  and transparent parts of a mask file count as white, as ``open_image`` composites them. An image without a mask
  file gets no mask.

A mask must have the image's size (after EXIF orientation): one of another size is refused and the image skipped,
naming the file, rather than stretched, because a mask of another size was drawn on another version of the image
(cropped, or resized to another aspect) and stretching it would weight the wrong pixels without a word. The image is
skipped rather than trained unmasked for the same reason: it would train what the mask was made to hide.

The pixel mask is resized and cropped exactly as the image (``latent_cache.resize_and_crop``: the image's
``Placement``, PIL Lanczos), then averaged over 8x8 blocks to latent resolution: ``mask`` float32 [H/8, W/8] in
[0, 1]. That equals sd-scripts' ``F.interpolate(mask, size=latent size, mode="area")`` of the pixel mask.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtune.data.buckets import Placement, Reso
from sdtune.data.images import ImageError, list_image_files, open_image
from sdtune.data.latent_cache import content_hash, resize_and_crop
from sdtune.errors import SdtuneError

ALPHA_SOURCE = "alpha"  # the cache-key part of --alpha_mask; a mask file's is "file:<hash of its bytes>"


class MaskError(SdtuneError):
    """A mask file that cannot be used for its image."""


def check_mask_options(alpha_mask: bool, mask_dir: Path | None, train_data_dir: Path, recursive: bool) -> None:
    """Raise ``SdtuneError`` for mask options ``prepare`` cannot follow (before anything is read)."""
    if mask_dir is None:
        return
    if alpha_mask:
        raise SdtuneError("--alpha_mask and --mask_dir both give the loss mask; pass one of them")
    folder, train = Path(mask_dir).resolve(), Path(train_data_dir).resolve()
    if not folder.is_dir():
        raise SdtuneError(f"--mask_dir {mask_dir}: not a folder; pass the folder of mask images (same stems as the "
                          "training images)")
    if folder == train or (recursive and train in folder.parents):
        raise SdtuneError(f"--mask_dir {mask_dir} is inside the training folder {train_data_dir}, so its masks would "
                          "be trained on as images; keep the masks in a folder of their own")


def find_mask_files(mask_dir: Path, train_data_dir: Path, images: list[Path], recursive: bool
                    ) -> tuple[dict[Path, Path], dict[Path, str]]:
    """({image: its mask file}, {image: why it cannot have one}) for the training ``images``: a mask is the file of
    the image's stem in ``mask_dir`` (in the same sub-folder with ``recursive``); two candidates are an error."""
    found, _others = list_image_files(mask_dir, recursive)
    by_name: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in found:
        by_name[(path.parent.relative_to(mask_dir), path.stem)].append(path)
    masks: dict[Path, Path] = {}
    problems: dict[Path, str] = {}
    for image in images:
        candidates = by_name.get((image.parent.relative_to(train_data_dir), image.stem), [])
        if len(candidates) == 1:
            masks[image] = candidates[0]
        elif candidates:
            problems[image] = (f"{image}: {len(candidates)} mask files have its stem ("
                               f"{', '.join(str(c) for c in candidates)}); keep one of them")
    return masks, problems


@dataclass(frozen=True)
class MaskInput:
    """One image's mask source as a worker found it: the cache-key part, and the mask file's bytes and stat."""

    source: str | None = None  # None: no mask (no --alpha_mask / --mask_dir, or no mask file for this image)
    file: Path | None = None
    data: bytes = b""
    stat: tuple[int, int] = (0, 0)  # size in bytes, mtime in ns, taken before the bytes were read

    @classmethod
    def read(cls, mask_file: Path | None, alpha_mask: bool) -> MaskInput:
        """The mask source of an image whose mask file is ``mask_file`` (None: none), or its alpha."""
        if alpha_mask:
            return cls(ALPHA_SOURCE)
        if mask_file is None:
            return cls()
        try:
            st = mask_file.stat()
            data = mask_file.read_bytes()
        except OSError as exc:
            raise MaskError(f"{mask_file}: mask file cannot be read ({exc.strerror or exc})") from None
        return cls(f"file:{content_hash(data)}", mask_file, data, (st.st_size, st.st_mtime_ns))

    def pixel_mask(self, image: Path, image_size: Reso, alpha: Image.Image | None, max_pixels: int
                   ) -> Image.Image | None:
        """The mask at the image's pixels, an ``L`` image of ``image_size`` (None: no mask); ``alpha`` is the
        image's alpha channel (``images.open_image_and_alpha``). Raises ``MaskError`` naming a bad mask file."""
        if self.source == ALPHA_SOURCE or self.file is None:
            return alpha if self.source == ALPHA_SOURCE else None
        try:
            mask = open_image(self.file, max_pixels, data=self.data).convert("L")
        except ImageError as exc:
            raise MaskError(f"{self.file}: the mask file of {image} cannot be used ({exc.reason}); fix or remove it"
                            ) from None
        if mask.size != tuple(image_size):
            raise MaskError(f"{self.file}: the mask is {mask.width}x{mask.height} but its image {image} is "
                            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size (it is not "
                            "stretched: it may have been drawn on another crop). Make it again at the image's size")
        return mask

    def cache_fields(self, image: Path, mask: np.ndarray | None) -> dict[str, Any]:
        """The ``LatentCache`` mask fields for ``image`` with the latent ``mask``."""
        if mask is None:
            return {}
        if self.file is None:
            return {"mask": mask}
        try:
            relative = os.path.relpath(self.file, image.parent)  # the pair can move together (to another machine)
        except ValueError:  # another drive on Windows: no relative path
            relative = str(self.file.resolve())
        return {"mask": mask, "mask_file": Path(relative).as_posix(), "mask_hash": self.source.removeprefix("file:"),
                "mask_bytes": self.stat[0], "mask_mtime_ns": self.stat[1]}


def latent_mask(mask: Image.Image, placement: Placement) -> np.ndarray:
    """The pixel ``mask`` (an ``L`` image of the original size) resized and cropped like the image, as float32
    [H/8, W/8] in [0, 1]: each value the mean of an 8x8 block of the crop."""
    crop = resize_and_crop(mask.convert("L"), placement).astype(np.float32) / 255.0
    h, w = crop.shape
    if h % 8 or w % 8:
        raise ValueError(f"bucket {w}x{h} is not a multiple of 8")  # buckets.check_bucket_limits prevents it
    return crop.reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


__all__ = ["ALPHA_SOURCE", "MaskError", "MaskInput", "check_mask_options", "find_mask_files", "latent_mask"]
