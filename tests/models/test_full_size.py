"""Full-size SD1.5- and SD2.1-shaped models with random weights: every key maps, both ways.

Slow (about a minute, a few GB of memory) but CI runs it: the tiny models cannot prove that the key maps cover
the real block counts and widths.
"""

from __future__ import annotations

import torch
import pytest
from accelerate import init_empty_weights

from sdtune.models.families import get_family
from sdtune.models.io import diffusers_state_dict, ldm_state_dict, load_model, save_model
from sdtune.models.sd import StableDiffusion, build_modules
from sdtune.models.tokenizer import packaged_tokenizer


def random_full_size(name: str) -> StableDiffusion:
    family = get_family(name)
    with init_empty_weights(include_buffers=False):
        unet, vae, text = build_modules(family.configs())
    generator = torch.Generator().manual_seed(0)
    for module in (unet, vae, text):
        module.to_empty(device="cpu")
        module.to(torch.float16)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(torch.float16))
    return StableDiffusion(family, unet, vae, text, packaged_tokenizer(family.pad_token))


# Key counts of the released checkpoints' model weights (v1-5-pruned and v2-1_768-ema-pruned, without the DDPM
# schedule buffers and EMA copies): U-Net 686, VAE 248; SD1's CLIP 12 layers x 16 + 4 (+ position_ids), SD2's
# OpenCLIP 24 layers x 12 + 6 (token and positional embeddings, ln_final, text_projection, logit_scale).
EXPECTED_LDM_KEYS = {"sd1": 686 + 248 + 12 * 16 + 4 + 1, "sd2-v": 686 + 248 + 24 * 12 + 6}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd1", "sd2-v"])
def test_full_size_model_converts_both_ways(tmp_path, name):
    model = random_full_size(name)
    ldm = ldm_state_dict(model, torch.float16)
    assert len(ldm) == EXPECTED_LDM_KEYS[name]
    path = save_model(model, tmp_path / "full.safetensors", "safetensors", "fp16")
    del ldm
    back = load_model(path, dtype=torch.float16)  # strict: any missing or unexpected key raises
    original = diffusers_state_dict(model)
    reloaded = diffusers_state_dict(back)
    assert set(original) == set(reloaded)
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert back.family.name == name
    assert back.unet.config.cross_attention_dim == (1024 if name == "sd2-v" else 768)
