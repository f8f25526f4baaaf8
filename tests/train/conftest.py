"""A small prepared dataset (images, captions, metadata, cached latents) for training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from sdtune.data.metadata import save_metadata
from sdtune.data.prepare import PrepareOptions, prepare_latents
from sdtune.models.io import load_vae

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 40, 170), "white": (240, 240, 240)}


def make_images(folder: Path, count: int = 6, sizes: tuple[tuple[int, int], ...] = ((64, 64), (128, 48))) -> dict:
    """Coloured squares on a contrasting background, captioned with their colour; two aspect ratios."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {}
    names = list(COLOURS)
    for i in range(count):
        colour = names[i % len(names)]
        w, h = sizes[i % len(sizes)]
        pixels = np.full((h, w, 3), 20 + i * 10, dtype=np.uint8)
        x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
        pixels[y:y + h // 2, x:x + w // 2] = COLOURS[colour]
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        images[f"img{i:02d}"] = {"caption": f"a {colour} square", "tags": f"{colour}, square, simple background"}
    return images


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, saved_model) -> Callable[..., tuple[Path, Path, Path]]:
    """prepared(family) -> (model path, train dir, metadata json with train_resolution), cached per family."""
    cache: dict[tuple, tuple[Path, Path, Path]] = {}

    def get(family: str = "sd1", flip_aug: bool = False, count: int = 6) -> tuple[Path, Path, Path]:
        key = (family, flip_aug, count)
        if key not in cache:
            model = saved_model(family, "diffusers_safetensors")
            root = tmp_path_factory.mktemp(f"data-{family}")
            train_dir = root / "train"
            save_metadata(root / "meta.json", make_images(train_dir, count))
            options = PrepareOptions(train_data_dir=train_dir, in_json=root / "meta.json", out_json=root / "meta_lat.json",
                                     model_name_or_path=str(model), max_resolution="64,64", min_bucket_reso=32,
                                     max_bucket_reso=128, bucket_reso_steps=32, flip_aug=flip_aug,
                                     max_data_loader_n_workers=0)
            prepare_latents(options, load_vae(model))
            cache[key] = (model, train_dir, root / "meta_lat.json")
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; tests that train with other precisions need a fresh one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
