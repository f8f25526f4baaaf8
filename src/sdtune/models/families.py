"""Stable Diffusion model families as data: component configs, prediction type, tokenizer padding, clip skip.

The configs are those of the reference diffusers repositories (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1-base, stabilityai/stable-diffusion-2-1), so a single-file checkpoint loads with no
network access: only the weights come from the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

SCHEDULER_BASE: dict[str, Any] = {
    # The DDPM schedule SD was trained with (ldm's "linear" schedule is diffusers' "scaled_linear").
    "_class_name": "DDPMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

_SD1_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": False,
}

_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' name; SD2 uses 64-wide heads, so these are head counts
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}

_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_CLIP_L: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

_OPENCLIP_H: dict[str, Any] = {
    **_CLIP_L,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    # OpenCLIP ViT-H has 24 layers; SD 2.x conditions on the penultimate one, so diffusers keeps 23.
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "bos_token_id": 0,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class Family:
    """What distinguishes one Stable Diffusion generation from another."""

    name: str  # "sd1", "sd2", "sd2-v"
    description: str
    text_encoder: str  # "clip" (SD1, HF CLIP layout in LDM files) or "openclip" (SD2)
    prediction_type: str  # "epsilon" or "v_prediction"
    resolution: int
    pad_token: str  # SD1 pads with <|endoftext|>, SD2 (OpenCLIP) with "!" (id 0)
    default_clip_skip: int
    modelspec_architecture: str
    hub_repo: str
    unet: dict[str, Any] = field(repr=False, default_factory=dict)
    vae: dict[str, Any] = field(repr=False, default_factory=dict)
    text: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def is_v2(self) -> bool:
        """SD 2.x (the OpenCLIP text encoder), whatever the prediction type."""
        return self.text_encoder == "openclip"

    @property
    def v_parameterization(self) -> bool:
        """The model predicts velocity (sd-scripts' ``--v_parameterization``)."""
        return self.prediction_type == "v_prediction"

    def scheduler_config(self) -> dict[str, Any]:
        """The config of SD's DDPM training schedule with this family's prediction type."""
        return {**SCHEDULER_BASE, "prediction_type": self.prediction_type}

    def configs(self) -> dict[str, dict[str, Any]]:
        """Deep copies of the component configs (callers may change them)."""
        return {
            "unet": copy.deepcopy(self.unet),
            "vae": copy.deepcopy(self.vae),
            "text_encoder": copy.deepcopy(self.text),
            "scheduler": self.scheduler_config(),
        }


SD1 = Family(
    name="sd1",
    description="Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, epsilon prediction, 512 px)",
    text_encoder="clip",
    prediction_type="epsilon",
    resolution=512,
    pad_token="<|endoftext|>",
    default_clip_skip=1,
    modelspec_architecture="stable-diffusion-v1",
    hub_repo="runwayml/stable-diffusion-v1-5",
    unet=_SD1_UNET,
    vae=_VAE,
    text=_CLIP_L,
)

SD2 = Family(
    name="sd2",
    description="Stable Diffusion 2.x 512-base (OpenCLIP ViT-H/14, epsilon prediction, 512 px)",
    text_encoder="openclip",
    prediction_type="epsilon",
    resolution=512,
    pad_token="!",
    default_clip_skip=1,  # the 23-layer text encoder already ends at OpenCLIP's penultimate layer
    modelspec_architecture="stable-diffusion-v2-512",
    hub_repo="stabilityai/stable-diffusion-2-1-base",
    unet=_SD2_UNET,
    vae=_VAE,
    text=_OPENCLIP_H,
)

SD2_V = Family(
    name="sd2-v",
    description="Stable Diffusion 2.x 768-v (OpenCLIP ViT-H/14, v-prediction, 768 px)",
    text_encoder="openclip",
    prediction_type="v_prediction",
    resolution=768,
    pad_token="!",
    default_clip_skip=1,
    modelspec_architecture="stable-diffusion-v2-768-v",
    hub_repo="stabilityai/stable-diffusion-2-1",
    unet={**_SD2_UNET, "sample_size": 96},
    vae={**_VAE, "sample_size": 768},
    text=_OPENCLIP_H,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SD2_V)}


def get_family(name: str) -> Family:
    """The family named ``name`` (``sd1``, ``sd2``, ``sd2-v``); ValueError for any other name."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}") from None
