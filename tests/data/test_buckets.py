"""Aspect-ratio buckets: generated lists, placement, and the per-epoch batch plan."""

from __future__ import annotations

from collections import Counter

import pytest

from sdtune.data.buckets import AspectBuckets, TooSmall, bucket_table, make_bucket_resolutions, share_batches
from sdtune.errors import SdtuneError

pytestmark = pytest.mark.unit

# Worked by hand: for each width w = 256..1024 step 64, h = min(1024, floor(area_units / (w / 64)) * 64), kept if
# h >= 256, plus (h, w), plus the square. 512x512 = 64 units of 64x64.
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]
# 768x768 = 144 units: w=256 -> 36 units, capped at 1024; ... w=576 -> 16 -> 1024; w=640 -> 14 -> 896; ...
# w=960 -> 9 -> 576; w=1024 -> 9 -> 576.
BUCKETS_768 = [
    (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024), (640, 896),
    (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320), (1024, 384), (1024, 448),
    (1024, 512), (1024, 576),
]


def test_bucket_list_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512
    assert AspectBuckets().resolutions == tuple(BUCKETS_512)


def test_bucket_list_768():
    assert make_bucket_resolutions((768, 768), 256, 1024, 64) == BUCKETS_768
    assert all(w * h <= 768 * 768 for w, h in BUCKETS_768)


def test_heights_under_the_minimum_are_left_out():
    # 512x512 area with sides up to 2048: w=2048 would need h=128 < 256
    resos = make_bucket_resolutions((512, 512), 256, 2048, 64)
    assert min(min(r) for r in resos) == 256 and (1024, 256) in resos and (2048, 128) not in resos


@pytest.mark.parametrize("limits", [
    dict(max_resolution=(512, 512), min_bucket_reso=256, max_bucket_reso=1024, step=60),
    dict(max_resolution=(512, 512), min_bucket_reso=300, max_bucket_reso=1024, step=64),
    dict(max_resolution=(512, 512), min_bucket_reso=1024, max_bucket_reso=512, step=64),
    dict(max_resolution=(256, 256), min_bucket_reso=512, max_bucket_reso=1024, step=64),
])
def test_invalid_limits_raise(limits):
    with pytest.raises(SdtuneError):
        make_bucket_resolutions(**limits)


# (image size) -> (bucket, resized) with upscaling allowed (the default).
PLACEMENTS = {
    (512, 512): ((512, 512), (512, 512)),
    (1024, 1024): ((512, 512), (512, 512)),        # shrunk
    (100, 100): ((512, 512), (512, 512)),          # small images are enlarged to their bucket
    (1000, 500): ((704, 320), (704, 352)),         # aspect 2.0: 704x320 (2.2) is nearer than 640x384 (1.67)
    (500, 1000): ((320, 704), (352, 704)),
    (640, 480): ((576, 448), (597, 448)),          # 4:3 -> 1.29
    (1920, 1080): ((640, 384), (683, 384)),        # 16:9 -> 1.67
    (300, 1200): ((256, 1024), (256, 1024)),       # 1:4 exactly
    (576, 448): ((576, 448), (576, 448)),          # an image of a bucket's size stays as it is
}


@pytest.mark.parametrize("size", list(PLACEMENTS))
def test_placement(size):
    bucket, resized = PLACEMENTS[size]
    p = AspectBuckets().place(*size)
    assert (p.bucket, p.resized) == (bucket, resized)
    # covers the bucket, keeps the aspect ratio (to rounding), crop centred and of the bucket's size
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert min(resized[0] - bucket[0], resized[1] - bucket[1]) == 0
    assert abs(resized[0] / resized[1] - size[0] / size[1]) < 0.01
    left, top, right, bottom = p.crop_ltrb
    assert (right - left, bottom - top) == bucket
    assert left == (resized[0] - bucket[0]) // 2 and top == (resized[1] - bucket[1]) // 2
    assert p.aspect_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


# (image size) -> (bucket, resized) with --bucket_no_upscale.
NO_UPSCALE = {
    (512, 512): ((512, 512), (512, 512)),
    (300, 300): ((256, 256), (300, 300)),          # not enlarged: own bucket, floored to the step
    (400, 300): ((384, 256), (400, 300)),
    (2000, 2000): ((512, 512), (512, 512)),        # larger than the area: shrunk to it
    (640, 480): ((512, 384), (512, 384)),          # shrunk so that the bucket keeps 4:3 (sd-scripts' choice)
    (1000, 500): ((640, 320), (640, 320)),
    (600, 2000): ((256, 832), (256, 853)),
    (1023, 1025): ((512, 512), (512, 513)),
}


@pytest.mark.parametrize("size", list(NO_UPSCALE))
def test_placement_without_upscaling(size):
    bucket, resized = NO_UPSCALE[size]
    buckets = AspectBuckets(no_upscale=True)
    p = buckets.place(*size)
    assert (p.bucket, p.resized) == (bucket, resized)
    assert resized[0] <= size[0] and resized[1] <= size[1]  # never enlarged
    assert bucket[0] * bucket[1] <= buckets.max_area
    assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0


@pytest.mark.parametrize("size", [(50, 40), (63, 600), (30000, 40)])
def test_too_small_without_upscaling(size):
    """Only a side under one step is refused (sd-scripts would make a 0-px bucket of it and fail)."""
    with pytest.raises(TooSmall, match="bucket_reso_steps"):
        AspectBuckets(no_upscale=True).place(*size)
    AspectBuckets().place(*size)  # with upscaling they are placed


# ---------------------------------------------------------------------------------------------- against sd-scripts
# sd-scripts' code, written out here as the reference: library/model_util.py make_bucket_resolutions and
# library/train_util.py BucketManager.select_bucket (its no_upscale branch, with round_to_steps).
def seed_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    import math

    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def seed_select_bucket_no_upscale(image_width, image_height, max_area, reso_steps=64):
    import math

    def round_to_steps(x):
        x = int(x + 0.5)
        return x - x % reso_steps

    aspect_ratio = image_width / image_height
    if image_width * image_height > max_area:
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        b_width_rounded = round_to_steps(resized_width)
        b_height_in_wr = round_to_steps(b_width_rounded / aspect_ratio)
        ar_width_rounded = b_width_rounded / b_height_in_wr
        b_height_rounded = round_to_steps(resized_height)
        b_width_in_hr = round_to_steps(b_height_rounded * aspect_ratio)
        ar_height_rounded = b_width_in_hr / b_height_rounded
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
        else:
            resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
    else:
        resized_size = (image_width, image_height)
    bucket_width = resized_size[0] - resized_size[0] % reso_steps
    bucket_height = resized_size[1] - resized_size[1] % reso_steps
    return (bucket_width, bucket_height), resized_size


@pytest.mark.parametrize("max_resolution", [(512, 512), (600, 600), (768, 768), (512, 768), (700, 500), (1000, 1000)])
def test_bucket_list_as_sd_scripts(max_resolution):
    max_size = max(1024, *max_resolution)
    assert make_bucket_resolutions(max_resolution, 256, max_size, 64) == \
        seed_make_bucket_resolutions(max_resolution, 256, max_size, 64)


NO_UPSCALE_SIZES = [(300, 200), (200, 300), (255, 600), (200, 200), (64, 64), (3000, 300), (4000, 500), (500, 4000),
                    (2000, 100), (1024, 1024), (1920, 1080), (777, 333), (6000, 4000), (513, 511), (100, 1000)]


@pytest.mark.parametrize("max_resolution", [(512, 512), (600, 600), (768, 768)])
def test_no_upscale_keeps_every_image_sd_scripts_trains(max_resolution):
    buckets = AspectBuckets(max_resolution=max_resolution, no_upscale=True)
    for size in NO_UPSCALE_SIZES:
        bucket, resized = seed_select_bucket_no_upscale(*size, max_resolution[0] * max_resolution[1])
        p = buckets.place(*size)  # never TooSmall for an image sd-scripts trains
        assert (p.bucket, p.resized) == (bucket, resized), size


def _assigned(n: int, sizes=((512, 512), (640, 384), (384, 640), (1024, 256))) -> AspectBuckets:
    buckets = AspectBuckets()
    for i in range(n):
        buckets.assign(f"img{i:03d}", *sizes[(i * 7) % len(sizes)] if i % 5 else (1000, 500))
    return buckets


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch_size", [(1, 1), (7, 2), (23, 4), (50, 3), (64, 8)])
def test_every_image_once_per_epoch_for_any_world_size(world_size, n, batch_size):
    buckets = _assigned(n)
    keys = {f"img{i:03d}" for i in range(n)}
    for epoch in range(3):
        batches = buckets.batches(epoch, seed=1234, batch_size=batch_size)
        # the global order holds every image exactly once, batches of one bucket, none larger than batch_size
        flat = [k for batch in batches for k in batch]
        assert Counter(flat) == Counter(keys)
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            assert len({buckets.bucket_of(k) for k in batch}) == 1
        # dealt to the ranks: the same number of batches each; the weighted ones hold every image exactly once
        per_rank = [share_batches(batches, world_size, rank) for rank in range(world_size)]
        assert len({len(r) for r in per_rank}) == 1
        seen = Counter(k for r in per_rank for batch, weight in r if weight > 0 for k in batch)
        assert seen == Counter(keys)  # nothing dropped, nothing twice
        # stride sharding of one shared list: rank 0 starts with the first batch (or its first half)
        assert per_rank[0][0][0] == batches[0][:len(per_rank[0][0][0])]


def test_batches_are_deterministic_and_change_with_epoch_and_seed():
    buckets = _assigned(40)
    a = buckets.batches(epoch=0, seed=1, batch_size=4)
    assert a == _assigned(40).batches(epoch=0, seed=1, batch_size=4)
    assert a != buckets.batches(epoch=1, seed=1, batch_size=4)
    assert a != buckets.batches(epoch=0, seed=2, batch_size=4)
    # insertion order does not matter
    reordered = AspectBuckets.from_assignments(
        {k: buckets.bucket_of(k) for k in sorted((f"img{i:03d}" for i in range(40)), reverse=True)})
    assert reordered.batches(epoch=0, seed=1, batch_size=4) == a


def test_small_bucket_yields_a_smaller_batch_and_more_ranks_than_batches():
    buckets = AspectBuckets.from_assignments({"a": (512, 512), "b": (512, 512), "c": (256, 1024)})
    batches = buckets.batches(0, 0, batch_size=4)
    assert sorted(map(sorted, batches)) == [["a", "b"], ["c"]]
    assert all(len(share_batches(batches, 4, r)) == 1 for r in range(4))
    assert AspectBuckets().batches(0, 0, 4) == []


def test_uneven_single_images_pad_with_zero_weight_instead_of_hanging():
    shares = [share_batches([["a"], ["b"], ["c"]], 2, r) for r in range(2)]
    assert shares[0] == [(["a"], 1.0), (["c"], 2.0)]
    assert shares[1] == [(["b"], 1.0), (["a"], 0.0)]  # runs a copy so the collectives line up, learns nothing


def test_splitting_keeps_images_unique():
    shares = [share_batches([["a", "b"], ["c", "d"], ["e"]], 2, r) for r in range(2)]
    keys = [k for share in shares for b, w in share for k in b]
    assert sorted(keys) == list("abcde") and all(w == 1.0 for share in shares for _, w in share)


def test_table_lists_buckets_counts_and_total():
    buckets = _assigned(10)
    table = buckets.table()
    counts = buckets.counts()
    assert sum(counts.values()) == 10
    for (w, h), n in counts.items():
        assert any(line.split()[:1] == [f"{w}x{h}"] and line.split()[-1] == str(n) for line in table.splitlines())
    assert f"{len(counts)} buckets" in table and table.splitlines()[-2].split()[-1] == "10"
    assert "mean aspect ratio error" in table
    assert "0 buckets" in bucket_table({})
