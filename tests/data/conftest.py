"""Fixtures for the dataset-preparation tests: small generated images and the tiny model's VAE."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image


def smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric colour image (gradients plus a blob), uint8 [H, W, 3]: any wrong crop, flip or
    rotation changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    blob = np.exp(-(((x - cx) / (0.2 * width)) ** 2 + ((y - cy) / (0.2 * height)) ** 2))
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 255 * blob
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture()
def make_image() -> Callable[..., Path]:
    """``make_image(path, width, height, seed=0)`` writes a smooth RGB image and returns its path."""

    def make(path: Path, width: int, height: int, seed: int = 0, **save_kwargs) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_rgb(width, height, seed)).save(path, **save_kwargs)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(saved_model) -> Path:
    """The tiny SD1 model as a diffusers folder (built once per session)."""
    return saved_model("sd1", "diffusers_safetensors")


@pytest.fixture(scope="session")
def tiny_vae(tiny_model_dir):
    from sdtune.models.io import load_vae

    return load_vae(tiny_model_dir)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine (DataLoader workers, parallel test
    runs) OpenMP's spinning threads make a 20 ms encode take over a second. Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def dataset(tmp_path, make_image) -> tuple[Path, Path]:
    """A training folder of the three ``EXPECTED`` images with captions, and its merged metadata JSON."""
    from sdtune.cli import main
    from tests.data.prepared import EXPECTED

    train = tmp_path / "train"
    for i, (name, (size, *_)) in enumerate(EXPECTED.items()):
        make_image(train / f"{name}.png", *size, seed=i)
        (train / f"{name}.caption").write_text(f"a picture of {name}")
    meta = tmp_path / "meta.json"
    assert main(["merge-captions", str(train), str(meta)]) == 0
    return train, meta
