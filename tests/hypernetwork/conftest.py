"""Fixtures of the hypernetwork tests: the training tests' prepared data, and tiny models whose attention matters.

In the tiny random models (``sdtune.models.tiny``) every weight is drawn with std 0.02, so each attention's output
projection and each transformer's ``proj_out`` shrink what attention adds to the residual stream: switching all
attention off moves the U-Net's output by about a tenth of its spread. A hypernetwork, which changes nothing but the
attention's keys and values, then has almost no say in the loss. In real Stable Diffusion attention is what carries
the prompt; :func:`attention_heavy_model` restores that by scaling those two projections up, so that a hypernetwork
can visibly overfit in a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from sdtune.models.save import save_model
from sdtune.models.tiny import build_tiny
from tests.train.conftest import fresh_accelerate_state, prepared  # noqa: F401  (shared fixtures)

ATTENTION_GAIN = 10.0


@pytest.fixture(scope="session")
def attention_heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """attention_heavy_model(family) -> a diffusers folder: the tiny model of ``family`` (same VAE and text
    encoder as ``saved_model``) with its attention output projections scaled by ATTENTION_GAIN."""
    root = tmp_path_factory.mktemp("attention-heavy")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            model = build_tiny(family)
            with torch.no_grad():
                for name, module in model.unet.named_modules():
                    if hasattr(module, "to_out"):
                        module.to_out[0].weight.mul_(ATTENTION_GAIN)
                    if name.endswith("proj_out"):
                        module.weight.mul_(ATTENTION_GAIN)
            cache[family] = root / family
            save_model(model, cache[family], "diffusers_safetensors")
        return cache[family]

    return get
