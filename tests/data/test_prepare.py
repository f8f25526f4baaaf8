"""sdtune prepare: buckets in the metadata, latent files that hold the right pixels, skipping what is valid, bad
input. The cache format itself: test_latent_cache.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.data.latent_cache import (
    LATENT_FORMAT_VERSION,
    LatentFileError,
    latent_files,
    load_latent_file,
    vae_fingerprint,
)
from sdtune.data.metadata import load_metadata, save_metadata
from sdtune.data.prepare import PrepareOptions, prepare_latents
from sdtune.errors import SdtuneError
from tests.data.prepared import BUCKET_ARGS, CLI_BUCKET_ARGS, EXPECTED, encode, expected_crop, options

pytestmark = pytest.mark.component


def test_latents_hold_the_resized_and_cropped_image_and_its_mirror(dataset, tiny_vae):
    train, meta = dataset
    summary = prepare_latents(options(train, meta, flip_aug=True, batch_size=2), vae=tiny_vae)
    assert (summary.encoded, summary.reused, summary.skipped) == (3, 0, [])
    images = load_metadata(meta.with_name("meta_lat.json"))
    for name, (size, bucket, resized, crop) in EXPECTED.items():
        assert images[name] == {"caption": f"a picture of {name}", "train_resolution": list(bucket)}
        cache = load_latent_file(train / f"{name}.npz")
        assert cache.latents.dtype == np.float32 and cache.latents.shape == (4, bucket[1] // 8, bucket[0] // 8)
        assert (cache.original_size, cache.train_resolution, cache.resized_size, cache.crop_ltrb) == \
            (size, bucket, resized, crop)
        assert cache.format_version == LATENT_FORMAT_VERSION and cache.vae_fingerprint == vae_fingerprint(tiny_vae)
        pixels = expected_crop(train / f"{name}.png", resized, crop)
        np.testing.assert_allclose(cache.latents, encode(tiny_vae, pixels), atol=2e-5, rtol=0)
        np.testing.assert_allclose(cache.latents_flipped, encode(tiny_vae, pixels[:, ::-1]), atol=2e-5, rtol=0)
        # the checks above can fail: a crop one pixel off, or an unflipped mirror, gives other latents
        shifted = expected_crop(train / f"{name}.png", (resized[0] + 2, resized[1] + 2), crop)
        assert np.abs(encode(tiny_vae, shifted) - cache.latents).max() > 1e-3
        assert np.abs(cache.latents_flipped - cache.latents).max() > 1e-3
    assert summary.bucket_counts == {(64, 128): 1, (96, 96): 1, (128, 64): 1}
    assert summary.enlarged == 2  # small and tall were enlarged to cover their buckets


def test_workers_give_the_same_latents_as_the_main_process(dataset, tiny_vae):
    train, meta = dataset
    prepare_latents(options(train, meta, max_data_loader_n_workers=0), vae=tiny_vae)
    first = {n: load_latent_file(train / f"{n}.npz").latents for n in EXPECTED}
    summary = prepare_latents(options(train, meta, max_data_loader_n_workers=2, batch_size=3), vae=tiny_vae)
    assert summary.encoded == 3
    for name, latents in first.items():
        np.testing.assert_allclose(load_latent_file(train / f"{name}.npz").latents, latents, atol=2e-5)


def test_workers_start_under_spawn_as_on_windows(dataset, tiny_vae, spawn_workers):
    train, meta = dataset
    summary = prepare_latents(options(train, meta, max_data_loader_n_workers=1, batch_size=3), vae=tiny_vae)
    assert summary.encoded == 3


def test_skip_existing_reencodes_only_what_changed(dataset, tiny_vae, make_image):
    train, meta = dataset
    opts = options(train, meta, skip_existing=True)
    assert prepare_latents(opts, vae=tiny_vae).encoded == 3
    stamps = {n: (train / f"{n}.npz").stat().st_mtime_ns for n in EXPECTED}

    again = prepare_latents(opts, vae=tiny_vae)  # nothing changed: nothing encoded, no file rewritten
    assert (again.encoded, again.reused) == (0, 3)
    assert {n: (train / f"{n}.npz").stat().st_mtime_ns for n in EXPECTED} == stamps
    assert load_metadata(opts.out_json)["wide"]["train_resolution"] == [128, 64]

    make_image(train / "wide.png", 130, 70, seed=99)  # same size and bucket, other pixels
    changed = prepare_latents(opts, vae=tiny_vae)
    assert (changed.encoded, changed.reused) == (1, 2)

    # another bucket for "small" only: the area 128x64 adds 64x64 and 96x64 buckets, and 50x40 (1.25) now goes
    # to 64x64 (a tie with 96x64, broken by order); "wide" and "tall" keep their buckets, resizes and crops
    moved = prepare_latents(replace(opts, max_resolution="128,64"), vae=tiny_vae)
    assert (moved.encoded, moved.reused) == (1, 2)
    assert load_latent_file(train / "small.npz").train_resolution == (64, 64)
    back = prepare_latents(opts, vae=tiny_vae)  # back to the first buckets: that file was overwritten
    assert (back.encoded, back.reused) == (1, 2)

    assert prepare_latents(replace(opts, flip_aug=True), vae=tiny_vae).encoded == 3  # flip changes the contents
    assert prepare_latents(replace(opts, flip_aug=True), vae=tiny_vae).encoded == 0

    (train / "tall.npz").write_bytes(b"damaged")
    assert prepare_latents(replace(opts, flip_aug=True), vae=tiny_vae).encoded == 1

    from sdtune.models.tiny import build_tiny

    other_vae = build_tiny("sd1", seed=1).vae
    assert prepare_latents(replace(opts, flip_aug=True), vae=other_vae).encoded == 3
    # without --skip_existing everything is encoded again
    assert prepare_latents(replace(opts, flip_aug=True, skip_existing=False), vae=other_vae).encoded == 3


def test_bucket_change_alone_triggers_reencoding(dataset, tiny_vae):
    train, meta = dataset
    opts = options(train, meta, skip_existing=True)
    prepare_latents(opts, vae=tiny_vae)
    # --bucket_no_upscale changes the placement of every enlarged image (small, tall) and keeps "wide"'s bucket
    # but not its resize (130x70 fits the area, so it is no longer shrunk): all three are re-encoded
    summary = prepare_latents(replace(opts, bucket_no_upscale=True), vae=tiny_vae)
    assert summary.encoded == 3
    assert load_latent_file(train / "small.npz").train_resolution == (32, 32)
    assert prepare_latents(replace(opts, bucket_no_upscale=True), vae=tiny_vae).encoded == 0


def test_no_upscale_never_enlarges(dataset, tiny_vae):
    train, meta = dataset
    summary = prepare_latents(options(train, meta, bucket_no_upscale=True), vae=tiny_vae)
    assert summary.enlarged == 0
    for name, (size, *_rest) in EXPECTED.items():
        cache = load_latent_file(train / f"{name}.npz")
        assert cache.resized_size == size
        assert cache.train_resolution == (size[0] - size[0] % 32, size[1] - size[1] % 32)


def test_failed_image_loses_a_stale_train_resolution(dataset, tiny_vae):
    train, meta = dataset
    images = load_metadata(meta)
    images["wide"]["train_resolution"] = [96, 96]
    images["elsewhere"] = {"caption": "an image of another folder", "train_resolution": [64, 64]}
    save_metadata(meta, images)
    (train / "wide.png").write_bytes(b"")
    summary = prepare_latents(options(train, meta), vae=tiny_vae)
    out = load_metadata(meta.with_name("meta_lat.json"))
    assert "train_resolution" not in out["wide"] and out["wide"]["caption"] == "a picture of wide"
    assert out["elsewhere"]["train_resolution"] == [64, 64]  # not in this folder: untouched
    assert [p.name for p, _ in summary.skipped] == ["wide.png"]
    assert latent_files(train, out) == {"small": train / "small.npz", "tall": train / "tall.npz"}


def test_full_path_keys(dataset, tiny_vae):
    train, meta = dataset
    assert main(["merge-captions", str(train), str(meta.with_name("full.json")), "--full_path"]) == 0
    opts = replace(options(train, meta.with_name("full.json"), full_path=True))
    prepare_latents(opts, vae=tiny_vae)
    out = load_metadata(opts.out_json)
    key = str((train / "wide.png").absolute())
    assert out[key]["train_resolution"] == [128, 64]
    assert latent_files(train, out, full_path=True)[key] == train / "wide.npz"


def test_bfloat16(dataset, tiny_model_dir):
    from sdtune.models.io import load_vae

    train, meta = dataset
    vae = load_vae(tiny_model_dir)
    prepare_latents(options(train, meta), vae=vae)
    full = load_latent_file(train / "wide.npz").latents
    summary = prepare_latents(options(train, meta, mixed_precision="bf16"), vae=vae)
    assert summary.encoded == 3 and next(vae.parameters()).dtype == torch.bfloat16
    half = load_latent_file(train / "wide.npz")
    assert half.latents.dtype == np.float32
    np.testing.assert_allclose(half.latents, full, atol=0.05 * np.abs(full).max())


@pytest.mark.parametrize("args, message", [
    (["--max_resolution", "abc"], "max_resolution"),
    (["--bucket_reso_steps", "30"], "multiple of 8"),
    (["--batch_size", "0"], "batch_size"),
    (["--min_bucket_reso", "2048"], "min_bucket_reso"),
])
def test_bad_options_fail_before_any_work(dataset, tmp_path, args, message, capsys):
    train, meta = dataset
    code = main(["prepare", str(train), str(meta), str(tmp_path / "out.json"), str(tmp_path / "no-model"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not list(train.glob("*.npz"))


def test_cli_end_to_end_with_every_kind_of_bad_input(tmp_path, make_image, tiny_model_dir, caplog, capsys):
    """One folder holding every bad-input case, through the real CLI: merge, then prepare."""
    train = tmp_path / "train"
    good = ["good1.png", "good2.jpg", "good3.webp"]
    for i, name in enumerate(good):
        make_image(train / name, 80 + 8 * i, 64, seed=i)
    make_image(train / "source.png", 64, 64)
    data = (train / "source.png").read_bytes()
    (train / "source.png").unlink()
    (train / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut
    (train / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (train / "zero.png").write_bytes(b"")
    (train / "text.png").write_text("this is not an image")
    Image.new("CMYK", (64, 48), (0, 200, 0, 0)).save(train / "cmyk.jpg")
    Image.new("P", (48, 64), 3).save(train / "palette.png")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(train / "gray16.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(train / "transparent.png")
    rotated = Image.fromarray(np.zeros((48, 96, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(train / "rotated.jpg", exif=exif)  # stored 96x48, shown 48x96
    make_image(train / "tiny.png", 20, 20)  # a side under one step (32): no bucket with --bucket_no_upscale
    make_image(train / "bomb.png", 200, 150)  # 30,000 pixels, over --max_image_pixels 20000
    for name in good:
        (train / name).with_suffix(".caption").write_text(f"caption of {name}")
    (train / "cmyk.caption").write_bytes(b"\xff\xfe\x00broken")  # not UTF-8

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"good1": {"caption": "x"')
    meta = tmp_path / "meta.json"
    assert main(["merge-captions", str(train), str(meta), "--in_json", str(bad_json)]) == 2
    err = capsys.readouterr().err
    assert str(bad_json) in err and "not valid JSON" in err and "Traceback" not in err

    caplog.set_level("INFO")
    # one rule for every stage: the rest is processed and written, and a failed input makes the exit status 1
    assert main(["merge-captions", str(train), str(meta)]) == 1
    assert "1 caption file(s) could not be read" in caplog.text and str(train / "cmyk.caption") in caplog.text
    assert "exit status 1" in caplog.text
    caplog.clear()

    out = tmp_path / "meta_lat.json"
    code = main(["prepare", str(train), str(meta), str(out), str(tiny_model_dir), *CLI_BUCKET_ARGS,
                 "--bucket_no_upscale", "--max_image_pixels", "20000", "--max_data_loader_n_workers", "2",
                 "--batch_size", "2", "--flip_aug"])
    assert code == 1  # images were skipped (each named below); the others were prepared
    processed = {"good1", "good2", "good3", "cmyk", "palette", "gray16", "transparent", "rotated"}
    skipped = {"truncated.png": "truncated", "corrupt.jpg": "", "zero.png": "empty", "text.png": "not an image",
               "tiny.png": "too small", "bomb.png": "decompression bomb"}
    images = load_metadata(out)
    assert {k for k, v in images.items() if "train_resolution" in v} == processed
    assert all((train / f"{k}.npz").is_file() for k in processed)
    assert not any((train / name).with_suffix(".npz").exists() for name in skipped)
    assert images["rotated"]["train_resolution"] == [32, 96]  # EXIF applied before bucketing
    assert images["good1"]["caption"] == "caption of good1.png"
    assert f"{len(processed) + len(skipped)} images found: {len(processed)} encoded, 0 reused from valid caches, " \
           f"{len(skipped)} skipped" in caplog.text
    for name, reason in skipped.items():
        line = next(line for line in caplog.text.splitlines() if str(train / name) in line)
        assert reason in line
    assert "bucket" in caplog.text and "images" in caplog.text  # the bucket table

    # the transparent image was composited onto white before encoding: its latent is the encoding of white
    from sdtune.models.io import load_vae

    vae = load_vae(tiny_model_dir)
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    np.testing.assert_allclose(load_latent_file(train / "transparent.npz").latents, encode(vae, white), atol=2e-5)


def test_missing_in_json_is_a_clean_error(dataset, tmp_path, capsys):
    train, _meta = dataset
    code = main(["prepare", str(train), str(tmp_path / "none.json"), str(tmp_path / "o.json"), "model"])
    assert code == 2 and "none.json" in capsys.readouterr().err


def test_options_are_validated_in_the_library_too(dataset, tiny_vae):
    train, meta = dataset
    with pytest.raises(SdtuneError, match="max_data_loader_n_workers"):
        prepare_latents(options(train, meta, max_data_loader_n_workers=-1), tiny_vae)
    json.loads(meta.read_text())  # untouched


STEPS = 200


@pytest.fixture(scope="module")
def trained_vae():
    """The tiny VAE trained for a few seconds to reconstruct smooth 32x32 images (random weights decode to noise).

    200 Adam steps on 64 smooth images and their mirrors bring the reconstruction error of unseen crops to about
    0.09 (pixels in [-1, 1]), against 0.4-0.6 for the mirrored crop: enough to tell a right crop from a mirrored
    one. About 5-15 s on two CPU cores.
    """
    from sdtune.models.tiny import build_tiny
    from tests.data.conftest import smooth_rgb

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)  # module scope: set up before the per-test one_torch_thread fixture
        torch.manual_seed(0)
        vae = build_tiny("sd1").vae.train()
        batch = np.stack([smooth_rgb(32, 32, seed=s) for s in range(64)])
        pixels = torch.tensor(batch.transpose(0, 3, 1, 2).copy(), dtype=torch.float32) / 127.5 - 1.0
        optimizer = torch.optim.Adam(vae.parameters(), lr=4e-3)
        for step in range(STEPS):
            x = pixels[torch.randint(0, len(pixels), (4,))]
            x = x.flip(-1) if step % 2 else x
            loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    return vae.eval().requires_grad_(False)


@pytest.mark.slow
def test_latents_decode_to_the_crop_and_its_mirror(tmp_path, make_image, trained_vae):
    train = tmp_path / "train"
    # one 32x32 bucket: 48x32 is cropped to columns 8..40, 32x44 to rows 6..38
    make_image(train / "wide.png", 48, 32, seed=3)
    make_image(train / "tall.png", 32, 44, seed=4)
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    opts = PrepareOptions(train, meta, tmp_path / "out.json", "unused", max_resolution="32,32", min_bucket_reso=32,
                          max_bucket_reso=32, bucket_reso_steps=32, flip_aug=True, max_data_loader_n_workers=0)
    assert prepare_latents(opts, vae=trained_vae).encoded == 2
    for name, crop_box in (("wide", (8, 0, 40, 32)), ("tall", (0, 6, 32, 38))):
        cache = load_latent_file(train / f"{name}.npz")
        assert cache.crop_ltrb == crop_box
        with Image.open(train / f"{name}.png") as im:
            crop = np.asarray(im.convert("RGB").crop(crop_box)).astype(np.float32) / 127.5 - 1.0
        mirrored = crop[:, ::-1]
        with torch.no_grad():
            decoded = trained_vae.decode(torch.from_numpy(cache.latents)[None]).sample[0].permute(1, 2, 0).numpy()
            decoded_flipped = trained_vae.decode(
                torch.from_numpy(cache.latents_flipped)[None]).sample[0].permute(1, 2, 0).numpy()

        def mse(a, b):
            return float(np.mean((a - b) ** 2))

        assert mse(decoded, crop) < 0.5 * mse(decoded, mirrored)
        assert mse(decoded_flipped, mirrored) < 0.5 * mse(decoded_flipped, crop)


def test_recursive_and_empty_folders(tmp_path, make_image, tiny_vae):
    train = tmp_path / "train"
    make_image(train / "sub" / "deep.png", 64, 64)
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    flat = prepare_latents(options(train, meta, device="cpu"), vae=tiny_vae)
    assert (flat.found, flat.encoded) == (0, 0) and load_metadata(meta.with_name("meta_lat.json")) == {}
    deep = prepare_latents(options(train, meta, recursive=True), vae=tiny_vae)
    assert (deep.found, deep.encoded) == (1, 1) and (train / "sub" / "deep.npz").is_file()
    assert load_metadata(meta.with_name("meta_lat.json")) == {"deep": {"train_resolution": [96, 96]}}


def test_nan_latents_are_not_cached(dataset, tiny_vae, monkeypatch):
    train, meta = dataset
    real = __import__("sdtune.data.prepare", fromlist=["encode_pixels"]).encode_pixels

    def poisoned(vae, pixels):
        out = real(vae, pixels).clone()
        if out.shape[-1] == 128 // 8:  # the 128x64 bucket: "wide"
            out[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr("sdtune.data.prepare.encode_pixels", poisoned)
    summary = prepare_latents(options(train, meta, batch_size=3), vae=tiny_vae)
    assert summary.encoded == 2 and len(summary.skipped) == 1 and "NaN" in summary.skipped[0][1]
    assert sorted(p.name for p in train.glob("*.npz")) == ["small.npz", "tall.npz"]
    assert "train_resolution" not in load_metadata(meta.with_name("meta_lat.json"))["wide"]


def _sd_scripts_npz(path: Path) -> None:
    """As sd-scripts' prepare_buckets_latents.py / train_util.save_latents_to_disk write it: np.savez(npz_path,
    latents=..., original_size=np.array(...), crop_ltrb=np.array(...))."""
    np.savez(path, latents=np.ones((4, 8, 12), np.float32), original_size=np.array((130, 70)),
             crop_ltrb=np.array((0, 2, 128, 66)))


def test_another_tools_npz_is_reported_and_never_overwritten(dataset, tiny_vae, caplog):
    train, meta = dataset
    _sd_scripts_npz(train / "wide.npz")
    before = (train / "wide.npz").read_bytes()
    with pytest.raises(LatentFileError, match=r"wide\.npz: a latent file written by another tool.*sd-scripts") as info:
        load_latent_file(train / "wide.npz")
    assert "damaged" not in str(info.value)
    caplog.set_level("INFO")
    summary = prepare_latents(options(train, meta, skip_existing=True), vae=tiny_vae)
    assert (train / "wide.npz").read_bytes() == before  # the other tool's file is left as it was
    assert [p.name for p, _ in summary.skipped] == ["wide.png"]
    assert "written by another tool" in summary.skipped[0][1] and "Move it elsewhere" in summary.skipped[0][1]
    assert "train_resolution" not in load_metadata(meta.with_name("meta_lat.json"))["wide"]
    assert summary.encoded == 2


def test_prepare_summary_names_files_of_other_extensions(dataset, tiny_vae, caplog):
    train, meta = dataset
    (train / "scan.tiff").write_bytes(b"II*\x00")
    summary = prepare_latents(options(train, meta), vae=tiny_vae)
    assert [p.name for p in summary.other_images] == ["scan.tiff"] and summary.encoded == 3
    caplog.set_level("WARNING")
    summary.log()
    assert "scan.tiff" in caplog.text and "Convert them to PNG" in caplog.text


def test_fp16_on_the_cpu_is_warned_about(dataset, tiny_vae, caplog):
    # issue 18: prepare took 631 s in fp16 on a CPU against 27 s in float32, without a word
    train, meta = dataset
    with caplog.at_level("WARNING", logger="sdtune"):
        prepare_latents(options(train, meta, mixed_precision="fp16", device="cpu"), vae=tiny_vae)
    assert "--mixed_precision fp16 on the CPU" in caplog.text and "--mixed_precision no" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdtune"):
        prepare_latents(options(train, meta, device="cpu"), vae=tiny_vae)
    assert "on the CPU" not in caplog.text


def test_metadata_of_another_folder_is_warned_about_and_never_overwrites_caches(dataset, tiny_vae, tmp_path,
                                                                                caplog):
    # issue 18: prepare train/ ../other/meta_clean.json added caption-less entries and overwrote valid caches
    train, meta = dataset
    prepare_latents(options(train, meta), vae=tiny_vae)
    before = {p.name: p.read_bytes() for p in train.glob("*.npz")}
    other = tmp_path / "other.json"
    save_metadata(other, {"cat1": {"caption": "a cat"}, "cat2": {"caption": "a cat"}, "wide": {"caption": "w"}})
    with pytest.raises(SdtuneError, match=r"other\.json does not describe .*2 of 3 images have no entry.*\.npz"):
        prepare_latents(PrepareOptions(train, other, tmp_path / "out.json", "unused", **BUCKET_ARGS,
                                       max_data_loader_n_workers=0), vae=tiny_vae)
    assert {p.name: p.read_bytes() for p in train.glob("*.npz")} == before
    assert not (tmp_path / "out.json").exists()
    # with --skip_existing the valid caches are kept, and the mismatch is still said
    with caplog.at_level("WARNING", logger="sdtune"):
        summary = prepare_latents(PrepareOptions(train, other, tmp_path / "out.json", "unused", **BUCKET_ARGS,
                                                 max_data_loader_n_workers=0, skip_existing=True), vae=tiny_vae)
    assert summary.reused == 3
    assert "2 of 3 images in" in caplog.text and "is it the metadata of another folder?" in caplog.text
    assert "1 of 3 images found: 2 entries of" in caplog.text


def test_a_partial_folder_is_flagged(dataset, tiny_vae, caplog):
    train, meta = dataset
    (train / "tall.png").unlink()
    with caplog.at_level("WARNING", logger="sdtune"):
        prepare_latents(options(train, meta), vae=tiny_vae)
    assert "2 of 3 images found" in caplog.text and "tall" in caplog.text


def test_most_images_without_a_caption_are_warned_about_before_encoding(dataset, tiny_vae, caplog):
    train, meta = dataset
    save_metadata(meta, {"wide": {}, "small": {}, "tall": {"caption": "a tall picture"}})
    with caplog.at_level("WARNING", logger="sdtune"):
        prepare_latents(options(train, meta), vae=tiny_vae)
    assert "2 of 3 images in" in caplog.text and "have neither caption nor tags" in caplog.text
