"""One host-device wait per optimizer step (issue 10): the loss, the fp16 overflow flag and the stop request are read
in one ``.tolist()``; nothing else in a step converts a tensor to a Python value (diffusers' train_text_to_image
reads the loss once a step too). bench/bench_syncs.py prints the counts."""

from __future__ import annotations

import pytest
import torch

from sdtune.train.loop import Trainer
from sdtune.train.syncs import HostSyncCounter, count_run_syncs
from tests.train.test_train import options

pytestmark = pytest.mark.component


@pytest.mark.parametrize("settings", [
    {},
    {"mixed_precision": "fp16", "min_snr_gamma": 5.0, "noise_offset": 0.05, "gradient_accumulation_steps": 2,
     "train_text_encoder": True, "clip_skip": 2},
    {"mixed_precision": "fp16", "full_fp16": True, "v_parameterization": True},
], ids=["fp32", "fp16-min-snr-accumulation-te", "full-fp16-v"])
def test_a_training_step_waits_for_the_device_once(prepared, tmp_path, settings):
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=4, logging_dir=str(tmp_path / "logs"),
                              **settings))
    per_step, counter = count_run_syncs(trainer)
    assert per_step == 1, counter.report()


def test_the_counter_sees_an_item_and_an_if_on_a_tensor():
    with HostSyncCounter() as counter:
        x = torch.ones(3)
        x.sum().item()
        if x.max() > 0:
            pass
        float(x[0])
    assert counter.total == 3, counter.report()
