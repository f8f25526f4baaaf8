"""sdtune generate: every model format, metadata, file numbering, option errors, --vae, --dtype, --help."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdtune.cli import main
from sdtune.models.io import load_model
from sdtune.models.tiny import build_tiny
from sdtune.sampling.pipeline import generate_images
from sdtune.sampling.png import read_png_settings
from tests.sampling.test_pipeline import FAST, pixels

pytestmark = pytest.mark.component


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_generate_cli_from_every_format(tmp_path, saved_model, family, fmt):
    model = saved_model(family, fmt)
    out = tmp_path / "out"
    code = main(["generate", "--ckpt", str(model), "--prompt", "a red circle, simple background",
                 "--negative_prompt", "blurry", "--W", "64", "--H", "48", "--steps", "2", "--seed", "11",
                 "--images_per_prompt", "2", "--sampler", "dpm++", "--outdir", str(out)])
    assert code == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000-11.png", "00001-12.png"]
    name = model.stem if model.is_file() else model.name
    for path, seed in zip(files, (11, 12)):
        with Image.open(path) as image:
            assert image.size == (64, 48)
            text = dict(image.text)
        assert text["parameters"] == (
            "a red circle, simple background\nNegative prompt: blurry\n"
            f"Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: {seed}, Size: 64x48, Model: {name}, Clip skip: 1"
        )
        meta = json.loads(text["sdtune"])
        assert meta["seed"] == seed and meta["sampler"] == "dpm++" and meta["family"] == family
        assert meta["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")
        assert meta["negative_prompt"] == "blurry" and meta["max_token_length"] == 75
        assert read_png_settings(path) == meta
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_every_format_gives_the_same_image(saved_model, family):
    images = []
    for fmt in ("ckpt", "safetensors", "diffusers"):
        model = load_model(saved_model(family, fmt))
        assert model.family.name == family
        images.append(pixels(generate_images(model, ["a blue square"], seed=5, **FAST)[0]))
    # Equal weights; the last bits of CPU float sums may depend on how a file's tensors are aligned in memory.
    for other in images[1:]:
        assert np.abs(images[0] - other).max() <= 2


# ------------------------------------------------------------------------------------------------ files
def test_numbered_files_never_overwrite(tmp_path, saved_model):
    model = saved_model("sd1", "safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007-99.png").write_bytes(b"not mine")
    (out / "notes.txt").write_text("kept", encoding="utf-8")
    args = ["generate", "--ckpt", str(model), "--prompt", "a cat", "--W", "32", "--H", "32", "--steps", "1",
            "--outdir", str(out)]
    assert main([*args, "--seed", "1"]) == 0
    assert main([*args, "--seed", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00007-99.png", "00008-1.png", "00009-1.png", "notes.txt"]
    assert (out / "00007-99.png").read_bytes() == b"not mine"
    assert np.array_equal(pixels(out / "00008-1.png"), pixels(out / "00009-1.png"))
    assert not list(out.glob(".*"))  # no temporary files left behind


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, message", [
    (["--prompt", "a cat", "--W", "60"], "multiples of 8"),
    (["--prompt", "a cat", "--from_file", "p.txt"], "either --prompt"),
    ([], "either --prompt"),
    (["--prompt", "a cat", "--steps", "0"], "--steps"),
])
def test_option_errors_come_before_loading_the_model(tmp_path, capsys, args, message):
    missing_model = tmp_path / "nowhere.safetensors"  # never read: options fail first
    assert main(["generate", "--ckpt", str(missing_model), "--outdir", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_model_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    assert main(["generate", "--ckpt", str(missing), "--prompt", "a cat", "--outdir", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_vae_option_replaces_the_vae(tmp_path, saved_model):
    """--vae with another model's VAE changes the decoded image; with the model's own VAE it changes nothing."""
    from sdtune.models.save import save_model

    other = tmp_path / "other.safetensors"
    save_model(build_tiny("sd1", seed=9), other, "safetensors")
    base = ["generate", "--ckpt", str(saved_model("sd1", "ckpt")), "--prompt", "a cat", "--W", "32", "--H", "32",
            "--steps", "1", "--seed", "3", "--sampler", "ddim"]
    runs = {}
    for name, extra in (("plain", []), ("own", ["--vae", str(saved_model("sd1", "diffusers"))]),
                        ("other", ["--vae", str(other)])):
        assert main([*base, *extra, "--outdir", str(tmp_path / name)]) == 0
        runs[name] = pixels(next((tmp_path / name).iterdir()))
    assert np.abs(runs["plain"] - runs["own"]).max() <= 2
    assert np.abs(runs["plain"] - runs["other"]).mean() > 5


def test_half_precision_on_the_cpu_is_warned_about_before_the_model_loads(tmp_path, caplog):
    # issue 18: fp16 on a CPU ran 23x slower with no word said
    with caplog.at_level("WARNING", logger="sdtune"):
        main(["generate", "--ckpt", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--dtype", "fp16",
              "--device", "cpu", "--outdir", str(tmp_path / "out")])
    assert "--dtype fp16 on the CPU" in caplog.text and "--dtype float" in caplog.text
    assert "many times slower than float32" in caplog.text  # how much it costs, not only "slow or unsupported"
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdtune"):
        main(["generate", "--ckpt", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--device", "cpu",
              "--outdir", str(tmp_path / "out")])
    assert "on the CPU" not in caplog.text


def test_help_says_half_precision_is_slow_on_a_cpu(capsys):
    for command, option in (("generate", "--dtype"), ("prepare", "--mixed_precision")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "on a CPU they are many times slower" in out, command
