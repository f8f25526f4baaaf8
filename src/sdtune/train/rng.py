"""Randomness derived from numbers, never taken from global state.

Every random draw of a training step comes from a generator seeded by ``(seed, rank, step, micro-batch)``, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    state = np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator for one micro-batch: derived from (seed, rank, step, micro), never global."""
    return torch.Generator().manual_seed(derived_seed(seed, rank, step, micro))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG seeded with ``seed`` inside the block and restored after.

    Dropout layers (a hypernetwork's) draw from the global RNG; seeding it per micro-batch from (seed, rank, step,
    micro) makes their masks, like everything else, the same after --resume. Gradient checkpointing replays the
    state it saw in the forward pass, so recomputed masks match too.
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
