"""Aspect-ratio buckets (NovelAI's method, as sd-scripts uses it): pure and seedable, no I/O.

Instead of centre-cropping every image to a square, images are grouped by aspect ratio into a few resolutions of
about the same area, and each batch holds images of one resolution.

* **Generation** (``make_bucket_resolutions``): for every width ``w`` from ``min_bucket_reso`` to
  ``max_bucket_reso`` in steps of ``bucket_reso_steps``, the tallest height that keeps ``w * h`` within the
  area of ``max_resolution`` (also a multiple of the step, at most ``max_bucket_reso``), if it is at least
  ``min_bucket_reso``; then the same with width and height swapped, plus the square of the same area
  (NovelAI/novelai-aspect-ratio-bucketing bucketmanager.py; sd-scripts library/model_util.py
  ``make_bucket_resolutions``).
* **Placement** (``AspectBuckets.place``): an image goes to the bucket whose aspect ratio is nearest its own (a
  bucket of exactly its size wins a tie), is resized (keeping its aspect ratio) to the smallest size covering the
  bucket, and centre-cropped to it. Small images are therefore enlarged.
* **No upscaling** (``no_upscale=True``, ``--bucket_no_upscale``), as sd-scripts does it: an image is never
  enlarged. It is shrunk only when it is larger than the area of ``max_resolution``; its bucket is its (shrunk)
  size floored to the step, so every image gets a bucket of its own shape and buckets are created as needed.
  ``min_bucket_reso`` and ``max_bucket_reso`` do not apply (sd-scripts ignores them in this mode, and an image it
  trains must not be dropped): a 300x200 image gets 256x192, a 4000x500 one 1024x128. Only an image with a side
  under one step is refused (``TooSmall``): its bucket would have a side of 0 px.
* **Batches** (``AspectBuckets.batches``): one epoch's batches, one bucket each, every image in exactly one; the
  same list on every rank.
* **Sharding** (``share_batches``): ranks take that list by stride; when its length does not divide, the largest
  batches are split, so every rank runs the same number of steps and no image is seen twice (see there).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from sdtune.errors import SdtuneError

Reso = tuple[int, int]  # (width, height)


class TooSmall(SdtuneError):
    """An image too small for the smallest bucket when upscaling is off."""


def make_bucket_resolutions(
    max_resolution: Reso = (512, 512), min_bucket_reso: int = 256, max_bucket_reso: int = 1024, step: int = 64
) -> list[Reso]:
    """The predefined bucket resolutions, sorted by width then height (see the module docstring).

    As sd-scripts' library/model_util.py ``make_bucket_resolutions``: the area is that of ``max_resolution`` as
    given (600,600 bounds buckets by 360000 px, not by 576x576), and each height is floored to the step.
    """
    check_bucket_limits(max_resolution, min_bucket_reso, max_bucket_reso, step)
    max_area = max_resolution[0] * max_resolution[1]
    resos: set[Reso] = set()
    side = math.isqrt(max_area) // step * step
    resos.add((side, side))
    for width in range(min_bucket_reso, max_bucket_reso + 1, step):
        height = min(max_bucket_reso, max_area // width // step * step)
        if height >= min_bucket_reso:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def check_bucket_limits(max_resolution: Reso, min_bucket_reso: int, max_bucket_reso: int, step: int) -> None:
    """Raise ``SdtuneError`` for limits that give no buckets or buckets the VAE cannot take."""
    if step <= 0 or step % 8:
        raise SdtuneError(f"--bucket_reso_steps must be a positive multiple of 8 (the VAE's downscale), not {step}")
    if len(max_resolution) != 2 or min(max_resolution) < step:
        raise SdtuneError(f"--max_resolution {max_resolution} must be two sizes of at least {step}, like 512,512")
    if min_bucket_reso % step or max_bucket_reso % step:
        raise SdtuneError(f"--min_bucket_reso ({min_bucket_reso}) and --max_bucket_reso ({max_bucket_reso}) must be "
                          f"multiples of --bucket_reso_steps ({step})")
    if not 0 < min_bucket_reso <= max_bucket_reso:
        raise SdtuneError(f"--min_bucket_reso ({min_bucket_reso}) must be positive and at most --max_bucket_reso "
                          f"({max_bucket_reso})")
    if min_bucket_reso * min_bucket_reso > max_resolution[0] * max_resolution[1]:
        raise SdtuneError(f"--min_bucket_reso {min_bucket_reso} squared is more than the area of --max_resolution "
                          f"{max_resolution[0]},{max_resolution[1]}: no bucket fits; lower --min_bucket_reso")


@dataclass(frozen=True)
class Placement:
    """Where an image goes: its bucket, the size it is resized to and the crop box (in resized pixels)."""

    bucket: Reso
    resized: Reso
    crop_ltrb: tuple[int, int, int, int]
    aspect_error: float  # bucket aspect ratio minus image aspect ratio


def _centre_crop(resized: Reso, bucket: Reso) -> tuple[int, int, int, int]:
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return left, top, left + bucket[0], top + bucket[1]


def cover(width: int, height: int, bucket: Reso) -> Placement:
    """Resize a ``width`` x ``height`` image to cover ``bucket`` and centre-crop it: the side that is relatively
    shorter matches exactly, the other overhangs."""
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return Placement(bucket, resized, _centre_crop(resized, bucket), bucket[0] / bucket[1] - width / height)


@dataclass
class AspectBuckets:
    """Bucket resolutions for given limits, and the images assigned to them (by key).

    ``place`` is pure; ``assign`` / ``add`` record an image; ``batches`` gives a deterministic epoch of batches.
    """

    max_resolution: Reso = (512, 512)
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    no_upscale: bool = False
    resolutions: tuple[Reso, ...] = field(init=False)
    _assigned: dict[str, Reso] = field(init=False, default_factory=dict, repr=False)
    _errors: dict[str, float] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.max_resolution = (int(self.max_resolution[0]), int(self.max_resolution[1]))
        self.resolutions = tuple(make_bucket_resolutions(
            self.max_resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps))
        self._aspects = np.array([w / h for w, h in self.resolutions])

    @property
    def max_area(self) -> int:
        """The pixel area of ``max_resolution``, which bounds every bucket."""
        return self.max_resolution[0] * self.max_resolution[1]

    # ---------------------------------------------------------------------------------------------- placement
    def place(self, width: int, height: int) -> Placement:
        """The bucket, resized size and crop box of an image of ``width`` x ``height`` (EXIF-oriented) pixels.

        Raises ``TooSmall`` with ``no_upscale`` when the image cannot fill the smallest allowed bucket side.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, not {width}x{height}")
        aspect = width / height
        if self.no_upscale:
            return self._place_no_upscale(width, height, aspect)
        if (width, height) in self.resolutions:
            bucket = (width, height)
        else:
            bucket = self.resolutions[int(np.abs(self._aspects - aspect).argmin())]
        return cover(width, height, bucket)

    def _place_no_upscale(self, width: int, height: int, aspect: float) -> Placement:
        """sd-scripts' no-upscale placement (library/train_util.py ``BucketManager.select_bucket``): shrink only an
        image larger than the area of ``max_resolution``; the bucket is the (shrunk) size floored to the step.
        ``min_bucket_reso`` / ``max_bucket_reso`` do not apply, as in sd-scripts, so every image it trains is kept
        (a 300x200 image gets 256x192). Only an image with a side under one step is refused: its bucket would have
        a side of 0 px."""
        step = self.bucket_reso_steps
        if width * height > self.max_area:
            target_w = math.sqrt(self.max_area * aspect)
            resized = self._shrunk_size(target_w, self.max_area / target_w, aspect)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if min(bucket) < step:
            raise TooSmall(f"{width}x{height} is too small for --bucket_no_upscale: its bucket would be "
                           f"{bucket[0]}x{bucket[1]} (a side under --bucket_reso_steps {step}); allow upscaling, "
                           "or lower --bucket_reso_steps")
        return Placement(bucket, resized, _centre_crop(resized, bucket), bucket[0] / bucket[1] - aspect)

    def _shrunk_size(self, target_w: float, target_h: float, aspect: float) -> Reso:
        """sd-scripts' choice (library/train_util.py ``BucketManager.select_bucket``): make either the width or
        the height a multiple of the step, whichever leaves the bucket's aspect ratio nearer the image's, and
        size the other side to keep the image's aspect ratio."""
        step = self.bucket_reso_steps

        def to_step(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        w_rounded = to_step(target_w)
        h_for_w = to_step(w_rounded / aspect)
        h_rounded = to_step(target_h)
        w_for_h = to_step(h_rounded * aspect)
        error_w = abs(w_rounded / h_for_w - aspect) if h_for_w else math.inf
        error_h = abs(w_for_h / h_rounded - aspect) if h_rounded else math.inf
        if error_w < error_h:
            return max(1, w_rounded), max(1, int(w_rounded / aspect + 0.5))
        return max(1, int(h_rounded * aspect + 0.5)), max(1, h_rounded)

    # ---------------------------------------------------------------------------------------------- assignment
    def assign(self, key: str, width: int, height: int) -> Placement:
        """``place`` the image and record ``key`` in its bucket."""
        placement = self.place(width, height)
        self._assigned[key] = placement.bucket
        self._errors[key] = placement.aspect_error
        return placement

    def add(self, key: str, bucket: Reso) -> None:
        """Record ``key`` in a known bucket (training: the ``train_resolution`` that ``prepare`` wrote)."""
        self._assigned[key] = (int(bucket[0]), int(bucket[1]))

    @classmethod
    def from_assignments(cls, assignments: Mapping[str, Reso] | Iterable[tuple[str, Reso]], **limits) -> AspectBuckets:
        """Buckets holding the given ``key -> bucket`` assignments (as the metadata's train_resolution says)."""
        buckets = cls(**limits)
        items = assignments.items() if isinstance(assignments, Mapping) else assignments
        for key, bucket in items:
            buckets.add(key, bucket)
        return buckets

    def __len__(self) -> int:
        return len(self._assigned)

    def bucket_of(self, key: str) -> Reso:
        """The bucket ``key`` was assigned to."""
        return self._assigned[key]

    def counts(self) -> dict[Reso, int]:
        """Images per bucket, for every bucket in use, sorted by resolution."""
        return dict(sorted(Counter(self._assigned.values()).items()))

    def mean_aspect_error(self) -> float | None:
        """Mean absolute aspect-ratio error of the images placed with ``assign`` (None when there are none)."""
        return float(np.mean(np.abs(list(self._errors.values())))) if self._errors else None

    def table(self) -> str:
        """The bucket table of the assigned images (see :func:`bucket_table`)."""
        return bucket_table(self.counts(), self.mean_aspect_error())

    # ---------------------------------------------------------------------------------------------- batches
    def batches(self, epoch: int, seed: int, batch_size: int) -> list[list[str]]:
        """One epoch's batches (lists of image keys, all of one bucket), the same on every rank for the same
        arguments; ranks take their shares with :func:`share_batches`.

        Each bucket's images (sorted by key, so insertion order does not matter) are shuffled and cut into batches
        of ``batch_size``; a bucket's last batch may be smaller (nothing is dropped). Then the list of all batches
        is shuffled with the same generator, so that buckets are mixed. The generator is derived from
        ``(seed, epoch)``: no global random state is read or changed.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        rng = np.random.default_rng([seed, epoch])
        by_bucket: dict[Reso, list[str]] = {}
        for key in sorted(self._assigned):
            by_bucket.setdefault(self._assigned[key], []).append(key)
        batches: list[list[str]] = []
        for bucket in sorted(by_bucket):
            keys = by_bucket[bucket]
            order = rng.permutation(len(keys))
            shuffled = [keys[i] for i in order]
            batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def share_batches(batches: list[list[str]], world_size: int, rank: int) -> list[tuple[list[str], float]]:
    """Deal one epoch's batches to ranks by stride, every rank getting the same number, as (keys, loss weight).

    Every rank must take the same number of steps (one that finished early would hang the others at the next
    gradient all-reduce). When the count does not divide, the largest batches are split in two, so no image is
    dropped and none is seen twice in the epoch. When every batch is a single image and the count still does not
    divide, the ranks left without a batch in the last step run a copy of another with loss weight 0, and the
    real batches of that step get weight ``world_size / real batches``: the averaged gradient is then exactly
    the mean over the real batches.
    """
    batches = [list(b) for b in batches]
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            break
        whole = batches[largest]
        batches[largest: largest + 1] = [whole[: len(whole) // 2], whole[len(whole) // 2:]]
    real = len(batches)
    last_step_real = real % world_size or world_size
    steps = math.ceil(real / world_size)
    out: list[tuple[list[str], float]] = []
    for step in range(steps):
        index = step * world_size + rank
        if index < real:
            weight = world_size / last_step_real if step == steps - 1 else 1.0
            out.append((batches[index], weight))
        else:
            out.append((batches[index % real], 0.0))
    return out


def bucket_table(counts: Mapping[Reso, int], mean_aspect_error: float | None = None) -> str:
    """A text table of buckets and their image counts (printed at the end of ``prepare``)."""
    rows = [("bucket", "aspect", "images")]
    rows += [(f"{w}x{h}", f"{w / h:.3f}", str(n)) for (w, h), n in counts.items()]
    total = sum(counts.values())
    widths = [max(len(r[i]) for r in rows + [("", "", str(total))]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    out = [f"{rows[0][0]:<{widths[0]}}  {rows[0][1]:>{widths[1]}}  {rows[0][2]:>{widths[2]}}", line]
    out += [f"{b:<{widths[0]}}  {a:>{widths[1]}}  {n:>{widths[2]}}" for b, a, n in rows[1:]]
    out.append(line)
    out.append(f"{f'{len(counts)} buckets':<{widths[0]}}  {'':>{widths[1]}}  {total:>{widths[2]}}")
    if mean_aspect_error is not None:
        out.append(f"mean aspect ratio error: {mean_aspect_error:.4f}")
    return "\n".join(out)
