"""LoRA against full fine-tuning: seconds per training step and the memory of a step, same model and batch, on the CPU.

Runs the training step of ``sdtune train`` (prompts encoded, noise added, U-Net forward, MSE loss, backward,
gradient clipping, AdamW step) on one model, for: the fine-tune of the U-Net (sdtune's default), a LoRA of rank
``--dim`` on the U-Net and the text encoder (``--network_module lora``'s default), the same LoRA on the U-Net only
(``--network_train_unet_only``), and each of those with ``--gradient_checkpointing``. The LoRA is sdtune's own
(:class:`sdtune.models.lora.LoraNetwork`, alpha 1, modules hooked as the trainer hooks them). Everything is fp32,
as without ``--mixed_precision``; with ``--mixed_precision bf16`` the step runs under bf16 autocast and, as in
``sdtune train``, the LoRA rows keep the frozen model in bf16 (the LoRA in fp32) while the fine-tune rows keep fp32
weights (autocast's bf16 copies of them, kept for backward, then count as activations).

Seconds per step: the mean of ``--steps`` timed steps after one untimed step (start-up, first-call allocations and
the optimizer's state are not in it), as CPU seconds of this process (the work, steadier than wall-clock time on a
shared machine) and wall-clock seconds.

Memory, counted from the tensors (what a GPU would hold, less the CUDA context and allocator slack): the weights
(frozen and trained), the gradients, the optimizer state (AdamW: two fp32 moments a trained parameter) and the
activations, i.e. the bytes autograd keeps for the backward pass (distinct storages, weights excluded), as
bench/bench_memory.py counts them.

    .venv/bin/python bench/bench_lora.py [--model tiny|sd1] [--resolution 256] [--batch 1] [--dim 16] [--steps 3]

``--model tiny``: sdtune's tiny SD1 model (U-Net width 32, seconds). ``--model sd1``: SD 1.5's full-size U-Net and
text encoder with random weights; the fine-tune rows need about 14 GB of RAM, so they are skipped (with a line
saying so) when the machine has less free. ``--json``: one JSON line a row (sizes in bytes). ``--smoke``: the tiny
model at 64 px in seconds, to check the script (tests/bench/test_bench_lora.py). Not a test: nothing here asserts a
time or a size.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import psutil
import torch

from sdtune.models.families import get_family
from sdtune.models.lora import LoraNetwork
from sdtune.models.sd import StableDiffusion, build_modules, place
from sdtune.models.text import encode_prompts
from sdtune.models.tiny import build_tiny
from sdtune.models.tokenizer import packaged_tokenizer
from sdtune.train import noise as noise_lib

GIB = 2**30


def full_size_sd1(seed: int = 0) -> StableDiffusion:
    """SD 1.5's U-Net and text encoder (fp32) with pseudo-random weights, built in seconds: the modules are made on
    the meta device, allocated once, and every tensor is a window of one pool of N(0, 0.02) values at a random
    offset (drawing a billion normal samples would take minutes). The VAE stays on the meta device: no step uses
    it."""
    from accelerate import init_empty_weights

    family = get_family("sd1")
    with init_empty_weights(include_buffers=False):
        unet, vae, text_encoder = build_modules(family.configs())
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator) * 0.02
    doubled = torch.cat([pool, pool])
    for module in (unet, text_encoder):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                flat, done = p.view(-1), 0
                while done < flat.numel():
                    start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
                    n = min(pool.numel(), flat.numel() - done)
                    flat[done:done + n].copy_(doubled[start:start + n])
                    done += n
        for name, buffer in module.named_buffers():  # position ids: real values, not random
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return StableDiffusion(family, unet, vae, text_encoder, packaged_tokenizer(family.pad_token))


@dataclass
class Row:
    label: str
    lora: bool
    unet_only: bool = False
    checkpointing: bool = False


ROWS = [
    Row("fine-tune (U-Net)", lora=False),
    Row("fine-tune, gradient checkpointing", lora=False, checkpointing=True),
    Row("LoRA (U-Net + text encoder)", lora=True),
    Row("LoRA, U-Net only", lora=True, unet_only=True),
    Row("LoRA, gradient checkpointing", lora=True, checkpointing=True),
    Row("LoRA, U-Net only, gradient checkpointing", lora=True, unet_only=True, checkpointing=True),
]


def nbytes(tensors) -> int:
    """Bytes of distinct storages."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class SavedBytes:
    """Counts the bytes autograd keeps for backward during a forward (weights excluded), as bench_memory.py."""

    def __init__(self, weights: set[int]) -> None:
        self.weights, self.storages = weights, {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.weights:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run_row(model: StableDiffusion, row: Row, dim: int, batch: int, side: int, steps: int,
            autocast: Optional[torch.dtype] = None, seed: int = 0) -> Optional[dict]:
    """One configuration: seconds per step and the memory figures (bytes)."""
    unet, te, tok = model.unet, model.text_encoder, model.tokenizer
    # as the trainer: under autocast a fine-tune keeps fp32 weights, a LoRA run keeps the frozen model in the
    # autocast dtype (train/targets.py freeze)
    frozen = autocast if autocast is not None and row.lora else torch.float32
    place(unet, dtype=frozen if row.lora else torch.float32)
    place(te, dtype=frozen)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    te.eval()
    network = None
    if row.lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = LoraNetwork(model, dim=dim, alpha=1.0, train_text_encoder=not row.unet_only)
        network.apply_to(model).train()
        trained = list(network.parameters())
        unet.eval()
    else:
        unet.requires_grad_(True).train()
        trained = list(unet.parameters())
    if row.checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    trains_te = row.lora and not row.unet_only
    optimizer = torch.optim.AdamW(trained, lr=1e-4)  # on CPU tensors: the per-parameter loop (no foreach copies)
    scheduler = model.noise_scheduler()
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, side, side, generator=g)
    captions = [f"a photo of thing number {i}, colourful, detailed" for i in range(batch)]
    weights = {p.untyped_storage().data_ptr() for m in (unet, te) for p in m.parameters()}
    weights |= {p.untyped_storage().data_ptr() for p in trained}
    figures: dict = {}

    def step(measure: Optional[Callable[[str, int], None]] = None) -> None:
        saved = SavedBytes(weights)
        context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
        with saved.hooks, context:
            with torch.set_grad_enabled(trains_te):
                states = encode_prompts(tok, te, captions, 75, 1)
            noise, t = noise_lib.sample_noise_and_timesteps(latents, 1000, g)
            noisy = noise_lib.add_noise(scheduler, latents, noise, t)
            pred = unet(noisy, t, states).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if measure:
            measure("activations", saved.total)
            measure("gradients", nbytes([p.grad for p in trained if p.grad is not None]))
        optimizer.zero_grad(set_to_none=True)
        del loss, pred, states

    step(lambda key, value: figures.__setitem__(key, value))  # untimed: allocations, optimizer state
    figures["optimizer"] = nbytes([v for s in optimizer.state.values() for v in s.values()
                                   if torch.is_tensor(v) and v.numel() > 1])
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    figures["seconds"] = (time.process_time() - cpu) / steps
    figures["wall"] = (time.perf_counter() - started) / steps
    figures["trained_params"] = sum(p.numel() for p in trained)
    figures["weights"] = nbytes([p for m in (unet, te) for p in m.parameters()]) + (
        nbytes(list(network.parameters())) if network is not None else 0)
    figures["total"] = sum(figures[k] for k in ("weights", "gradients", "optimizer", "activations"))
    optimizer.state.clear()  # frees the moments before the next row
    if network is not None:
        network.remove()
    unet.disable_gradient_checkpointing()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd1"])
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: tiny 64, sd1 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=16, help="LoRA rank (--network_dim)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps a row (default: tiny 10, sd1 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"],
                        help="bf16 autocast, the frozen model of the LoRA rows in bf16 (as sdtune train)")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers to run (default all), e.g. 0,2")
    parser.add_argument("--json", action="store_true", help="one JSON line a row (bytes, seconds) instead of the table")
    parser.add_argument("--smoke", action="store_true", help="checks the script: tiny model, 64 px, dim 4, one timed "
                        "step, one thread (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.resolution, args.dim, args.steps, args.threads = "tiny", args.resolution or 64, 4, 1, 1
    torch.set_num_threads(args.threads)
    resolution = args.resolution or (64 if args.model == "tiny" else 256)
    steps = args.steps or (10 if args.model == "tiny" else 2)
    out = (lambda text: None) if args.json else print
    started = time.perf_counter()
    model = build_tiny("sd1") if args.model == "tiny" else full_size_sd1()
    unet_params = sum(p.numel() for p in model.unet.parameters())
    te_params = sum(p.numel() for p in model.text_encoder.parameters())
    out(f"{args.model}: U-Net {unet_params / 1e6:.1f}M and text encoder {te_params / 1e6:.1f}M parameters (fp32, "
          f"built in {time.perf_counter() - started:.0f} s); {resolution} px ({resolution // 8}x{resolution // 8} "
          f"latents), batch {args.batch}, LoRA dim {args.dim} alpha 1, AdamW, mixed precision "
          f"{args.mixed_precision}, {steps} timed step(s) a row, "
          f"{args.threads} thread(s)")
    unit, scale = ("GiB", GIB) if args.model == "sd1" else ("MiB", 2**20)
    out(f"{'':42}{'CPU s':>8}{'wall s':>8}{'trained':>10}{'weights':>9}{'grads':>8}{'optim':>8}{'activ.':>8}"
          f"{'total':>8}{'vs fine-tune':>14}")
    out(f"{'':42}{'a step':>8}{'a step':>8}{'params':>10}{unit:>9}{unit:>8}{unit:>8}{unit:>8}{unit:>8}"
          f"{'time  memory':>14}")
    wanted = [int(i) for i in args.rows.split(",")] if args.rows else range(len(ROWS))
    # fine-tune: 16 bytes a U-Net parameter (weights, gradients, two moments) plus activations and the text encoder
    need = unet_params * 16 + te_params * 4 + GIB
    reference = None
    for index in wanted:
        row = ROWS[index]
        if not row.lora and psutil.virtual_memory().available < need:
            free = psutil.virtual_memory().available
            out(f"{row.label:42}skipped: needs about {need / GIB:.0f} GiB of free RAM, {free / GIB:.0f} GiB free")
            if args.json:
                print(json.dumps({"row": row.label, "skipped": f"needs {need} bytes of free RAM, {free} free"}))
            continue
        gc.collect()
        f = run_row(model, row, args.dim, args.batch, resolution // 8, steps,
                    torch.bfloat16 if args.mixed_precision == "bf16" else None)
        if not row.lora and not row.checkpointing:
            reference = f
        if args.json:
            print(json.dumps({"row": row.label, "lora": row.lora, "unet_only": row.unet_only,
                              "checkpointing": row.checkpointing, "model": args.model, "resolution": resolution,
                              "batch": args.batch, "dim": args.dim, "mixed_precision": args.mixed_precision, **f}),
                  flush=True)
            continue
        ratios = (f"{f['seconds'] / reference['seconds']:7.2f}{f['total'] / reference['total']:7.2f}"
                  if reference else f"{'':>14}")
        print(f"{row.label:42}{f['seconds']:8.2f}{f['wall']:8.2f}{f['trained_params'] / 1e6:9.2f}M"
              + "".join(f"{f[k] / scale:{w}.2f}" for k, w in (("weights", 9), ("gradients", 8), ("optimizer", 8),
                                                              ("activations", 8), ("total", 8)))
              + ratios, flush=True)


if __name__ == "__main__":
    main()
