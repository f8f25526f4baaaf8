"""sdtune generate --lora FILE[:WEIGHT]: checked against the model `sdtune merge-lora` writes, not against itself.

A LoRA hooked at generation must give the image of the merged checkpoint (same seed, same weight); two LoRAs the
image of merging both; weight 0 the base model's image. The infotext's ``Lora hashes`` is recomputed here from the
file's bytes as AUTOMATIC1111's hashes.addnet_hash_safetensors does (sha256 of what follows the header, first 12
hex digits), not with sdtune's function.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.models.io import load_model
from sdtune.models.lora import LoraNetwork
from tests.models.lora_helpers import random_lora, randomize
from tests.sampling.test_pipeline import pixels

pytestmark = pytest.mark.component

# 128 px: at 64 px and below the tiny U-Net's deepest blocks are 1x1 and their group norms turn float rounding
# (merged weights are rounded to float32, hooks add the update after the layer) into whole levels of the image;
# at 128 px hooked and merged images agree to within one level at a handful of pixels.
ARGS = ["--prompt", "a red circle", "--negative_prompt", "blurry", "--W", "128", "--H", "128", "--steps", "2",
        "--seed", "7", "--sampler", "euler_a"]


def a1111_shorthash(path) -> str:
    """AUTOMATIC1111's hash of a .safetensors LoRA without sshs_model_hash metadata, written out from its
    modules/hashes.py addnet_hash_safetensors and network.py's shorthash = hash[0:12]."""
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()[:12]


@pytest.fixture(scope="module")
def files(tmp_path_factory, saved_model):
    """The base model file and two LoRA files of it (a LoCon with 3x3 convolutions, and a plain one)."""
    root = tmp_path_factory.mktemp("loras")
    base_path = saved_model("sd1", "safetensors")
    base = load_model(base_path)
    first, second = root / "first.safetensors", root / "second.safetensors"
    random_lora(base, seed=1).save(first)
    randomize(LoraNetwork(base, dim=4, alpha=2.0), seed=2, std=0.2).save(second)  # no LoCon layers; strong enough
    # to move the 128 px image by ~2.5 levels on its own
    return {"base": base_path, "first": first, "second": second, "root": root}


def generate(tmp_path, model, *extra) -> tuple[np.ndarray, dict[str, str]]:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    assert main(["generate", "--ckpt", str(model), *ARGS, "--outdir", str(out), *extra]) == 0
    (path,) = out.iterdir()
    with Image.open(path) as image:
        text = dict(image.text)
    return pixels(path), text


def merged(tmp_path, files, *models) -> str:
    out = tmp_path / f"merged-{len(list(tmp_path.iterdir()))}.safetensors"
    assert main(["merge-lora", "--sd_model", str(files["base"]), "--models", *models, "--save_to", str(out)]) == 0
    return str(out)


def assert_same_image(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float rounding, which the uint8 rounding of the decode can move by one level at a few pixels.
    (A weight of 0.65 instead of 0.7 moves the mean by ~0.25 and single pixels by 5.)"""
    diff = np.abs(got - want)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_lora_at_a_weight_gives_the_merged_models_image(tmp_path, files):
    plain, _ = generate(tmp_path, files["base"])
    spec = f"{files['first']}:0.7"
    hooked, text = generate(tmp_path, files["base"], "--lora", spec)
    want, _ = generate(tmp_path, merged(tmp_path, files, spec))
    assert_same_image(hooked, want)
    assert np.abs(hooked - plain).mean() > 1 and np.abs(hooked - plain).max() > 20  # the comparison above can fail

    params = text["parameters"]
    first_line, last_line = params.splitlines()[0], params.splitlines()[-1]
    assert first_line == "a red circle <lora:first:0.7>"
    assert last_line.endswith(f', Clip skip: 1, Lora hashes: "first: {a1111_shorthash(files["first"])}"')
    meta = json.loads(text["sdtune"])
    assert meta["prompt"] == "a red circle"
    assert [(x["name"], x["weight"], x["hash"][:12]) for x in meta["loras"]] == [
        ("first", 0.7, a1111_shorthash(files["first"]))]


def test_default_weight_is_one(tmp_path, files):
    hooked, text = generate(tmp_path, files["base"], "--lora", str(files["second"]))
    want, _ = generate(tmp_path, merged(tmp_path, files, f"{files['second']}:1.0"))
    assert_same_image(hooked, want)
    assert text["parameters"].startswith("a red circle <lora:second:1>\n")


def test_two_loras_give_the_image_of_merging_both(tmp_path, files):
    specs = [f"{files['first']}:0.6", f"{files['second']}:-0.4"]
    hooked, text = generate(tmp_path, files["base"], "--lora", *specs)
    want, _ = generate(tmp_path, merged(tmp_path, files, *specs))
    only_first, _ = generate(tmp_path, files["base"], "--lora", specs[0])
    assert_same_image(hooked, want)
    assert np.abs(hooked - only_first).mean() > 1  # the second LoRA counts
    assert text["parameters"].splitlines()[0] == "a red circle <lora:first:0.6> <lora:second:-0.4>"
    assert text["parameters"].endswith(
        f'Lora hashes: "first: {a1111_shorthash(files["first"])}, second: {a1111_shorthash(files["second"])}"')
    meta = json.loads(text["sdtune"])
    assert [(x["name"], x["weight"]) for x in meta["loras"]] == [("first", 0.6), ("second", -0.4)]


def test_weight_zero_is_the_base_model(tmp_path, files):
    plain, plain_text = generate(tmp_path, files["base"])
    zero, text = generate(tmp_path, files["base"], "--lora", f"{files['first']}:0")
    assert np.array_equal(zero, plain)
    assert "Lora hashes" not in plain_text["parameters"] and "Lora hashes" in text["parameters"]


def test_fp16_model_with_a_float_lora(tmp_path, files):
    """The hooks cast: an fp16 U-Net and text encoder with a float32 LoRA (no autocast, as on the GPU path) give the
    float image up to fp16 rounding, much nearer than the fp16 image without the LoRA."""
    spec = f"{files['first']}:0.7"
    full, _ = generate(tmp_path, files["base"], "--lora", spec)
    half, _ = generate(tmp_path, files["base"], "--lora", spec, "--dtype", "fp16", "--device", "cpu")
    half_plain, _ = generate(tmp_path, files["base"], "--dtype", "fp16", "--device", "cpu")
    assert np.abs(full - half).mean() < 0.25 * np.abs(half_plain - half).mean()


def test_the_text_encoder_lora_equals_the_merged_text_encoder(tmp_path, files):
    """The tiny model's images barely depend on the prompt, so the text encoder's half is checked on its output."""
    from sdtune.models.text import encode_prompts
    from sdtune.sampling.loras import build_networks, loras_applied, read_lora_files

    spec = f"{files['first']}:0.7"
    base, want_model = load_model(files["base"]), load_model(merged(tmp_path, files, spec))
    networks = build_networks(base, read_lora_files([(files["first"], 0.7)]))

    def encode(model):
        with torch.no_grad():
            return encode_prompts(model.tokenizer, model.text_encoder, ["a red circle", "blurry"], 75, 1)

    plain = encode(base)
    with loras_applied(networks):
        hooked = encode(base)
    assert (hooked - plain).abs().max() > 1e-2
    torch.testing.assert_close(hooked, encode(want_model), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode(base), plain, rtol=0, atol=0)  # removed again: the base model is untouched


def other_family_model(kind: str):
    """A tiny model whose LoRAs do not fit the tiny SD 1.x model the way a real SD 2.x LoRA does not fit SD 1.5:
    ``deeper`` has more text-encoder layers (OpenCLIP's 23 against CLIP's 12: module names SD 1.x lacks), ``wider``
    a wider text encoder and cross-attention (1024 against 768: the same names, other shapes)."""
    from sdtune.models.families import get_family
    from sdtune.models.sd import StableDiffusion, build_modules
    from sdtune.models.tiny import tiny_configs
    from sdtune.models.tokenizer import packaged_tokenizer

    family = get_family("sd2-v")
    configs = tiny_configs(family)
    if kind == "deeper":
        configs["text_encoder"]["num_hidden_layers"] = 5
    else:
        configs["text_encoder"].update(hidden_size=64, projection_dim=64)
        configs["unet"]["cross_attention_dim"] = 64
    torch.manual_seed(0)
    unet, vae, text_encoder = build_modules(configs)
    return StableDiffusion(family=family, unet=unet, vae=vae, text_encoder=text_encoder,
                           tokenizer=packaged_tokenizer(family.pad_token))


@pytest.mark.parametrize("kind, message", [("deeper", "match no layer"), ("wider", "has shape")])
def test_a_lora_of_another_family_fails_naming_the_file_before_any_image(tmp_path, files, capsys, kind, message):
    other = tmp_path / f"for-sd2-{kind}.safetensors"
    random_lora(other_family_model(kind), seed=3).save(other)
    out = tmp_path / "out"
    code = main(["generate", "--ckpt", str(files["base"]), *ARGS, "--outdir", str(out), "--lora",
                 f"{files['first']}:0.5", f"{other}:0.8"])  # the first fits: every file is checked before an image
    assert code == 2
    err = capsys.readouterr().err
    assert str(other) in err and message in err and "another model family" in err
    assert not out.exists() or not list(out.glob("*.png"))


def test_a_missing_lora_fails_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    code = main(["generate", "--ckpt", str(tmp_path / "no-model.safetensors"), *ARGS, "--outdir",
                 str(tmp_path / "out"), "--lora", f"{missing}:0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no-model" not in err  # the LoRA is read first


def test_lora_hash_prefers_the_files_sshs_model_hash(tmp_path, files):
    """A1111's NetworkOnDisk takes metadata['sshs_model_hash'] before hashing the file."""
    from safetensors.torch import load_file, save_file

    tagged = files["root"] / "tagged.safetensors"
    save_file(load_file(str(files["second"])), str(tagged), metadata={"sshs_model_hash": "abcdef0123456789" * 4})
    _, text = generate(tmp_path, files["base"], "--lora", str(tagged))
    assert text["parameters"].endswith('Lora hashes: "tagged: abcdef012345"')
