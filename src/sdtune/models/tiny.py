"""Tiny Stable Diffusion models: the real topologies (4 U-Net levels, 2 layers a block, cross-attention, the VAE's
8x downsampling, a CLIP/OpenCLIP text encoder with the real 49,408-token vocabulary) at tiny widths.

Used by the tests and by ``sdtune demo``; a forward pass on a 64x64 image takes milliseconds on a CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from sdtune.models.families import Family, get_family
from sdtune.models.sd import StableDiffusion, build_modules
from sdtune.models.tokenizer import packaged_tokenizer


def tiny_configs(family: Family) -> dict[str, dict[str, Any]]:
    """``family``'s component configs at tiny widths (32-64 channels, 3 text layers), for :func:`build_tiny`."""
    configs = family.configs()
    width = 32
    configs["unet"].update(
        block_out_channels=[32, 32, 64, 64],
        cross_attention_dim=width,
        attention_head_dim=[2, 2, 4, 4] if family.is_v2 else 2,
        sample_size=8,
    )
    configs["vae"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
    configs["text_encoder"].update(
        hidden_size=width,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        projection_dim=width,
    )
    return copy.deepcopy(configs)


def build_tiny(family: Family | str = "sd1", seed: int = 0) -> StableDiffusion:
    """A randomly initialised tiny model of ``family``, the same for the same seed."""
    if isinstance(family, str):
        family = get_family(family)
    configs = tiny_configs(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build_modules(configs)
        # diffusers zero-initialises some output layers; give every tensor random values so that a conversion
        # that swapped or dropped a tensor cannot go unnoticed.
        with torch.no_grad():
            for module in (unet, vae, text_encoder):
                for p in module.parameters():
                    if p.dim() == 1 and torch.all(p == 1):
                        p.uniform_(0.9, 1.1)  # norm weights
                    else:
                        p.normal_(0.0, 0.02 if p.dim() > 1 else 0.01)
    tokenizer = packaged_tokenizer(family.pad_token)
    return StableDiffusion(family=family, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
