"""sdtune generate: every model format, seeds, metadata, long prompts, clip skip, samplers, file numbering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.generate import (
    SAMPLERS,
    ImageSettings,
    GeneratedImage,
    NumberedWriter,
    PromptSpec,
    generate_images,
    get_sampler,
    read_png_settings,
)
from sdtune.models.io import load_model
from sdtune.models.sd import with_prediction_type
from sdtune.models.text import encode_prompts
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component

FAST = {"steps": 2, "width": 64, "height": 64, "progress": False}


def pixels(item: GeneratedImage | Path) -> np.ndarray:
    if isinstance(item, Path):
        with Image.open(item) as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.asarray(item.image, dtype=np.int16)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1", seed=0)


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


# ------------------------------------------------------------------------------------------------ seeds
def test_same_seed_same_image_other_seed_other_image(sd1):
    first = generate_images(sd1, ["a green triangle"], seed=3, **FAST)[0]
    again = generate_images(sd1, ["a green triangle"], seed=3, **FAST)[0]
    other = generate_images(sd1, ["a green triangle"], seed=4, **FAST)[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert first.settings.seed == 3 and other.settings.seed == 4


def test_image_i_of_a_run_uses_seed_plus_i_whatever_the_batch(sd1):
    run = generate_images(sd1, ["a cat", "a dog"], seed=10, images_per_prompt=2, sampler="euler_a", **FAST)
    assert [g.settings.seed for g in run] == [10, 11, 12, 13]
    assert [g.settings.prompt for g in run] == ["a cat", "a cat", "a dog", "a dog"]
    alone = generate_images(sd1, ["a dog"], seed=13, sampler="euler_a", **FAST)[0]
    assert np.array_equal(pixels(run[3]), pixels(alone))
    batched = generate_images(sd1, ["a cat", "a dog"], seed=10, images_per_prompt=2, sampler="euler_a",
                              batch_size=4, **FAST)
    # Batching changes only float rounding (which this random model and CFG amplify in a few pixels): a batched
    # image is within a level on average of its unbatched self, while images of other seeds are ~20 levels apart.
    for a, b in zip(run, batched):
        assert np.abs(pixels(a) - pixels(b)).mean() < 1.0
    assert all(np.abs(pixels(a) - pixels(b)).mean() > 5 for a, b in zip(run, run[1:]))


# ------------------------------------------------------------------------------------------------ conditioning
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_words_past_75_tokens_count_only_with_a_longer_max_token_length(family):
    model = build_tiny(family, seed=1)
    base = " ".join(["red"] * 75)
    assert len(model.tokenizer(base, add_special_tokens=False).input_ids) == 75
    longer = base + " blue square on a black background"

    def embeddings(max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            states = encode_prompts(model.tokenizer, model.text_encoder, [base, longer], max_tokens)
        return states[0], states[1]

    def images(max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        # both with seed 7 (otherwise the second image of the run would get seed 8)
        a, b = generate_images(model, [PromptSpec(base, seed=7), PromptSpec(longer, seed=7)],
                               max_token_length=max_tokens, **FAST)
        return pixels(a), pixels(b)

    short_a, short_b = embeddings(75)
    assert torch.equal(short_a, short_b)
    long_a, long_b = embeddings(150)
    assert long_a.shape[0] == 152
    with pytest.raises(AssertionError, match="not close"):  # with 150 tokens the extra words count
        torch.testing.assert_close(long_a, long_b, rtol=1e-5, atol=1e-8)
    img_a, img_b = images(75)
    assert np.array_equal(img_a, img_b)
    img_a, img_b = images(150)
    assert not np.array_equal(img_a, img_b)


def test_clip_skip_changes_the_conditioning_and_is_recorded(sd1, tmp_path):
    one = generate_images(sd1, ["a yellow circle"], seed=2, clip_skip=1, **FAST)[0]
    two = generate_images(sd1, ["a yellow circle"], seed=2, clip_skip=2, **FAST)[0]
    assert not np.array_equal(pixels(one), pixels(two))
    assert two.settings.parameters_text().endswith("Clip skip: 2")


def test_prediction_type_is_used(sd1):
    """The same weights sampled as v-prediction give another image: the family's prediction type reaches the
    scheduler."""
    model = build_tiny("sd2-v", seed=0)
    v_image = generate_images(model, ["a red square"], seed=1, sampler="ddim", **FAST)[0]
    model.family = with_prediction_type(model.family, "epsilon")
    eps_image = generate_images(model, ["a red square"], seed=1, sampler="ddim", **FAST)[0]
    assert v_image.settings.prediction_type == "v_prediction"
    assert not np.array_equal(pixels(v_image), pixels(eps_image))


def test_scale_one_skips_the_negative_prompt(sd1):
    a = generate_images(sd1, ["a cat"], seed=1, scale=1.0, negative_prompt="dog", **FAST)[0]
    b = generate_images(sd1, ["a cat"], seed=1, scale=1.0, negative_prompt="something else", **FAST)[0]
    c = generate_images(sd1, ["a cat"], seed=1, scale=5.0, negative_prompt="dog", **FAST)[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


# ------------------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_and_repeats(sampler):
    model = build_tiny("sd2-v", seed=0)
    a = generate_images(model, ["a cat"], seed=1, sampler=sampler, steps=3, width=48, height=32, progress=False)[0]
    b = generate_images(model, ["a cat"], seed=1, sampler=sampler, steps=3, width=48, height=32, progress=False)[0]
    assert a.image.size == (48, 32)
    assert np.array_equal(pixels(a), pixels(b))
    assert pixels(a).std() > 0
    assert f"Sampler: {SAMPLERS[sampler].a1111_name}," in a.settings.parameters_text()


def test_sampler_aliases():
    assert get_sampler("k_euler_a").name == "euler_a"
    assert get_sampler("dpmsolver++").name == "dpm++"
    assert get_sampler("DDIM").name == "ddim"


# ------------------------------------------------------------------------------------------------ files
def test_parameters_text_quotes_like_automatic1111():
    settings = ImageSettings(prompt="a, b", negative_prompt="", width=512, height=768, seed=1, steps=30, scale=7.0,
                             sampler="euler", clip_skip=2, max_token_length=150, model="my, model")
    assert settings.parameters_text() == (
        'a, b\nSteps: 30, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 512x768, Model: "my, model", Clip skip: 2')


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


def test_writer_skips_a_name_taken_meanwhile(tmp_path, sd1):
    writer = NumberedWriter(tmp_path)
    (tmp_path / "00000-4.png").write_bytes(b"another process")
    item = generate_images(sd1, ["a cat"], seed=4, steps=1, width=32, height=32, progress=False)[0]
    path = writer.save(item)
    assert path.name == "00001-4.png"
    assert (tmp_path / "00000-4.png").read_bytes() == b"another process"


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
    from sdtune.models.io import save_model

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
