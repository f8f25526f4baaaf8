"""The latent cache files: the documented keys, atomic writes, clear errors for damaged files, the reading path
training uses, and training noticing caches made stale by an edited image or another VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.data.latent_cache import LatentFileError, latent_files, latent_path, load_latent_file
from sdtune.data.metadata import load_metadata
from sdtune.data.prepare import prepare_latents
from tests.data.prepared import EXPECTED, encode, expected_crop, options

pytestmark = pytest.mark.component


def test_npz_keys_are_the_documented_ones(dataset, tiny_vae):
    train, meta = dataset
    prepare_latents(options(train, meta), vae=tiny_vae)
    with np.load(train / "wide.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(["latents", "original_size", "resized_size", "crop_ltrb", "train_resolution",
                                          "vae_fingerprint", "cache_key", "format_version", "image_hash",
                                          "image_bytes", "image_mtime_ns"])  # no flip: no mirror
    assert load_latent_file(train / "wide.npz").latents_flipped is None


def test_an_interrupted_write_leaves_no_half_files(dataset, tiny_vae, monkeypatch):
    train, meta = dataset
    calls = []

    def savez_then_interrupt(path, **arrays):
        calls.append(path)
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("sdtune.data.latent_cache.np.savez", savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(options(train, meta), vae=tiny_vae)
    assert calls and not list(train.glob("*.npz")) and not list(train.glob(".*"))
    assert not meta.with_name("meta_lat.json").exists()


def test_damaged_latent_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"nope")
    with pytest.raises(LatentFileError, match="damaged"):
        load_latent_file(tmp_path / "x.npz")
    with pytest.raises(LatentFileError, match="does not exist"):
        load_latent_file(tmp_path / "y.npz")
    assert latent_path(tmp_path / "a.b.png") == tmp_path / "a.b.npz"


def test_the_training_side_reading_path(dataset, tiny_vae):
    """What docs/metadata.md shows the training code doing, end to end."""
    from sdtune.data.buckets import AspectBuckets

    train, meta = dataset
    for name in ("wide2", "wide3"):  # two more in the 128x64 bucket, so that a batch holds several images
        (train / f"{name}.png").write_bytes((train / "wide.png").read_bytes())
    prepare_latents(options(train, meta, flip_aug=True), vae=tiny_vae)
    images = load_metadata(meta.with_name("meta_lat.json"))
    files = latent_files(train, images)
    assert set(files) == {"wide", "wide2", "wide3", "small", "tall"}
    buckets = AspectBuckets.from_assignments({k: tuple(images[k]["train_resolution"]) for k in files})
    seen = []
    for batch in buckets.batches(epoch=0, seed=42, batch_size=4):
        stacked = np.stack([load_latent_file(files[k]).latents for k in batch])
        w, h = images[batch[0]]["train_resolution"]
        assert stacked.shape == (len(batch), 4, h // 8, w // 8)
        seen += batch
    assert sorted(seen) == sorted(files)


# ---------------------------------------------------------------------------------- training notices stale caches
def _fine_tune_data(train: Path, meta: Path):
    from sdtune.data.dataset import FineTuneData

    return FineTuneData.from_metadata(load_metadata(meta.with_name("meta_lat.json")), train)


@pytest.mark.parametrize("old_file", [False, True], ids=["current", "without-image-fields"])
def test_training_reencodes_caches_of_edited_images_and_of_another_vae(dataset, tiny_vae, make_image, caplog,
                                                                       old_file):
    import os

    from sdtune.models.tiny import build_tiny

    train, meta = dataset
    prepare_latents(options(train, meta, flip_aug=old_file), vae=tiny_vae)
    if old_file:  # as prepare wrote them before the image fields existed: validity through cache_key alone
        for npz in train.glob("*.npz"):
            with np.load(npz, allow_pickle=False) as z:
                kept = {k: z[k] for k in z.files if not k.startswith("image_")}
            np.savez(npz, **kept)
    assert _fine_tune_data(train, meta).encode_missing(tiny_vae) == 0

    st = (train / "wide.png").stat()
    os.utime(train / "wide.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    assert _fine_tune_data(train, meta).encode_missing(tiny_vae) == 0

    make_image(train / "small.png", 50, 40, seed=9)  # edited: same size, other pixels
    caplog.set_level("WARNING")
    data = _fine_tune_data(train, meta)
    assert data.encode_missing(tiny_vae) == 1
    assert "small.npz: stale latent cache" in caplog.text and "changed since it was cached" in caplog.text
    _, bucket, resized, crop = EXPECTED["small"]
    reference = encode(tiny_vae, expected_crop(train / "small.png", resized, crop))  # the new image, not the cache
    torch.testing.assert_close(data.in_memory["small"], torch.from_numpy(reference), atol=2e-5, rtol=0)

    caplog.clear()
    other = build_tiny("sd1", seed=5).vae
    assert _fine_tune_data(train, meta).encode_missing(other) == 3
    assert caplog.text.count("another VAE") == 3
