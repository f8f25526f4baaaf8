"""bench/bench_gpu.py --smoke: the GPU benchmark's own code (the trainer's step per memory recipe, the OOM and skip
records, the summary line) on a tiny model on the CPU, so the script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Four recipes cover every path of the script within the test's time: fp32; fp16 autocast with --full_fp16, 8-bit
# Adam and gradient checkpointing (the loss scaler, half-precision weights, bitsandbytes); bf16 with the text
# encoder trained; and an option sdtune lacks (skipped), or, once it has it, the fused backward pass.
RECIPES = ["fp32", "README 8 GB", "README 24 GB", "bf16 + fused backward"]
MEASURED = {"recipe", "batch", "img_per_s", "s_per_step", "peak_vram_gib", "oom", "options", "device", "steps",
            "warmup", "overflow_skips", "encoded_on_the_fly"}
# The script's main() as `python bench/bench_gpu.py ARGS` runs it, with one out-of-memory error made up: the step of
# README 24 GB at batch 2 raises what CUDA raises (a CPU has no memory limit to run into).
RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import bench_gpu
measure = bench_gpu.measure
def measure_or_oom(trainer, groups, batch, warmup, steps):
    if trainer.opts.train_text_encoder and batch == 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (made up by the test)")
    return measure(trainer, groups, batch, warmup, steps)
bench_gpu.measure = measure_or_oom
bench_gpu.main(sys.argv[2:])
"""


def test_smoke_prints_one_json_record_per_recipe_and_batch():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", RUN, str(BENCH), "--smoke", "--steps", "1", "--recipes", *RECIPES],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every printed line is JSON
    *rows, summary = records
    by_recipe: dict[str, list[dict]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    assert sorted(by_recipe) == sorted(RECIPES)
    for name, got in by_recipe.items():
        if "skipped" in got[0]:
            assert name == "bf16 + fused backward" and "--fused_backward_pass" in got[0]["skipped"]
            continue
        assert [row["batch"] for row in got] == [1, 2]
        for row in got:
            if name == "README 24 GB" and row["batch"] == 2:  # the made-up OOM: a record, not a crash
                assert row["oom"] is True and "out of memory" in row["error"]
                continue
            assert MEASURED <= set(row), (name, set(row))
            assert row["oom"] is False and row["img_per_s"] > 0 and row["s_per_step"] > 0
            assert row["peak_vram_gib"] is None  # no CUDA memory figure on the CPU
            assert row["encoded_on_the_fly"] == 0  # the synthetic latent cache was taken as prepared
            assert row["steps"] == 1 and row["model"] == "tiny"
    assert summary["summary"] == "smallest_memory_batch1"
    assert {"recipe", "peak_vram_gib", "img_per_s", "ran"} <= set(summary)
    assert sorted(summary["ran"]) == sorted(n for n in RECIPES if "skipped" not in by_recipe[n][0])
