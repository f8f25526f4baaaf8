"""``--torch_compile`` across bucket shapes: what torch's automatic-dynamic mode (sdtune's choice: a block is compiled
for its first shape, and again with the sizes that changed symbolic) costs and runs at, against one static compile
per bucket shape, every size symbolic from the start (``dynamic=True``), and eager.

    .venv/bin/python bench/bench_compile.py [--width 64] [--batch 4] [--threads 1] [--backend inductor]

The U-Net is bench_train.py's (a small SD1-topology U-Net), its blocks compiled in place by sdtune's own
``compile_blocks`` inside ``recompile_room``, as ``sdtune train --torch_compile`` does. One forward and backward per
call, on latents of bucket shapes in the order a shuffled epoch might meet them (16x16, 16x24, 24x16, the first
two again, then two new ones: 24x24, 32x16). Per mode: the seconds of each call (a call that compiles shows it),
the graphs dynamo compiled, and the median of three further calls per shape once everything is compiled.
Inductor's on-disk cache goes to a fresh temporary folder, so every compile is a real one. Prints one JSON line per
mode.

Measured 2026-12-06 (2-core CPU, 1 thread, width 64, batch 4; ``bench_compile.py --width 64``, 9 min 23 s, and
``--modes "all sizes dynamic"``, ``--backend aot_eager``), seconds per forward and backward::

    call (latents)                16x16  16x24  24x16  16x16  16x24  24x24  32x16  graphs  steady (5 shapes)
    eager                         0.27   0.32   0.30   0.20   0.28   0.47   0.40   0       0.200 0.287 0.278 0.439 0.374
    automatic dynamic (sdtune)    83.9   49.5   24.5   0.23   0.33   40.0   36.6   63      0.202 0.285 0.291 0.450 0.386
    static per shape              60.4   71.6   24.8   0.22   0.32   72.5   70.6   76      0.227 0.314 0.308 0.489 0.424
    all sizes dynamic (dynamic=True) 93.4 51.4  29.9   0.23   0.31   48.0   45.2   63      0.211 0.296 0.297 0.456 0.391
    automatic dynamic, aot_eager  6.3    1.7    0.31   0.21   0.29   0.44   0.38   12      (traces only)

With inductor every new bucket compiles again, whichever mode: the graphs dynamo traces turn symbolic (aot_eager,
which only traces, compiles 12 graphs for the seven calls and nothing for new buckets), but inductor's kernels add
guards of their own (``TORCH_LOGS=recompiles`` shows the failed size guards). Automatic dynamic pays least for a new
bucket (37-50 s here, against 71-72 s for a static compile) and its kernels run as fast as eager; a run pays one
compile per bucket in its first epoch and none after. An earlier run of the five first calls gave the same
compile times and steady times 0.238 / 0.338 / 0.338 (automatic) and 0.229 / 0.309 / 0.314 (static): the steady
figures move by 10-15 % between runs on this shared machine. On this CPU compiling never pays (see
bench_options.py for why); on a GPU the figures are not measured yet.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = [(16, 16), (16, 24), (24, 16), (16, 16), (16, 24), (24, 24), (32, 16)]


def step(unet, latents, states) -> float:
    """Seconds for one forward and backward of ``unet`` on ``latents``."""
    import torch

    timesteps = torch.full((latents.shape[0],), 500)
    started = time.perf_counter()
    unet(latents, timesteps, states).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def run_mode(mode: str, width: int, batch: int, backend: str) -> dict:
    """The call times of one mode: ``eager``, ``automatic dynamic`` (sdtune's), ``static per shape`` or ``all sizes
    dynamic`` (``dynamic=True``: every size symbolic from the first compile)."""
    if mode not in ("eager", "automatic dynamic", "static per shape", "all sizes dynamic"):
        raise SystemExit(f"unknown mode {mode!r}")
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sdtune.models.compile import compile_blocks, recompile_room

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import build_model

    torch.manual_seed(0)
    unet = build_model(width).unet.train()
    torch._dynamo.reset()
    counters.clear()
    states = torch.randn(batch, 77, unet.config.cross_attention_dim)
    latents = {shape: torch.randn(batch, 4, *shape) for shape in set(SHAPES)}
    if mode != "eager":
        compile_blocks(unet, backend, dynamic=True if mode == "all sizes dynamic" else None)
    patch = torch._dynamo.config.patch(automatic_dynamic_shapes=(mode != "static per shape"))
    with patch, recompile_room(mode != "eager"):
        calls = [round(step(unet, latents[shape], states), 3) for shape in SHAPES]
        steady = {f"{h}x{w}": round(statistics.median(step(unet, latents[(h, w)], states) for _ in range(3)), 4)
                  for h, w in dict.fromkeys(SHAPES)}
    return {"mode": mode, "shapes": [f"{h}x{w}" for h, w in SHAPES], "calls_s": calls,
            "graphs_compiled": int(counters["stats"]["unique_graphs"]), "steady_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="U-Net base width (SD: 320; tiny: 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="inductor", help="dynamo backend (aot_eager: trace only, fast)")
    parser.add_argument("--modes", default="eager,automatic dynamic,static per shape",
                        help="which to run, comma-separated, of: eager, automatic dynamic, static per shape, "
                             "all sizes dynamic")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)  # before torch._inductor reads it
        import torch

        torch.set_num_threads(args.threads)
        for mode in args.modes.split(","):
            print(json.dumps(run_mode(mode, args.width, args.batch, args.backend)), flush=True)


if __name__ == "__main__":
    main()
