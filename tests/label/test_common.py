"""The labeling commands' shared pieces: which images need a label, threaded loading in order, extensions."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from sdtune.data.images import ImageError
from sdtune.label.common import LabelError, LabelReport, iter_batches, normalize_extension, plan_work

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_keep_order_and_carry_failures(workers: int) -> None:
    rng = random.Random(workers)
    threads: set[str] = set()

    def load(i: int) -> int:
        threads.add(threading.current_thread().name)
        time.sleep(rng.random() / 500)  # finish out of order
        if i % 7 == 3:
            raise ImageError(Path(f"{i}.png"), "corrupt")
        return i * 10

    batches = list(iter_batches(list(range(30)), load, batch_size=4, workers=workers))
    assert [i for b in batches for i in b.items] == [i for i in range(30) if i % 7 != 3]
    assert all(d == i * 10 for b in batches for i, d in zip(b.items, b.data))
    assert [i for b in batches for i, _ in b.failed] == [3, 10, 17, 24]
    assert all(len(b.items) == 4 for b in batches[:-1])
    assert (threads == {threading.current_thread().name}) == (workers == 0)


def test_other_loader_errors_are_not_hidden() -> None:
    def load(i: int) -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        list(iter_batches([1, 2, 3], load, batch_size=2, workers=2))


def test_plan_work_skips_labelled_and_refuses_shared_sidecars(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "b.jpg", "c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("done")
    report = LabelReport()
    items = plan_work(tmp_path, False, ".txt", overwrite=False, report=report)
    assert [i.image.name for i in items] == ["b.jpg", "c.webp"]
    assert [i.sidecar.name for i in items] == ["b.txt", "c.txt"]
    assert report.skipped == [tmp_path / "a.png"]
    assert [p.name for p, _ in report.failed] == ["b.png"] and "b.jpg" in report.failed[0][1]
    again = plan_work(tmp_path, False, ".txt", overwrite=True, report=LabelReport())
    assert [i.image.name for i in again] == ["a.png", "b.jpg", "c.webp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelError, match="--recursive"):
        plan_work(tmp_path / "empty", False, ".txt", False, LabelReport())


def test_extensions() -> None:
    assert normalize_extension("txt", "--caption_extension") == ".txt"
    assert normalize_extension(".caption", "--caption_extension") == ".caption"
    for bad in (".", "", "../x"):
        with pytest.raises(LabelError, match="--caption_extension"):
            normalize_extension(bad, "--caption_extension")
