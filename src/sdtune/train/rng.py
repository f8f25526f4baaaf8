"""Randomness derived from numbers, never taken from global state.

Every random draw of a training step comes from a generator seeded by ``(seed, step, batch)``, where ``batch`` is
the batch's place among all the batches of that optimizer step on all ranks (micro-batch * world size + rank). So a
resumed run draws exactly what an uninterrupted one would, and one process with gradient accumulation N draws what
N processes draw: the world size changes nothing but speed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from sdtune.seeds import derived_seed


def step_batch_index(micro: int, world_size: int, rank: int) -> int:
    """A batch's place among one optimizer step's batches of every rank (ranks take an epoch's batches by stride)."""
    return micro * world_size + rank


def step_generator(seed: int, step: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one batch of one optimizer step, on ``device`` (draws there need no copy): derived from
    (seed, step, batch index), never global."""
    return torch.Generator(device).manual_seed(derived_seed(seed, step, batch))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG seeded with ``seed`` inside the block and restored after.

    Dropout layers (a hypernetwork's) draw from the global RNG; seeding it per batch from (seed, step, batch index)
    makes their masks, like everything else, the same after --resume. Gradient checkpointing replays the
    state it saw in the forward pass, so recomputed masks match too.
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
