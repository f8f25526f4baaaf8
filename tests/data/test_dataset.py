"""Bucket batches for training: every image once per epoch on every world size, equal steps per rank."""

from __future__ import annotations

import pytest

from sdtune.data.buckets import AspectBuckets
from sdtune.data.dataset import FineTuneData

pytestmark = pytest.mark.unit


def data_with(counts: dict[tuple[int, int], int]) -> FineTuneData:
    assignments = {f"{w}x{h}-{i}\x000": (w, h) for (w, h), n in counts.items() for i in range(n)}
    return FineTuneData(examples={}, buckets=AspectBuckets.from_assignments(assignments))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_every_image_once_per_epoch_and_equal_steps(world, batch):
    data = data_with({(512, 512): 7, (640, 384): 3, (384, 640): 1})
    for epoch in range(3):
        per_rank = [data.epoch_batches(epoch, 11, batch, world, r) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
        seen = [key for rank in per_rank for b, weight in rank if weight > 0 for key in b]
        assert sorted(seen) == sorted(data.buckets._assigned)  # each image exactly once, none dropped
        for step in zip(*per_rank):  # the weights of a step average the real batches' gradients exactly
            assert sum(w for _, w in step) == pytest.approx(world)
        for rank in per_rank:
            for b, _ in rank:
                assert len({data.buckets.bucket_of(k) for k in b}) == 1  # one bucket per batch
                assert len(b) <= batch


def test_a_bucket_smaller_than_the_batch_still_trains():
    data = data_with({(512, 512): 4, (768, 320): 1})
    batches = data.epoch_batches(0, 0, 4, 1, 0)
    assert sorted(len(b) for b, _ in batches) == [1, 4]


def test_batches_depend_on_seed_and_epoch_only():
    data = data_with({(512, 512): 10})
    assert data.epoch_batches(0, 5, 2, 1, 0) == data.epoch_batches(0, 5, 2, 1, 0)
    assert data.epoch_batches(0, 5, 2, 1, 0) != data.epoch_batches(1, 5, 2, 1, 0)
