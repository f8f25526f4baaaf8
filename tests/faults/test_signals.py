"""SIGINT and SIGTERM at a random moment of a real run (issue 12): whenever the signal lands, the run stops at a step
boundary, saves its state, and the resumed run ends with the uninterrupted run's weights, bit for bit.

Every run here is a subprocess with the same environment (one torch thread), so the only difference between them is
the signal."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def command(prepared, out: Path, *extra: str) -> list[str]:
    model, train_dir, meta = prepared("sd1")
    return [sys.executable, "-m", "sdtune", "train", "--pretrained_model_name_or_path", str(model), "--in_json",
            str(meta), "--train_data_dir", str(train_dir), "--output_dir", str(out), "--max_train_steps", str(STEPS),
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--save_state", "--train_text_encoder", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def weights(state: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(state / "unet.safetensors")), **load_file(str(state / "text_encoder.safetensors"))}


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "out"
    run = subprocess.run(command(prepared, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return weights(out / "last-state")


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("signum,seed", [(signal.SIGINT, 1), (signal.SIGTERM, 2), (signal.SIGTERM, 3)])
def test_a_signal_at_a_random_moment_resumes_to_the_uninterrupted_weights(prepared, straight, tmp_path, signum,
                                                                          seed):
    out = tmp_path / "out"
    log = tmp_path / "stderr.log"
    with log.open("w", encoding="utf-8") as stderr:
        run = subprocess.Popen(command(prepared, out), env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while not re.search(r"\b[1-9]\d*/%d\b" % STEPS, log.read_text(encoding="utf-8", errors="replace")):
                assert run.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
                time.sleep(0.05)
            # anywhere in a step: forward, backward, update, save (a step takes 0.06-0.3 s here: well before the end)
            time.sleep(random.Random(seed).uniform(0.0, 0.3))
            os.kill(run.pid, signum)
            code = run.wait(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
    text = log.read_text(encoding="utf-8", errors="replace")
    if code == 0:
        pytest.skip("the run finished before the signal arrived (machine much faster than expected)")
    assert code == 128 + signum, text[-2000:]
    state = out / "interrupted-state"
    stopped_at = json.loads((state / "progress.json").read_text(encoding="utf-8"))["global_step"]
    # a signal during the final save stops after the last step: the resumed run then only makes the final save
    assert 1 <= stopped_at <= STEPS
    assert f"stopped by {signal.Signals(signum).name} after step {stopped_at}" in text
    resumed = subprocess.run(command(prepared, out, "--resume", str(state)), env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = weights(out / "last-state")
    assert final.keys() == straight.keys()
    for key in final:
        assert torch.equal(final[key], straight[key]), key
