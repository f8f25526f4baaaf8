"""Host-device synchronisations per optimizer step: how often Python waits for the device in a training step.

Counts, with :class:`sdtune.train.syncs.HostSyncCounter`, every conversion of a tensor to a Python value or to host
memory (``.item()``, ``.tolist()``, ``float()``, ``bool()``, ``int()``, ``.cpu()``, ``.numpy()``) made outside
torch's own code during the step (forward, backward, unscale, clipping, optimizer, logging, saves' checks), for
several option sets, and for a bare loop written like diffusers' train_text_to_image (``loss.item()`` once a step)
as the reference. On a GPU each one stalls the host; the target is one per step.

    .venv/bin/python bench/bench_syncs.py [--steps 6] [--device cpu|cuda] 2>/dev/null   (stderr: progress bars)

On a GPU, also run a step under ``torch.cuda.set_sync_debug_mode("warn")`` (``--cuda_debug``): it reports syncs
inside kernels (``nonzero``, masked indexing) that no Python hook sees. Not a test: nothing here asserts a count
(tests/train/test_syncs.py does).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from bench_train import build_model, make_dataset

from sdtune.data.dataset import FineTuneData
from sdtune.data.metadata import load_metadata
from sdtune.data.prepare import PrepareOptions, load_prepare_vae, prepare_latents
from sdtune.models.io import load_model
from sdtune.models.save import save_model
from sdtune.models.text import encode_prompts
from sdtune.train import noise as noise_lib
from sdtune.train.loop import Trainer, TrainOptions
from sdtune.train.syncs import HostSyncCounter, count_run_syncs

CONFIGS = {
    "fp32": {},
    "fp16 + Min-SNR + noise offset": {"mixed_precision": "fp16", "min_snr_gamma": 5.0, "noise_offset": 0.05},
    "fp16, accumulation 2, text encoder, clip skip 2": {"mixed_precision": "fp16", "gradient_accumulation_steps": 2,
                                                        "train_text_encoder": True, "clip_skip": 2},
    "full fp16": {"mixed_precision": "fp16", "full_fp16": True},
    "full bf16": {"mixed_precision": "bf16", "full_bf16": True},
}
def count_reference(model_path: Path, data: FineTuneData, steps: int, batch: int, device: str,
                    device_only: bool) -> float:
    """diffusers' train_text_to_image step: add_noise, MSE, backward, clip_grad_norm_, AdamW, loss.item()."""
    model = load_model(model_path)
    unet, te, tok = model.unet.to(device).train(), model.text_encoder.to(device), model.tokenizer
    te.requires_grad_(False)
    scheduler = model.noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    batches = [data.load_batch(k, 0, 0) for k, _ in data.epoch_batches(0, 0, batch, 1, 0)]
    generator = torch.Generator(device).manual_seed(0)
    counter = HostSyncCounter(only_non_cpu=device_only)
    with counter:
        for step in range(steps):
            b = batches[step % len(batches)]
            latents = b["latents"].to(device) * float(model.vae.config.scaling_factor)
            noise, t = noise_lib.sample_noise_and_timesteps(latents, 1000, generator)
            noisy = noise_lib.add_noise(scheduler, latents, noise, t)
            with torch.no_grad():
                states = encode_prompts(tok, te, b["captions"], 75, 1)
            loss = torch.nn.functional.mse_loss(unet(noisy, t, states).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # train_text_to_image logs the loss each step
    return counter.total / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda_debug", action="store_true", help="also warn on kernel-level syncs (GPU only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device_only = args.device != "cpu"  # on a GPU, CPU tensors (optimizer step counters) never stall
    if args.cuda_debug:
        torch.cuda.set_sync_debug_mode("warn")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path = save_model(build_model(32), root / "model", "diffusers_safetensors")
        make_dataset(root, count=4 * args.batch, size=64)
        prepare_latents(PrepareOptions(train_data_dir=root / "train", in_json=root / "meta.json",
                                       out_json=root / "lat.json", model_name_or_path=str(model_path),
                                       max_resolution="64,64", min_bucket_reso=64, bucket_reso_steps=64,
                                       max_data_loader_n_workers=0), load_prepare_vae(str(model_path)))
        data = FineTuneData.from_metadata(load_metadata(root / "lat.json"), root / "train")
        reference = count_reference(model_path, data, args.steps, args.batch, args.device, device_only)
        print(f"{'configuration':50} syncs/step")
        print(f"{'reference (diffusers train_text_to_image step)':50} {reference:6.2f}")
        for name, settings in CONFIGS.items():
            opts = TrainOptions(pretrained_model_name_or_path=str(model_path), in_json=str(root / "lat.json"),
                                train_data_dir=str(root / "train"), output_dir=str(root / "out" / name),
                                train_batch_size=args.batch, learning_rate=1e-4, max_train_steps=args.steps,
                                seed=0, max_data_loader_n_workers=0, **settings)
            per_step, counter = count_run_syncs(Trainer(opts), device_only)
            print(f"{'sdtune: ' + name:50} {per_step:6.2f}")
            if per_step > 1:
                print(counter.report())


if __name__ == "__main__":
    main()
