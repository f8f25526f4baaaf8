"""A LoRA from the difference of two models (sd-scripts' ``networks/extract_lora_from_models.py``): for every
target layer, the truncated SVD of ``tuned - base``.

The update of each layer is ``U_r S_r @ Vh_r`` (``up = U_r S_r``, ``down = Vh_r``, alpha = rank so the scale is 1),
both clamped to the ``clamp_quantile`` quantile of their values as sd-scripts does (1.0: no clamping). The rank of a
layer is ``dim`` (``conv_dim`` for 3x3 convolutions, which are left out without it), at most the rank its
difference can have: ``min(out, in * kh * kw)``. (sd-scripts caps it at ``min(out, in)``, which for a 3x3
convolution that widens the channels is below full rank.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sdtune.errors import SdtuneError
from sdtune.models.lora import is_conv3x3, text_encoder_targets, unet_targets

if TYPE_CHECKING:
    from sdtune.models.sd import StableDiffusion

logger = logging.getLogger(__name__)


@dataclass
class Extracted:
    """The LoRA state dict, and per model part (``unet``, ``text_encoder``) the relative approximation error
    ``||D - D_r||_F / ||D||_F`` over all of that part's layers (D: the weight differences, D_r: the LoRA's)."""

    state_dict: dict[str, torch.Tensor]
    errors: dict[str, float] = field(default_factory=dict)
    text_encoder_included: bool = True


def _low_rank(diff: torch.Tensor, rank: int, clamp_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    out_dim = diff.shape[0]
    mat = diff.float().flatten(1)
    rank = min(rank, *mat.shape)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()])
        if values.numel() > 16_000_000:  # torch.quantile's input limit: a strided sample of the values
            values = values[:: math.ceil(values.numel() / 16_000_000)]
        hi = torch.quantile(values, clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if diff.dim() == 4:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, *diff.shape[1:])
    return up.contiguous(), down.contiguous()


@torch.no_grad()
def extract_lora(base: StableDiffusion, tuned: StableDiffusion, dim: int = 4, conv_dim: int | None = None,
                 clamp_quantile: float = 0.99, min_diff: float = 0.01,
                 device: str | torch.device | None = None) -> Extracted:
    """The LoRA that takes ``base`` towards ``tuned``. The text encoder is left out (as in sd-scripts) when no
    weight of it differs by more than ``min_diff``."""
    if base.family.is_v2 != tuned.family.is_v2:
        raise SdtuneError("the two models are of different generations (SD 1.x vs SD 2.x); extract from a model "
                          "and one fine-tuned from it")
    if not 0.0 < clamp_quantile <= 1.0:
        raise SdtuneError(f"--clamp_quantile {clamp_quantile}: must be in (0, 1]")
    parts = {
        "text_encoder": (text_encoder_targets(base.text_encoder), text_encoder_targets(tuned.text_encoder)),
        "unet": (unet_targets(base.unet, conv=conv_dim is not None),
                 unet_targets(tuned.unet, conv=conv_dim is not None)),
    }
    result = Extracted({})
    for part, (base_layers, tuned_layers) in parts.items():
        if set(base_layers) != set(tuned_layers):
            raise SdtuneError(f"the two models' {part} layers differ; extract from a model and one fine-tuned from it")
        diffs = {}
        for name, layer in base_layers.items():
            other = tuned_layers[name].weight
            if tuple(other.shape) != tuple(layer.weight.shape):
                raise SdtuneError(f"{name}: the layer has shape {tuple(layer.weight.shape)} in one model and "
                                  f"{tuple(other.shape)} in the other; they are not the same architecture")
            diffs[name] = other.detach().to(device or "cpu", torch.float32) - layer.weight.detach().to(
                device or "cpu", torch.float32)
        if part == "text_encoder":
            largest = max((float(d.abs().max()) for d in diffs.values()), default=0.0)
            if largest <= min_diff:
                logger.warning("the text encoders differ by at most %.3g (--min_diff %g): extracting the U-Net only",
                               largest, min_diff)
                result.text_encoder_included = False
                continue
        residual = total = 0.0
        for name, diff in diffs.items():
            rank = conv_dim if is_conv3x3(base_layers[name]) else dim
            if not rank:
                continue
            up, down = _low_rank(diff, int(rank), clamp_quantile)
            approx = (up.flatten(1) @ down.flatten(1)).reshape(diff.shape)
            residual += float((diff - approx).pow(2).sum())
            total += float(diff.pow(2).sum())
            result.state_dict[f"{name}.lora_up.weight"] = up.cpu()
            result.state_dict[f"{name}.lora_down.weight"] = down.cpu()
            result.state_dict[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        result.errors[part] = math.sqrt(residual / total) if total > 0 else 0.0
        logger.info("%s: %d layers, relative approximation error %.4g (dim %s, conv_dim %s)", part, len(diffs),
                    result.errors[part], dim, conv_dim)
    return result
