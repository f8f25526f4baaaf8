"""The GPU checks a session with a lent GPU runs (one script, a few minutes): what the CPU cannot show.

For SD 1.5's (or SD 2.x's) full-size U-Net with random weights, at 512 px (64x64 latents), batch 1, it trains a few
steps per configuration with sdtune's own pieces (attention choice, torch.autocast, LossScaler, HalfWeightAdamW,
bitsandbytes' AdamW8bit, gradient checkpointing) and prints seconds per step and peak CUDA memory:

    .venv/bin/python bench/gpu_checks.py [--family sd1] [--resolution 512] [--steps 6] [--device cuda]

Also checked, and printed as PASS/FAIL:
* fp16 loss scaling on CUDA: the first step at scale 2^16 is finite or skipped, the scale settles, no NaN weights;
* full fp16 with HalfWeightAdamW: weights stay fp16 and finite and move;
* host syncs: one optimizer step runs under ``torch.cuda.set_sync_debug_mode("warn")`` and the warnings are counted
  (kernel-level syncs no Python hook sees; bench/bench_syncs.py --device cuda counts the Python-level ones);
* xformers, when installed.
``--device cpu --resolution 64 --steps 1`` runs the same code on a CPU (a smoke test of the script only; the figures
mean nothing there). Not a test: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch

from sdtune.models.attention import set_attention
from sdtune.models.families import get_family
from sdtune.models.sd import build_modules, place
from sdtune.train.optim import build_optimizer, step_with_factor
from sdtune.train.precision import LossScaler, unscale_and_clip


def make_step(unet, device, resolution: int, autocast: torch.dtype | None, scaler: LossScaler | None,
              optimizer) -> Callable[[], float]:
    latent = resolution // 8
    context_dim = unet.config.cross_attention_dim
    generator = torch.Generator(device).manual_seed(0)
    params = [p for p in unet.parameters() if p.requires_grad]

    def step() -> float:
        x = torch.randn(1, 4, latent, latent, device=device, generator=generator)
        t = torch.randint(0, 1000, (1,), device=device, generator=generator)
        states = torch.randn(1, 77, context_dim, device=device, generator=generator)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            pred = unet(x.to(next(unet.parameters()).dtype), t, states.to(next(unet.parameters()).dtype)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x)
        (scaler.scale_loss(loss) if scaler else loss).backward()
        grads = [p.grad for p in params if p.grad is not None]
        found_inf, factor = unscale_and_clip(grads, scaler, 1.0, device)  # the trainer's own step
        if scaler is not None:
            scaler.update(found_inf)
        if not bool(found_inf):
            step_with_factor(optimizer, grads, factor)
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


CONFIGS = {
    "fp32": dict(),
    "fp16 autocast + loss scaling": dict(autocast=torch.float16, scaler=True),
    "bf16 autocast": dict(autocast=torch.bfloat16),
    "fp16 + gradient checkpointing": dict(autocast=torch.float16, scaler=True, checkpointing=True),
    "fp16 + 8-bit AdamW": dict(autocast=torch.float16, scaler=True, optimizer="AdamW8bit"),
    "full fp16 (HalfWeightAdamW, kahan)": dict(autocast=torch.float16, scaler=True, weights=torch.float16),
    "full bf16 (HalfWeightAdamW, kahan)": dict(autocast=torch.bfloat16, weights=torch.bfloat16),
    "fp16 + xformers": dict(autocast=torch.float16, scaler=True, attention="xformers"),
}


def run_config(name: str, spec: dict, args, device: torch.device) -> None:
    family = get_family(args.family)
    unet, _, _ = build_modules(family.configs())
    weights = spec.get("weights", torch.float32)
    place(unet, device, weights).train()
    try:
        set_attention(unet, spec.get("attention", "sdpa"))
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not run and goes on
        print(f"{name:40} skipped: {exc}")
        return
    if spec.get("checkpointing"):
        unet.enable_gradient_checkpointing()
    groups = [{"params": [p for p in unet.parameters()]}]
    optimizer = build_optimizer(spec.get("optimizer", "AdamW"), groups, 1e-5, {},
                                half_weights=weights != torch.float32)
    scaler = LossScaler(device) if spec.get("scaler") else None
    step = make_step(unet, device, args.resolution, spec.get("autocast"), scaler, optimizer)
    before = next(unet.parameters()).detach().clone()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (kernel selection, allocator)
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    finite = all(torch.isfinite(p).all() for p in unet.parameters())
    moved = not torch.equal(before, next(unet.parameters()).detach())
    checks = [("finite weights", finite), ("weights moved", moved), ("finite loss", all(map(lambda v: v == v, losses)))]
    if scaler is not None:
        checks.append((f"loss scale {scaler.scale:g}", scaler.scale >= 1))
    status = ", ".join(f"{what} {'PASS' if ok else 'FAIL'}" for what, ok in checks)
    print(f"{name:40} {seconds:6.3f} s/step  peak {peak:6.2f} GiB  {status}")
    if device.type == "cuda" and name == "fp16 autocast + loss scaling":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"{'':40} syncs in one step (CUDA debug mode): {len(syncs)} (the loss read is one)")
    del unet, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test only)"
    print(f"{args.family} U-Net, {args.resolution} px, batch 1, {args.steps} timed steps on {where}")
    for name, spec in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        run_config(name, spec, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
