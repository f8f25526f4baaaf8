"""LoRA / LoCon networks (sdtune.models.lora): which layers, the update's scale, hooking without touching the base,
the file (names, metadata, A1111's hashes), merging, and extraction by SVD (sdtune.models.lora_extract)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from sdtune.errors import ModelLoadError, SdtuneError
from sdtune.models.lora import (
    LoraNetwork,
    merge_lora_into,
    network_metadata,
    read_lora,
    text_encoder_targets,
    unet_targets,
)
from sdtune.models.lora_extract import extract_lora
from sdtune.models.tiny import build_tiny
from tests.models.lora_helpers import random_lora, randomize, target_weights

pytestmark = pytest.mark.component


def unet_inputs(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = model.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    return ids, latents, torch.tensor([10])


def denoise(model, ids, latents, timesteps):
    hidden = model.text_encoder(ids)[0]
    return model.unet(latents, timesteps, hidden).sample


# ------------------------------------------------------------------------------------------------- layers and names
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_names_defaults_and_initialisation_are_sd_scripts(family):
    model = build_tiny(family)
    network = LoraNetwork(model)
    sd = network.state_dict()
    # every Linear / Conv2d inside a Transformer2DModel, counted here independently of the library
    expected = sum(1 for m in model.unet.modules() if type(m).__name__ == "Transformer2DModel"
                   for c in m.modules() if isinstance(c, (nn.Linear, nn.Conv2d)))
    assert len(network.unet_loras) == expected > 0
    assert len(network.text_encoder_loras) == 3 * 6  # 3 layers: q, k, v, out_proj, fc1, fc2
    proj_in = sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    # SD 1.x's proj_in is a 1x1 convolution, SD 2.x's a linear layer (use_linear_projection)
    assert tuple(proj_in.shape) == ((4, 32) if family == "sd2-v" else (4, 32, 1, 1))
    assert tuple(sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].shape) == (32, 4)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in sd
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in sd
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in sd)
    for lora in network.loras():
        assert lora.lora_dim == 4 and float(lora.alpha) == 1.0 and lora.scale == 0.25  # network_dim 4, alpha 1
        assert torch.count_nonzero(lora.lora_up.weight) == 0
        fan_in = lora.lora_down.weight[0].numel()
        # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        largest = float(lora.lora_down.weight.detach().abs().max())
        assert 0.5 / math.sqrt(fan_in) < largest <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_3x3_convolutions_get_modules_only_with_conv_dim(family):
    model = build_tiny(family)
    three = {name for name, m in model.unet.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    # the ResNet blocks' and samplers' 3x3 convolutions: all but the U-Net's first and last layer
    wanted = {"lora_unet_" + n.replace(".", "_") for n in three - {"conv_in", "conv_out"}}
    assert len(wanted) > 20

    plain = LoraNetwork(model)
    assert not [lora.lora_name for lora in plain.unet_loras
                if isinstance(lora.org_module, nn.Conv2d) and lora.org_module.kernel_size != (1, 1)]
    assert not any("resnets" in lora.lora_name or "samplers" in lora.lora_name for lora in plain.unet_loras)

    locon = LoraNetwork(model, dim=4, alpha=1.0, conv_dim=2, conv_alpha=1.0)
    conv3 = {lora.lora_name: lora for lora in locon.unet_loras if lora.org_module.weight.dim() == 4
             and lora.org_module.kernel_size == (3, 3)}
    assert set(conv3) == wanted
    for lora in conv3.values():
        assert lora.lora_dim == 2 and lora.scale == 0.5
        assert lora.lora_down.kernel_size == (3, 3) and lora.lora_up.kernel_size == (1, 1)
        assert lora.lora_down.padding == lora.org_module.padding and lora.lora_down.stride == lora.org_module.stride
    # the ResNet blocks' linear and 1x1 layers come with conv_dim too, at the network's dim / alpha
    extra = [lora for lora in locon.unet_loras if "resnets" in lora.lora_name and lora.lora_name not in conv3]
    assert any("time_emb_proj" in lora.lora_name for lora in extra)
    assert any("conv_shortcut" in lora.lora_name for lora in extra)
    assert all(lora.lora_dim == 4 and lora.scale == 0.25 for lora in extra)
    assert len(locon.text_encoder_loras) == len(plain.text_encoder_loras)


def test_update_is_alpha_over_rank_times_up_down_times_multiplier():
    model = build_tiny("sd1")
    network = randomize(LoraNetwork(model, dim=4, alpha=3.0, conv_dim=2, conv_alpha=5.0, multiplier=0.7), std=0.2)
    block = model.unet.down_blocks[0]
    cases = {  # name: (layer, rank, alpha)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            (block.attentions[0].transformer_blocks[0].attn1.to_q, 4, 3.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (block.attentions[0].proj_in, 4, 3.0),  # 1x1 conv
        "lora_unet_down_blocks_0_resnets_0_conv1": (block.resnets[0].conv1, 2, 5.0),  # 3x3 conv
    }
    sd = network.state_dict()
    expected = {}
    for name, (layer, rank, alpha) in cases.items():
        up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
        assert down.shape[0] == rank and float(sd[f"{name}.alpha"]) == alpha
        weight = layer.weight.detach().clone()
        if weight.dim() == 2:
            delta = up @ down
        elif weight.shape[2:] == (1, 1):
            delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
        else:  # W[o, i, y, x] += sum_r up[o, r] * down[r, i, y, x]
            delta = torch.einsum("or,riyx->oiyx", up[:, :, 0, 0], down)
        expected[name] = weight + (alpha / rank) * delta * 0.7
        assert float(delta.abs().max()) > 1e-3

    network.apply_to(model)
    generator = torch.Generator().manual_seed(1)
    for name, (layer, _, _) in cases.items():
        if isinstance(layer, nn.Linear):
            x = torch.randn((2, 5, layer.in_features), generator=generator)
            reference = F.linear(x, expected[name], layer.bias)
        else:
            x = torch.randn((2, layer.in_channels, 8, 8), generator=generator)
            reference = F.conv2d(x, expected[name], layer.bias, layer.stride, layer.padding)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    network.remove()

    merged = merge_lora_into(model, sd, weight=0.7)
    assert set(cases) <= set(merged)
    for name, (layer, _, _) in cases.items():
        torch.testing.assert_close(layer.weight.detach(), expected[name], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------- hooking
def test_base_weights_are_bit_identical_after_apply_train_and_remove():
    model = build_tiny("sd1")
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    torch.manual_seed(0)  # the dropouts' draws
    before = target_weights(model)
    ids, latents, t = unet_inputs(model)
    with torch.no_grad():
        base_out = denoise(model, ids, latents, t)

    network = LoraNetwork(model, dim=4, alpha=4.0, conv_dim=2, conv_alpha=2.0, dropout=0.1, rank_dropout=0.1,
                          module_dropout=0.1).apply_to(model)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.5)
    for _ in range(2):
        loss = denoise(model, ids, latents, t).pow(2).mean()
        loss.backward()
        # module dropout (p 0.1) skips a few modules in a step; the others learn
        for part in (network.unet_loras, network.text_encoder_loras):
            assert sum(lora.lora_up.weight.grad is not None for lora in part) >= 0.7 * len(part)
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in list(model.unet.parameters()) + list(model.text_encoder.parameters()))
    network.eval()
    with torch.no_grad():
        assert not torch.allclose(denoise(model, ids, latents, t), base_out)  # the trained LoRA acts
        network.multiplier = 0.0
        torch.testing.assert_close(denoise(model, ids, latents, t), base_out)  # multiplier 0: the base model
    network.remove()

    after = target_weights(model)
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in list(model.unet.modules()) + list(model.text_encoder.modules()))
    with torch.no_grad():
        assert torch.equal(denoise(model, ids, latents, t), base_out)
    assert not any(k.startswith(("unet.", "text_encoder.")) or "org_module" in k for k in network.state_dict())


def test_parameter_groups_and_parts():
    model = build_tiny("sd1")
    network = LoraNetwork(model)
    groups = network.parameter_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 5e-5), ("unet", 1e-4)]
    assert len(groups[1]["params"]) == 2 * len(network.unet_loras)
    assert [g["name"] for g in network.parameter_groups(1e-4, 0)] == ["unet"]
    assert [g["lr"] for g in network.parameter_groups(None, None, default_lr=1e-3)] == [1e-3, 1e-3]
    unet_only = LoraNetwork(model, train_text_encoder=False)
    assert unet_only.text_encoder_loras == [] and len(unet_only.unet_loras) == len(network.unet_loras)
    assert not any(k.startswith("lora_te") for k in unet_only.state_dict())
    with pytest.raises(SdtuneError, match="another model"):
        network.apply_to(build_tiny("sd1"))


# ------------------------------------------------------------------------------------------------- the file
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_file_round_trip_with_sd_scripts_metadata(tmp_path, family):
    model = build_tiny(family)
    network = random_lora(model)
    metadata = network_metadata(model.family, 4, 2.0, {"conv_dim": 3, "conv_alpha": 1.5}, title="mine", clip_skip=2,
                                timestamp=0)
    path = network.save(tmp_path / "mine.safetensors", metadata, torch.float16)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(network.state_dict())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    v2 = family != "sd1"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    assert meta["ss_v2"] == str(v2) and meta["ss_base_model_version"] == ("sd_v2_v" if v2 else "sd_v1")
    assert meta["modelspec.architecture"] == ("stable-diffusion-v2-768-v/lora" if v2 else "stable-diffusion-v1/lora")
    assert meta["modelspec.prediction_type"] == ("v" if v2 else "epsilon")
    assert meta["modelspec.resolution"] == ("768x768" if v2 else "512x512")
    assert (meta["modelspec.title"], meta["modelspec.encoder_layer"]) == ("mine", "2")
    assert meta["modelspec.date"].startswith("1970-01-01T00:00:00")
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8

    # --network_weights: the same modules in another network get the file's weights
    other = LoraNetwork(build_tiny(family, seed=1), dim=4, alpha=2.0, conv_dim=3, conv_alpha=1.5)
    other.load_weights(path)
    want = {k: v.to(torch.float16).float() for k, v in network.state_dict().items()}
    got = other.state_dict()
    assert all(torch.equal(got[k].float(), want[k]) for k in want)
    rebuilt = LoraNetwork.from_weights(build_tiny(family), path)
    assert {(l.lora_name, l.lora_dim, float(l.alpha)) for l in rebuilt.loras()} == \
        {(l.lora_name, l.lora_dim, float(l.alpha)) for l in network.loras()}
    # a network without the LoCon layers does not take the file silently
    with pytest.raises(ModelLoadError, match="mine.safetensors.*unexpected"):
        LoraNetwork(model, dim=4, alpha=2.0).load_weights(path)
    with pytest.raises(ModelLoadError, match="shape"):
        LoraNetwork(model, dim=8, alpha=2.0, conv_dim=3, conv_alpha=1.5).load_weights(path)

    pickled = network.save(tmp_path / "mine.pt")  # any other suffix: a torch pickle of the state dict
    assert set(read_lora(pickled)[0]) == set(network.state_dict())


def test_addnet_hashes_match_an_independent_computation(tmp_path):
    """The published algorithm (sd-scripts train_util.addnet_hash_safetensors / addnet_hash_legacy, applied by
    precalculate_safetensors_hashes to the file as it is with only its ss_* metadata)."""
    model = build_tiny("sd1")
    network = random_lora(model, dim=32, conv_dim=32)
    path = network.save(tmp_path / "h.safetensors", {"ss_network_dim": "32", "ss_output_name": "h",
                                                    "modelspec.title": "h"})
    raw = path.read_bytes()
    assert len(raw) > 0x100000 + 0x10000  # the legacy hash reads real bytes, not past the end
    header = int.from_bytes(raw[:8], "little")
    model_hash = hashlib.sha256(raw[8 + header:]).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ss_only = tmp_path / "ss_only.safetensors"
    save_file(tensors, str(ss_only), {k: v for k, v in meta.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(ss_only.read_bytes()[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    assert meta["sshs_model_hash"] == model_hash
    assert meta["sshs_legacy_hash"] == legacy
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]


def test_merge_refuses_other_formats_and_foreign_layers_before_changing_anything():
    model = build_tiny("sd1")
    before = target_weights(model)
    sd = random_lora(model).state_dict()
    with pytest.raises(SdtuneError, match="hada_w1_a"):
        merge_lora_into(model, {**sd, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(1)})
    ldm_named = {"lora_unet_input_blocks_1_1_proj_in" + k.removeprefix("lora_unet_down_blocks_0_attentions_0_proj_in"): v
                 for k, v in sd.items() if k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.")}
    with pytest.raises(SdtuneError, match="input_blocks_1_1_proj_in"):
        merge_lora_into(model, {**sd, **ldm_named})
    after = target_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------- extraction
def fine_tuned(base, seed: int = 0, text_encoder: bool = True, scale: float = 0.02):
    """A "fine-tune" of ``base``: every LoRA target layer (LoCon's too) perturbed by full-rank noise."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    layers = list(unet_targets(tuned.unet, conv=True).values())
    if text_encoder:
        layers += list(text_encoder_targets(tuned.text_encoder).values())
    with torch.no_grad():
        for layer in layers:
            layer.weight.add_(torch.randn(layer.weight.shape, generator=generator) * scale)
    return tuned


def test_extract_at_full_rank_merges_back_to_the_tuned_model():
    base = build_tiny("sd1")
    tuned = fine_tuned(base)
    result = extract_lora(base, tuned, dim=100_000, conv_dim=100_000, clamp_quantile=1.0)
    assert result.text_encoder_included
    assert result.errors["unet"] < 1e-5 and result.errors["text_encoder"] < 1e-5
    merged = copy.deepcopy(base)
    merge_lora_into(merged, result.state_dict)
    want, got, original = target_weights(tuned), target_weights(merged), target_weights(base)
    changed = [k for k in want if not torch.equal(want[k], original[k])]
    assert len(changed) == len(result.state_dict) // 3  # every perturbed layer has its module
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-6)


def test_extract_at_low_rank_reports_its_error(caplog):
    base = build_tiny("sd1")
    tuned = fine_tuned(base, text_encoder=False)
    with caplog.at_level(logging.INFO, logger="sdtune.models.lora_extract"):
        result = extract_lora(base, tuned, dim=1, conv_dim=1, clamp_quantile=1.0)
    assert not result.text_encoder_included and "text_encoder" not in result.errors
    assert not any(k.startswith("lora_te") for k in result.state_dict)
    assert any("relative approximation error" in r.getMessage() for r in caplog.records)
    assert all(v.shape[0] == 1 for k, v in result.state_dict.items() if k.endswith("lora_down.weight"))
    # the reported error, recomputed from the merged weights: ||(tuned - base) - lora|| / ||tuned - base||
    merged = copy.deepcopy(base)
    merge_lora_into(merged, result.state_dict)
    want, got, original = target_weights(tuned), target_weights(merged), target_weights(base)
    residual = sum(float((got[k] - want[k]).pow(2).sum()) for k in want if k.startswith("unet."))
    total = sum(float((want[k] - original[k]).pow(2).sum()) for k in want if k.startswith("unet."))
    assert 0.5 < result.errors["unet"] < 1.0
    assert result.errors["unet"] == pytest.approx(math.sqrt(residual / total), rel=1e-3)
    clamped = extract_lora(base, tuned, dim=1, conv_dim=1, clamp_quantile=0.5)
    assert clamped.errors["unet"] > result.errors["unet"]  # clamping costs accuracy
