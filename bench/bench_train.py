"""Training speed: ``sdtune train`` against a bare PyTorch loop doing the same work.

Both run the same model (a small SD1-topology U-Net), the same cached latents and captions, the same AdamW (torch's
fused kernel, sdtune's choice on the CPU) and the same forward, backward and optimizer step; the bare loop has the
batches in memory and nothing else. The ratio is the trainer's overhead (data loading, RNG derivation, NaN guard,
progress bar, bookkeeping).

    .venv/bin/python bench/bench_train.py [--steps 40] [--warmup 3] [--width 64] [--batch 4] [--threads 2]

Each loop's steps are timed by a global optimizer-step hook; the median interval between steps after ``--warmup``
is its step time (first-call allocations, model loading and the final save do not count; other jobs on a shared
machine add spikes, which the median ignores). Prints steps/s of each and the ratio. Both loops run in this
process, the trainer second, on a heap the bare loop has already grown: a quick check of the trainer's Python-side
overhead. bench_peer.py runs each in a fresh process of its own (under glibc that costs sdtune's process about
10 % more than the bare loop's, see there), beside diffusers' script. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from sdtune.data.dataset import FineTuneData
from sdtune.data.metadata import load_metadata, save_metadata
from sdtune.data.prepare import PrepareOptions, load_prepare_vae, prepare_latents
from sdtune.models.io import load_model
from sdtune.models.save import save_model
from sdtune.models.text import encode_prompts
from sdtune.models.tiny import build_tiny
from sdtune.train import noise as noise_lib
from sdtune.train.loop import Trainer, TrainOptions


def make_dataset(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    meta = {}
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"im{i:03d}.png")
        meta[f"im{i:03d}"] = {"caption": f"picture number {i}", "tags": "noise, colourful"}
    save_metadata(root / "meta.json", meta)


def cache_latents(root: Path, model_path: Path, size: int) -> Path:
    """``sdtune prepare`` of ``root/train`` (as :func:`make_dataset` wrote it) at ``size`` px; the metadata written."""
    prepare_latents(PrepareOptions(train_data_dir=root / "train", in_json=root / "meta.json",
                                   out_json=root / "lat.json", model_name_or_path=str(model_path),
                                   max_resolution=f"{size},{size}", min_bucket_reso=64, bucket_reso_steps=64,
                                   max_data_loader_n_workers=0), load_prepare_vae(str(model_path)))
    return root / "lat.json"


def build_model(width: int):
    model = build_tiny("sd1")
    if width != 32:
        from sdtune.models.sd import build_modules
        from sdtune.models.tiny import tiny_configs

        configs = tiny_configs(model.family)
        configs["unet"]["block_out_channels"] = [width, width * 2, width * 2, width * 2]
        model.unet, _, _ = build_modules(configs)
    return model


def bare_loop(model_path: Path, data: FineTuneData, steps: int, batch: int, seed: int, fused: bool = True) -> float:
    """The step written by hand: batches in memory, the text encoder's forward, the U-Net's forward and backward,
    clipping, torch's AdamW (``fused``: its fused kernel, which sdtune picks on the CPU and CUDA; False: the
    per-tensor loop, torch's CPU default, what diffusers' scripts get there). Steps per second."""
    model = load_model(model_path)
    unet, te, tok = model.unet.train(), model.text_encoder, model.tokenizer
    te.requires_grad_(False)
    scheduler = model.noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused)
    keys = data.epoch_batches(0, seed, batch, 1, 0)
    batches = [data.load_batch(k, 0, seed) for k, _ in keys]
    generator = torch.Generator().manual_seed(seed)
    scale = float(model.vae.config.scaling_factor)
    start = time.perf_counter()
    for step in range(steps):
        b = batches[step % len(batches)]
        latents = b["latents"] * scale
        noise, t = noise_lib.sample_noise_and_timesteps(latents, 1000, generator)
        noisy = noise_lib.add_noise(scheduler, latents, noise, t)
        with torch.no_grad():
            states = encode_prompts(tok, te, b["captions"], 75, 1)
        pred = unet(noisy, t, states).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def steps_per_second(run, warmup: int) -> float:
    """Run ``run()`` and return 1 / the median interval between its optimizer steps after the first ``warmup``."""
    times: list[float] = []
    handle = register_optimizer_step_post_hook(lambda *_: times.append(time.perf_counter()))
    try:
        run()
    finally:
        handle.remove()
    intervals = np.diff(np.asarray(times[warmup:]))
    if len(intervals) == 0:
        raise RuntimeError(f"{len(times)} optimizer steps timed; need more than --warmup {warmup}")
    return 1.0 / float(np.median(intervals))


def run_bare(model_path: Path, in_json: Path, train_dir: Path, steps: int, batch: int, fused: bool) -> None:
    """Only the bare loop, on a model and data already prepared: bench_peer.py runs this in a process of its own,
    started like the trainers' (a fresh process's heap grows and is trimmed by the C allocator as the step's
    tensors come and go, which a process that ran other work first does not see)."""
    data = FineTuneData.from_metadata(load_metadata(in_json), train_dir)
    bare_loop(model_path, data, steps, batch, 0, fused=fused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="steps of each loop not timed")
    parser.add_argument("--width", type=int, default=64, help="U-Net base width (SD: 320; tiny: 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latents are size/8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bare_only", nargs=3, type=Path, metavar=("MODEL", "IN_JSON", "TRAIN_DIR"),
                        help="run only the bare loop on this model and prepared data (bench_peer.py's)")
    parser.add_argument("--loop_adamw", action="store_true", help="with --bare_only: AdamW's per-tensor loop "
                        "(torch's CPU default) instead of its fused kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.bare_only is not None:
        run_bare(*args.bare_only, args.steps, args.batch, fused=not args.loop_adamw)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(args.width)
        params = sum(p.numel() for p in model.unet.parameters())
        model_path = save_model(model, root / "model", "diffusers_safetensors")
        make_dataset(root, count=4 * args.batch, size=args.size)
        cache_latents(root, model_path, args.size)
        data = FineTuneData.from_metadata(load_metadata(root / "lat.json"), root / "train")
        bare = steps_per_second(lambda: bare_loop(model_path, data, args.steps, args.batch, 0), args.warmup)
        opts = TrainOptions(pretrained_model_name_or_path=str(model_path), in_json=str(root / "lat.json"),
                            train_data_dir=str(root / "train"), output_dir=str(root / "out"),
                            train_batch_size=args.batch, learning_rate=1e-4, max_train_steps=args.steps, seed=0,
                            max_data_loader_n_workers=0)
        trainer_rate = steps_per_second(Trainer(opts).run, args.warmup)
    print(f"U-Net parameters: {params / 1e6:.2f}M, batch {args.batch}, latents {args.size // 8}x{args.size // 8}, "
          f"{args.steps} steps ({args.warmup} not timed), {args.threads} thread(s)")
    print(f"bare PyTorch loop : {bare:7.2f} steps/s")
    print(f"sdtune train      : {trainer_rate:7.2f} steps/s")
    print(f"ratio (train/bare): {trainer_rate / bare:7.3f}  (1.0 = no overhead)")


if __name__ == "__main__":
    main()
