"""What ``sdtune caption`` and ``sdtune tag`` share: which images need a label, loading them in background threads
while the model runs, per-file failures, and the closing summary.

Why threads and not a ``torch.utils.data.DataLoader`` with worker processes: decoding (PIL) and resizing release the
GIL, so a few threads keep up with the model, and threads start instantly on every platform, whereas worker
processes on Windows and macOS re-import torch (seconds) and need everything they touch to be picklable.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from sdtune.data import metadata
from sdtune.data.images import ImageError, list_images
from sdtune.errors import SdtuneError

T = TypeVar("T")
R = TypeVar("R")

#: Background loaders used when ``--max_data_loader_n_workers`` is not given (more rarely helps on a CPU-bound box).


class LabelError(SdtuneError):
    """Bad labeling options or a model that cannot be found or read."""


@dataclass(frozen=True)
class WorkItem:
    """One image to label and the sidecar file its label goes to."""

    image: Path
    sidecar: Path


@dataclass
class LabelReport:
    """What a labeling run did. ``model_seconds`` is time spent in the model's forward/generate calls and
    ``wall_seconds`` the time of the labeling loop (model loading excluded), so their ratio says how busy the
    model was."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    model_seconds: float = 0.0
    wall_seconds: float = 0.0
    load_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """The run's exit status: 1 when any image failed, else 0."""
        return 1 if self.failed else 0

    def log_summary(self, logger: logging.Logger, verb: str, skip_reason: str) -> None:
        """Log one closing line, then each failed file with its reason (the user fixes those)."""
        parts = [f"{len(self.done)} {verb}", f"{len(self.skipped)} skipped ({skip_reason})" if self.skipped else "",
                 f"{len(self.failed)} failed" if self.failed else ""]
        line = ", ".join(p for p in parts if p)
        if self.wall_seconds > 0 and self.done:
            line += (f" in {self.wall_seconds:.1f} s ({len(self.done) / self.wall_seconds:.2f} images/s, "
                     f"model busy {100 * self.model_seconds / self.wall_seconds:.0f}% of the time)")
        if self.failed:
            logger.error("%s:\n%s", line, "\n".join(f"  {path}: {reason}" for path, reason in self.failed))
        else:
            logger.info("%s", line)


def normalize_extension(extension: str, option: str) -> str:
    """:func:`sdtune.data.metadata.normalize_extension` (the one rule), raising ``LabelError``."""
    return metadata.normalize_extension(extension, option, LabelError)


def sidecar_path(image: Path, extension: str) -> Path:
    """``photo.png`` -> ``photo.txt``: the label file sits next to its image with the image's stem, as sd-scripts
    and the merge step expect."""
    return image.with_name(image.stem + extension)


def plan_work(
    folder: Path, recursive: bool, extension: str, overwrite: bool, report: LabelReport,
    relabel_existing: bool = False,
) -> list[WorkItem]:
    """The images to label, in path order. Images whose sidecar exists are skipped (recorded in ``report``) unless
    ``overwrite`` or ``relabel_existing`` (``tag --append_tags`` merges into existing files).

    Two images with the same stem (``a.png`` and ``a.jpg``) would write the same sidecar: the first in path order
    is labeled, the others are reported as failed so that the user renames them rather than losing a label.
    """
    images = list_images(folder, recursive=recursive)
    if not images:
        hint = "" if recursive else " (add --recursive to look in sub-folders)"
        raise LabelError(f"no images in {folder}{hint}")
    owner: dict[Path, Path] = {}
    items: list[WorkItem] = []
    for image in images:
        sidecar = sidecar_path(image, extension)
        if sidecar in owner:
            report.failed.append((image, f"its label file {sidecar.name} would also be {owner[sidecar].name}'s; "
                                         "rename one of the two images"))
            continue
        owner[sidecar] = image
        if sidecar.exists() and not (overwrite or relabel_existing):
            report.skipped.append(image)
            continue
        items.append(WorkItem(image, sidecar))
    return items


def resolve_workers(workers: int) -> int:
    """The ``--max_data_loader_n_workers`` value, checked: threads decoding images while the model runs."""
    if workers < 0:
        raise LabelError(f"--max_data_loader_n_workers must be 0 or more, got {workers}")
    return workers


@dataclass
class Batch(Generic[T, R]):
    """Items that loaded (with what ``load`` returned) and those whose image could not be used."""

    items: list[T] = field(default_factory=list)
    data: list[R] = field(default_factory=list)
    failed: list[tuple[T, ImageError]] = field(default_factory=list)


def _load_one(load: Callable[[T], R], item: T) -> R | ImageError:
    # A broken image is the user's data, reported per file; any other exception is a bug and propagates.
    try:
        return load(item)
    except ImageError as exc:
        return exc


def iter_batches(items: Sequence[T], load: Callable[[T], R], batch_size: int, workers: int) -> Iterator[Batch[T, R]]:
    """Batches of up to ``batch_size`` loaded items, in order, loaded by ``workers`` threads ahead of the consumer
    (``workers == 0`` loads in the calling thread). Items whose ``load`` raised ``ImageError`` travel in ``failed``.
    """
    if workers == 0:
        results: Iterator[R | ImageError] = (_load_one(load, item) for item in items)
        yield from _group(items, results, batch_size)
        return
    # Bounded read-ahead: enough to keep every thread busy while the model works on the current batch, without
    # decoding the whole folder into memory.
    ahead = 2 * batch_size + workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtune-load") as pool:
        pending: deque[Future[R | ImageError]] = deque()
        position = 0

        def results_in_order() -> Iterator[R | ImageError]:
            nonlocal position
            while pending or position < len(items):
                while position < len(items) and len(pending) < ahead:
                    pending.append(pool.submit(_load_one, load, items[position]))
                    position += 1
                yield pending.popleft().result()

        try:
            yield from _group(items, results_in_order(), batch_size)
        finally:
            # The consumer stopped early (an exception, Ctrl-C): do not decode images nobody will use.
            for future in pending:
                future.cancel()


def _group(items: Sequence[T], results: Iterator[R | ImageError], batch_size: int) -> Iterator[Batch[T, R]]:
    batch: Batch[T, R] = Batch()
    for item, result in zip(items, results):
        if isinstance(result, ImageError):
            batch.failed.append((item, result))
        else:
            batch.items.append(item)
            batch.data.append(result)
        if len(batch.items) == batch_size:
            yield batch
            batch = Batch()
    if batch.items or batch.failed:
        yield batch


class Stopwatch:
    """Accumulates the seconds spent inside ``with stopwatch:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


def split_list(text: str | None) -> list[str]:
    """``"a, b,,c "`` -> ``["a", "b", "c"]`` (sd-scripts takes tag lists as one comma-separated string)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``), for error messages."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or env
