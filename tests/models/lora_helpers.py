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


def full_size_fp16(name: str, seed: int = 0) -> StableDiffusion:
    """A full-size model of family ``name`` in fp16 with pseudo-random weights, built fast and lean: the modules are
    made on the meta device, cast there, then allocated once in fp16 (no float32 copy), and every tensor is a window
    of one shared pool of random values at its own random offset (drawing 1.3 billion normal samples would take
    most of a minute), each matrix and kernel scaled by 1 / sqrt(fan-in) so that a forward pass stays finite and a
    training step on the model gives a finite loss. Enough to tell every tensor from any other, which is all the
    key-mapping tests need."""
    from accelerate import init_empty_weights

    from sdtune.models.families import get_family
    from sdtune.models.sd import build_modules
    from sdtune.models.tokenizer import packaged_tokenizer

    family = get_family(name)
    with init_empty_weights(include_buffers=False):
        modules = build_modules(family.configs())
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator).to(torch.float16)
    doubled = torch.cat([pool, pool])
    for module in modules:
        torch.nn.Module.to(module, dtype=torch.float16)
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                flat = p.view(-1)
                done = 0
                while done < flat.numel():
                    start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
                    n = min(pool.numel(), flat.numel() - done)
                    flat[done:done + n].copy_(doubled[start:start + n])
                    done += n
                if p.dim() > 1:  # so that activations stay finite through the full depth and a step can train
                    p.mul_(float(p[0].numel()) ** -0.5)
    unet, vae, text = modules
    return StableDiffusion(family, unet, vae, text, packaged_tokenizer(family.pad_token))
