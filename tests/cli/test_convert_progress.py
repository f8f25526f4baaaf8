"""convert keeps the epoch and step the source file records (issue 18, item 10)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sdtune.cli import main
from sdtune.models.io import load_model
from sdtune.models.save import save_model

pytestmark = pytest.mark.e2e


def safetensors_progress(path) -> tuple[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
    return meta["epoch"], meta["global_step"]


def test_convert_keeps_the_recorded_step_and_epoch(tmp_path, saved_model):
    src = tmp_path / "trained.ckpt"
    save_model(load_model(saved_model("sd1", "diffusers")), src, "ckpt", epoch=3, global_step=120)

    assert main(["convert", str(src), str(tmp_path / "a.safetensors")]) == 0
    assert safetensors_progress(tmp_path / "a.safetensors") == ("3", "120")
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.ckpt")]) == 0
    back = torch.load(str(tmp_path / "b.ckpt"), map_location="cpu", weights_only=True)
    assert (back["epoch"], back["global_step"]) == (3, 120)
    # the command line still says otherwise when asked
    assert main(["convert", str(src), str(tmp_path / "c.safetensors"), "--global_step", "7"]) == 0
    assert safetensors_progress(tmp_path / "c.safetensors") == ("3", "7")


def test_a_source_without_progress_records_zero(tmp_path, saved_model):
    assert main(["convert", str(saved_model("sd1", "diffusers")), str(tmp_path / "m.safetensors")]) == 0
    assert safetensors_progress(tmp_path / "m.safetensors") == ("0", "0")
