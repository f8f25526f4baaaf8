"""sdtune generate --lora with a LyCORIS file (LoHa): applied by LyCORIS' own loader, checked against the model
LyCORIS itself merges the file into (its ``create_network_from_weights`` + ``merge_to``), not against sdtune."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdtune.cli import main
from sdtune.models.io import load_model
from sdtune.models.lycoris import text_encoder_root
from sdtune.models.save import save_model
from tests.generate.test_lora import ARGS, assert_same_image, generate, other_family_model

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def loha(tmp_path_factory, saved_model):
    """A random LoHa (U-Net and text encoder) of the tiny SD 1 model, in LyCORIS' file format."""
    pytest.importorskip("lycoris")
    root = tmp_path_factory.mktemp("loha")
    base_path = saved_model("sd1", "safetensors")
    path = root / "loha.safetensors"
    make_loha(load_model(base_path), path, seed=3)
    return {"base": base_path, "file": path, "root": root}


def make_loha(model, path, seed: int) -> None:
    """A LoHa of ``model`` made by LyCORIS (sdtune's SD preset), every factor random, saved in its format."""
    from sdtune.train.lycoris_target import create_network

    opts = types.SimpleNamespace(network_dim=4, network_alpha=4.0, network_args=["algo=loha"])
    network = create_network(opts, model, {"algo": "loha"})
    network.apply_to(text_encoder_root(model.text_encoder), model.unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if "hada_w" in name:  # LyCORIS starts one factor at zero (no change): make every module count
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, str(path),
              metadata={"ss_network_module": "lycoris.kohya"})


def lycoris_merged(loha, weight: float):
    """The base model with the file merged in at ``weight`` by LyCORIS itself, saved as a single file."""
    from lycoris import kohya

    model = load_model(loha["base"])
    te_root = text_encoder_root(model.text_encoder)
    network, _ = kohya.create_network_from_weights(1.0, str(loha["file"]), model.vae, te_root, model.unet,
                                                   for_inference=True)
    # each module's own merge at the weight (the kohya wrapper's merge_to always merges at 1, whatever multiplier
    # the network was made with)
    for module in network.text_encoder_loras + network.unet_loras:
        module.merge_to(weight)
    return save_model(model, loha["root"] / f"merged-{weight}.safetensors", "safetensors")


def test_a_loha_gives_the_image_of_the_model_lycoris_merges_it_into(tmp_path, loha):
    plain, _ = generate(tmp_path, loha["base"])
    hooked, text = generate(tmp_path, loha["base"], "--lora", f"{loha['file']}:0.7")
    want, _ = generate(tmp_path, lycoris_merged(loha, 0.7))
    assert_same_image(hooked, want)
    assert np.abs(hooked - plain).mean() > 1  # the comparison above can fail
    assert text["parameters"].splitlines()[0] == "a red circle <lora:loha:0.7>"
    again, _ = generate(tmp_path, loha["base"])  # the hooks were removed: the base model again
    np.testing.assert_array_equal(again, plain)


@pytest.mark.parametrize("kind, message", [("deeper", "match no layer"), ("wider", "does not fit")])
def test_a_loha_of_another_family_is_refused_before_any_image(tmp_path, loha, capsys, kind, message):
    """LoHas of test_lora.py's other-family models: more text-encoder layers (names SD 1.x lacks), or a wider text
    encoder and cross-attention (the same names, other shapes)."""
    other = tmp_path / f"loha-{kind}.safetensors"
    make_loha(other_family_model(kind), other, seed=4)
    out = tmp_path / "out"
    code = main(["generate", "--ckpt", str(loha["base"]), *ARGS, "--outdir", str(out), "--lora", str(other)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(other) in err and message in err and "another model family" in err
    assert not out.exists() or not list(out.glob("*.png"))


def test_without_the_lycoris_package_a_loha_fails_with_the_install_command(tmp_path, loha, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lycoris" else find_spec(name, *a))
    code = main(["generate", "--ckpt", str(loha["base"]), *ARGS, "--outdir", str(tmp_path / "out"), "--lora",
                 str(loha["file"])])
    assert code == 2
    assert "pip install lycoris-lora" in capsys.readouterr().err


def test_merge_lora_merges_a_loha_as_lycoris_does(tmp_path, loha):
    out = tmp_path / "merged.safetensors"
    assert main(["merge-lora", "--sd_model", str(loha["base"]), "--models", f"{loha['file']}:0.7",
                 "--save_to", str(out)]) == 0
    got, want, base = load_model(out), load_model(lycoris_merged(loha, 0.7)), load_model(loha["base"])
    for name in ("unet", "text_encoder"):
        ours, theirs = getattr(got, name).state_dict(), getattr(want, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], msg=lambda m, k=key: f"{name} {k}: {m}")
        assert any(not torch.equal(ours[k], v) for k, v in getattr(base, name).state_dict().items())
