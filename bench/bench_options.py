"""The gain of each speed option of ``sdtune train``, on this machine: marginal seconds per step of the same run
with and without it.

Marginal: the median time between optimizer steps of one run per configuration, after ``--warmup`` untimed
steps, so start-up (model load, latent check, the text-encoder cache's encoding, torch.compile's compilation) is
excluded and a step slowed by another job on the machine does not move the figure; the configurations run
interleaved ``--rounds`` times and the best median counts. The model and data are bench_train.py's (a small
SD1-topology U-Net, cached latents).

    .venv/bin/python bench/bench_options.py [--steps 20] [--warmup 4] [--rounds 3] [--width 64] [--batch 4]
        [--threads 2] [--compile]

Options compared: the plain run (sdtune's defaults: torch's fused AdamW kernel), AdamW's per-tensor loop (torch's
own default on a CPU, what diffusers' scripts run there) and its foreach kernel,
--cache_text_encoder_outputs, --channels_last, and with --compile --torch_compile (inductor: minutes of compilation
on a CPU). Prints one JSON line per configuration and the ratio to the plain run, and the time of AdamW's step
alone with each of torch's kernels (random gradients on the same U-Net; measured 2026-12-06, one thread, twice:
per-tensor 29.7 and 30.6 ms, foreach 54.8 and 55.7, fused 9.3 and 9.2).

Measured 2026-12-06 (2-core CPU, 1 thread, width 64, batch 4, 16x16 latents, 20 steps after 4; two invocations,
the second with --compile), s/step and the ratio to the plain run::

    .venv/bin/python bench/bench_options.py --threads 1 --rounds 3            --rounds 2 --compile
    plain (fused AdamW)                      0.202  1.000                      0.224  1.000
    per-tensor AdamW                         0.215  1.066                      0.243  1.081
    foreach AdamW                            0.223  1.105                      0.241  1.074
    --cache_text_encoder_outputs             0.197  0.976                      0.209  0.933
    --channels_last                          0.210  1.041                      0.220  0.978
    --torch_compile (inductor)               -                                 0.233  1.040

The spread between the two invocations (the plain run 0.202 and 0.224) is as large as the smaller gains: the
fused AdamW and the text-encoder cache gain in both, channels_last and torch.compile do not gain on a CPU. Why
compile does not: a profile of the U-Net's forward and backward here (torch.profiler) puts 35 % of the time in
convolutions and 44 % in matrix products and attention, which inductor hands to the same oneDNN / BLAS / flash
kernels; the element-wise and normalisation work it can fuse is about 15 %, and its generated CPU code for them is
no faster at these sizes (the U-Net's blocks compiled: 0.204 s for a forward and backward against 0.189 eager; the
whole U-Net compiled: 0.199 against 0.195). On a GPU the gain comes from fewer kernel launches and fused
memory-bound operations, which this CPU step does not pay for; bench_gpu.py measures it there.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import build_model, cache_latents, make_dataset  # noqa: E402  (the sibling benchmark's model and images)

from sdtune.models.save import save_model  # noqa: E402
from sdtune.train.loop import Trainer, TrainOptions  # noqa: E402

CONFIGS = {
    "plain": {},
    "per-tensor AdamW (torch's CPU default)": {"optimizer_args": ["foreach=False"]},
    "foreach AdamW": {"optimizer_args": ["foreach=True"]},
    "text-encoder cache": {"cache_text_encoder_outputs": True},
    "channels_last": {"channels_last": True},
}


def step_seconds(base: dict, overrides: dict, steps: int, warmup: int, out: Path) -> float:
    """The median wall time between optimizer steps of one run, after ``warmup`` steps (start-up and
    compilation excluded; the median ignores a step slowed by another job on the machine)."""
    opts = TrainOptions(**{**base, **overrides, "max_train_steps": warmup + steps, "output_dir": str(out)})
    trainer = Trainer(opts)
    stamps: list[float] = []
    after_step = trainer.after_step

    def stamped() -> None:
        stamps.append(time.perf_counter())
        after_step()

    trainer.after_step = stamped  # on the instance: what the loop calls after each optimizer step
    with contextlib.redirect_stderr(io.StringIO()):  # no progress bar between the figures
        trainer.run()
    return statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))


def adamw_step_seconds(width: int, repeats: int = 20) -> dict[str, float]:
    """The optimizer step alone: the median seconds of torch's AdamW per kernel (per-tensor loop, foreach, fused)
    over the U-Net's parameters with random gradients, after three untimed steps."""
    unet = build_model(width).unet
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    figures = {}
    for name, kwargs in (("per-tensor", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, **kwargs)
        seconds = []
        for _ in range(3 + repeats):
            started = time.perf_counter()
            optimizer.step()
            seconds.append(time.perf_counter() - started)
        figures[name] = statistics.median(seconds[3:])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--rounds", type=int, default=3, help="runs per configuration, interleaved; the best counts")
    parser.add_argument("--warmup", type=int, default=4, help="untimed first steps (torch.compile compiles here)")
    parser.add_argument("--width", type=int, default=64, help="U-Net base width (SD: 320; tiny: 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latents are size/8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also --torch_compile (inductor; slow to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    configs = dict(CONFIGS)
    if args.compile:
        configs["torch_compile (inductor)"] = {"torch_compile": True}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path = save_model(build_model(args.width), root / "model", "diffusers_safetensors")
        make_dataset(root, count=4 * args.batch, size=args.size)
        cache_latents(root, model_path, args.size)
        base = dict(pretrained_model_name_or_path=str(model_path), in_json=str(root / "lat.json"),
                    train_data_dir=str(root / "train"), train_batch_size=args.batch, learning_rate=1e-4, seed=0,
                    max_data_loader_n_workers=0, save_model_as="safetensors")
        step_seconds(base, {}, 2, 1, root / "warm")  # first-call allocations and lazy imports
        rounds: dict[str, list[float]] = {name: [] for name in configs}
        names = list(configs)
        for r in range(args.rounds):  # interleaved, so a slow minute of the machine hits every configuration,
            for name in names[r % len(names):] + names[:r % len(names)]:  # each round in another order
                out = root / f"run{r}-{names.index(name)}"
                rounds[name].append(step_seconds(base, configs[name], args.steps, args.warmup, out))
        figures = {name: min(values) for name, values in rounds.items()}
    for kernel, seconds in adamw_step_seconds(args.width).items():
        print(json.dumps({"adamw_step_alone": kernel, "s": round(seconds, 4)}))
    plain = figures["plain"]
    print(f"# batch {args.batch}, latents {args.size // 8}x{args.size // 8}, U-Net width {args.width}, "
          f"{args.threads} thread(s), median of {args.steps} steps after {args.warmup}, best of {args.rounds} rounds")
    for name, seconds in figures.items():
        print(json.dumps({"config": name, "s_per_step": round(seconds, 4), "vs_plain": round(seconds / plain, 3)}))


if __name__ == "__main__":
    main()
