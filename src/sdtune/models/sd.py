"""The in-memory Stable Diffusion model: diffusers/transformers modules plus the family they belong to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sdtune.models.families import Family

if TYPE_CHECKING:  # imported where used: diffusers and transformers take seconds to import, `--help` none
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass
class StableDiffusion:
    """A loaded model: its family, the diffusers/transformers modules and the LDM tensors diffusers has no place for."""

    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    # Tensors of an LDM file that diffusers has no place for (OpenCLIP's last layer, text_projection, logit_scale),
    # kept so that a loaded .safetensors/.ckpt is written back whole.
    ldm_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        """The family's: ``epsilon`` or ``v_prediction``."""
        return self.family.prediction_type

    def noise_scheduler(self) -> DDPMScheduler:
        """A new DDPM scheduler of the model's training schedule and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.family.scheduler_config())

    def configs(self) -> dict[str, dict[str, Any]]:
        """The component configs as plain dicts (what a diffusers folder's config.json files hold)."""
        return {
            "unet": {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")},
            "vae": {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")},
            "text_encoder": text_config_dict(self.text_encoder.config),
            "scheduler": self.family.scheduler_config(),
        }


def text_config_dict(config: CLIPTextConfig) -> dict[str, Any]:
    """The CLIP text config fields that :meth:`StableDiffusion.configs` keeps for the text encoder."""
    keys = ("hidden_act", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "max_position_embeddings", "projection_dim", "vocab_size", "layer_norm_eps", "bos_token_id",
            "eos_token_id", "pad_token_id")
    return {k: getattr(config, k) for k in keys}


def build_modules(configs: dict[str, dict[str, Any]]) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Randomly initialised modules of the given configs (callers load weights into them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return unet, vae, text_encoder


def place(module: torch.nn.Module, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module.to(device, dtype)`` through torch's own ``Module.to``: diffusers' override logs a warning about
    "modules that should be kept in float32" on every cast, even when (as for SD) there are none."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def with_prediction_type(family: Family, prediction_type: str) -> Family:
    """``family`` with ``prediction_type`` (``family`` itself when it has it already)."""
    return family if family.prediction_type == prediction_type else dataclasses.replace(
        family, prediction_type=prediction_type)
