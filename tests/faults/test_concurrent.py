"""Two real runs into one --output_dir (issue 12 item 2): while the first trains, the second is refused, naming it,
and the first finishes untouched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtune.cli import main

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_trains(prepared, tmp_path, capsys):
    model, train_dir, meta = prepared("sd1")
    out = tmp_path / "out"
    args = ["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta), "--train_data_dir",
            str(train_dir), "--output_dir", str(out), "--train_batch_size", "2", "--max_data_loader_n_workers", "0"]
    log = tmp_path / "first.log"
    with log.open("w", encoding="utf-8") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "sdtune", *args, "--max_train_steps", "400"],
                                 env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while not re.search(r"\b[1-9]\d*/400\b", log.read_text(encoding="utf-8", errors="replace")):
                assert first.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
                time.sleep(0.1)
            assert main([*args, "--max_train_steps", "2"]) == 2
            err = capsys.readouterr().err
            assert f"another sdtune train is running into this folder (pid {first.pid}" in err
            assert first.wait(timeout=600) == 0  # the first run is not disturbed
        finally:
            if first.poll() is None:
                first.kill()
    assert (out / "last.safetensors").is_file() and not (out / ".sdtune-train.lock").exists()
