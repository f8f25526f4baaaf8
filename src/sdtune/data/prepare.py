"""``sdtune prepare``: assign aspect-ratio buckets and cache every image's VAE latents next to it.

For every image of the training folder: read its size from the header, place it in a bucket
(``sdtune.data.buckets``), decode, resize to cover the bucket and centre-crop (PIL Lanczos, which also
anti-aliases when shrinking), encode with the model's VAE, and write ``<image stem>.npz`` beside the image (the
format and its validity rules: ``sdtune.data.latent_cache``). The metadata JSON gets ``train_resolution``
``[width, height]`` for every image that succeeded; an image that failed loses any ``train_resolution`` an earlier
run wrote, so training cannot pair it with a stale cache.

The stage is three steps: **place** (``place_images``: options, metadata and folders checked, every image put in
its bucket; no model needed), **encode** (``encode_images``: the VAE the caller gives encodes and each latent file
is written) and **write** (``write_metadata``: the metadata JSON and the summary). ``prepare_latents`` runs them
with a VAE in hand; ``prepare_command`` loads the model's VAE between the first two, so bad options or folders
fail before any model loads.

Decoding and resizing run in ``--max_data_loader_n_workers`` worker processes (a torch ``DataLoader``) while the
VAE encodes the previous batch; 0 workers decodes in the main process.

With ``--alpha_mask`` or ``--mask_dir`` each image's loss mask is cached with its latents (``sdtune.data.masks``).

Images smaller than their bucket are enlarged to cover it. With ``--bucket_no_upscale`` they are never enlarged
and get a bucket of their own size, as in sd-scripts (``--min_bucket_reso``/``--max_bucket_reso`` do not apply);
only an image with a side under ``--bucket_reso_steps`` is skipped and reported.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from tqdm import tqdm

from sdtune.atomic import check_writable, clean_stale_temporaries
from sdtune.data.buckets import AspectBuckets, Placement, Reso, TooSmall, bucket_table
from sdtune.data.images import DEFAULT_MAX_PIXELS, ImageError, image_size, list_image_files, other_images_message
from sdtune.data.latent_cache import (
    LATENT_FORMAT_VERSION,
    MIXED_PRECISIONS,
    LatentCache,
    encode_pixels,
    latent_path,
    to_pixels,
    vae_fingerprint,
    write_latent_file,
)
from sdtune.data.masks import MaskError, check_mask_options, find_mask_files
from sdtune.data.metadata import (
    Coverage,
    Images,
    KeyIndex,
    check_unique_keys,
    failure_exit_code,
    load_metadata,
    save_metadata,
)
from sdtune.data.prepare_workers import ImageJobs, Job, Loaded, as_list
from sdtune.devices import half_precision_on_cpu_warning, resolve_device
from sdtune.errors import SdtuneError
from sdtune.models.choices import HALF_ON_CPU_HELP
from sdtune.option_groups import ImageFolder, ImageKeys, LoaderWorkers
from sdtune.options import opt
from sdtune.precision_names import dtype_of

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ options
@dataclass
class PrepareOptions(ImageFolder, ImageKeys, LoaderWorkers):
    """``prepare``: TRAIN_DIR's images bucketed and their latents cached with MODEL's VAE; IN_JSON, with each
    image's ``train_resolution``, goes to OUT_JSON."""

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
    mixed_precision: str = opt("no", f"precision the VAE runs in; {HALF_ON_CPU_HELP}", choices=MIXED_PRECISIONS)
    flip_aug: bool = opt(False, "also cache the latents of the horizontally mirrored image")
    alpha_mask: bool = opt(False, "cache each image's alpha channel as its loss mask for train --masked_loss "
                                  "(transparent = not trained)")
    mask_dir: Optional[Path] = opt(None, "folder of mask images with the training images' stems, cached as their "
                                         "loss masks for train --masked_loss: white = train, black = ignore")
    skip_existing: bool = opt(False, "reuse latent files still valid for this image, bucket and VAE")
    v2: bool = opt(False, "sd-scripts' option, accepted and not needed: SD 1.x and 2.x share the VAE layout, which "
                          "prepare reads from the file itself")
    max_image_pixels: int = opt(DEFAULT_MAX_PIXELS, "images with more pixels are skipped as possible "
                                                    "decompression bombs")
    device: str = opt("auto", "device the VAE runs on (auto: cuda when available, else cpu)")


def parse_resolution(text: str) -> Reso:
    """``--max_resolution``'s ``WIDTH,HEIGHT`` (or one number for a square) as (width, height)."""
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
    """The (empty) buckets the options describe."""
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
    if options.mixed_precision not in MIXED_PRECISIONS:
        raise SdtuneError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}")
    resolve_device(options.device)
    check_mask_options(options.alpha_mask, options.mask_dir, Path(options.train_data_dir), options.recursive)
    if not Path(options.in_json).is_file():
        raise SdtuneError(f"{options.in_json}: metadata file does not exist; create it with sdtune merge-captions "
                          "or merge-tags")
    return buckets


@dataclass
class PrepareSummary:
    """What a prepare run did: counts, skipped images with their reasons, the bucket table, timings."""

    found: int = 0
    encoded: int = 0
    reused: int = 0
    enlarged: int = 0
    masks: str = ""  # the mask option ("--alpha_mask", "--mask_dir DIR"), or "" without one
    masked: int = 0  # prepared images with a cached mask
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    other_images: list[Path] = field(default_factory=list)  # image files of extensions sdtune does not read
    folder: Path | None = None
    bucket_counts: dict[Reso, int] = field(default_factory=dict)
    mean_aspect_error: float | None = None
    seconds: float = 0.0
    encode_seconds: float = 0.0  # time the VAE was busy (including copies to and from its device)

    @property
    def prepared(self) -> int:
        """Images with a valid latent file after the run: encoded or reused."""
        return self.encoded + self.reused

    def log(self, log: logging.Logger = logger) -> None:
        """Log the bucket table, the counts and every skipped image with its reason."""
        log.info("buckets:\n%s", bucket_table(self.bucket_counts, self.mean_aspect_error))
        log.info("%d images found: %d encoded, %d reused from valid caches, %d skipped (%.1f s, VAE busy %.1f s)",
                 self.found, self.encoded, self.reused, len(self.skipped), self.seconds, self.encode_seconds)
        if self.masks:
            log.info("%d of %d prepared images have a loss mask (%s); %d have none and train whole with "
                     "--masked_loss", self.masked, self.prepared, self.masks, self.prepared - self.masked)
        if self.enlarged:
            log.info("%d images were smaller than their bucket and were enlarged (--bucket_no_upscale prevents it)",
                     self.enlarged)
        if self.other_images:
            log.warning("%s", other_images_message(self.other_images, self.folder or "the folder"))
        if self.skipped:
            log.warning("%d images were skipped:\n%s", len(self.skipped),
                        "\n".join(f"  {reason}" for _path, reason in self.skipped))


# ------------------------------------------------------------------------------------------------ place
@dataclass
class PreparePlan:
    """What the place step found, and what the encode and write steps add to: the metadata, one ``Job`` per image
    that got a bucket, the keys that failed and those that succeeded (with their placement)."""

    options: PrepareOptions
    images: Images
    coverage: Coverage
    summary: PrepareSummary
    jobs: list[Job] = field(default_factory=list)
    failed_keys: list[str] = field(default_factory=list)
    succeeded: dict[str, Placement] = field(default_factory=dict)
    start: float = 0.0  # perf_counter at the start of the run

    def fail(self, path: Path, key: str, reason: str) -> None:
        """Skip ``path`` (metadata key ``key``) for ``reason``: reported at the end, its train_resolution dropped."""
        self.summary.skipped.append((path, reason))
        self.failed_keys.append(key)


def place_images(options: PrepareOptions) -> PreparePlan:
    """The place step, before any model loads: check the options, the metadata against the folder and the folders'
    permissions, then put every image in its bucket (only its header is read)."""
    start = time.perf_counter()
    buckets = validate(options)
    slow = half_precision_on_cpu_warning(resolve_device(options.device), "--mixed_precision",
                                         options.mixed_precision, "--mixed_precision no")
    if slow:
        logger.warning(slow)
    images = load_metadata(options.in_json)
    paths, others = list_image_files(options.train_data_dir, options.recursive)
    check_unique_keys(paths, options.full_path)
    index = KeyIndex(images, options.full_path)
    summary = PrepareSummary(found=len(paths), other_images=others, folder=Path(options.train_data_dir))
    logger.info("found %d images in %s", len(paths), options.train_data_dir)
    coverage = _check_coverage(options, images, index, paths)
    _check_folders(options, paths)
    plan = PreparePlan(options, images, coverage, summary, start=start)
    masks, mask_problems = find_mask_files(options.mask_dir, Path(options.train_data_dir), paths, options.recursive) \
        if options.mask_dir is not None else ({}, {})
    summary.masks = "--alpha_mask" if options.alpha_mask else \
        f"--mask_dir {options.mask_dir}" if options.mask_dir is not None else ""
    for path in tqdm(paths, desc="reading sizes", unit="img", leave=False, disable=None):
        key = index.key_for(path)
        try:
            if path in mask_problems:
                raise MaskError(mask_problems[path])
            size = image_size(path, options.max_image_pixels)
            placement = buckets.place(*size)
        except (ImageError, MaskError, TooSmall) as exc:
            plan.fail(path, key, f"{path}: {exc}" if isinstance(exc, TooSmall) else str(exc))
            continue
        plan.jobs.append(Job(len(plan.jobs), path, key, size, placement, masks.get(path)))
    return plan


def _check_coverage(options: PrepareOptions, images: Images, index: KeyIndex, paths: list[Path]) -> Coverage:
    """How well the metadata describes the folder; raises when it is another folder's and preparing would overwrite
    this folder's caches, logs the warnings otherwise."""
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
    for message in coverage.warnings(options.in_json, options.train_data_dir):
        logger.warning(message)
    return coverage


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


# ------------------------------------------------------------------------------------------------ encode
def encode_images(plan: PreparePlan, vae: AutoencoderKL) -> None:
    """The encode step: decode and crop in worker processes while ``vae`` encodes, and write each image's latent
    file as soon as its batch is encoded. ``vae`` is moved to ``--device`` and cast to ``--mixed_precision`` in
    place."""
    options = plan.options
    fingerprint = vae_fingerprint(vae)  # of the float32 weights: the same VAE in any precision prints the same
    from sdtune.models.sd import place  # heavy imports only when the stage runs

    vae = place(vae, resolve_device(options.device), dtype_of(options.mixed_precision))
    vae.eval().requires_grad_(False)

    # Batches hold one bucket each (the VAE needs equal sizes); buckets in turn, images in folder order.
    order = sorted(plan.jobs, key=lambda j: (j.placement.bucket, j.index))
    dataset = ImageJobs(plan.jobs, options, fingerprint)
    workers = options.max_data_loader_n_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_split_by_bucket(order, options.batch_size), num_workers=workers,
        collate_fn=as_list, prefetch_factor=2 if workers > 0 else None,
    )
    with tqdm(total=len(plan.jobs), desc="encoding latents", unit="img", disable=None) as bar:
        for batch in loader:
            todo = _to_encode(plan, batch)
            if todo:
                _encode_batch(plan, vae, todo, fingerprint)
            bar.update(len(batch))


def _to_encode(plan: PreparePlan, batch: list[Loaded]) -> list[Loaded]:
    """The items of ``batch`` that need the VAE; failed ones are recorded as skipped, reused ones as succeeded."""
    todo = []
    for item in batch:
        job = plan.jobs[item.index]
        if item.error:
            plan.fail(job.path, job.key, item.error)
        elif item.reused:
            plan.summary.reused += 1
            plan.summary.masked += item.has_mask
            plan.succeeded[job.key] = job.placement
        else:
            todo.append(item)
    return todo


def _encode_batch(plan: PreparePlan, vae: AutoencoderKL, todo: list[Loaded], fingerprint: str) -> None:
    """Encode ``todo`` (one bucket), and its mirror with --flip_aug, and write a latent file per image."""
    flip_aug = plan.options.flip_aug
    t0 = time.perf_counter()
    pixels = to_pixels(np.stack([item.pixels for item in todo]))
    if flip_aug:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    latents = encode_pixels(vae, pixels).numpy()
    plan.summary.encode_seconds += time.perf_counter() - t0
    for i, item in enumerate(todo):
        job = plan.jobs[item.index]
        mine = latents[i :: len(todo)]  # the image's latents, and its mirror's with --flip_aug
        if not np.isfinite(mine).all():
            # fp16 VAEs overflow on some images; a NaN in the cache would poison training later.
            plan.fail(job.path, job.key, f"{job.path}: the VAE produced NaN/inf latents in "
                      f"{plan.options.mixed_precision} precision; try --mixed_precision no")
            continue
        write_latent_file(latent_path(job.path), LatentCache(
            latents=latents[i],
            latents_flipped=latents[len(todo) + i] if flip_aug else None,
            original_size=job.original_size, resized_size=job.placement.resized,
            crop_ltrb=job.placement.crop_ltrb, train_resolution=job.placement.bucket,
            vae_fingerprint=fingerprint, cache_key=item.cache_key, format_version=LATENT_FORMAT_VERSION,
            image_hash=item.image_hash, image_bytes=item.image_stat[0], image_mtime_ns=item.image_stat[1],
            **item.mask_input.cache_fields(job.path, item.mask),
        ))
        plan.succeeded[job.key] = job.placement
        plan.summary.encoded += 1
        plan.summary.masked += item.has_mask
        plan.summary.enlarged += job.placement.resized[0] > job.original_size[0]


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


# ------------------------------------------------------------------------------------------------ write
def write_metadata(plan: PreparePlan) -> PrepareSummary:
    """The write step: ``--out_json`` with ``train_resolution`` for every image that succeeded and none for one that
    failed; returns the run's summary."""
    options, images, summary = plan.options, plan.images, plan.summary
    for key, placement in plan.succeeded.items():
        images.setdefault(key, {})["train_resolution"] = list(placement.bucket)
    for key in plan.failed_keys:
        if key in images:
            images[key].pop("train_resolution", None)
    save_metadata(options.out_json, images)

    summary.bucket_counts = dict(sorted(Counter(p.bucket for p in plan.succeeded.values()).items()))
    if plan.succeeded:
        summary.mean_aspect_error = float(np.mean([abs(p.aspect_error) for p in plan.succeeded.values()]))
    summary.seconds = time.perf_counter() - plan.start
    coverage = plan.coverage
    unlabelled = [k for k in plan.succeeded if not ({"caption", "tags"} & set(images[k]))]
    if unlabelled and not (coverage.mostly_without_entry or len(coverage.unlabelled) * 2 > coverage.images):
        logger.warning("%d prepared images have neither caption nor tags in %s (e.g. %s)", len(unlabelled),
                       options.in_json, ", ".join(unlabelled[:5]))
    return summary


# ------------------------------------------------------------------------------------------------ the stage
def prepare_latents(options: PrepareOptions, vae: AutoencoderKL) -> PrepareSummary:
    """The ``prepare`` stage with ``vae`` (the caller loads it; ``options.model_name_or_path`` is not read): place,
    encode, write. ``vae`` is moved to ``--device`` and cast to ``--mixed_precision`` in place."""
    plan = place_images(options)
    encode_images(plan, vae)
    return write_metadata(plan)


def load_prepare_vae(model: str) -> AutoencoderKL:
    """The VAE of ``model`` (diffusers folder, checkpoint or standalone VAE file) in float32."""
    from sdtune.models.io import load_vae  # heavy imports only when the stage runs

    return load_vae(model, torch.float32)


def prepare_command(options: PrepareOptions) -> int:
    """``sdtune prepare``: the stage with the model's VAE, loaded once the options, metadata and folders passed."""
    plan = place_images(options)
    encode_images(plan, load_prepare_vae(options.model_name_or_path))
    summary = write_metadata(plan)
    summary.log()
    logger.info("wrote %s", options.out_json)
    return failure_exit_code(len(summary.skipped), "image(s) were skipped")


__all__ = [
    "ImageJobs", "PrepareOptions", "PreparePlan", "PrepareSummary", "encode_images", "load_prepare_vae",
    "make_buckets", "parse_resolution", "place_images", "prepare_command", "prepare_latents", "validate",
    "write_metadata",
]
