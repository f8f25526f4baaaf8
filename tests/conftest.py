"""Test-wide setup: no network, tiny models built in code and saved in the real on-disk formats."""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may reach the network: models are built in code (sdtune.models.tiny).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.models"]


def pytest_configure(config):
    # Tiny models are dominated by per-operation overhead: one thread is several times faster than two on a
    # 2-core machine, and keeps timings steady when something else runs beside the tests.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def spawn_workers(monkeypatch):
    """DataLoader workers started with spawn, as on Windows and macOS: everything a worker gets must pickle."""
    import torch.utils.data

    class SpawnLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            if kwargs.get("num_workers", 0) > 0:
                kwargs.setdefault("multiprocessing_context", "spawn")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", SpawnLoader)
