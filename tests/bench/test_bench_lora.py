"""bench/bench_lora.py --smoke: every row of the LoRA benchmark runs on the tiny model, and its byte counts add up
(AdamW keeps two fp32 moments a trained parameter, a gradient a trained parameter, the frozen model in bf16 under
--mixed_precision bf16). No time is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_lora.py"


def run(*args: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_smoke_runs_every_row_and_the_sizes_add_up():
    rows = {r["row"]: r for r in run()}
    assert len(rows) == 6 and not any("skipped" in r for r in rows.values())
    fine, lora, unet_only = rows["fine-tune (U-Net)"], rows["LoRA (U-Net + text encoder)"], rows["LoRA, U-Net only"]
    model_bytes = fine["weights"]  # the fine-tune's weights: the U-Net and text encoder in fp32
    for r in rows.values():
        assert r["gradients"] == 4 * r["trained_params"] and r["optimizer"] == 8 * r["trained_params"]
        assert r["weights"] == model_bytes + (4 * r["trained_params"] if r["lora"] else 0)
        assert r["total"] == r["weights"] + r["gradients"] + r["optimizer"] + r["activations"]
        assert r["seconds"] > 0 and r["activations"] > 0
    assert unet_only["trained_params"] < lora["trained_params"] < fine["trained_params"] / 10
    assert lora["total"] < fine["total"]
    for plain, checkpointed in (("fine-tune (U-Net)", "fine-tune, gradient checkpointing"),
                                ("LoRA (U-Net + text encoder)", "LoRA, gradient checkpointing"),
                                ("LoRA, U-Net only", "LoRA, U-Net only, gradient checkpointing")):
        assert rows[checkpointed]["activations"] < rows[plain]["activations"]

    (half,) = run("--mixed_precision", "bf16", "--rows", "2")
    assert half["weights"] == model_bytes // 2 + 4 * half["trained_params"]  # frozen bf16, the LoRA fp32
