"""``sdtune prepare``: assign aspect-ratio buckets and cache every image's VAE latents next to it.

For every image of the training folder: read its size from the header, place it in a bucket
(``sdtune.data.buckets``), decode, resize to cover the bucket and centre-crop (PIL Lanczos, which also
anti-aliases when shrinking), encode with the model's VAE, and write ``<image stem>.npz`` beside the image. The
metadata JSON gets ``train_resolution`` ``[width, height]`` for every image that succeeded; an image that failed
loses any ``train_resolution`` an earlier run wrote, so training cannot pair it with a stale cache.

Decoding and resizing run in ``--max_data_loader_n_workers`` worker processes (a torch ``DataLoader``) while the
VAE encodes the previous batch; 0 workers decodes in the main process.

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

Choices, documented here because training relies on them:

* **Unscaled**: the latents are the VAE's raw output; training multiplies them by ``vae.config.scaling_factor``
  (0.18215 for SD 1.x/2.x), as sd-scripts does with its caches.
* **The mean, not a sample**: ``latent_dist.mean`` rather than sd-scripts' ``latent_dist.sample()``. A cached
  sample is one fixed draw, so it adds no augmentation; the mean makes the cache reproducible (and its validity
  checkable), and for SD's VAE the posterior's standard deviation is tiny anyway.
* **Pixels**: RGB in [-1, 1], shape [B, 3, H, W].
* ``--skip_existing`` reuses a file only when its ``cache_key`` matches: a hash of the image file's bytes, the
  bucket, resized size and crop, the flip flag, the VAE fingerprint, the precision and this format version. Any
  other file (stale, damaged, from another VAE) is encoded again.
* **Training checks every cache before using it** (``cache_staleness``): the bucket against the metadata, the VAE
  fingerprint against the model's VAE, and the image: when its size and modification time are those stored, it is
  taken as unchanged; otherwise its bytes are hashed and compared. A stale file is encoded again in memory and named.
* Images smaller than their bucket are enlarged to cover it. With ``--bucket_no_upscale`` they are never
  enlarged and get a bucket of their own size, as in sd-scripts (``--min_bucket_reso``/``--max_bucket_reso`` do not
  apply); only an image with a side under ``--bucket_reso_steps`` is skipped and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sdtune.atomic import atomic_path, check_writable, clean_stale_temporaries
from sdtune.data.buckets import AspectBuckets, Placement, Reso, TooSmall, bucket_table
from sdtune.data.images import (
    DEFAULT_MAX_PIXELS, ImageError, image_size, list_image_files, list_images, open_image, other_images_message)
from sdtune.data.metadata import (
    Coverage, Images, KeyIndex, check_unique_keys, failure_exit_code, load_metadata, save_metadata)
from sdtune.devices import HALF_ON_CPU_HELP, half_precision_on_cpu_warning, resolve_device
from sdtune.errors import SdtuneError
from sdtune.option_groups import ImageFolder, ImageKeys, LoaderWorkers
from sdtune.options import opt

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

LATENT_FORMAT_VERSION = 1
PRECISIONS: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
                image_hash=str(z["image_hash"]) if "image_hash" in z.files else None,
                image_bytes=int(z["image_bytes"]) if "image_bytes" in z.files else None,
                image_mtime_ns=int(z["image_mtime_ns"]) if "image_mtime_ns" in z.files else None,
            )
    except FileNotFoundError:
        raise LatentFileError(f"{path}: latent file does not exist; run sdtune prepare") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise LatentFileError(f"{path}: damaged latent file ({type(exc).__name__}: {exc}); delete it and run "
                              "sdtune prepare again") from None
    check_latents(path, cache.latents, cache.train_resolution)
    if cache.latents_flipped is not None:
        check_latents(path, cache.latents_flipped, cache.train_resolution, "latents_flipped")
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
    for name in ("image_hash", "image_bytes", "image_mtime_ns"):
        value = getattr(cache, name)
        if value is not None:
            arrays[name] = np.array(value) if name == "image_hash" else np.array(value, dtype=np.int64)
    if cache.latents_flipped is not None:
        arrays["latents_flipped"] = np.ascontiguousarray(cache.latents_flipped, dtype=np.float32)
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
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def cache_key(image_hash: str, placement: Placement, flip_aug: bool, vae_print: str, precision: str) -> str:
    """Everything a latent file's contents depend on, hashed."""
    parts = {
        "format": LATENT_FORMAT_VERSION, "image": image_hash, "bucket": list(placement.bucket),
        "resized": list(placement.resized), "crop": list(placement.crop_ltrb), "flip": flip_aug,
        "vae": vae_print, "precision": precision, "latent": "mean",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_staleness(cache: LatentCache, image: Path, bucket: Reso, vae_print: str) -> str | None:
    """Why ``cache`` is not valid for ``image`` in ``bucket`` with the VAE printed ``vae_print``; None if it is.

    Cheap first: the bucket and the VAE fingerprint are compared as stored; the image counts as unchanged when its
    size and modification time are those stored, and only otherwise is it read and hashed (a touched but identical
    image stays valid). Files without the image fields (older ones) are checked by recomputing their cache_key.
    """
    if tuple(cache.train_resolution) != tuple(bucket):
        return f"cached for bucket {cache.train_resolution} but the metadata says {tuple(bucket)}"
    if cache.vae_fingerprint != vae_print:
        return "encoded with another VAE than the model's (--vae or the model changed)"
    try:
        st = image.stat()
        if (cache.image_bytes, cache.image_mtime_ns) == (st.st_size, st.st_mtime_ns):
            return None
        digest = content_hash(image.read_bytes())
    except OSError as exc:
        return f"its image {image} cannot be read ({exc.strerror or exc})"
    if cache.image_hash is not None:
        return None if digest == cache.image_hash else f"{image} changed since it was cached"
    placement = Placement(tuple(bucket), cache.resized_size, cache.crop_ltrb, 0.0)
    flip = cache.latents_flipped is not None
    if any(cache_key(digest, placement, flip, vae_print, precision) == cache.cache_key for precision in PRECISIONS):
        return None
    return f"{image} changed since it was cached"


# ------------------------------------------------------------------------------------------------ pixels
def resize_and_crop(image: Image.Image, placement: Placement) -> np.ndarray:
    """The bucket-sized crop of ``image`` as uint8 [H, W, 3]."""
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


@dataclass(frozen=True)
class Job:
    index: int
    path: Path
    key: str
    original_size: Reso
    placement: Placement


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


class ImageJobs(torch.utils.data.Dataset):
    """Reads, hashes, decodes, resizes and crops one image per item (in DataLoader workers).

    Never raises for a bad image: an exception in a worker would end the whole run, so failures come back as
    ``Loaded.error`` and are reported at the end.
    """

    def __init__(self, jobs: list[Job], flip_aug: bool, vae_print: str, precision: str, skip_existing: bool,
                 max_pixels: int) -> None:
        self.jobs = jobs
        self.flip_aug = flip_aug
        self.vae_print = vae_print
        self.precision = precision
        self.skip_existing = skip_existing
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Loaded:
        job = self.jobs[i]
        foreign = foreign_latent_file(latent_path(job.path))
        if foreign is not None:  # never overwritten: it may be the user's only copy of another tool's cache
            return Loaded(i, error=foreign)
        try:
            st = job.path.stat()  # before reading: a change after this shows as a changed stat next time
            data = job.path.read_bytes()
        except OSError as exc:
            return Loaded(i, error=f"{job.path}: cannot be read ({exc.strerror or exc})")
        digest = content_hash(data)
        key = cache_key(digest, job.placement, self.flip_aug, self.vae_print, self.precision)
        if self.skip_existing and stored_cache_key(latent_path(job.path)) == key:
            return Loaded(i, key, reused=True)
        try:
            image = open_image(job.path, self.max_pixels, data=data)
        except ImageError as exc:
            return Loaded(i, error=str(exc))
        if image.size != job.original_size:
            return Loaded(i, error=f"{job.path}: changed while preparing ({job.original_size} -> {image.size}); run "
                                   "prepare again")
        return Loaded(i, key, digest, (st.st_size, st.st_mtime_ns), pixels=resize_and_crop(image, job.placement))


def _as_list(batch: list[Loaded]) -> list[Loaded]:
    """DataLoader collate: keep the items as they are (a batch may mix encodable and failed images)."""
    return batch


# ------------------------------------------------------------------------------------------------ options
@dataclass
class PrepareOptions(ImageFolder, ImageKeys, LoaderWorkers):
    in_json: Path = opt(help="metadata JSON to read (from merge-captions / merge-tags / clean)", positional=True)
    out_json: Path = opt(help="metadata JSON to write, with train_resolution per image", positional=True)
    model_name_or_path: str = opt(help="model whose VAE encodes: diffusers folder, .safetensors/.ckpt checkpoint "
                                       "or standalone VAE file", positional=True, metavar="MODEL")
    batch_size: int = opt(1, "images encoded at once")
    max_resolution: str = opt("512,512", "WIDTH,HEIGHT whose area bounds every bucket")
    min_bucket_reso: int = opt(256, "smallest bucket side")
    max_bucket_reso: int = opt(1024, "largest bucket side")
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this")
    bucket_no_upscale: bool = opt(False, "never enlarge images: each gets a bucket of its own size (floored to the "
                                         "step; --min/max_bucket_reso do not apply, as in sd-scripts)")
    mixed_precision: str = opt("no", f"precision the VAE runs in; {HALF_ON_CPU_HELP}", choices=("no", "fp16", "bf16"))
    flip_aug: bool = opt(False, "also cache the latents of the horizontally mirrored image")
    skip_existing: bool = opt(False, "reuse latent files still valid for this image, bucket and VAE")
    v2: bool = opt(False, "sd-scripts' option, accepted and not needed: SD 1.x and 2.x share the VAE layout, which "
                          "prepare reads from the file itself")
    max_image_pixels: int = opt(DEFAULT_MAX_PIXELS, "images with more pixels are skipped as possible "
                                                    "decompression bombs")
    device: str = opt("auto", "device the VAE runs on (auto: cuda when available, else cpu)")


def parse_resolution(text: str) -> Reso:
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise SdtuneError(f"--max_resolution {text!r}: expected WIDTH,HEIGHT such as 512,512")
    return parts[0], parts[1]



def make_buckets(options: PrepareOptions) -> AspectBuckets:
    return AspectBuckets(parse_resolution(options.max_resolution), options.min_bucket_reso, options.max_bucket_reso,
                         options.bucket_reso_steps, options.bucket_no_upscale)


def validate(options: PrepareOptions) -> AspectBuckets:
    """Check the options before anything is read or loaded; returns the (empty) buckets."""
    buckets = make_buckets(options)
    if options.batch_size < 1:
        raise SdtuneError(f"--batch_size must be at least 1, not {options.batch_size}")
    if options.max_data_loader_n_workers < 0:
        raise SdtuneError("--max_data_loader_n_workers must be 0 or more")
    if options.max_image_pixels < 1:
        raise SdtuneError("--max_image_pixels must be positive")
    if options.mixed_precision not in PRECISIONS:
        raise SdtuneError(f"--mixed_precision must be one of {', '.join(PRECISIONS)}")
    resolve_device(options.device)
    if not Path(options.in_json).is_file():
        raise SdtuneError(f"{options.in_json}: metadata file does not exist; create it with sdtune merge-captions "
                          "or merge-tags")
    return buckets


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class PrepareSummary:
    found: int = 0
    encoded: int = 0
    reused: int = 0
    enlarged: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    other_images: list[Path] = field(default_factory=list)  # image files of extensions sdtune does not read
    folder: Path | None = None
    bucket_counts: dict[Reso, int] = field(default_factory=dict)
    mean_aspect_error: float | None = None
    seconds: float = 0.0
    encode_seconds: float = 0.0  # time the VAE was busy (including copies to and from its device)

    @property
    def prepared(self) -> int:
        return self.encoded + self.reused

    def log(self, log: logging.Logger = logger) -> None:
        log.info("buckets:\n%s", bucket_table(self.bucket_counts, self.mean_aspect_error))
        log.info("%d images found: %d encoded, %d reused from valid caches, %d skipped (%.1f s, VAE busy %.1f s)",
                 self.found, self.encoded, self.reused, len(self.skipped), self.seconds, self.encode_seconds)
        if self.enlarged:
            log.info("%d images were smaller than their bucket and were enlarged (--bucket_no_upscale prevents it)",
                     self.enlarged)
        if self.other_images:
            log.warning("%s", other_images_message(self.other_images, self.folder or "the folder"))
        if self.skipped:
            log.warning("%d images were skipped:\n%s", len(self.skipped),
                        "\n".join(f"  {reason}" for _path, reason in self.skipped))


def _load_vae(model: str) -> AutoencoderKL:
    from sdtune.models.io import load_vae  # heavy imports only when the stage runs

    return load_vae(model, torch.float32)


def _check_folders(options: PrepareOptions, paths: list[Path]) -> None:
    """Before the VAE loads: every folder that will get latent files, and the --out_json folder, must be writable
    (a read-only image folder used to fail at the first write, naming a temporary file); temporaries a killed
    prepare left there are removed."""
    folders = sorted({path.parent for path in paths}) or [Path(options.train_data_dir)]
    out_folder = Path(options.out_json).parent
    for option, folder in [*(("--train_data_dir", f) for f in folders), ("--out_json", out_folder)]:
        try:
            check_writable([(option, folder)])
        except SdtuneError as exc:
            if option == "--train_data_dir":
                raise SdtuneError(f"{exc}. prepare writes each image's latent cache (<image stem>.npz) beside it"
                                  ) from exc
            raise
    for folder in sorted({*folders, out_folder}):
        clean_stale_temporaries(folder)


def prepare_latents(options: PrepareOptions, vae: AutoencoderKL | None = None) -> PrepareSummary:
    """The ``prepare`` stage. ``vae`` replaces loading ``options.model_name_or_path`` (tests, benchmarks, or a
    caller that has the model already); it is moved to ``--device`` and cast to ``--mixed_precision`` in place."""
    start = time.perf_counter()
    buckets = validate(options)
    device = resolve_device(options.device)
    dtype = PRECISIONS[options.mixed_precision]
    slow = half_precision_on_cpu_warning(device, "--mixed_precision", options.mixed_precision, "--mixed_precision no")
    if slow:
        logger.warning(slow)
    images = load_metadata(options.in_json)
    paths, others = list_image_files(options.train_data_dir, options.recursive)
    check_unique_keys(paths, options.full_path)
    index = KeyIndex(images, options.full_path)
    summary = PrepareSummary(found=len(paths), other_images=others, folder=Path(options.train_data_dir))
    logger.info("found %d images in %s", len(paths), options.train_data_dir)
    coverage = Coverage.of(images, (index.key_for(path) for path in paths))
    if coverage.mostly_without_entry and not options.skip_existing:
        no_entry = set(coverage.without_entry)
        cached = [path for path in paths if index.key_for(path) in no_entry and latent_path(path).exists()]
        if cached:  # metadata of another folder would overwrite this folder's caches, silently
            raise SdtuneError(
                f"{options.in_json} does not describe {options.train_data_dir}: {len(coverage.without_entry)} of "
                f"{coverage.images} images have no entry in it, and {len(cached)} of them have latent caches (e.g. "
                f"{latent_path(cached[0])}) that preparing would overwrite. Pass this folder's metadata (sdtune "
                "merge-captions / merge-tags writes it), or --skip_existing to keep the valid caches, or delete the "
                ".npz files to prepare the folder afresh")
    warned = coverage.warnings(options.in_json, options.train_data_dir)
    for message in warned:
        logger.warning(message)
    _check_folders(options, paths)

    jobs: list[Job] = []
    failed_keys: list[str] = []
    for path in tqdm(paths, desc="reading sizes", unit="img", leave=False, disable=None):
        key = index.key_for(path)
        try:
            size = image_size(path, options.max_image_pixels)
            placement = buckets.place(*size)
        except (ImageError, TooSmall) as exc:
            reason = str(exc) if isinstance(exc, ImageError) else f"{path}: {exc}"
            summary.skipped.append((path, reason))
            failed_keys.append(key)
            continue
        jobs.append(Job(len(jobs), path, key, size, placement))

    if vae is None:
        vae = _load_vae(options.model_name_or_path)
    fingerprint = vae_fingerprint(vae)  # of the float32 weights: the same VAE in any precision prints the same
    from sdtune.models.sd import place  # heavy imports only when the stage runs

    vae = place(vae, device, dtype)
    vae.eval().requires_grad_(False)

    # Batches hold one bucket each (the VAE needs equal sizes); buckets in turn, images in folder order.
    order = sorted(jobs, key=lambda j: (j.placement.bucket, j.index))
    batches = _split_by_bucket(order, options.batch_size)
    dataset = ImageJobs(jobs, options.flip_aug, fingerprint, options.mixed_precision, options.skip_existing,
                        options.max_image_pixels)
    workers = options.max_data_loader_n_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=_as_list,
        prefetch_factor=2 if workers > 0 else None,
    )
    succeeded: dict[str, Placement] = {}
    with tqdm(total=len(jobs), desc="encoding latents", unit="img", disable=None) as bar:
        for batch in loader:
            todo = []
            for item in batch:
                job = jobs[item.index]
                if item.error:
                    summary.skipped.append((job.path, item.error))
                    failed_keys.append(job.key)
                elif item.reused:
                    summary.reused += 1
                    succeeded[job.key] = job.placement
                else:
                    todo.append(item)
            if todo:
                t0 = time.perf_counter()
                pixels = to_pixels(np.stack([item.pixels for item in todo]))
                if options.flip_aug:
                    pixels = torch.cat([pixels, pixels.flip(-1)])
                latents = encode_pixels(vae, pixels).numpy()
                summary.encode_seconds += time.perf_counter() - t0
                for i, item in enumerate(todo):
                    job = jobs[item.index]
                    mine = latents[i :: len(todo)]  # the image's latents, and its mirror's with --flip_aug
                    if not np.isfinite(mine).all():
                        # fp16 VAEs overflow on some images; a NaN in the cache would poison training later.
                        summary.skipped.append((job.path, f"{job.path}: the VAE produced NaN/inf latents in "
                                                f"{options.mixed_precision} precision; try --mixed_precision no"))
                        failed_keys.append(job.key)
                        continue
                    write_latent_file(latent_path(job.path), LatentCache(
                        latents=latents[i],
                        latents_flipped=latents[len(todo) + i] if options.flip_aug else None,
                        original_size=job.original_size, resized_size=job.placement.resized,
                        crop_ltrb=job.placement.crop_ltrb, train_resolution=job.placement.bucket,
                        vae_fingerprint=fingerprint, cache_key=item.cache_key, format_version=LATENT_FORMAT_VERSION,
                        image_hash=item.image_hash, image_bytes=item.image_stat[0], image_mtime_ns=item.image_stat[1],
                    ))
                    succeeded[job.key] = job.placement
                    summary.encoded += 1
                    summary.enlarged += job.placement.resized[0] > job.original_size[0]
            bar.update(len(batch))

    for key, placement in succeeded.items():
        images.setdefault(key, {})["train_resolution"] = list(placement.bucket)
    for key in failed_keys:
        if key in images:
            images[key].pop("train_resolution", None)
    save_metadata(options.out_json, images)

    summary.bucket_counts = dict(sorted(Counter(p.bucket for p in succeeded.values()).items()))
    if succeeded:
        summary.mean_aspect_error = float(np.mean([abs(p.aspect_error) for p in succeeded.values()]))
    summary.seconds = time.perf_counter() - start
    unlabelled = [k for k in succeeded if not ({"caption", "tags"} & set(images[k]))]
    if unlabelled and not (coverage.mostly_without_entry or len(coverage.unlabelled) * 2 > coverage.images):
        logger.warning("%d prepared images have neither caption nor tags in %s (e.g. %s)", len(unlabelled),
                       options.in_json, ", ".join(unlabelled[:5]))
    return summary


def _split_by_bucket(order: list[Job], batch_size: int) -> list[list[int]]:
    """Consecutive runs of ``order`` of at most ``batch_size`` jobs, never mixing buckets."""
    batches: list[list[int]] = []
    current: list[int] = []
    bucket: Reso | None = None
    for job in order:
        if current and (job.placement.bucket != bucket or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(job.index)
        bucket = job.placement.bucket
    if current:
        batches.append(current)
    return batches


def prepare_command(options: PrepareOptions) -> int:
    summary = prepare_latents(options)
    summary.log()
    logger.info("wrote %s", options.out_json)
    return failure_exit_code(len(summary.skipped), "image(s) were skipped")


__all__ = [
    "LATENT_FORMAT_VERSION", "LatentCache", "LatentFileError", "PrepareOptions", "PrepareSummary", "cache_key",
    "encode_pixels", "latent_files", "latent_path", "load_latent_file", "prepare_command", "prepare_latents",
    "resize_and_crop", "to_pixels", "vae_fingerprint", "write_latent_file",
]

