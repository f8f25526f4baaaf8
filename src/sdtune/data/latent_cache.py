"""The latent cache: each image's VAE latents in ``<image stem>.npz`` beside it, and the keys that say when a file
is still valid. ``sdtune.data.prepare`` writes these files; training (``sdtune.data.dataset``) and the review page
read them. The encode helpers (resize and crop to the bucket, pixels, the VAE's posterior mean) live here too, as
both the stage and training's re-encoding of stale files need them.

Latent file (``.npz``, format version 1; ``np.load(path)`` reads it, no pickle)::

    latents            float32 [C, H/8, W/8]  C = the VAE's latent channels (4); W x H = train_resolution
    latents_flipped    float32 [C, H/8, W/8]  the horizontally mirrored crop; only with --flip_aug
    original_size      int64 [2]   (width, height) of the image, EXIF orientation applied
    resized_size       int64 [2]   (width, height) it was resized to before cropping
    crop_ltrb          int64 [4]   crop box (left, top, right, bottom) in resized pixels
    train_resolution   int64 [2]   (width, height) of the bucket
    vae_fingerprint    str         hash of the VAE's config and weights
    cache_key          str         hash of everything the latents depend on (see ``cache_key``)
    format_version     int64       1
    image_hash         str         hash of the image file's bytes            (optional: files from before they
    image_bytes        int64       the image file's size in bytes             were added lack them; validity is
    image_mtime_ns     int64       its modification time, ns                  then checked through cache_key)
    mask               float32 [H/8, W/8]  the loss mask (prepare --alpha_mask / --mask_dir), optional: values in
                                   [0, 1], 1 = train, 0 = ignore; the pixel mask resized and cropped exactly as the
                                   image, then averaged over 8x8 blocks to latent resolution. Absent: no mask
    mask_file          str         the mask image it came from (--mask_dir only), relative to the image's folder
    mask_hash          str         hash of that file's bytes                  (these three only with mask_file)
    mask_bytes         int64       its size in bytes
    mask_mtime_ns      int64       its modification time, ns

Choices, documented here because training relies on them:

* **Unscaled**: the latents are the VAE's raw output; training multiplies them by ``vae.config.scaling_factor``
  (0.18215 for SD 1.x/2.x), as sd-scripts does with its caches.
* **The mean, not a sample**: ``latent_dist.mean`` rather than sd-scripts' ``latent_dist.sample()``. A cached
  sample is one fixed draw, so it adds no augmentation; the mean makes the cache reproducible (and its validity
  checkable), and for SD's VAE the posterior's standard deviation is tiny anyway.
* **Pixels**: RGB in [-1, 1], shape [B, 3, H, W].
* ``--skip_existing`` reuses a file only when its ``cache_key`` matches: a hash of the image file's bytes, the
  bucket, resized size and crop, the flip flag, the VAE fingerprint, the precision, the mask source (``alpha`` with
  --alpha_mask, the mask file's hash with --mask_dir; nothing for an image without a mask, so older files stay
  valid) and this format version. Any other file (stale, damaged, from another VAE) is encoded again.
* **The mask is not flipped in the file**: ``latents_flipped`` goes with ``mask[:, ::-1]``, which is exact because
  bucket widths are multiples of 8 (an 8x8 block average of the mirrored crop is the mirrored block average).
* **Training checks every cache before using it** (``cache_staleness``): the bucket against the metadata, the VAE
  fingerprint against the model's VAE, and the image: when its size and modification time are those stored, it is
  taken as unchanged; otherwise its bytes are hashed and compared. A mask file (``mask_file``) is checked the same
  way, and a missing one makes the cache stale. A stale file is encoded again in memory (without a mask) and named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from sdtune.atomic import atomic_path
from sdtune.data.buckets import Placement, Reso
from sdtune.data.images import list_images
from sdtune.data.metadata import Images, KeyIndex
from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

LATENT_FORMAT_VERSION = 1
# The --mixed_precision names prepare takes; each is part of the cache key (sdtune.precision_names gives the dtypes).
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")


# ------------------------------------------------------------------------------------------------ the file
def latent_path(image: Path) -> Path:
    """Where ``image``'s latents are cached: beside it, ``<stem>.npz``."""
    return image.with_suffix(".npz")


@dataclass(frozen=True)
class LatentCache:
    """A latent file's contents (see the module docstring for the meaning of each field)."""

    latents: np.ndarray
    latents_flipped: np.ndarray | None
    original_size: Reso
    resized_size: Reso
    crop_ltrb: tuple[int, int, int, int]
    train_resolution: Reso
    vae_fingerprint: str
    cache_key: str
    format_version: int
    image_hash: str | None = None
    image_bytes: int | None = None
    image_mtime_ns: int | None = None
    mask: np.ndarray | None = None
    mask_file: str | None = None
    mask_hash: str | None = None
    mask_bytes: int | None = None
    mask_mtime_ns: int | None = None


_OPTIONAL_STR = ("image_hash", "mask_file", "mask_hash")
_OPTIONAL_INT = ("image_bytes", "image_mtime_ns", "mask_bytes", "mask_mtime_ns")


class LatentFileError(SdtuneError):
    """A latent file that is missing, damaged or of an unknown format."""


def _pair(a: np.ndarray) -> tuple[int, int]:
    return int(a[0]), int(a[1])


def foreign_latent_file(path: Path) -> str | None:
    """A description of the ``.npz`` at ``path`` when it is a readable NumPy archive that sdtune did not write
    (sd-scripts' finetune/prepare_buckets_latents.py writes ``<image stem>.npz`` too, with ``latents``,
    ``original_size``, ``crop_ltrb``); None when there is no such file, it is sdtune's, or it is unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            files = sorted(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # damaged, not foreign: an unreadable file of ours is re-encoded
    if "format_version" in files or "cache_key" in files:
        return None
    guess = " (sd-scripts' prepare_buckets_latents.py writes these)" if {"latents", "crop_ltrb"} <= set(files) else ""
    return (f"{path}: a latent file written by another tool (keys {', '.join(files)}){guess}; sdtune neither reads "
            "nor overwrites it. Move it elsewhere (sdtune caches <image stem>.npz beside the image) and run sdtune "
            "prepare again")


def load_latent_file(path: str | Path) -> LatentCache:
    """Read a latent file written by ``prepare``; raises ``LatentFileError`` naming the file when it cannot."""
    path = Path(path)
    foreign = foreign_latent_file(path)
    if foreign is not None:
        raise LatentFileError(foreign)
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != LATENT_FORMAT_VERSION:
                raise LatentFileError(f"{path}: latent format version {version} is not supported (expected "
                                      f"{LATENT_FORMAT_VERSION}); run sdtune prepare again")
            crop = tuple(int(v) for v in z["crop_ltrb"])
            cache = LatentCache(
                latents=z["latents"],
                latents_flipped=z["latents_flipped"] if "latents_flipped" in z.files else None,
                original_size=_pair(z["original_size"]),
                resized_size=_pair(z["resized_size"]),
                crop_ltrb=(crop[0], crop[1], crop[2], crop[3]),
                train_resolution=_pair(z["train_resolution"]),
                vae_fingerprint=str(z["vae_fingerprint"]),
                cache_key=str(z["cache_key"]),
                format_version=version,
                mask=z["mask"] if "mask" in z.files else None,
                **{name: str(z[name]) for name in _OPTIONAL_STR if name in z.files},
                **{name: int(z[name]) for name in _OPTIONAL_INT if name in z.files},
            )
    except FileNotFoundError:
        raise LatentFileError(f"{path}: latent file does not exist; run sdtune prepare") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise LatentFileError(f"{path}: damaged latent file ({type(exc).__name__}: {exc}); delete it and run "
                              "sdtune prepare again") from None
    check_latents(path, cache.latents, cache.train_resolution)
    if cache.latents_flipped is not None:
        check_latents(path, cache.latents_flipped, cache.train_resolution, "latents_flipped")
    if cache.mask is not None:
        check_mask(path, cache.mask, cache.train_resolution)
    return cache


def check_latents(path: Path, latents: np.ndarray, train_resolution: Reso, name: str = "latents") -> None:
    """Raise ``LatentFileError`` naming ``path`` unless ``latents`` is a finite float array [C, H/8, W/8] for a
    bucket of ``train_resolution`` (W, H). Without this a wrong-shape file stopped a run mid-way in torch.stack
    with no file named, and NaN latents were reported as a NaN loss, blamed on the learning rate."""
    w, h = train_resolution
    if latents.ndim != 3 or latents.dtype.kind != "f" or tuple(latents.shape[1:]) != (h // 8, w // 8):
        raise LatentFileError(f"{path}: {name} has shape {tuple(latents.shape)} ({latents.dtype}); a {w}x{h} bucket "
                              f"needs [channels, {h // 8}, {w // 8}] floats. Delete the file and run sdtune prepare "
                              "again")
    if not np.isfinite(latents).all():
        raise LatentFileError(f"{path}: {name} contains NaN or infinite values (a damaged file, or the VAE "
                              "overflowed in fp16 when it was made: prepare with --mixed_precision no). Delete the "
                              "file and run sdtune prepare again")


def check_mask(path: Path, mask: np.ndarray, train_resolution: Reso) -> None:
    """Raise ``LatentFileError`` naming ``path`` unless ``mask`` is a float array [H/8, W/8] of values in [0, 1]."""
    w, h = train_resolution
    if mask.ndim != 2 or mask.dtype.kind != "f" or tuple(mask.shape) != (h // 8, w // 8):
        raise LatentFileError(f"{path}: mask has shape {tuple(mask.shape)} ({mask.dtype}); a {w}x{h} bucket needs "
                              f"[{h // 8}, {w // 8}] floats. Delete the file and run sdtune prepare again")
    if not (np.isfinite(mask).all() and mask.min(initial=0.0) >= 0.0 and mask.max(initial=0.0) <= 1.0):
        raise LatentFileError(f"{path}: mask has values outside [0, 1]; delete the file and run sdtune prepare again")


def has_mask(path: Path) -> bool:
    """Whether the latent file at ``path`` holds a mask (only the archive's list of names is read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mask" in z.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False  # a missing or damaged file has no usable mask; training names it when it checks the cache


def stored_cache_key(path: Path) -> str | None:
    """The ``cache_key`` in an existing latent file, or None when there is no readable one."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["cache_key"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # A damaged or foreign file is simply not a valid cache: it is encoded again and overwritten.
        logger.debug("%s: unreadable latent file, will be replaced (%s)", path, exc)
        return None


def latent_files(train_data_dir: str | Path, images: Images, full_path: bool = False,
                 recursive: bool = False) -> dict[str, Path]:
    """For training: ``{metadata key: latent file}`` for every image in the folder whose entry has a
    ``train_resolution`` (so ``prepare`` succeeded for it)."""
    index = KeyIndex(images, full_path)
    out: dict[str, Path] = {}
    for image in list_images(train_data_dir, recursive):
        key = index.key_for(image)
        if "train_resolution" in images.get(key, {}):
            out[key] = latent_path(image)
    return out


def write_latent_file(path: Path, cache: LatentCache) -> None:
    """Write atomically: an interrupted run leaves the previous file or none, never half of one."""
    arrays: dict[str, Any] = {
        "latents": np.ascontiguousarray(cache.latents, dtype=np.float32),
        "original_size": np.array(cache.original_size, dtype=np.int64),
        "resized_size": np.array(cache.resized_size, dtype=np.int64),
        "crop_ltrb": np.array(cache.crop_ltrb, dtype=np.int64),
        "train_resolution": np.array(cache.train_resolution, dtype=np.int64),
        "vae_fingerprint": np.array(cache.vae_fingerprint),
        "cache_key": np.array(cache.cache_key),
        "format_version": np.array(cache.format_version, dtype=np.int64),
    }
    for name in (*_OPTIONAL_STR, *_OPTIONAL_INT):
        value = getattr(cache, name)
        if value is not None:
            arrays[name] = np.array(value) if name in _OPTIONAL_STR else np.array(value, dtype=np.int64)
    if cache.latents_flipped is not None:
        arrays["latents_flipped"] = np.ascontiguousarray(cache.latents_flipped, dtype=np.float32)
    if cache.mask is not None:
        arrays["mask"] = np.ascontiguousarray(cache.mask, dtype=np.float32)
    with atomic_path(path) as tmp:  # keeps the .npz suffix, so numpy does not append another
        np.savez(tmp, **arrays)


# ------------------------------------------------------------------------------------------------ cache keys
def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A hash of the VAE's config and every weight (about 0.3 s for SD's 84M-parameter VAE on a CPU)."""
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def content_hash(data: bytes) -> str:
    """A 128-bit blake2b hex digest of ``data`` (image files' bytes in cache keys)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def cache_key(image_hash: str, placement: Placement, flip_aug: bool, vae_print: str, precision: str,
              mask_source: str | None = None) -> str:
    """Everything a latent file's contents depend on, hashed. ``mask_source`` says where its mask comes from
    (``"alpha"``, or ``"file:<hash of the mask file>"``); None, no mask, leaves the key of files without masks as it
    was before masks existed."""
    parts = {
        "format": LATENT_FORMAT_VERSION, "image": image_hash, "bucket": list(placement.bucket),
        "resized": list(placement.resized), "crop": list(placement.crop_ltrb), "flip": flip_aug,
        "vae": vae_print, "precision": precision, "latent": "mean",
    }
    if mask_source is not None:
        parts["mask"] = mask_source
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_staleness(cache: LatentCache, image: Path, bucket: Reso, vae_print: str,
                    check_mask: bool = True) -> str | None:
    """Why ``cache`` is not valid for ``image`` in ``bucket`` with the VAE printed ``vae_print``; None if it is.

    Cheap first: the bucket and the VAE fingerprint are compared as stored; the image counts as unchanged when its
    size and modification time are those stored, and only otherwise is it read and hashed (a touched but identical
    image stays valid). Files without the image fields (older ones) are checked by recomputing their cache_key.
    With ``check_mask`` (training with --masked_loss) the mask file a cache names is checked the same way; without
    it, a changed mask does not make the latents stale.
    """
    if tuple(cache.train_resolution) != tuple(bucket):
        return f"cached for bucket {cache.train_resolution} but the metadata says {tuple(bucket)}"
    if cache.vae_fingerprint != vae_print:
        return "encoded with another VAE than the model's (--vae or the model changed)"
    reason = _image_staleness(cache, image, bucket, vae_print)
    if reason is None and check_mask and cache.mask_file is not None:
        reason = _file_staleness(mask_file_of(cache, image), cache.mask_hash, cache.mask_bytes, cache.mask_mtime_ns,
                                 "its mask file")
    return reason


def mask_file_of(cache: LatentCache, image: Path) -> Path:
    """The mask file ``cache`` was made from (its ``mask_file`` is relative to ``image``'s folder)."""
    return image.parent / str(cache.mask_file)


def _file_staleness(path: Path, digest: str | None, size: int | None, mtime_ns: int | None,
                    what: str) -> str | None:
    """None when ``path`` is the file hashed ``digest`` (unchanged size and mtime, or else the same bytes);
    ``what`` names it in the reason ("its image", "its mask file")."""
    try:
        st = path.stat()
        if (size, mtime_ns) == (st.st_size, st.st_mtime_ns):
            return None
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{what} {path} does not exist any more"
    except OSError as exc:
        return f"{what} {path} cannot be read ({exc.strerror or exc})"
    return None if content_hash(data) == digest else f"{what} {path} changed since it was cached"


def _image_staleness(cache: LatentCache, image: Path, bucket: Reso, vae_print: str) -> str | None:
    if cache.image_hash is not None:
        return _file_staleness(image, cache.image_hash, cache.image_bytes, cache.image_mtime_ns, "its image")
    try:  # a file from before the image fields: its cache_key, recomputed for each precision prepare takes
        digest = content_hash(image.read_bytes())
    except OSError as exc:
        return f"its image {image} cannot be read ({exc.strerror or exc})"
    placement = Placement(tuple(bucket), cache.resized_size, cache.crop_ltrb, 0.0)
    flip = cache.latents_flipped is not None
    if any(cache_key(digest, placement, flip, vae_print, p) == cache.cache_key for p in MIXED_PRECISIONS):
        return None
    return f"{image} changed since it was cached"


# ------------------------------------------------------------------------------------------------ pixels
def resize_and_crop(image: Image.Image, placement: Placement) -> np.ndarray:
    """The bucket-sized crop of ``image`` as uint8 [H, W, 3] ([H, W] for an ``L`` image: a mask)."""
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    return np.asarray(image.crop(placement.crop_ltrb), dtype=np.uint8)


def to_pixels(crops: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], what the VAE encoder takes."""
    if not crops.flags.writeable:  # torch warns about read-only arrays (PIL's np.asarray gives them)
        crops = crops.copy()
    # contiguous NCHW: a permuted (channels-last) view makes the CPU convolutions take another path, whose results
    # differ in the 4th digit, so the same image would not always give the same latents.
    return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1.0)


@torch.inference_mode()
def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The posterior mean for ``pixels`` (float [B, 3, H, W] in [-1, 1]), float32 on the CPU, unscaled."""
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean
    return latents.float().cpu()


__all__ = [
    "LATENT_FORMAT_VERSION", "MIXED_PRECISIONS", "LatentCache", "LatentFileError", "cache_key", "cache_staleness",
    "check_latents", "check_mask", "content_hash", "encode_pixels", "foreign_latent_file", "has_mask", "latent_files",
    "latent_path", "load_latent_file", "mask_file_of", "resize_and_crop", "stored_cache_key", "to_pixels",
    "vae_fingerprint", "write_latent_file",
]
