"""Training speed: ``sdtune train`` against diffusers' examples/text_to_image/train_text_to_image.py (the peer)
and a bare PyTorch loop, on the same tiny model, images, captions and batch.

    .venv/bin/python bench/bench_peer.py --peer_script /tmp/peer/train_text_to_image.py \\
        [--peer_pythonpath /tmp/peer/site] [--images 16] [--size 128] [--batch 4] [--steps 40] [--warmup 3] \\
        [--rounds 3] [--env KEY=VALUE ...]

Seconds per step, start-up excluded: each tool runs in a fresh process of its own through a small launcher that adds
a global optimizer-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) and writes the time of
every optimizer step at exit; the intervals between steps after ``--warmup`` steps are each tool's step time (batch
loading, text encoder, U-Net forward and backward, clipping, the optimizer, logging: everything the loop does
between two updates), so process start, imports, model loading, dataset setup and the final save do not count.
The median is a run's figure (other jobs on a shared machine add spikes, not a steady cost); the tools run
interleaved ``--rounds`` times, each round in another order, and each tool's best run counts. Prints each figure,
the ratios, and one JSON line.

The runs:
- ``sdtune``: ``sdtune train`` with its defaults, on the latents ``sdtune prepare`` cached (the text encoder runs
  each step); ``sdtune_te_cache``: the same with ``--cache_text_encoder_outputs``.
- ``bare``: bench/bench_train.py's ``bare_loop`` (run as ``bench_train.py --bare_only``, not copied): the same
  cached latents in memory, the text encoder's forward, the U-Net's forward and backward, gradient clipping and
  torch's AdamW with its fused kernel, as sdtune picks it; nothing else. sdtune / bare is sdtune's overhead.
  ``bare_loop_adamw``: the same with AdamW's per-tensor loop, torch's CPU default (what the peer runs).
- ``peer``: it has no latent cache, so each of its steps also loads and transforms the images and encodes them
  with the VAE (``vae_encode_s`` is that encode alone, timed in this process, to tell it apart).
Same learning rate, fp32, constant schedule, batch and seed; the data loaders run in the main process
(``--max_data_loader_n_workers 0`` / ``--dataloader_num_workers 0``); OMP_NUM_THREADS and MKL_NUM_THREADS are
``--threads`` for every process, and ``--env`` adds the same variables to each.

The peer's script is passed as a path, a copy of the public file kept outside this repository (never vendored):
e.g. ``git -C <diffusers clone> show <commit>:examples/text_to_image/train_text_to_image.py > /tmp/peer/t2i.py``.
It runs from a temporary folder with plain ``python`` (one process, CPU when there is no GPU), offline
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), on an imagefolder (the PNGs plus a metadata.jsonl with a ``text`` column)
and the model saved as a diffusers folder. It imports ``datasets`` and ``torchvision``, which sdtune does not need;
``--peer_pythonpath`` adds a folder where they are installed (``pip install --target DIR datasets torchvision``),
so the project's environment stays as it is. A torchvision wheel built for CUDA does not load its C++ operators
under a CPU-only torch (``operator torchvision::nms does not exist``); the launcher this script writes beside the
peer then stubs ``torchvision._meta_registrations`` (the fake-tensor registrations of those operators, which the
peer never calls; its transforms are pure Python on PIL images) and runs the script unchanged with ``runpy``.

Measured 2026-12-06 (2-core CPU, 1 thread; the tiny SD1 model with a 64-channel U-Net as in bench_train.py, 12.7M
U-Net parameters, and a VAE of widths 32,64,64,64 whose encode is 0.43 of the U-Net's training FLOPs (SD 1.5 at
512 px: 0.46, counted the same way); 16 images, batch 4, 40 steps (20 at 256 px), 3 warm-up steps; the peer at
diffusers commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (2026-08-23) with diffusers 0.42.1, datasets 5.2.0 and
torchvision 0.28.0 from ``pip install --target /tmp/peer/site --no-deps datasets "torchvision==0.28.*" pyarrow
pandas dill xxhash multiprocess ftfy wcwidth python-dateutil pytz tzdata``), s/step, best of the rounds (x N);
"padded": ``--env MALLOC_TOP_PAD_=268435456``; te: sdtune_te_cache; loop: bare_loop_adamw::

    run                            sdtune  te     bare   loop   peer   sdtune/bare  sdtune/peer  te/peer  bare/peer
    128 px, 1 thread, glibc  (x3)  0.241   0.230  0.218  0.236  0.299  1.11         0.81         0.77     0.73
    128 px, 1 thread, padded (x3)  0.207   0.207  0.211  0.229  0.278  0.98         0.74         0.74     0.76
    128 px, 2 threads, glibc (x2)  0.160   0.153  0.153  0.174  0.217  1.05         0.74         0.70     0.70
    128 px, 2 threads, padded (x2) 0.148   0.153  0.153  0.166  0.195  0.97         0.76         0.79     0.79
    256 px, 1 thread, glibc  (x1)  0.899   0.884  0.826  0.838  1.160  1.09         0.78         0.76     0.71

What the figures say:
- The peer's extra work (image decoding and transforms, the VAE encode, AdamW's per-tensor loop) is 21-30 % of its
  step on this CPU, where the VAE's FLOPs alone (0.43 of the U-Net's training) predict 30 % for the encode: the
  VAE's few large convolutions run near the CPU's peak, the U-Net's many small operations do not. So even the
  bare loop, which has no overhead at all, reaches only 0.70-0.79 of the peer's time: below 0.7 is out of reach
  on this CPU for any trainer doing this work. On a GPU the shares differ, and this script runs there unchanged.
- sdtune's step costs what the bare loop's does when both processes' C allocator behaves alike (0.97-0.98 with
  ``--env MALLOC_TOP_PAD_=268435456``). Under glibc's defaults sdtune's process trims its heap and grows it again
  within each step, about 120 ``brk`` calls and 18,700 minor page faults a step, where the bare loop's makes 11 calls
  and no faults (``strace -c -e trace=brk``; ``getrusage``), though glibc's thresholds are the same in both
  (7.2 MB mmap, 14.5 MB trim, read with gdb at step 20). The trim comes when ``zero_grad`` frees the gradients at
  the end of a step and they border the top of the heap (found by watching ``mallinfo2`` from a profile hook);
  the bare loop's own step tensors, alive in its loop variables until the next step, partly shield it (deleting
  them before ``zero_grad`` costs it 15 more ``brk`` calls a step). So the gap is where freed memory lies in the
  heap, not work sdtune does. Keeping the gradients allocated (``zero_grad(set_to_none=False)``) removes the faults
  but zeroing and accumulating into them costs half of what that saves (0.219 s/step against 0.225 with glibc's
  defaults and 0.211 with the padded heap, in one process), and it holds the gradients through the forward pass,
  memory a 12 GB card needs; so sdtune keeps torch's default. It is a CPU matter only: on a GPU the tensors live
  in CUDA's caching allocator.
- The text-encoder cache saves the text encoder's forward (1.5 ms a step here, a tiny CLIP); the fused AdamW
  saves 2-8 % of the step against the per-tensor loop.

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import build_model, cache_latents, make_dataset  # noqa: E402  (the sibling benchmark's model and data)

from sdtune.data.dataset import build_caption  # noqa: E402
from sdtune.data.metadata import load_metadata  # noqa: E402
from sdtune.models.save import save_model  # noqa: E402

LAUNCHER = '''"""Runs a training script or module unchanged, writing the time of each optimizer step; see
bench/bench_peer.py. Usage: run_peer.py TIMES_JSON (--module NAME | SCRIPT) ARGS..."""
import atexit
import json
import runpy
import sys
import time
import types

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

times = []
register_optimizer_step_post_hook(lambda *_: times.append(time.perf_counter()))
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(times)))
try:
    import torchvision  # noqa: F401
except ImportError:
    pass  # sdtune does not need it; the peer then fails naming it
except RuntimeError as exc:  # a CUDA build of torchvision under a CPU-only torch
    if "does not exist" not in str(exc):
        raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401
if sys.argv[2] == "--module":
    sys.argv = [sys.argv[3]] + sys.argv[4:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
'''


def step_seconds(times: list[float], warmup: int) -> dict[str, float]:
    """Median and mean interval between the optimizer steps after the first ``warmup``."""
    intervals = np.diff(np.asarray(times[warmup:]))
    if len(intervals) == 0:
        raise RuntimeError(f"{len(times)} optimizer steps timed; need more than --warmup {warmup}")
    return {"median": float(np.median(intervals)), "mean": float(intervals.mean()), "steps": len(intervals)}


def run_timed(launcher: Path, target: list[str], cwd: Path, env: dict[str, str], name: str,
              warmup: int) -> dict[str, float]:
    """Run ``target`` (a script path, or ``--module NAME``, then its arguments) through the launcher; its step
    times. Output goes to ``cwd/name.log``; a failure raises with the log's tail."""
    log, times = cwd / f"{name}.log", cwd / f"{name}_steps.json"
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, str(launcher), str(times), *target], cwd=cwd, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name} exited {done.returncode}; the end of {log}:\n{tail}")
    result = step_seconds(json.loads(times.read_text()), warmup)
    result["wall"] = time.perf_counter() - started
    return result


def write_peer_dataset(root: Path, train_dir: Path, meta: dict) -> Path:
    """The same PNGs as an imagefolder: a copy of each image and a metadata.jsonl whose ``text`` is the caption
    sdtune trains on (caption, tags)."""
    folder = root / "peer_data"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for key, entry in sorted(meta.items()):
            shutil.copy2(train_dir / f"{key}.png", folder / f"{key}.png")
            f.write(json.dumps({"file_name": f"{key}.png", "text": build_caption(entry)}) + "\n")
    return folder


def sd_proportioned_vae(model, widths: list[int], layers: int):
    """A random VAE of ``widths`` (the tiny model's configs otherwise): the encode-to-training ratio of SD 1.5."""
    from sdtune.models.sd import build_modules
    from sdtune.models.tiny import tiny_configs

    configs = tiny_configs(model.family)
    configs["vae"].update(block_out_channels=widths, layers_per_block=layers)
    return build_modules(configs)[1]


def vae_to_unet_flops(model, batch: int, size: int) -> float:
    """FLOPs of the VAE encode of a batch over those of the U-Net's forward and backward on its latents (torch's
    FlopCounterMode; SD 1.5 at 512 px: about 0.48)."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.rand(batch, 3, size, size) * 2 - 1
    with FlopCounterMode(display=False) as vae_flops, torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.sample()
    states = torch.randn(batch, 77, model.unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as unet_flops:
        model.unet(latents, torch.tensor([500] * batch), states).sample.mean().backward()
    model.unet.zero_grad(set_to_none=True)
    return vae_flops.get_total_flops() / unet_flops.get_total_flops()


def vae_encode_seconds(model, batch: int, size: int, repeats: int = 10) -> float:
    """Seconds for the VAE to encode one batch of pixels (the peer's extra work each step): the median of
    ``repeats`` encodes after three untimed ones, in this process."""
    vae = model.vae.eval()
    pixels = torch.rand(batch, 3, size, size) * 2 - 1
    seconds = []
    with torch.no_grad():
        for _ in range(3 + repeats):
            started = time.perf_counter()
            vae.encode(pixels).latent_dist.sample()
            seconds.append(time.perf_counter() - started)
    return float(np.median(seconds[3:]))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer_script", type=Path, help="a copy of diffusers' train_text_to_image.py (without it "
                        "only sdtune and bare run)")
    parser.add_argument("--peer_pythonpath", default="", help="extra PYTHONPATH for the peer (datasets, "
                        "torchvision installed outside the project's environment)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps not counted")
    parser.add_argument("--width", type=int, default=64, help="U-Net base width (tiny: 32; SD: 320)")
    parser.add_argument("--vae_widths", default="32,64,64,64",
                        help="the VAE's block widths (SD: 128,256,512,512 with 2 layers per block; the default "
                             "keeps SD 1.5's share of VAE encode in the peer's step, printed as a FLOP ratio)")
    parser.add_argument("--vae_layers", type=int, default=1, help="the VAE's layers per block (SD: 2)")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tool, interleaved; the best median "
                        "counts")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for every measured process alike (repeatable), e.g. "
                             "MALLOC_TOP_PAD_=268435456: glibc then grows its heap in 256 MiB steps instead of "
                             "trimming and regrowing it between steps")
    parser.add_argument("--keep", type=Path, help="copy the work folder (logs, step times, outputs) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for pair in args.env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    work = Path(tempfile.mkdtemp(prefix="sdtune-bench-peer-"))
    results: dict[str, object] = {"images": args.images, "size": args.size, "batch": args.batch,
                                  "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                                  "unet_width": args.width, "env": args.env}
    try:
        model = build_model(args.width)
        model.vae = sd_proportioned_vae(model, [int(w) for w in args.vae_widths.split(",")], args.vae_layers)
        results["unet_params_m"] = round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 2)
        model_path = save_model(model, work / "model", "diffusers_safetensors")
        make_dataset(work, count=args.images, size=args.size)
        cache_latents(work, model_path, args.size)
        meta = load_metadata(work / "lat.json")
        peer_data = write_peer_dataset(work, work / "train", meta)
        launcher = work / "run_timed.py"
        launcher.write_text(LAUNCHER)

        def show(name: str, figures: dict[str, float]) -> None:
            results[f"{name}_s_per_step"] = round(figures["median"], 4)
            results[f"{name}_mean_s_per_step"] = round(figures["mean"], 4)
            wall = f", run {figures['wall']:.1f} s wall" if "wall" in figures else ""
            print(f"{name:16}: {figures['median']:7.4f} s/step median, {figures['mean']:7.4f} mean "
                  f"({figures['steps']} intervals after {args.warmup} warm-up steps{wall})", flush=True)

        train = ["--module", "sdtune", "train", "--pretrained_model_name_or_path", str(model_path),
                 "--in_json", str(work / "lat.json"), "--train_data_dir", str(work / "train"),
                 "--train_batch_size", str(args.batch), "--learning_rate", str(args.learning_rate),
                 "--max_train_steps", str(args.steps), "--seed", "0", "--max_data_loader_n_workers", "0"]
        bare = [str(Path(__file__).resolve().parent / "bench_train.py"), "--bare_only", str(model_path),
                str(work / "lat.json"), str(work / "train"), "--steps", str(args.steps), "--batch", str(args.batch),
                "--threads", str(args.threads)]
        # name -> (arguments for one run, given an empty folder for its outputs; working folder; environment)
        runs: dict[str, tuple] = {
            "sdtune": (lambda out: [*train, "--output_dir", str(out)], work, env),
            "sdtune_te_cache": (lambda out: [*train, "--output_dir", str(out), "--cache_text_encoder_outputs"],
                                work, env),
            "bare": (lambda out: bare, work, env),
            "bare_loop_adamw": (lambda out: [*bare, "--loop_adamw"], work, env),
        }
        if args.peer_script is not None:
            peer_env = dict(env)
            if args.peer_pythonpath:
                peer_env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_pythonpath,
                                                                     env.get("PYTHONPATH", "")) if p)
            peer_dir = work / "peer"
            peer_dir.mkdir()
            script = args.peer_script.resolve()
            results["peer_script"] = str(script)
            runs["peer"] = (lambda out: [
                str(script), "--pretrained_model_name_or_path", str(model_path),
                "--train_data_dir", str(peer_data), "--image_column", "image", "--caption_column", "text",
                "--resolution", str(args.size), "--center_crop", "--train_batch_size", str(args.batch),
                "--max_train_steps", str(args.steps), "--learning_rate", str(args.learning_rate),
                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--mixed_precision", "no",
                "--dataloader_num_workers", "0", "--output_dir", str(out), "--cache_dir", str(peer_dir / "cache"),
                "--checkpointing_steps", "1000000"], peer_dir, peer_env)
        best: dict[str, dict[str, float]] = {}
        names = list(runs)
        for r in range(args.rounds):  # interleaved, each round in another order: a slow minute hits every tool
            for name in names[r % len(names):] + names[:r % len(names)]:
                make, cwd, run_env = runs[name]
                try:
                    figures = run_timed(launcher, make(work / "out" / f"{name}-{r}"), cwd, run_env,
                                        f"{name}-{r}", args.warmup)
                except RuntimeError as exc:
                    if name != "peer":
                        raise
                    results["peer_error"] = str(exc)[-2000:]
                    print(f"peer            : could not run: {exc}", flush=True)
                    names.remove("peer")
                    continue
                print(f"  round {r + 1}: {name} {figures['median']:.4f} s/step", flush=True)
                if name not in best or figures["median"] < best[name]["median"]:
                    best[name] = figures
        for name, figures in best.items():
            show(name, figures)
        if args.peer_script is None:
            print("peer            : not run (no --peer_script)")
        sdtune, cached, bare_run, peer = best["sdtune"], best["sdtune_te_cache"], best["bare"], best.get("peer")
        encode = vae_encode_seconds(model, args.batch, args.size)
        results["vae_encode_s"] = round(encode, 4)
        results["vae_to_unet_flops"] = round(vae_to_unet_flops(model, args.batch, args.size), 3)
        print(f"VAE encode / U-Net training FLOPs: {results['vae_to_unet_flops']} (SD 1.5 at 512 px: ~0.48)")
        print(f"VAE encode of one batch (the peer's extra work each step): {encode:.4f} s", flush=True)
        s, c, b = sdtune["median"], cached["median"], bare_run["median"]
        print(f"ratio sdtune / bare : {s / b:6.3f}  (1.0 = no overhead)")
        results["ratio_sdtune_over_bare"] = round(s / b, 3)
        if peer is not None:
            p = peer["median"]
            print(f"ratio sdtune / peer : {s / p:6.3f}  (below 1: sdtune faster)")
            print(f"ratio bare / peer   : {b / p:6.3f}  (the most a trainer with no overhead at all could gain)")
            print(f"ratio sdtune with --cache_text_encoder_outputs / peer : {c / p:6.3f}")
            print(f"ratio sdtune / (peer - VAE encode) : {s / (p - encode):6.3f}  (against the peer without its "
                  "per-step VAE encode)")
            results["ratio_sdtune_over_peer"] = round(s / p, 3)
            results["ratio_bare_over_peer"] = round(b / p, 3)
            results["ratio_sdtune_te_cache_over_peer"] = round(c / p, 3)
            results["ratio_sdtune_over_peer_without_vae"] = round(s / (p - encode), 3)
        print(json.dumps(results), flush=True)
    finally:
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
