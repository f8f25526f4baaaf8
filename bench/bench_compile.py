"""``--torch_compile`` across bucket shapes: what torch's automatic-dynamic mode (sdtune's choice: a block is compiled
for its first shape, then once more with the changing sizes symbolic) costs and runs at, against one static compile
per bucket shape, and against eager.

    .venv/bin/python bench/bench_compile.py [--width 64] [--batch 4] [--threads 1] [--backend inductor]

The U-Net is bench_train.py's (a small SD1-topology U-Net), its blocks compiled in place by sdtune's own
``compile_blocks`` inside ``recompile_room``, as ``sdtune train --torch_compile`` does. One forward and backward per
call, on latents of three bucket shapes in the order a shuffled epoch meets them (16x16, 16x24, 24x16, then the first
two again). Per mode: the seconds of each call (a call that compiles shows it), the compiles counted by dynamo, and
the median of three further calls per shape once everything is compiled. Inductor's on-disk cache goes to a fresh
temporary folder, so every compile is a real one. Prints one JSON line per mode.

Measured 2026-12-06 (2-core CPU, 1 thread, inductor, width 64, batch 4; ``bench_compile.py --width 64``, 5 min 40 s),
seconds per forward and backward::

    call (latents)              16x16  16x24  24x16  16x16  16x24   graphs   steady 16x16 / 16x24 / 24x16
    eager                       0.26   0.31   0.31   0.20   0.29    0        0.200 / 0.289 / 0.286
    automatic dynamic (sdtune)  81.7   50.9   25.6   0.24   0.34    39       0.238 / 0.338 / 0.338
    static per shape            67.1   71.9   24.5   0.24   0.33    44       0.229 / 0.309 / 0.314

Automatic dynamic compiles a block again the first time its width changes and once more when its height does
(each size turns symbolic on its own), then never again: a run with twenty buckets compiles three times. Static
compiles at every new bucket (here the third is cheaper, its smaller levels' shapes having been met already), so
its cost grows with the number of buckets, for kernels 4-9 % faster than the symbolic ones. On this CPU both run
slower than eager (see bench_options.py for why); on a GPU the figures are not measured yet.
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

SHAPES = [(16, 16), (16, 24), (24, 16), (16, 16), (16, 24)]


def step(unet, latents, states) -> float:
    """Seconds for one forward and backward of ``unet`` on ``latents``."""
    import torch

    timesteps = torch.full((latents.shape[0],), 500)
    started = time.perf_counter()
    unet(latents, timesteps, states).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def run_mode(mode: str, width: int, batch: int, backend: str) -> dict:
    """The call times of one mode: ``eager``, ``automatic dynamic`` or ``static per shape``."""
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
        compile_blocks(unet, backend)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)  # before torch._inductor reads it
        import torch

        torch.set_num_threads(args.threads)
        for mode in ("eager", "automatic dynamic", "static per shape"):
            print(json.dumps(run_mode(mode, args.width, args.batch, args.backend)), flush=True)


if __name__ == "__main__":
    main()
