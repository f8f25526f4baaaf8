"""Activation memory of a training step of the full-size U-Net, per memory option, measured on the CPU.

Builds SD 1.5's (or SD 2.x's) U-Net with random weights from the packaged family config, runs one training forward
pass at the given resolution and batch, and counts the bytes of every tensor autograd keeps for the backward pass
(distinct storages, the U-Net's own weights excluded): the activation memory that the README's memory table talks
about. Weights, gradients and optimizer state follow from the parameter count and are printed alongside.

    .venv/bin/python bench/bench_memory.py [--family sd1] [--resolution 512] [--batch 1] [--threads 2]

What a GPU adds on top (CUDA context, allocator caching, cuDNN workspaces) is not measured here: this machine has
no GPU. SDPA on the CPU keeps what a GPU's flash kernel keeps (the output and the softmax statistics), so the
attention figures carry over. Not a test: nothing here asserts a size. Needs about 10 GB of RAM for SD 1.5 at 512 px.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdtune.models.attention import set_attention
from sdtune.models.families import get_family
from sdtune.models.sd import build_modules, place

GIB = 2**30


def saved_bytes(unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                autocast: torch.dtype | None) -> tuple[int, int]:
    """(activation bytes, bytes of half-precision weight copies) that autograd keeps for the backward pass.

    Under autocast the fp32 weights are cast for each layer and the casts are kept for backward too: a second,
    half-size copy of the weights that mixed precision costs on top of the fp32 master weights."""
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    weight_shapes = {tuple(p.shape) for p in unet.parameters()}
    storages: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in weights:
            return t
        is_copy = autocast is not None and t.dtype == autocast and tuple(t.shape) in weight_shapes
        (copies if is_copy else storages)[storage.data_ptr()] = storage.nbytes()
        return t

    context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        out = unet(latents, timesteps, states).sample
    del out  # no backward: the saved tensors are what matters
    return sum(storages.values()), sum(copies.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sd2-v"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    family = get_family(args.family)
    torch.manual_seed(0)
    unet, _, _ = build_modules(family.configs())
    unet.train()
    params = sum(p.numel() for p in unet.parameters())
    side = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, side, side, generator=g)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=g)
    width = unet.config.cross_attention_dim
    states = torch.randn(args.batch, 77, width, generator=g)

    print(f"{family.name} U-Net: {params / 1e6:.0f}M parameters; {args.resolution} px ({side}x{side} latents), "
          f"batch {args.batch}")
    print(f"  weights fp32 {params * 4 / GIB:.2f} GiB (fp16/bf16 {params * 2 / GIB:.2f}); gradients the same; "
          f"AdamW state {params * 8 / GIB:.2f} GiB (8-bit: {params * 2 / GIB:.2f})")
    print(f"  {'kept for backward':<44}{'activations GiB':>16}{'vs first':>10}{'weight copies GiB':>19}"
          f"{'forward s':>11}")
    rows = [
        ("fp32, sdpa", "sdpa", False, None),
        ("fp32, sdpa, gradient checkpointing", "sdpa", True, None),
        ("bf16 autocast, sdpa", "sdpa", False, torch.bfloat16),
        ("bf16 autocast, sdpa, gradient checkpointing", "sdpa", True, torch.bfloat16),
        ("fp32, mem_eff (sliced)", "mem_eff", False, None),
        # last: the weights themselves become bf16, as with --full_bf16 (--full_fp16 keeps the same sizes)
        ("full bf16 weights, sdpa", "sdpa", False, "full"),
        ("full bf16 weights, sdpa, gradient checkpointing", "sdpa", True, "full"),
    ]
    first = None
    for label, attention, checkpointing, autocast in rows:
        if autocast == "full":
            place(unet, dtype=torch.bfloat16)
            latents, states, autocast = latents.bfloat16(), states.bfloat16(), None
        set_attention(unet, attention)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        started = time.perf_counter()
        size, copies = saved_bytes(unet, latents, timesteps, states, autocast)
        seconds = time.perf_counter() - started
        first = first or size
        print(f"  {label:<44}{size / GIB:>16.2f}{size / first:>10.2f}{copies / GIB:>19.2f}{seconds:>11.1f}")


if __name__ == "__main__":
    main()
