"""Training speed and peak GPU memory of sdtune's own training step, full-size SD U-Net, per memory recipe and batch.

One script for a machine with a GPU, no download, a few minutes: SD 1.5's model (the packaged config, random
weights) at 512 px (64x64 latents), batches 1, 4 and 8, each memory recipe of the README's memory table (fp32 as the
reference; fp16 and bf16 autocast; 8-bit Adam; gradient checkpointing; --full_fp16 / --full_bf16; the 8, 12 and
24 GB recipes; --fused_backward_pass where sdtune has it). One JSON line per (recipe, batch)::

    {"recipe": "fp16 autocast", "batch": 4, "img_per_s": ..., "s_per_step": ..., "peak_vram_gib": ..., "oom": false,
     "options": {...}, "device": "...", "steps": 8, "warmup": 2, "overflow_skips": 0, "encoded_on_the_fly": 0}

``img_per_s`` is marginal: ``warmup`` steps run first (kernel selection, optimizer state, allocator) and are not
timed; ``overflow_skips`` counts the timed fp16 steps the loss scaler skipped, ``encoded_on_the_fly`` the images
whose latent file training did not accept (0: the synthetic cache was read as prepared). ``peak_vram_gib`` is
``torch.cuda.max_memory_allocated()`` over the warm-up and timed steps (weights, gradients, optimizer state,
activations; the CUDA context and the allocator's cache are not counted), null on the CPU. A recipe that runs out
of memory prints ``"oom": true`` (its larger batches too, not run) and the script goes on; a recipe whose option
sdtune lacks prints ``"skipped"`` with the reason. The last line names the recipe with the smallest peak memory
at batch 1 (``"summary": "smallest_memory_batch1"``).

    .venv/bin/python bench/bench_gpu.py                      # the GPU run (--device auto: cuda when there is one)
    .venv/bin/python bench/bench_gpu.py --smoke              # the same code, tiny model, CPU, a few seconds
    .venv/bin/python bench/bench_gpu.py --recipes "fp16 autocast" "README 8 GB" --batches 1 2

How the step is driven: each recipe builds a real ``sdtune.train.loop.Trainer`` from ``TrainOptions`` (the
recipe's options as ``sdtune train`` would get them) on a full-size random model saved once to a temporary
diffusers folder (fp16 on disk, ~2 GB) and a synthetic dataset at 512 px whose latent files are written by sdtune's
own latent-cache writer (``write_latent_file``, random latents, valid cache keys: training reads them as a prepared
dataset). The timed loop is the trainer's own ``step_groups()`` and ``step()``: batch loading, text encoder, noise,
U-Net forward/backward, loss scaling, clipping, the optimizer the options choose, the one host sync a step. So
whatever an option changes in sdtune (HalfWeightAdamW for --full_fp16, bitsandbytes for --use_8bit_adam, the text
encoder's gradients for --train_text_encoder) is what is measured, not a re-implementation of it. One trainer per
recipe, built with the largest batch; the smaller batches are the first rows of its batches (the step does not
depend on how the batch was cut). Nothing is saved and no sample is drawn (``run()``, which does both, is not
called). Cost on a GPU: the model is built and saved once (~20 s), each recipe loads it (~5 s) and runs
3 x (warm-up + timed) steps; ``--budget_s`` (default 270) skips the recipes that would start after it, so the whole
run stays under 5 minutes. bench/gpu_checks.py is the companion that checks loss scaling and finiteness.

``--smoke``: a tiny model, 64 px, batches 1 and 2, one warm-up and two timed steps, on the CPU: the same code, to
know the script works before a GPU is lent (tests/bench/test_bench_gpu.py runs it). The figures mean nothing there.
Not a test: nothing here asserts a time or a size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from sdtune.data.buckets import Placement
from sdtune.data.latent_cache import (
    LATENT_FORMAT_VERSION,
    LatentCache,
    cache_key,
    content_hash,
    latent_path,
    vae_fingerprint,
    write_latent_file,
)
from sdtune.data.metadata import save_metadata
from sdtune.models.families import get_family
from sdtune.models.io import load_vae
from sdtune.models.save import save_model
from sdtune.models.sd import StableDiffusion, build_modules
from sdtune.models.tiny import build_tiny
from sdtune.models.tokenizer import packaged_tokenizer
from sdtune.train.loop import Trainer, TrainOptions

GIB = 2**30

# (name, the options of sdtune train). The README's memory table and its recipes (SD 1.5, 512 px).
RECIPES: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {}),
    ("fp16 autocast", {"mixed_precision": "fp16"}),
    ("bf16 autocast", {"mixed_precision": "bf16"}),
    ("fp16 + 8-bit Adam", {"mixed_precision": "fp16", "use_8bit_adam": True}),
    ("fp16 + gradient checkpointing", {"mixed_precision": "fp16", "gradient_checkpointing": True}),
    ("full fp16", {"mixed_precision": "fp16", "full_fp16": True}),
    ("full bf16", {"mixed_precision": "bf16", "full_bf16": True}),
    ("bf16 + fused backward", {"mixed_precision": "bf16", "fused_backward_pass": True}),
    ("README 8 GB", {"mixed_precision": "fp16", "full_fp16": True, "use_8bit_adam": True,
                     "gradient_checkpointing": True}),
    ("README 12 GB", {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True}),
    ("README 24 GB", {"mixed_precision": "bf16", "use_8bit_adam": True, "train_text_encoder": True}),
]


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------ model and data
def build_model(family: str, tiny: bool) -> StableDiffusion:
    """The family's real component configs with random weights (diffusers' own initialisation), or a tiny model."""
    if tiny:
        return build_tiny(family)
    fam = get_family(family)
    torch.manual_seed(0)
    unet, vae, text_encoder = build_modules(fam.configs())
    return StableDiffusion(fam, unet, vae, text_encoder, packaged_tokenizer(fam.pad_token))


def write_dataset(root: Path, model_path: Path, count: int, resolution: int) -> tuple[Path, Path]:
    """``count`` images at ``resolution`` with captions, metadata and latent files as ``sdtune prepare`` writes them
    (random latents; cache keys and the VAE fingerprint valid for the saved model): (train dir, metadata json)."""
    train_dir = root / "train"
    train_dir.mkdir(parents=True)
    vae_print = vae_fingerprint(load_vae(model_path))  # of the VAE as the trainer will load it
    rng = np.random.default_rng(0)
    side = resolution // 8
    meta: dict[str, dict[str, Any]] = {}
    for i in range(count):
        image = train_dir / f"im{i:03d}.png"
        Image.fromarray(np.full((resolution, resolution, 3), 40 + 20 * i % 200, dtype=np.uint8)).save(image)
        data, stat = image.read_bytes(), image.stat()
        placement = Placement((resolution, resolution), (resolution, resolution), (0, 0, resolution, resolution), 0.0)
        image_hash = content_hash(data)
        write_latent_file(latent_path(image), LatentCache(
            latents=rng.standard_normal((4, side, side), dtype=np.float32) * 5.0,  # about SD's VAE latents' scale
            latents_flipped=None, original_size=(resolution, resolution), resized_size=placement.resized,
            crop_ltrb=placement.crop_ltrb, train_resolution=placement.bucket, vae_fingerprint=vae_print,
            cache_key=cache_key(image_hash, placement, False, vae_print, "no"), format_version=LATENT_FORMAT_VERSION,
            image_hash=image_hash, image_bytes=stat.st_size, image_mtime_ns=stat.st_mtime_ns))
        meta[image.stem] = {"caption": f"a photograph number {i} of a grey square, studio light",
                            "image_size": [resolution, resolution], "train_resolution": [resolution, resolution]}
    save_metadata(root / "meta_lat.json", meta)
    return train_dir, root / "meta_lat.json"


# ------------------------------------------------------------------------------------------------ measuring
def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def take(group: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The first ``batch`` images of each batch of a step's group."""
    out = []
    for b in group:
        cut = dict(b)
        cut["latents"], cut["captions"], cut["keys"] = b["latents"][:batch], b["captions"][:batch], b["keys"][:batch]
        out.append(cut)
    return out


def measure(trainer: Trainer, groups, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up steps, then ``steps`` timed steps of the trainer's own step at ``batch``."""
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        trainer.step(take(next(groups), batch))
    scale_before = trainer.scaler.scale if trainer.scaler is not None else None
    sync(device)
    started = time.perf_counter()
    losses = [trainer.step(take(next(groups), batch)) for _ in range(steps)]
    sync(device)
    seconds = time.perf_counter() - started
    skips = 0
    if scale_before is not None and trainer.scaler.scale < scale_before:
        skips = round(math.log2(scale_before / trainer.scaler.scale))
    return {
        "img_per_s": round(batch * steps / seconds, 3), "s_per_step": round(seconds / steps, 4),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None,
        "oom": False, "overflow_skips": skips, "last_loss": round(losses[-1], 5),
    }


def missing_options(options: dict[str, Any]) -> list[str]:
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    return [name for name in options if name not in known]


def run_recipe(name: str, options: dict[str, Any], args, paths: dict[str, Path], index: int,
               common: dict[str, Any]) -> list[dict[str, Any]]:
    """All batches of one recipe; one record per batch (printed as it is made)."""
    rows: list[dict[str, Any]] = []
    base = {"recipe": name, "options": options, **common}
    opts = TrainOptions(
        pretrained_model_name_or_path=str(paths["model"]), in_json=str(paths["meta"]),
        train_data_dir=str(paths["train"]), output_dir=str(paths["root"] / f"out{index:02d}"),
        train_batch_size=max(args.batches), learning_rate=1e-5, max_train_steps=10**6, seed=0,
        max_data_loader_n_workers=0, **options)
    trainer: Optional[Trainer] = None
    groups = None
    device = torch.device(common["device_type"])
    if device.type == "cuda":  # what an earlier recipe left would count in this one's peak: say so
        base["allocated_at_start_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
    try:
        trainer = Trainer(opts)
        base["encoded_on_the_fly"] = trainer.encodes_on_the_fly  # 0: the latent files were taken as valid
        groups = trainer.step_groups()
        oom_at = None
        for batch in args.batches:
            record = {**base, "batch": batch}
            if oom_at is not None:
                record.update(oom=True, not_run=f"batch {oom_at} ran out of memory")
            else:
                try:
                    record.update(measure(trainer, groups, batch, args.warmup, args.steps))
                except Exception as exc:  # noqa: BLE001 - an OOM is a result, not a crash
                    if not is_oom(exc):
                        raise
                    oom_at = batch
                    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
                    record.update(oom=True, peak_vram_gib=None if peak is None else round(peak, 3),
                                  error=str(exc).splitlines()[0][:200])
                if oom_at == batch:  # here, not in the except clause, whose traceback holds the step's tensors
                    trainer.optimizer.zero_grad(set_to_none=True)
                    free_memory(device)
            emit(record)
            rows.append(record)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not run and goes on
        if not is_oom(exc):
            record = {**base, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        else:
            record = {**base, "batch": args.batches[0], "oom": True, "error": str(exc).splitlines()[0][:200]}
        emit(record)
        rows.append(record)
    finally:
        if trainer is not None:
            trainer.run_lock.release()
        # the trainer holds reference cycles (bound methods in its parts) and the generator holds the trainer:
        # drop both, then collect, so that the next recipe starts with none of this one's GPU memory
        groups = trainer = None
        free_memory(device)
    return rows


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps (checks the script)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sd2-v"])
    parser.add_argument("--resolution", type=int, help="pixels (default 512; --smoke 64)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes, ascending (default 1 4 8; --smoke 1 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per batch (default 2; --smoke 1)")
    parser.add_argument("--steps", type=int, help="timed steps per batch (default 8; --smoke 2)")
    parser.add_argument("--recipes", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--budget_s", type=float, default=270.0,
                        help="start no recipe after this many seconds (default 270: the run stays under 5 minutes)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --smoke 1, as tiny models "
                        "run fastest on one)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.resolution = args.resolution or (64 if smoke else 512)
    args.batches = sorted(args.batches or ([1, 2] if smoke else [1, 4, 8]))
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.steps = args.steps or (2 if smoke else 8)
    device_name = "cpu" if smoke and args.device == "auto" else args.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if device_name == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the trainer's accelerator picks its device itself
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    threads = args.threads or (1 if smoke else 0)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("sdtune", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    names = [n for n, _ in RECIPES]
    for wanted in args.recipes or []:
        if wanted not in names:
            parser.error(f"unknown recipe {wanted!r}; known: {', '.join(names)}")
    device = torch.device(device_name)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-gpu-") as tmp:
        root = Path(tmp)
        model = build_model(args.family, tiny=smoke)
        params = sum(p.numel() for p in model.unet.parameters())
        model_path = save_model(model, root / "model", "diffusers_safetensors", "fp16")
        del model
        train_dir, meta = write_dataset(root, model_path, max(args.batches), args.resolution)
        paths = {"root": root, "model": model_path, "train": train_dir, "meta": meta}
        common = {"device": where, "device_type": device.type, "family": args.family,
                  "model": "tiny" if smoke else "full-size", "unet_params_m": round(params / 1e6, 1),
                  "resolution": args.resolution, "steps": args.steps, "warmup": args.warmup}
        print(f"# {args.family} {common['model']} U-Net ({params / 1e6:.0f}M parameters), {args.resolution} px "
              f"({args.resolution // 8}x{args.resolution // 8} latents), batches {args.batches}, {args.warmup} "
              f"warm-up + {args.steps} timed steps, on {where}; set up in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
        rows: list[dict[str, Any]] = []
        for index, (name, options) in enumerate(RECIPES):
            if args.recipes and name not in args.recipes:
                continue
            missing = missing_options(options)
            if missing:
                rows.append({"recipe": name, "options": options, **common,
                             "skipped": "sdtune has no " + ", ".join(f"--{m}" for m in missing)})
                emit(rows[-1])
                continue
            if time.perf_counter() - started > args.budget_s:
                rows.append({"recipe": name, "options": options, **common,
                             "skipped": f"time budget: {args.budget_s:.0f} s spent"})
                emit(rows[-1])
                continue
            rows.extend(run_recipe(name, options, args, paths, index, common))
    ran = [r for r in rows if r.get("batch") == args.batches[0] and r.get("oom") is False]
    measured = [r for r in ran if r.get("peak_vram_gib") is not None]
    best = min(measured, key=lambda r: r["peak_vram_gib"]) if measured else None
    emit({"summary": "smallest_memory_batch1", "batch": args.batches[0],
          "recipe": best["recipe"] if best else None, "peak_vram_gib": best["peak_vram_gib"] if best else None,
          "img_per_s": best["img_per_s"] if best else None,
          "note": None if best else "no memory figures on the CPU", "ran": [r["recipe"] for r in ran],
          "seconds": round(time.perf_counter() - started, 1), **common})


if __name__ == "__main__":
    main()
