"""Sample images during training: names, metadata, modes restored, TensorBoard logging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.models.tiny import build_tiny
from sdtune.train.samples import sample_during_training

pytestmark = pytest.mark.component


class FakeWriter:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.calls.append((tag, image, step, dataformats))


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "sample_prompts.txt"
    path.write_text("# samples\na red circle --w 64 --h 48 --s 2\n\na blue square --s 2 --d 99 --n circle\n",
                    encoding="utf-8")
    return path


def test_samples_are_named_logged_and_the_model_keeps_training(tmp_path, prompts):
    model = build_tiny("sd1")
    model.unet.train()
    model.text_encoder.eval()
    model.vae.eval()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    writer = FakeWriter()
    out = tmp_path / "output" / "sample"
    paths = sample_during_training(model, prompts, out, step=120, epoch=3, sampler="euler_a", clip_skip=2,
                                   max_token_length=150, device="cpu", seed=5, writer=writer, width=32, height=32)
    assert paths == [out / "sample_000120_00.png", out / "sample_000120_01.png"]
    with Image.open(paths[0]) as first, Image.open(paths[1]) as second:
        assert first.size == (64, 48) and second.size == (32, 32)
        meta = [json.loads(first.text["sdtune"]), json.loads(second.text["sdtune"])]
        assert "Clip skip: 2" in first.text["parameters"]
    assert [m["seed"] for m in meta] == [5, 99]
    assert all(m["step"] == 120 and m["epoch"] == 3 and m["max_token_length"] == 150 for m in meta)
    assert meta[1]["negative_prompt"] == "circle"
    # modes restored, weights and gradients untouched
    assert model.unet.training and not model.text_encoder.training and not model.vae.training
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert all(p.grad is None for p in model.unet.parameters())
    assert [(c[0], c[1].shape, c[2], c[3]) for c in writer.calls] == [
        ("sample/0", (48, 64, 3), 120, "HWC"), ("sample/1", (32, 32, 3), 120, "HWC")]
    assert writer.calls[0][1].dtype == np.uint8


def test_output_name_and_repeatable_samples(tmp_path, prompts):
    model = build_tiny("sd2-v")
    kw = {"seed": 1, "output_name": "mystyle", "width": 32, "height": 32}
    a = sample_during_training(model, prompts, tmp_path, 7, 1, "ddim", **kw)
    b = sample_during_training(model, prompts, tmp_path / "again", 7, 1, "ddim", **kw)
    assert [p.name for p in a] == ["mystyle_000007_00.png", "mystyle_000007_01.png"]
    with Image.open(a[0]) as x, Image.open(b[0]) as y:
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_a_bad_prompt_file_line_is_named(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat --w 33\n", encoding="utf-8")
    with pytest.raises(SdtuneError, match="bad.txt:1"):
        sample_during_training(build_tiny("sd1"), bad, tmp_path, 1, 0, "ddim")


def test_modes_are_restored_after_an_error(tmp_path, prompts):
    model = build_tiny("sd1")
    model.unet.train()
    model.text_encoder.train()
    model.vae.eval()
    with pytest.raises(SdtuneError, match="max_token_length"):
        sample_during_training(model, prompts, tmp_path, 1, 0, "ddim", max_token_length=100)  # fails mid-way
    assert model.unet.training and model.text_encoder.training and not model.vae.training
    assert not list(tmp_path.glob("*.png"))
