"""``sdtune merge-lora`` and ``sdtune extract-lora`` through the real CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from sdtune.cli import main
from sdtune.models.io import load_model
from sdtune.models.lora import merge_lora_into, read_lora
from sdtune.models.lora_commands import parse_lora_list
from sdtune.models.tiny import build_tiny
from tests.models.lora_helpers import random_lora, target_weights

pytestmark = pytest.mark.e2e


def test_merge_lora_cli_with_sd_scripts_options(tmp_path, saved_model):
    base_path = saved_model("sd1", "safetensors")
    base = load_model(base_path)
    first, second = random_lora(base, seed=1), random_lora(base, seed=2, conv_dim=None)
    first.save(tmp_path / "a.safetensors")
    second.save(tmp_path / "b.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["merge-lora", "--sd_model", str(base_path), "--models", str(tmp_path / "a.safetensors"),
                 str(tmp_path / "b.safetensors"), "--ratios", "0.7", "-0.3", "--save_to", str(out)]) == 0
    expected = copy.deepcopy(base)
    merge_lora_into(expected, first.state_dict(), 0.7)
    merge_lora_into(expected, second.state_dict(), -0.3)
    got = load_model(out)
    want, have, original = target_weights(expected), target_weights(got), target_weights(base)
    assert any(not torch.equal(want[k], original[k]) for k in want)
    for key in want:
        torch.testing.assert_close(have[key], want[key], rtol=1e-5, atol=1e-6)

    # FILE:WEIGHT, into a diffusers folder in fp16
    folder = tmp_path / "merged-folder"
    assert main(["merge-lora", "--sd_model", str(base_path), "--models", f"{tmp_path / 'a.safetensors'}:0.7",
                 f"{tmp_path / 'b.safetensors'}:-0.3", "--save_to", str(folder), "--save_precision", "fp16"]) == 0
    half = load_model(folder)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for key, value in target_weights(half).items():
        torch.testing.assert_close(value, want[key], rtol=2e-3, atol=2e-3)


def test_merge_lora_cli_refuses_a_lora_of_other_layers(tmp_path, saved_model, capsys):
    base_path = saved_model("sd1", "safetensors")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8), "lora_unet_nowhere.lora_up.weight":
               torch.zeros(8, 4)}, str(bad))
    out = tmp_path / "x.safetensors"
    assert main(["merge-lora", "--sd_model", str(base_path), "--models", str(bad), "--save_to", str(out)]) == 2
    assert "lora_unet_nowhere" in capsys.readouterr().err and not out.exists()


def test_parse_lora_list():
    assert parse_lora_list(["a.safetensors", "b.safetensors:0.5"], []) == [("a.safetensors", 1.0),
                                                                          ("b.safetensors", 0.5)]
    assert parse_lora_list(["a", "b"], [0.2, 0.3]) == [("a", 0.2), ("b", 0.3)]
    with pytest.raises(Exception, match="--ratios"):
        parse_lora_list(["a", "b"], [0.2])


def test_extract_lora_cli(tmp_path, caplog):
    from sdtune.models.lora import unet_targets
    from sdtune.models.save import save_model

    base = build_tiny("sd1")
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in unet_targets(tuned.unet, conv=True).values():
            layer.weight.add_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
    save_model(base, tmp_path / "base.safetensors")
    save_model(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    caplog.set_level("INFO", logger="sdtune")
    assert main(["extract-lora", "--model_org", str(tmp_path / "base.safetensors"), "--model_tuned",
                 str(tmp_path / "tuned.safetensors"), "--save_to", str(out), "--dim", "8", "--conv_dim", "4"]) == 0
    sd, meta = read_lora(out)
    assert not any(k.startswith("lora_te") for k in sd)  # the text encoders are the same
    assert meta["ss_network_dim"] == "8" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert any(v.shape[-1] == 3 and v.shape[0] == 4 for k, v in sd.items() if k.endswith("lora_down.weight"))
    assert any("relative error" in r.getMessage() and "unet" in r.getMessage() for r in caplog.records)
    with safe_open(str(out), framework="pt") as f:
        assert "sshs_model_hash" in f.metadata()
