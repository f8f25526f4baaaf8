"""The key maps as data: both directions, on every key of the tiny models."""

from __future__ import annotations

import pytest
import torch

from sdtune.errors import ConversionError
from sdtune.models.families import SD1
from sdtune.models.ldm_keys import build_key_map, normalize_ldm_keys, normalize_text_keys, unet_pairs
from sdtune.models.save import diffusers_state_dict
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_to_ldm_then_back_is_identity(family):
    model = build_tiny(family)
    key_map = build_key_map(model.configs(), model.family.text_encoder)
    dsd = diffusers_state_dict(model)
    ldm = key_map.to_ldm(dsd)
    back, extras = key_map.to_diffusers(ldm)
    assert extras == {}
    assert set(back) == set(dsd)
    assert all(torch.equal(back[k], dsd[k]) for k in dsd)


def test_unet_block_indices_of_sd15():
    """Spot checks against the released v1-5 checkpoint's names."""
    pairs = dict(unet_pairs(SD1.unet))
    assert pairs["unet.down_blocks.0.resnets.1.norm1."] == "model.diffusion_model.input_blocks.2.0.in_layers.0."
    assert pairs["unet.down_blocks.1.attentions.0."] == "model.diffusion_model.input_blocks.4.1."
    assert pairs["unet.down_blocks.2.downsamplers.0.conv."] == "model.diffusion_model.input_blocks.9.0.op."
    assert pairs["unet.up_blocks.0.upsamplers.0.conv."] == "model.diffusion_model.output_blocks.2.1.conv."
    assert pairs["unet.up_blocks.1.upsamplers.0.conv."] == "model.diffusion_model.output_blocks.5.2.conv."
    assert pairs["unet.up_blocks.3.attentions.2."] == "model.diffusion_model.output_blocks.11.1."
    assert pairs["unet.mid_block.resnets.1.conv2."] == "model.diffusion_model.middle_block.2.out_layers.3."


def test_openclip_qkv_is_fused_in_order():
    model = build_tiny("sd2-v")
    key_map = build_key_map(model.configs(), "openclip")
    dsd = diffusers_state_dict(model)
    fused = key_map.to_ldm(dsd)["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = (dsd[f"text_encoder.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(fused, torch.cat([q, k, v]))


def test_unmapped_key_raises_with_its_name():
    model = build_tiny("sd1")
    key_map = build_key_map(model.configs(), "clip")
    ldm = key_map.to_ldm(diffusers_state_dict(model))
    ldm["model.diffusion_model.some_adapter.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="some_adapter"):
        key_map.to_diffusers(ldm)
    with pytest.raises(ConversionError, match="unet.extra"):
        key_map.to_ldm({**diffusers_state_dict(model), "unet.extra.weight": torch.zeros(1)})


def test_ignorable_ldm_keys_are_ignored_and_old_clip_layout_accepted():
    model = build_tiny("sd1")
    key_map = build_key_map(model.configs(), "clip")
    ldm = key_map.to_ldm(diffusers_state_dict(model))
    ldm.update({"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000), "model_ema.decay": torch.tensor(0.9999)})
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in ldm.items()}
    back, _ = key_map.to_diffusers(normalize_ldm_keys(old))
    assert set(back) == set(diffusers_state_dict(model))


def test_text_keys_accept_both_transformers_layouts():
    sd = {"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1), "embeddings.position_ids": torch.zeros(1)}
    assert list(normalize_text_keys(sd)) == ["encoder.layers.0.mlp.fc1.weight"]
