"""Loss masks cached by ``sdtune prepare --alpha_mask / --mask_dir``: the cached mask is the image's crop, averaged
to latent resolution (computed here by hand with PIL, independently of sdtune's bucket code); the cache is renewed
when the mask changes; flipped latents go with mirrored masks; bad masks are named; batches carry masks only when
asked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.dataset import FineTuneData, NoMasks
from sdtune.data.latent_cache import cache_staleness, load_latent_file, vae_fingerprint
from sdtune.data.metadata import load_metadata
from sdtune.data.prepare import prepare_latents
from sdtune.errors import SdtuneError
from tests.data.conftest import smooth_rgb
from tests.data.prepared import EXPECTED, encode, options

pytestmark = pytest.mark.component


def block_mean(crop: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> the mean of each 8x8 block in [0, 1], written out with loops (no reshape tricks)."""
    h, w = crop.shape
    out = np.zeros((h // 8, w // 8))
    for i in range(h // 8):
        for j in range(w // 8):
            out[i, j] = crop[8 * i:8 * i + 8, 8 * j:8 * j + 8].astype(np.float64).mean() / 255.0
    return out


def expected_mask(mask: Image.Image, name: str) -> np.ndarray:
    """The mask of image ``name`` of EXPECTED as the spec says: PIL Lanczos resize and crop as the image, block
    mean."""
    _, _, resized, crop = EXPECTED[name]
    return block_mean(np.asarray(mask.convert("L").resize(resized, Image.Resampling.LANCZOS).crop(crop)))


def write_rgba(path: Path, size: tuple[int, int], alpha: np.ndarray, seed: int = 0) -> None:
    rgba = np.dstack([smooth_rgb(*size, seed), alpha.astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)


def left_half_transparent(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 2] = 0
    return alpha


def grey_mask(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A mask of greys: a horizontal ramp times a vertical step, so any crop or flip error shows."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    values = 255 * (x / (w - 1)) * np.where(y < h // 3, 0.4, 1.0) + seed
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


@pytest.fixture()
def alpha_dataset(dataset) -> tuple[Path, Path]:
    """The three EXPECTED images, ``small`` and ``wide`` as RGBA with the left half transparent, ``tall`` opaque
    RGB."""
    train, meta = dataset
    for i, name in enumerate(("small", "wide")):
        size = EXPECTED[name][0]
        write_rgba(train / f"{name}.png", size, left_half_transparent(size), seed=i)
    return train, meta


@pytest.fixture()
def mask_dir(dataset, tmp_path) -> Path:
    """Grey masks for ``small`` and ``tall`` (none for ``wide``)."""
    folder = tmp_path / "masks"
    folder.mkdir()
    for name in ("small", "tall"):
        grey_mask(EXPECTED[name][0]).save(folder / f"{name}.png")
    return folder


def test_alpha_mask_is_the_crop_of_the_alpha_at_latent_resolution(alpha_dataset, tiny_vae):
    train, meta = alpha_dataset
    summary = prepare_latents(options(train, meta, alpha_mask=True), vae=tiny_vae)
    assert (summary.encoded, summary.masked, summary.skipped) == (3, 2, [])
    assert load_latent_file(train / "tall.npz").mask is None  # no alpha: no mask
    for name in ("small", "wide"):
        cache = load_latent_file(train / f"{name}.npz")
        with Image.open(train / f"{name}.png") as im:
            expected = expected_mask(im.getchannel("A"), name)
        assert cache.mask.dtype == np.float32 and cache.mask.shape == expected.shape
        torch.testing.assert_close(torch.from_numpy(cache.mask).double(), torch.from_numpy(expected), atol=1e-6,
                                   rtol=0)
        # the latents are still those of the image composited onto white, as without masks
        with Image.open(train / f"{name}.png") as im:
            white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
        _, _, resized, crop = EXPECTED[name]
        pixels = np.asarray(white.resize(resized, Image.Resampling.LANCZOS).crop(crop))
        np.testing.assert_allclose(cache.latents, encode(tiny_vae, pixels), atol=2e-5, rtol=0)
    # small: 50x40 -> 120x96, crop columns 12..108. Its transparent left 25 px become 60, of which the crop keeps
    # 48: 6 latent columns of 0 (without the crop it would be 7.5), the right ones 1.
    mask = load_latent_file(train / "small.npz").mask
    assert np.all(mask[:, :5] == 0) and np.all(mask[:, 7:] == 1) and 0 < mask[0, 6] < 1
    assert 0 < mask[0, 5] < 0.2  # Lanczos rings a little across the edge at column 6


def test_mask_dir_masks_are_read_as_grey_and_images_without_one_have_none(dataset, mask_dir, tiny_vae, caplog):
    train, meta = dataset
    caplog.set_level("INFO")
    summary = prepare_latents(options(train, meta, mask_dir=mask_dir, flip_aug=True), vae=tiny_vae)
    assert (summary.encoded, summary.masked, summary.skipped) == (3, 2, [])
    summary.log()
    assert "2 of 3 prepared images have a loss mask" in caplog.text and "1 have none" in caplog.text
    assert load_latent_file(train / "wide.npz").mask is None
    for name in ("small", "tall"):
        cache = load_latent_file(train / f"{name}.npz")
        with Image.open(mask_dir / f"{name}.png") as im:
            expected = expected_mask(im, name)
        torch.testing.assert_close(torch.from_numpy(cache.mask).double(), torch.from_numpy(expected), atol=1e-6,
                                   rtol=0)
        assert Path(cache.mask_file) == Path(os.path.relpath(mask_dir / f"{name}.png", train))
        assert 0.01 < expected.min() < expected.max() < 0.99 and expected.std() > 0.1  # really grey, really varied


def test_flip_aug_gives_the_mirrored_mask_with_the_mirrored_latent(dataset, mask_dir, tiny_vae):
    train, meta = dataset
    prepare_latents(options(train, meta, mask_dir=mask_dir, flip_aug=True), vae=tiny_vae)
    cache = load_latent_file(train / "small.npz")
    # the mirrored crop's mask, by hand: the mirrored pixel crop, then the block mean
    _, _, resized, crop = EXPECTED["small"]
    with Image.open(mask_dir / "small.png") as im:
        pixels = np.asarray(im.resize(resized, Image.Resampling.LANCZOS).crop(crop))
    mirrored = block_mean(pixels[:, ::-1].copy())
    assert np.abs(mirrored - cache.mask).max() > 0.1  # the check below can fail

    data = FineTuneData.from_metadata(load_metadata(meta.with_name("meta_lat.json")), train, masks=True)
    seen = set()
    for epoch in range(12):
        batch = data.load_batch(["small\x000"], epoch, seed=1)
        flipped = torch.equal(batch["latents"][0], torch.from_numpy(cache.latents_flipped))
        assert flipped or torch.equal(batch["latents"][0], torch.from_numpy(cache.latents))
        expected = mirrored if flipped else block_mean(pixels)
        assert batch["masks"].shape == (1, 1, 12, 12) and batch["masks"].dtype == torch.float32
        torch.testing.assert_close(batch["masks"][0, 0].double(), torch.from_numpy(expected), atol=1e-6, rtol=0)
        seen.add(flipped)
    assert seen == {True, False}


def test_batches_carry_masks_only_when_asked_ones_for_images_without(dataset, mask_dir, tiny_vae):
    train, meta = dataset
    prepare_latents(options(train, meta, mask_dir=mask_dir), vae=tiny_vae)
    images = load_metadata(meta.with_name("meta_lat.json"))
    plain = FineTuneData.from_metadata(images, train)
    assert all("masks" not in plain.load_batch([f"{name}\x000"], 0, 0) for name in ("wide", "small"))
    masked = FineTuneData.from_metadata(images, train, masks=True)
    torch.testing.assert_close(masked.load_batch(["wide\x000"], 0, 0)["masks"], torch.ones(1, 1, 8, 16))
    assert masked.encode_missing(tiny_vae) == 0
    counts = masked.check_masks()
    assert (counts.with_mask, counts.without_mask, counts.encoded_on_the_fly) == (2, 1, 0)


def test_the_cache_is_renewed_when_the_mask_changes(dataset, mask_dir, tiny_vae):
    train, meta = dataset
    opts = options(train, meta, mask_dir=mask_dir, skip_existing=True)
    assert prepare_latents(opts, vae=tiny_vae).encoded == 3
    again = prepare_latents(opts, vae=tiny_vae)
    assert (again.encoded, again.reused, again.masked) == (0, 3, 2)

    grey_mask(EXPECTED["small"][0], seed=30).save(mask_dir / "small.png")  # same size, other greys
    vae_print = vae_fingerprint(tiny_vae)
    stale = cache_staleness(load_latent_file(train / "small.npz"), train / "small.png", (96, 96), vae_print)
    assert stale is not None and "small.png changed since it was cached" in stale and "mask file" in stale
    # a run without --masked_loss keeps the latents: they do not depend on the mask
    assert cache_staleness(load_latent_file(train / "small.npz"), train / "small.png", (96, 96), vae_print,
                           check_mask=False) is None
    renewed = prepare_latents(opts, vae=tiny_vae)
    assert (renewed.encoded, renewed.reused) == (1, 2)
    with Image.open(mask_dir / "small.png") as im:
        torch.testing.assert_close(torch.from_numpy(load_latent_file(train / "small.npz").mask).double(),
                                   torch.from_numpy(expected_mask(im, "small")), atol=1e-6, rtol=0)

    (mask_dir / "small.png").unlink()  # the mask gone: stale for training, and prepare caches no mask
    assert "does not exist" in cache_staleness(load_latent_file(train / "small.npz"), train / "small.png", (96, 96),
                                               vae_print)
    assert prepare_latents(opts, vae=tiny_vae).encoded == 1
    assert load_latent_file(train / "small.npz").mask is None
    # a mask file added where there was none, and --alpha_mask instead of --mask_dir, renew the cache too
    grey_mask(EXPECTED["wide"][0]).save(mask_dir / "wide.png")
    assert prepare_latents(opts, vae=tiny_vae).encoded == 1
    assert prepare_latents(options(train, meta, alpha_mask=True, skip_existing=True), vae=tiny_vae).encoded == 3


def test_training_counts_images_whose_stale_cache_is_encoded_without_a_mask(dataset, mask_dir, tiny_vae, caplog):
    train, meta = dataset
    prepare_latents(options(train, meta, mask_dir=mask_dir), vae=tiny_vae)
    grey_mask(EXPECTED["tall"][0], seed=50).save(mask_dir / "tall.png")
    data = FineTuneData.from_metadata(load_metadata(meta.with_name("meta_lat.json")), train, masks=True)
    caplog.set_level("INFO")
    assert data.encode_missing(tiny_vae) == 1 and "tall.npz: stale latent cache" in caplog.text
    counts = data.check_masks()
    assert (counts.with_mask, counts.without_mask, counts.encoded_on_the_fly) == (1, 2, 1)
    assert "1 of 3 images have a mask; 2 train whole" in caplog.text and "1 encoded at start-up" in caplog.text
    torch.testing.assert_close(data.load_batch(["tall\x000"], 0, 0)["masks"], torch.ones(1, 1, 16, 8))

    (mask_dir / "small.png").write_bytes(b"changed")  # no usable mask left: a clear error
    data = FineTuneData.from_metadata(load_metadata(meta.with_name("meta_lat.json")), train, masks=True)
    data.encode_missing(tiny_vae)
    with pytest.raises(NoMasks, match="no usable mask is left.*--alpha_mask.*--mask_dir"):
        data.check_masks()


def test_masks_asked_for_where_none_is_cached_fail_before_any_model(dataset, tiny_vae):
    train, meta = dataset
    prepare_latents(options(train, meta), vae=tiny_vae)
    with pytest.raises(NoMasks, match=r"none of the 3 prepared images has a cached mask.*prepare --alpha_mask.*"
                                      r"--mask_dir"):
        FineTuneData.from_metadata(load_metadata(meta.with_name("meta_lat.json")), train, masks=True)
    # a validation folder without masks is scored whole
    held = FineTuneData.from_metadata(load_metadata(meta.with_name("meta_lat.json")), train, masks=True,
                                      require_masks=False)
    torch.testing.assert_close(held.load_batch(["wide\x000"], 0, 0)["masks"], torch.ones(1, 1, 8, 16))


def test_bad_masks_skip_their_image_naming_the_file(dataset, mask_dir, tiny_vae):
    train, meta = dataset
    (mask_dir / "small.png").write_bytes(b"not a png")  # corrupt
    grey_mask((41, 90)).save(mask_dir / "tall.png")  # one pixel wider than its image
    grey_mask(EXPECTED["wide"][0]).save(mask_dir / "wide.png")
    grey_mask(EXPECTED["wide"][0]).save(mask_dir / "wide.jpg")  # two masks for one image
    summary = prepare_latents(options(train, meta, mask_dir=mask_dir), vae=tiny_vae)
    reasons = dict((path.name, reason) for path, reason in summary.skipped)
    assert set(reasons) == {"small.png", "tall.png", "wide.png"} and summary.encoded == 0
    assert str(mask_dir / "small.png") in reasons["small.png"] and "cannot be used" in reasons["small.png"]
    assert str(mask_dir / "tall.png") in reasons["tall.png"] and "41x90" in reasons["tall.png"] \
        and "40x90" in reasons["tall.png"]
    assert "2 mask files" in reasons["wide.png"] and str(mask_dir / "wide.jpg") in reasons["wide.png"]
    assert not list(train.glob("*.npz"))  # nothing half-made
    assert all("train_resolution" not in e for e in load_metadata(meta.with_name("meta_lat.json")).values())


@pytest.mark.parametrize("kw, message", [
    (dict(alpha_mask=True, mask_dir="MASKS"), "--alpha_mask and --mask_dir"),
    (dict(mask_dir="TRAIN"), "inside the training folder"),
    (dict(mask_dir="MISSING"), "not a folder"),
])
def test_mask_options_that_cannot_work_are_refused(dataset, mask_dir, kw, message):
    train, meta = dataset
    folders = {"MASKS": mask_dir, "TRAIN": train, "MISSING": mask_dir / "nothing"}
    kw = {k: folders.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(SdtuneError, match=message):
        prepare_latents(options(train, meta, **kw), vae=None)


def test_the_cli_caches_masks_from_a_mask_dir(dataset, mask_dir, tiny_model_dir, caplog):
    from sdtune.cli import main
    from tests.data.prepared import CLI_BUCKET_ARGS

    train, meta = dataset
    caplog.set_level("INFO")
    assert main(["prepare", str(train), str(meta), str(meta.with_name("meta_lat.json")), str(tiny_model_dir),
                 *CLI_BUCKET_ARGS, "--mask_dir", str(mask_dir), "--max_data_loader_n_workers", "0"]) == 0
    assert load_latent_file(train / "small.npz").mask is not None and load_latent_file(train / "wide.npz").mask is None
    assert f"2 of 3 prepared images have a loss mask (--mask_dir {mask_dir})" in caplog.text


def test_workers_make_the_same_masks_as_the_main_process(dataset, mask_dir, tiny_vae):
    train, meta = dataset
    prepare_latents(options(train, meta, mask_dir=mask_dir), vae=tiny_vae)
    first = {n: load_latent_file(train / f"{n}.npz") for n in ("small", "tall")}
    assert prepare_latents(options(train, meta, mask_dir=mask_dir, max_data_loader_n_workers=1), vae=tiny_vae
                           ).masked == 2
    for name, cache in first.items():
        again = load_latent_file(train / f"{name}.npz")
        assert np.array_equal(again.mask, cache.mask) and again.mask_hash == cache.mask_hash


def test_the_mask_fields_are_the_documented_ones(dataset, mask_dir, tiny_vae):
    import sdtune.data.latent_cache as latent_cache

    train, meta = dataset
    prepare_latents(options(train, meta, mask_dir=mask_dir), vae=tiny_vae)
    with np.load(train / "small.npz", allow_pickle=False) as z:
        added = set(z.files) - {"latents", "original_size", "resized_size", "crop_ltrb", "train_resolution",
                                "vae_fingerprint", "cache_key", "format_version", "image_hash", "image_bytes",
                                "image_mtime_ns"}
    assert added == {"mask", "mask_file", "mask_hash", "mask_bytes", "mask_mtime_ns"}
    docs = (Path(__file__).parents[2] / "docs" / "metadata.md").read_text(encoding="utf-8")
    for name in added:
        assert f"\n    {name} " in latent_cache.__doc__ and f"| `{name}`" in docs


def test_recursive_folders_find_masks_in_the_same_sub_folder(dataset, mask_dir, tiny_vae):
    train, meta = dataset
    (train / "sub").mkdir()
    (train / "tall.png").rename(train / "sub" / "tall.png")
    (mask_dir / "sub").mkdir()
    (mask_dir / "tall.png").rename(mask_dir / "sub" / "tall.png")
    summary = prepare_latents(options(train, meta, mask_dir=mask_dir, recursive=True), vae=tiny_vae)
    assert (summary.encoded, summary.masked, summary.skipped) == (3, 2, [])
    cache = load_latent_file(train / "sub" / "tall.npz")
    assert Path(cache.mask_file) == Path(os.path.relpath(mask_dir / "sub" / "tall.png", train / "sub"))
    assert cache_staleness(cache, train / "sub" / "tall.png", (64, 128), vae_fingerprint(tiny_vae)) is None


def save_rotated(displayed: Image.Image, path: Path) -> None:
    """Store ``displayed`` as a camera does: the pixels turned a quarter anticlockwise, with EXIF orientation 6
    ("rotate 90 clockwise to display"), which PIL's ImageOps.exif_transpose undoes."""
    exif = Image.Exif()
    exif[0x0112] = 6
    displayed.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def test_exif_rotated_images_get_the_mask_of_their_displayed_orientation(dataset, mask_dir, tiny_vae):
    """A photo stored sideways with an EXIF orientation: its alpha (--alpha_mask) turns with its pixels, and a
    --mask_dir mask is one drawn on the image as shown (its size after the orientation); the cached mask and the
    latents are those of the displayed image, computed here with PIL's exif_transpose."""
    from PIL import ImageOps

    train, meta = dataset
    size = EXPECTED["wide"][0]  # shown 130x70; stored 70x130
    alpha = left_half_transparent(size)
    shown = Image.fromarray(np.dstack([smooth_rgb(*size, 5), alpha]), "RGBA")
    save_rotated(shown, train / "wide.png")
    with Image.open(train / "wide.png") as im:
        assert im.size == (70, 130)
        upright = ImageOps.exif_transpose(im)
        assert upright.size == size and np.array_equal(np.asarray(upright), np.asarray(shown))  # the reference
    prepare_latents(options(train, meta, alpha_mask=True), vae=tiny_vae)
    cache = load_latent_file(train / "wide.npz")
    expected = expected_mask(shown.getchannel("A"), "wide")
    assert expected[:, :6].max() < 0.05 and expected[:, -6:].min() > 0.95  # the left half off, in the shown image
    torch.testing.assert_close(torch.from_numpy(cache.mask).double(), torch.from_numpy(expected), atol=1e-6, rtol=0)
    white = Image.alpha_composite(Image.new("RGBA", size, (255, 255, 255, 255)), shown).convert("RGB")
    _, _, resized, crop = EXPECTED["wide"]
    pixels = np.asarray(white.resize(resized, Image.Resampling.LANCZOS).crop(crop))
    np.testing.assert_allclose(cache.latents, encode(tiny_vae, pixels), atol=2e-5, rtol=0)

    # --mask_dir: the mask drawn on the shown image is used; one of the stored orientation is refused
    masks = mask_dir.parent / "masks_exif"
    masks.mkdir()
    grey_mask(size).save(masks / "wide.png")
    summary = prepare_latents(options(train, meta, mask_dir=masks), vae=tiny_vae)
    assert summary.skipped == []
    with Image.open(masks / "wide.png") as im:
        expected = expected_mask(im, "wide")
    torch.testing.assert_close(torch.from_numpy(load_latent_file(train / "wide.npz").mask).double(),
                               torch.from_numpy(expected), atol=1e-6, rtol=0)
    grey_mask((70, 130)).save(masks / "wide.png")
    summary = prepare_latents(options(train, meta, mask_dir=masks), vae=tiny_vae)
    reasons = dict((path.name, reason) for path, reason in summary.skipped)
    assert "70x130" in reasons["wide.png"] and "130x70" in reasons["wide.png"]
