"""PNG files: AUTOMATIC1111's infotext quoting, numbered names that never overwrite."""

from __future__ import annotations

import pytest

from sdtune.sampling.pipeline import ImageSettings, generate_images
from sdtune.sampling.png import NumberedWriter

pytestmark = pytest.mark.component


def test_parameters_text_quotes_like_automatic1111():
    settings = ImageSettings(prompt="a, b", negative_prompt="", width=512, height=768, seed=1, steps=30, scale=7.0,
                             sampler="euler", clip_skip=2, max_token_length=150, model="my, model")
    assert settings.parameters_text() == (
        'a, b\nSteps: 30, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 512x768, Model: "my, model", Clip skip: 2')


def test_writer_skips_a_name_taken_meanwhile(tmp_path, sd1):
    writer = NumberedWriter(tmp_path)
    (tmp_path / "00000-4.png").write_bytes(b"another process")
    item = generate_images(sd1, ["a cat"], seed=4, steps=1, width=32, height=32, progress=False)[0]
    path = writer.save(item)
    assert path.name == "00001-4.png"
    assert (tmp_path / "00000-4.png").read_bytes() == b"another process"
