"""Test-wide setup: no network, tiny models built in code and saved in the real on-disk formats."""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may reach the network: models are built in code (sdtune.models.tiny).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.models"]

#: The test tiers (pyproject.toml's markers): every test has exactly one, set by its module's ``pytestmark``.
TIERS = ("unit", "component", "e2e")


def pytest_configure(config):
    # Tiny models are dominated by per-operation overhead: one thread is several times faster than two on a
    # 2-core machine, and keeps timings steady when something else runs beside the tests.
    import torch

    torch.set_num_threads(1)


def pytest_runtest_setup(item):
    """A test without exactly one tier marker fails, naming the fix: a new module cannot forget its tier. (A run
    selected with ``-m`` does not collect an unmarked test at all; the plain run, CI's, catches it.)"""
    tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
    if len(tiers) != 1:
        pytest.fail(f"{item.nodeid} has tier markers {tiers}: give its module exactly one of "
                    f"pytestmark = pytest.mark.{' / '.join(TIERS)} (see pyproject.toml's markers)", pytrace=False)


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
