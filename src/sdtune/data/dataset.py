"""Training examples: cached latents + captions, batched by bucket, deterministic per (seed, epoch, item).

Each batch holds images of one bucket (so the latents stack). The epoch's batches come from
:meth:`sdtune.data.buckets.AspectBuckets.batches`, which every rank computes identically; a rank takes its share
with :func:`sdtune.data.buckets.share_batches`. Every random choice (caption shuffle, picking the flipped latent)
draws from a generator seeded by ``(seed, epoch, item key, repeat)`` (``sdtune.seeds``), so a resumed run sees
exactly the batches and captions an uninterrupted one would, whatever the number of data-loader workers.

With ``masks`` (``--masked_loss``) each batch also has ``"masks"``: float32 [B, 1, h, w], the loss mask cached by
``prepare --alpha_mask / --mask_dir`` (mirrored with the mirrored latents), ones for an image without one. Without
``masks`` no mask is stacked and the batches are as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdtune.data.buckets import AspectBuckets, Reso, cover, share_batches
from sdtune.data.images import list_images, open_image
from sdtune.data.latent_cache import (
    LatentFileError,
    cache_staleness,
    encode_pixels,
    has_mask,
    latent_path,
    load_latent_file,
    resize_and_crop,
    to_pixels,
    vae_fingerprint,
)
from sdtune.data.metadata import Coverage, Images, KeyIndex
from sdtune.errors import SdtuneError
from sdtune.seeds import derived_rng

logger = logging.getLogger(__name__)

_REPEAT_SEP = "\x00"  # joins an image key and its repeat index in bucket keys (never part of a file name)


def build_caption(entry: dict[str, Any]) -> str:
    """caption + ", " + tags, as sd-scripts' fine_tune combines them (either alone when the other is missing)."""
    parts = [entry.get("caption", "").strip(), entry.get("tags", "").strip()]
    return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class CaptionRules:
    """How a caption varies each time it is used, in sd-scripts' order:

    1. the whole caption becomes "" in every ``dropout_every_n_epochs``-th epoch (counting from 1), and otherwise
       with probability ``dropout_rate`` (the model then also learns the unconditional prediction that
       classifier-free guidance uses);
    2. the comma-separated parts after the first ``keep_tokens`` are shuffled (``shuffle``), and each is dropped
       with probability ``tag_dropout_rate``.

    Draws come from the item's own generator (:func:`item_rng`), and only for the rules that are on, so a run's
    other random choices stay as they were.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    tag_dropout_rate: float = 0.0

    def apply(self, caption: str, epoch: int, rng: np.random.Generator) -> str:
        """``caption`` as used in ``epoch``, the rules applied with draws from ``rng``."""
        if self.dropout_every_n_epochs and (epoch + 1) % self.dropout_every_n_epochs == 0:
            return ""
        if self.dropout_rate and rng.random() < self.dropout_rate:
            return ""
        if not (self.shuffle or self.tag_dropout_rate):
            return caption
        parts = [p.strip() for p in caption.split(",") if p.strip()]
        fixed, rest = parts[:self.keep_tokens], parts[self.keep_tokens:]
        if self.shuffle:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        if self.tag_dropout_rate:
            rest = [p for p in rest if rng.random() >= self.tag_dropout_rate]
        return ", ".join(fixed + rest)


def item_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator for one item of one epoch (derived, never global: ``sdtune.seeds``)."""
    return derived_rng(seed, epoch, key)


@dataclass
class Example:
    """One image to train on: its metadata key, image and latent-cache paths, caption and bucket."""

    key: str
    image: Path
    latents: Path
    caption: str
    bucket: Reso


@dataclass(frozen=True)
class MaskCounts:
    """With --masked_loss: how many training images have a mask. ``encoded_on_the_fly`` counts the images whose
    cache was missing or stale and was encoded at start-up, without a mask (included in ``without_mask``)."""

    with_mask: int
    without_mask: int
    encoded_on_the_fly: int = 0


class NoMasks(SdtuneError):
    """--masked_loss, and no training image has a cached mask."""


def _no_masks(train_data_dir: str | Path, why: str) -> NoMasks:
    return NoMasks(f"--masked_loss: {why} in {train_data_dir}. Cache masks with sdtune prepare --alpha_mask (the "
                   "images' alpha channels) or --mask_dir DIR (mask images with the images' stems), or train without "
                   "--masked_loss")


@dataclass
class FineTuneData:
    """The images to train on, their captions and buckets. Build with :meth:`from_metadata`."""

    examples: dict[str, Example]
    buckets: AspectBuckets
    repeats: int = 1
    # latents encoded at start-up for images whose cache file is missing (key -> [C, h, w])
    in_memory: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    masks: bool = False  # --masked_loss: batches carry "masks"
    mask_counts: MaskCounts | None = None  # with masks, counted by encode_missing

    @classmethod
    def from_metadata(cls, images: Images, train_data_dir: str | Path, repeats: int = 1, full_path: bool = False,
                      recursive: bool = False, masks: bool = False, require_masks: bool = True) -> "FineTuneData":
        """The prepared images of ``train_data_dir`` (those with a ``train_resolution``), each ``repeats`` times.
        With ``masks`` (--masked_loss) batches carry the cached masks, and, unless ``require_masks`` is false (a
        validation folder), ``NoMasks`` is raised now, before any model loads, when no latent file holds one."""
        if repeats < 1:
            raise SdtuneError(f"--dataset_repeats must be at least 1 (got {repeats})")
        index = KeyIndex(images, full_path)
        examples: dict[str, Example] = {}
        folder = list_images(train_data_dir, recursive)
        coverage = Coverage.of(images, (index.key_for(image) for image in folder))
        for message in coverage.warnings("the metadata (--in_json)", train_data_dir):
            logger.warning(message)
        for image in folder:
            key = index.key_for(image)
            entry = images.get(key)
            if entry is None or "train_resolution" not in entry:
                continue
            w, h = entry["train_resolution"]
            examples[key] = Example(key, image, latent_path(image), build_caption(entry), (int(w), int(h)))
        skipped = sorted(k for k, e in images.items() if "train_resolution" not in e)
        if not examples:
            raise SdtuneError(
                f"no trainable images: none of the images in {train_data_dir} has an entry with train_resolution "
                "in the metadata. Run sdtune prepare first (and check --train_data_dir / --in_json / --full_path)."
            )
        if masks and require_masks and not any(has_mask(ex.latents) for ex in examples.values()):
            raise _no_masks(train_data_dir, f"none of the {len(examples)} prepared images has a cached mask")
        return cls(examples, _repeated_buckets(examples, repeats), repeats, skipped=skipped, masks=masks)

    def split(self, held_out: set[str]) -> tuple["FineTuneData", "FineTuneData"]:
        """(the rest, the ``held_out`` keys): two sets with their own buckets (``--validation_split``)."""
        rest = {k: ex for k, ex in self.examples.items() if k not in held_out}
        out = {k: ex for k, ex in self.examples.items() if k in held_out}
        return (FineTuneData(rest, _repeated_buckets(rest, self.repeats), self.repeats, skipped=self.skipped,
                             masks=self.masks),
                FineTuneData(out, _repeated_buckets(out, 1), 1, masks=self.masks))

    def encode_missing(self, vae, batch_size: int = 4) -> int:
        """Encode (in memory) the images whose latent file is missing, unreadable or stale for this model's VAE
        (see ``latent_cache.cache_staleness``: bucket, VAE fingerprint, image size/mtime, then its hash); returns how
        many. Every such file is named in the log. With ``masks`` the images with a usable mask are counted in
        ``mask_counts`` (those encoded here have none; a changed mask file makes a cache stale)."""
        missing = []
        masked = 0
        vae_print = vae_fingerprint(vae)
        for key, ex in self.examples.items():
            if not ex.latents.is_file():
                missing.append(key)
                continue
            try:
                cached = load_latent_file(ex.latents)
            except LatentFileError as exc:
                logger.warning("%s", exc)
                missing.append(key)
                continue
            reason = cache_staleness(cached, ex.image, ex.bucket, vae_print, check_mask=self.masks)
            if reason is not None:
                logger.warning("%s: stale latent cache (%s); encoding it again (run sdtune prepare to cache it)",
                               ex.latents, reason)
                missing.append(key)
            else:
                masked += cached.mask is not None
        if self.masks:
            self.mask_counts = MaskCounts(masked, len(self.examples) - masked, len(missing))
        for start in range(0, len(missing), batch_size):
            keys = missing[start:start + batch_size]
            by_bucket: dict[Reso, list[str]] = {}
            for key in keys:
                by_bucket.setdefault(self.examples[key].bucket, []).append(key)
            for bucket, group in by_bucket.items():
                crops = []
                for key in group:
                    im = open_image(self.examples[key].image)
                    crops.append(resize_and_crop(im, cover(im.width, im.height, bucket)))
                latents = encode_pixels(vae, to_pixels(np.stack(crops)))
                for key, lat in zip(group, latents):
                    self.in_memory[key] = lat
        return len(missing)

    def check_masks(self) -> MaskCounts:
        """After :meth:`encode_missing`, for --masked_loss: the mask counts, logged when some images have no mask;
        raises ``NoMasks`` when none has one."""
        counts = self.mask_counts
        if counts is None:
            raise ValueError("check_masks needs masks=True and encode_missing first")
        total, encoded = counts.with_mask + counts.without_mask, counts.encoded_on_the_fly
        if not counts.with_mask:
            raise _no_masks(next(iter(self.examples.values())).image.parent,
                            f"no usable mask is left ({encoded} of {total} images had stale or missing caches and "
                            "were encoded at start-up, without masks)")
        if counts.without_mask:
            logger.info("--masked_loss: %d of %d images have a mask; %d train whole (no cached mask%s)",
                        counts.with_mask, total, counts.without_mask,
                        f"; {encoded} encoded at start-up" if encoded else "")
        return counts

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, world_size: int, rank: int
                      ) -> list[tuple[list[str], float]]:
        """This rank's batches of ``epoch``: see :func:`share_batches`."""
        return share_batches(self.buckets.batches(epoch, seed, batch_size), world_size, rank)

    def load_batch(self, bucket_keys: Sequence[str], epoch: int, seed: int,
                   caption_rules: CaptionRules = CaptionRules()) -> dict[str, Any]:
        """One batch: stacked latents (cached, or encoded at start-up), captions after the rules, image keys; with
        ``masks`` also the masks [B, 1, h, w] (mirrored with a mirrored latent; ones where an image has none)."""
        latents, captions, keys, masks = [], [], [], []
        for bucket_key in bucket_keys:
            key = bucket_key.split(_REPEAT_SEP)[0]
            ex = self.examples[key]
            rng = item_rng(seed, epoch, bucket_key)
            if key in self.in_memory:
                lat, mask = self.in_memory[key], None
            else:
                cached = load_latent_file(ex.latents)
                if cached.train_resolution != ex.bucket:  # replaced since the run started
                    raise LatentFileError(f"{ex.latents}: latents for a {cached.train_resolution[0]}x"
                                          f"{cached.train_resolution[1]} bucket; the metadata puts the image in "
                                          f"{ex.bucket[0]}x{ex.bucket[1]}. The file changed during the run: run "
                                          "sdtune prepare again, then resume")
                use_flip = cached.latents_flipped is not None and rng.random() < 0.5
                lat = torch.from_numpy(cached.latents_flipped if use_flip else cached.latents)
                # the mirrored crop's mask is the mirrored mask (exact: bucket widths are multiples of 8)
                mask = cached.mask[:, ::-1] if use_flip and cached.mask is not None else cached.mask
            caption = caption_rules.apply(ex.caption, epoch, rng)
            latents.append(lat)
            captions.append(caption)
            keys.append(key)
            if self.masks:
                masks.append(torch.ones((1, *lat.shape[1:])) if mask is None else torch.from_numpy(mask.copy())[None])
        batch = {"latents": torch.stack(latents), "captions": captions, "keys": keys}
        if self.masks:
            batch["masks"] = torch.stack(masks)
        return batch


def _repeated_buckets(examples: dict[str, Example], repeats: int) -> AspectBuckets:
    """Buckets holding each example ``repeats`` times (as ``<key>\\x00<repeat>``)."""
    return AspectBuckets.from_assignments(
        (f"{key}{_REPEAT_SEP}{r}", ex.bucket) for key, ex in examples.items() for r in range(repeats))


class RunBatches(torch.utils.data.Dataset):
    """This rank's batches for the rest of a run, across epochs, from batch ``start_batch`` of ``start_epoch``; each
    item is a whole batch with its loss weight, epoch and place in the epoch. One loader (and its worker processes)
    serves the whole run: workers start once, not once per epoch. Each epoch's batches are computed where they are
    needed (every worker computes the same, deterministically)."""

    def __init__(self, data: FineTuneData, seed: int, batch_size: int, world_size: int, rank: int,
                 caption_rules: CaptionRules, epochs: int, start_epoch: int = 0, start_batch: int = 0) -> None:
        self.data, self.seed, self.caption_rules = data, seed, caption_rules
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.per_epoch = len(data.epoch_batches(start_epoch, seed, batch_size, world_size, rank))
        self.first = start_epoch * self.per_epoch + start_batch
        self.end = max(epochs, start_epoch + 1) * self.per_epoch
        self._plan: tuple[int, list[tuple[list[str], float]]] | None = None  # the last epoch's batches

    def __len__(self) -> int:
        return max(0, self.end - self.first)

    def batches(self, epoch: int) -> list[tuple[list[str], float]]:
        """This rank's (keys, loss weight) batches of ``epoch`` (the last epoch's are kept)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.data.epoch_batches(epoch, self.seed, self.batch_size, self.world_size,
                                                         self.rank))
        return self._plan[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, position = divmod(self.first + index, self.per_epoch)
        keys, weight = self.batches(epoch)[position]
        batch = self.data.load_batch(keys, epoch, self.seed, self.caption_rules)
        batch.update(weight=weight, epoch=epoch, position=position, last_in_epoch=position == self.per_epoch - 1)
        return batch


def _whole_batch(items: list[Any]) -> Any:
    return items[0]  # each dataset item is a whole batch already


def run_loader(dataset: RunBatches, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches loaded in ``workers`` processes ahead of the training step (0: in the main process); with
    ``pin_memory`` (CUDA) the copies to the GPU do not block."""
    return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers,
                                       collate_fn=_whole_batch, pin_memory=pin_memory)
