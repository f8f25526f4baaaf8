"""Helpers of the LoRA tests: a LoRA network with random (non-zero) weights on a tiny model."""

from __future__ import annotations

import torch

from sdtune.models.lora import LoraNetwork
from sdtune.models.sd import StableDiffusion


def randomize(network: LoraNetwork, seed: int = 0, std: float = 0.05) -> LoraNetwork:
    """Random up and down weights (a fresh network's up weights are zero: its update would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(network.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return network


def random_lora(model: StableDiffusion, seed: int = 0, **kwargs) -> LoraNetwork:
    kwargs = {"dim": 4, "alpha": 2.0, "conv_dim": 3, "conv_alpha": 1.5, **kwargs}
    return randomize(LoraNetwork(model, **kwargs), seed)


def target_weights(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Copies of every U-Net and text-encoder weight, keyed by component and state-dict key."""
    out = {f"unet.{k}": v.detach().clone() for k, v in model.unet.state_dict().items()}
    out.update({f"text_encoder.{k}": v.detach().clone() for k, v in model.text_encoder.state_dict().items()})
    return out
