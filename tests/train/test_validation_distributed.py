"""--validation_split under torchrun: each rank scores its share of the validation images and the totals are
summed, so every rank logs the mean one process would (two ranks, gloo on the CPU)."""

from __future__ import annotations

import json
import math

import pytest

from sdtune.train.loop import Trainer
from tests.train.test_distributed import ROOT, torchrun
from tests.train.test_train import options

pytestmark = pytest.mark.e2e


def test_two_processes_score_the_set_as_one_process(prepared, tmp_path):
    """3 validation images on 2 ranks (shares of 2 and 1): the summed totals give one process's mean."""
    model, train_dir, meta = prepared("sd1", False)
    settings = {"validation_split": 0.5, "max_train_steps": 1, "train_batch_size": 2, "seed": 7}
    out = tmp_path / "ddp"
    run = torchrun(str(ROOT / "tests" / "train" / "ddp_worker.py"), str(model), str(train_dir), str(meta), str(out),
                   json.dumps(settings), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["validation"] == ranks[1]["validation"]  # every rank has the whole set's mean
    one = Trainer(options(prepared, tmp_path / "one", **settings))
    assert one.validation.images.images == 3
    (step, loss), *_ = ranks[0]["validation"]
    assert step == 0  # before training: the same weights in both runs
    assert math.isclose(loss, one.validate()["loss/validation"], rel_tol=1e-5)
