"""Gather what training will do with each image: its bucket and crop, cache state, caption, tokens and batches.

Each answer comes from the code training runs:

* which images are trained: :meth:`FineTuneData.from_metadata` (an image in the folder whose metadata entry has a
  ``train_resolution``), and the epoch's batches from its ``epoch_batches`` at ``--train_batch_size``;
* the crop: the one stored in a latent file whose bucket matches the metadata (what ``prepare`` encoded and what
  training loads); otherwise :func:`sdtune.data.buckets.cover` for the metadata's bucket, as training's start-up
  encoding does; for images not yet prepared, where ``prepare`` would put them
  (:meth:`AspectBuckets.place` with the bucket options given);
* the caption: :func:`build_caption`; with ``--shuffle_caption`` / ``--keep_tokens`` the comma-separated parts as
  :class:`CaptionRules` splits them, the first ``keep_tokens`` fixed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdtune.data.buckets import AspectBuckets, Reso, TooSmall, cover
from sdtune.data.dataset import FineTuneData, build_caption
from sdtune.data.images import DEFAULT_MAX_PIXELS, list_images
from sdtune.data.metadata import KeyIndex, duplicate_stems, load_metadata
from sdtune.data.prepare import parse_resolution
from sdtune.errors import SdtuneError
from sdtune.models.choices import ALLOWED_TOKEN_LENGTHS
from sdtune.models.text import check_max_token_length
from sdtune.option_groups import ImageKeys, Recursive
from sdtune.options import opt
from sdtune.review.thumbs import VALID, ImageFacts, ImageJob, inspect_images
from sdtune.review.tokens import count_tokens, find_cuts, load_review_tokenizer

logger = logging.getLogger(__name__)

THUMB_DIR = "thumbs"
PAGE_FILE = "index.html"


@dataclass
class ReviewOptions(ImageKeys, Recursive):
    """``review``: a page showing META_JSON's dataset as training would see it, written to --out."""

    in_json: Path = opt(help="metadata JSON (from merge-captions / clean / prepare)", positional=True,
                        metavar="META_JSON")
    train_data_dir: Optional[Path] = opt(None, "folder of training images (without it: captions, tags and buckets "
                                         "from the metadata only)", positional=True, metavar="TRAIN_DIR")
    out: Path = opt(Path("review"), "folder to write the page (index.html) and its thumbnails into")
    pretrained_model_name_or_path: Optional[str] = opt(None, "model whose tokenizer counts the tokens, as in train")
    tokenizer: Optional[str] = opt(None, "CLIP tokenizer folder (as in train; default: the model's, else the "
                                   "packaged vocabulary)")
    vae: Optional[str] = opt(None, "the train option: the VAE training encodes with (default: the model's), for "
                             "checking the latent caches were made with it")
    max_token_length: int = opt(75, "the train option: tokens kept of each caption", choices=ALLOWED_TOKEN_LENGTHS)
    train_batch_size: int = opt(1, "the train option: images per batch, for the batch counts per bucket")
    dataset_repeats: int = opt(1, "the train option: times each image appears per epoch")
    shuffle_caption: bool = opt(False, "the train option: show which caption parts are shuffled")
    keep_tokens: int = opt(0, "the train option: the first N comma-separated parts stay fixed")
    seed: int = opt(0, "seed for the epoch's batches shown (their number and sizes do not depend on it)")
    max_resolution: str = opt("512,512", "the prepare option, for images not prepared yet")
    min_bucket_reso: int = opt(256, "the prepare option, for images not prepared yet")
    max_bucket_reso: int = opt(1024, "the prepare option, for images not prepared yet")
    bucket_reso_steps: int = opt(64, "the prepare option, for images not prepared yet")
    bucket_no_upscale: bool = opt(False, "the prepare option, for images not prepared yet")
    max_image_pixels: int = opt(DEFAULT_MAX_PIXELS, "images with more pixels are reported, not decoded")
    thumb_size: int = opt(256, "longest side of the thumbnails, in pixels")
    workers: int = opt(4, "processes making thumbnails, at most the CPU count (0: in this process)")
    page_size: int = opt(100, "images per page of the grid")
    serve: bool = opt(False, "after writing, serve the page over HTTP (Ctrl-C stops)")
    host: str = opt("127.0.0.1", "address to serve on (127.0.0.1: this machine only; use ssh -L to see it from "
                    "another)")
    port: int = opt(0, "port to serve on (0: any free port)")


@dataclass
class Item:
    """One image (or metadata entry) as the page shows it."""

    key: str
    name: str
    trained: bool = False
    skip: str = ""  # why training skips it ("" when it is trained)
    size: Reso | None = None
    bucket: Reso | None = None
    resized: Reso | None = None
    crop: tuple[int, int, int, int] | None = None  # in resized pixels
    crop_from: str = ""
    upscaled: bool | None = None
    aspect_error: float | None = None
    latent: str = ""
    latent_note: str = ""
    flipped: bool | None = None
    caption: str = ""
    caption_state: str = "ok"  # "ok", "none" (no caption and no tags), "empty"
    tags: list[str] = field(default_factory=list)
    tokens: int | None = None
    cuts: list[Any] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # with --shuffle_caption / --keep_tokens
    fixed_parts: int = 0
    fixed_tokens: int | None = None
    content_hash: str = ""
    duplicates: list[str] = field(default_factory=list)
    thumb: str | None = None
    error: str = ""

    def flags(self, max_token_length: int) -> list[str]:
        """The problems the page marks this item with (the names of page.py's ``FLAG_FILTERS``)."""
        out = []
        if self.caption_state == "none":
            out.append("no caption")
        elif self.caption_state == "empty":
            out.append("empty caption")
        if self.duplicates:
            out.append("duplicate")
        if self.tokens is not None and self.tokens > max_token_length:
            out.append("over token limit")
        if self.trained and self.latent != VALID:
            out.append("cache not valid")
        if self.upscaled:
            out.append("upscaled")
        if self.skip:
            out.append("skipped")
        return out


@dataclass
class Review:
    """Everything the page shows: the items, epoch 0's batches, the tokenizer used and dataset-wide problems."""

    options: ReviewOptions
    items: list[Item]
    tokenizer_note: str
    batches: list[tuple[Reso, int]]  # (bucket, batch size) of every batch of epoch 0
    problems: list[str] = field(default_factory=list)  # dataset-wide notes (no trainable images, ...)
    tokenizer_ok: bool = True

    @property
    def trained(self) -> list[Item]:
        """The items training uses."""
        return [i for i in self.items if i.trained]

    def bucket_rows(self) -> list[dict[str, Any]]:
        """Per bucket of the trained images: images (with repeats), batches, full batches, last batch size."""
        counts = Counter(i.bucket for i in self.trained)
        by_bucket: dict[Reso, list[int]] = {}
        for bucket, size in self.batches:
            by_bucket.setdefault(bucket, []).append(size)
        rows = []
        for bucket in sorted(counts, key=lambda b: (b[0] / b[1], b)):
            sizes = by_bucket.get(bucket, [])
            rows.append({"bucket": bucket, "images": counts[bucket], "batches": len(sizes),
                         "full": sum(s == self.options.train_batch_size for s in sizes),
                         "partial": [s for s in sizes if s != self.options.train_batch_size]})
        return rows

    def tag_counts(self) -> list[tuple[str, int]]:
        """How many items have each tag, most frequent first (ties by name)."""
        counts = Counter(t for i in self.items for t in dict.fromkeys(i.tags))
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def summary(self) -> dict[str, Any]:
        """The headline figures of the page (trained images, buckets, steps, tokens, problems)."""
        trained = self.trained
        limit = self.options.max_token_length
        errors = [abs(i.aspect_error) for i in trained if i.aspect_error is not None]
        tokens = [i.tokens for i in trained if i.tokens is not None]
        return {
            "images": len(trained),
            "buckets": len({i.bucket for i in trained}),
            "steps_per_epoch": len(self.batches),
            "mean_aspect_error": sum(errors) / len(errors) if errors else None,
            "over_limit": sum(t > limit for t in tokens),
            "max_tokens": max(tokens) if tokens else None,
            "skipped": sum(1 for i in self.items if i.skip),
            "no_caption": sum(i.caption_state == "none" for i in trained),
            "empty_caption": sum(i.caption_state == "empty" for i in trained),
            "duplicates": sum(bool(i.duplicates) for i in self.items),
            "upscaled": sum(bool(i.upscaled) for i in trained),
            "cache_problems": sum(i.latent != VALID for i in trained),
        }


def make_buckets(options: ReviewOptions) -> AspectBuckets:
    """The ``AspectBuckets`` the prepare options describe, for images not prepared yet."""
    return AspectBuckets(parse_resolution(options.max_resolution), options.min_bucket_reso, options.max_bucket_reso,
                         options.bucket_reso_steps, options.bucket_no_upscale)


def validate(options: ReviewOptions) -> AspectBuckets:
    """Check the options before anything is read; returns the buckets ``prepare`` would use."""
    check_max_token_length(options.max_token_length)
    if options.train_batch_size < 1 or options.dataset_repeats < 1:
        raise SdtuneError("--train_batch_size and --dataset_repeats must be at least 1")
    if options.keep_tokens < 0:
        raise SdtuneError("--keep_tokens must be 0 or more")
    if not 16 <= options.thumb_size <= 2048:
        raise SdtuneError(f"--thumb_size must be between 16 and 2048 pixels, not {options.thumb_size}")
    if options.page_size < 1 or options.workers < 0 or options.max_image_pixels < 1:
        raise SdtuneError("--page_size and --max_image_pixels must be positive, --workers 0 or more")
    if not 0 <= options.port <= 65535:
        raise SdtuneError(f"--port must be 0-65535, not {options.port}")
    if not Path(options.in_json).is_file():
        raise SdtuneError(f"{options.in_json}: metadata file does not exist; give the JSON written by merge-captions, "
                          "clean or prepare")
    if options.train_data_dir is not None and not Path(options.train_data_dir).is_dir():
        raise SdtuneError(f"{options.train_data_dir}: image folder does not exist")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out}: is a file; give a folder for the page")
    return make_buckets(options)


def _display_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass  # not under the training folder (full-path keys): show the whole path
    return str(path)


def collect(options: ReviewOptions) -> Review:
    """Everything the page shows, for ``options``; writes the thumbnails into ``<out>/thumbs``."""
    buckets = validate(options)
    # before any image is read: a --tokenizer or model that cannot be read fails at once
    tokenizer, note = load_review_tokenizer(options.pretrained_model_name_or_path, options.tokenizer)
    vae_print = _vae_fingerprint(options)
    images = load_metadata(options.in_json)
    root = Path(options.train_data_dir) if options.train_data_dir is not None else None
    index = KeyIndex(images, options.full_path)
    paths: list[Path]
    if root is not None:
        paths = list_images(root, options.recursive)
    elif options.full_path:
        paths = sorted(Path(k) for k in images if Path(k).is_file())
    else:
        paths = []
    # One item per image file (by its display name) and one per metadata entry without an image.
    items: dict[str, Item] = {}
    path_of: dict[str, Path] = {}
    clashes = {} if options.full_path else duplicate_stems(paths)
    for path in paths:
        key = index.key_for(path)
        name = _display_name(path, root)
        item = Item(key=key, name=name)
        entry = images.get(key)
        if entry is None:
            item.skip = "no entry in the metadata JSON: training skips it (run merge-captions / merge-tags)"
        elif "train_resolution" not in entry:
            item.skip = "no train_resolution in the metadata: not prepared, training skips it (run sdtune prepare)"
        if path.stem in clashes:
            others = ", ".join(_display_name(p, root) for p in clashes[path.stem] if p != path)
            item.error = (f"shares its file stem with {others}: one metadata entry and one latent file for both "
                          "(prepare refuses this); rename one")
        items[name] = item
        path_of[name] = path
    on_disk = {item.key for item in items.values()}
    for key in images:
        if key not in on_disk:
            item = Item(key=key, name=key)
            if root is not None or options.full_path:
                where = f"in {root}" if root is not None else "at that path"
                item.skip = f"no image file {where}: training skips this entry"
            elif "train_resolution" not in images[key]:
                item.skip = "no train_resolution in the metadata: not prepared, training skips it"
            items[f"\x00{key}"] = item

    _fill_captions(items.values(), images, options)
    _fill_images(items, path_of, images, buckets, options, vae_print)
    batches, problems = _batches(items, images, root, options)
    _fill_duplicates(items.values())
    _fill_tokens(list(items.values()), tokenizer, options)
    review = Review(options, list(items.values()), note, batches, problems, tokenizer is not None)
    logger.info("review: %d images trained of %d entries, %d buckets", len(review.trained), len(items),
                review.summary()["buckets"])
    return review


def _fill_captions(items, images, options: ReviewOptions) -> None:
    for item in items:
        entry = images.get(item.key, {})
        item.caption = build_caption(entry)
        if "caption" not in entry and "tags" not in entry:
            item.caption_state = "none"
        elif not item.caption:
            item.caption_state = "empty"
        item.tags = [t.strip() for t in entry.get("tags", "").split(",") if t.strip()]
        if options.shuffle_caption or options.keep_tokens:
            # CaptionRules.apply's split: comma-separated parts, stripped, empty ones dropped
            item.parts = [p.strip() for p in item.caption.split(",") if p.strip()]
            item.fixed_parts = min(options.keep_tokens, len(item.parts))


def _vae_fingerprint(options: ReviewOptions) -> str | None:
    """The fingerprint of the VAE training would encode with (``--vae``, else the model's), as its cache check
    compares it; None without a local model (the caches' VAE is then not checked)."""
    source = options.vae or options.pretrained_model_name_or_path
    if source is None or not Path(source).exists():
        if source is not None:
            logger.warning("%s is not a local file or folder: the latent caches' VAE is not checked", source)
        return None
    from sdtune.data.latent_cache import vae_fingerprint
    from sdtune.models.io import load_vae

    return vae_fingerprint(load_vae(source))


def _fill_images(items: dict[str, Item], path_of: dict[str, Path], images, buckets: AspectBuckets,
                 options: ReviewOptions, vae_print: str | None) -> None:
    thumb_dir = Path(options.out) / THUMB_DIR
    thumb_dir.mkdir(parents=True, exist_ok=True)
    keys = list(path_of)
    jobs = []
    for k in keys:
        resolution = images.get(items[k].key, {}).get("train_resolution")
        jobs.append(ImageJob(path_of[k], tuple(resolution) if resolution else None, thumb_dir, options.thumb_size,
                             options.max_image_pixels, vae_print))
    for k, facts in zip(keys, inspect_images(jobs, options.workers)):
        _apply_facts(items[k], facts, images.get(items[k].key, {}), buckets)
    for item in items.values():
        if item.key not in path_of and not item.skip:  # metadata only (no TRAIN_DIR): bucket, no picture
            resolution = images.get(item.key, {}).get("train_resolution")
            item.bucket = tuple(resolution) if resolution else None


def _apply_facts(item: Item, facts: ImageFacts, entry: dict[str, Any], buckets: AspectBuckets) -> None:
    item.content_hash, item.size, item.thumb = facts.content_hash, facts.size, facts.thumb
    item.latent, item.latent_note, item.flipped = facts.latent, facts.latent_note, facts.flipped
    item.error = "; ".join(e for e in (item.error, facts.error) if e)
    resolution = entry.get("train_resolution")
    if facts.size is None:
        item.skip = item.skip or f"the image cannot be used: {facts.error}"
        return
    w, h = facts.size
    if resolution:
        item.bucket = (int(resolution[0]), int(resolution[1]))
        if facts.cached_crop is not None and facts.latent == VALID:
            item.resized, item.crop, item.crop_from = facts.cached_resized, facts.cached_crop, "latent cache"
        else:
            placement = cover(w, h, item.bucket)
            item.resized, item.crop = placement.resized, placement.crop_ltrb
            item.crop_from = "training's start-up encoding (no usable cache)"
        if facts.error:
            note = f"the image cannot be read ({facts.error})"
            item.skip = item.skip or (f"{note}; training would fail encoding it" if facts.latent != VALID else "")
    else:
        try:
            placement = buckets.place(w, h)
        except TooSmall as exc:
            item.skip = item.skip or f"prepare would skip it: {exc}"
            return
        item.bucket, item.resized, item.crop = placement.bucket, placement.resized, placement.crop_ltrb
        item.crop_from = "where prepare would put it (not prepared)"
    item.upscaled = item.resized[0] > w or item.resized[1] > h
    item.aspect_error = item.bucket[0] / item.bucket[1] - w / h


def _batches(items: dict[str, Item], images, root: Path | None, options: ReviewOptions
             ) -> tuple[list[tuple[Reso, int]], list[str]]:
    """Mark the trained items and return epoch 0's batches as (bucket, size), from training's own code."""
    problems: list[str] = []
    if root is not None:
        try:
            data = FineTuneData.from_metadata(images, root, options.dataset_repeats, options.full_path,
                                              options.recursive)
        except SdtuneError as exc:
            problems.append(str(exc))
            logger.warning("%s", exc)
            return [], problems
        for item in items.values():
            ex = data.examples.get(item.key)  # of images sharing a stem, training keeps the last one found
            item.trained = ex is not None and not item.skip and _display_name(ex.image, root) == item.name
            if ex is not None and not item.trained and not item.skip:
                item.skip = f"training uses {_display_name(ex.image, root)} for this metadata entry instead"
    else:
        for item in items.values():
            item.trained = not item.skip and item.bucket is not None and (
                not options.full_path or item.size is not None)
        buckets = AspectBuckets.from_assignments(
            (f"{item.key}\x00{r}", item.bucket) for item in items.values() if item.trained
            for r in range(options.dataset_repeats))
        data = FineTuneData({}, buckets, options.dataset_repeats)
        if not len(buckets):
            problems.append("no trainable images: no metadata entry has a train_resolution (run sdtune prepare)")
    plan = data.epoch_batches(0, options.seed, options.train_batch_size, 1, 0)
    bucket_of = data.buckets.bucket_of
    return [(bucket_of(keys[0]), len(keys)) for keys, _weight in plan], problems


def _fill_duplicates(items) -> None:
    groups: dict[str, list[Item]] = {}
    for item in items:
        if item.content_hash:
            groups.setdefault(item.content_hash, []).append(item)
    for group in groups.values():
        if len(group) > 1:
            for item in group:
                item.duplicates = [o.name for o in group if o is not item]


def _fill_tokens(items: list[Item], tokenizer, options: ReviewOptions) -> None:
    if tokenizer is None:
        return
    captions = [i.caption for i in items]
    totals = count_tokens(tokenizer, captions)
    cuts = find_cuts(tokenizer, captions, totals)
    for item, total, item_cuts in zip(items, totals, cuts):
        item.tokens = total
        item.cuts = [[c.limit, c.offset, c.inside_word] for c in item_cuts]
    fixed = [i for i in items if i.fixed_parts]
    for item, n in zip(fixed, count_tokens(tokenizer, [", ".join(i.parts[:i.fixed_parts]) for i in fixed])):
        item.fixed_tokens = n


def token_histogram(values: list[int], width: int = 5, top: int = 300) -> list[tuple[int, int]]:
    """(bin start, count) for bins of ``width`` tokens from 0; everything from ``top`` on in the last bin."""
    if not values:
        return []
    last = min(max(values), top) // width
    bins = [0] * (last + 1)
    for v in values:
        bins[min(v, top) // width] += 1
    return [(i * width, n) for i, n in enumerate(bins)]


__all__ = ["Item", "PAGE_FILE", "Review", "ReviewOptions", "THUMB_DIR", "collect", "token_histogram"]
