"""Two processes (torchrun, gloo on the CPU) train one hypernetwork: the same weights on both ranks.

The hypernetwork runs inside the U-Net's forward (hooks), so no DDP wrapper averages its gradients; the trainer
does. Each rank draws other dropout masks and other images, so without the averaging the ranks drift apart.
"""

from __future__ import annotations

import json

import pytest

from tests.train.test_distributed import ROOT, torchrun

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_two_processes_keep_one_hypernetwork(prepared, tmp_path):
    model, train_dir, meta = prepared("sd1", False)
    out = tmp_path / "out"
    run = torchrun(str(ROOT / "tests" / "hypernetwork" / "ddp_worker.py"), str(model), str(train_dir), str(meta),
                   str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [3, 3]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert (out / "last.pt").is_file()  # rank 0 wrote the hypernetwork
