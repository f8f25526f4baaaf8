"""Fixtures for the labeling tests: tiny BLIP and WD14 models in the real layouts, and folders of generated images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from PIL import Image

from tests.fixtures.labelers import build_tiny_blip, build_tiny_tagger

#: name -> (size, colour); sizes are not square so that padding (WD14) and resizing (BLIP) matter.
IMAGES: dict[str, tuple[tuple[int, int], tuple[int, int, int]]] = {
    "red.png": ((40, 24), (255, 0, 0)),
    "blue.jpg": ((32, 32), (0, 0, 255)),
    "green.png": ((40, 50), (0, 255, 0)),
    "gray.webp": ((64, 48), (128, 128, 128)),
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run thousands of tiny ops; with two OpenMP threads on a busy two-core box every op waits for a
    descheduled thread (seconds instead of milliseconds). Restored afterwards for the other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_tagger(fixed_batch=None)``: the folder of a tiny tagger (built once per variant)."""
    root = tmp_path_factory.mktemp("tagger")
    cache: dict[int | None, Path] = {}

    def get(fixed_batch: int | None = None) -> Path:
        if fixed_batch not in cache:
            cache[fixed_batch] = build_tiny_tagger(root / f"batch-{fixed_batch or 'dynamic'}",
                                                   fixed_batch=fixed_batch)
        return cache[fixed_batch]

    return get


def write_images(folder: Path, names: tuple[str, ...] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (size, colour) in IMAGES.items():
        if names is None or name in names:
            Image.new("RGB", size, colour).save(folder / name)
    return folder


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """A folder with the four IMAGES."""
    return write_images(tmp_path / "train")
