"""Seeds derived from numbers (and names), never taken from global state: the one derivation every stage uses.

Training draws each step's randomness from ``(seed, step, batch)`` (``sdtune.train.rng``), the dataset each item's
from ``(seed, epoch, item key)`` (``sdtune.data.dataset``), BLIP each batch's from ``(seed, batch index)``
(``sdtune.label.blip``). All go through NumPy's ``SeedSequence``, whose streams are well mixed: a plain
``seed + index`` would make neighbouring runs overlap. Only NumPy is imported, so any module can use this one.

The values are part of what a run reproduces (a resumed run must draw what an uninterrupted one drew): changing
anything here changes every seeded result.
"""

from __future__ import annotations

import hashlib

import numpy as np


def name_number(name: str) -> int:
    """A 64-bit number standing for ``name`` in a seed (blake2b of its UTF-8 bytes, little-endian)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def _entropy(parts: tuple[int | str, ...]) -> list[int]:
    return [name_number(p) if isinstance(p, str) else int(p) for p in parts]


def derived_seed(*parts: int | str, bits: int = 63) -> int:
    """A seed of ``bits`` bits (63: any torch or NumPy seeder takes it; 64: the full state word) derived from
    ``parts`` (integers, or names hashed by :func:`name_number`)."""
    state = np.random.SeedSequence(_entropy(parts)).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << bits) - 1)


def derived_rng(*parts: int | str) -> np.random.Generator:
    """A NumPy generator seeded by ``parts`` (integers, or names hashed by :func:`name_number`)."""
    return np.random.default_rng(_entropy(parts))


__all__ = ["derived_rng", "derived_seed", "name_number"]
