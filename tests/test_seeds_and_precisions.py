"""The two tables every stage shares: seed derivation (sdtune.seeds) and precision names (sdtune.precision_names).

The seeds are checked against the recipe the module documents (NumPy's SeedSequence of the parts, names hashed with
blake2b), computed here with NumPy and hashlib directly, and against the generators the stages really build.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from sdtune.precision_names import DTYPES, autocast_dtype_of, dtype_of, dtypes_of
from sdtune.seeds import derived_rng, derived_seed, name_number

pytestmark = pytest.mark.unit


def reference_seed(*parts, bits=63):
    entropy = [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") if isinstance(p, str)
               else p for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) & ((1 << bits) - 1)


@pytest.mark.parametrize("parts", [(0,), (1234, 7, 3), (2**40, 0, 0, 1), ("photo/cat.png", 5), (42, "x", 1)])
def test_derived_seed_is_the_documented_recipe(parts):
    assert derived_seed(*parts) == reference_seed(*parts)
    assert derived_seed(*parts, bits=64) == reference_seed(*parts, bits=64)
    assert derived_seed(*parts) < 2**63


def test_neighbouring_seeds_do_not_overlap():
    # seed + index would give run 1's batch 0 the seed of run 0's batch 1
    assert derived_seed(1, 0) != derived_seed(0, 1)
    assert len({derived_seed(s, b) for s in range(20) for b in range(20)}) == 400


def test_name_number_and_rng_follow_the_recipe():
    assert name_number("a.png") == int.from_bytes(hashlib.blake2b(b"a.png", digest_size=8).digest(), "little")
    expected = np.random.default_rng([7, name_number("a.png")]).random(4)
    np.testing.assert_array_equal(derived_rng(7, "a.png").random(4), expected)


def test_training_generators_are_seeded_by_the_derivation():
    from sdtune.train.rng import step_generator

    drawn = torch.randn(5, generator=step_generator(99, 12, 3))
    torch.testing.assert_close(drawn, torch.randn(5, generator=torch.Generator().manual_seed(reference_seed(99, 12, 3))),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name, dtype", [("no", torch.float32), ("float", torch.float32), ("fp32", torch.float32),
                                         ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision_names(name, dtype):
    assert dtype_of(name) is dtype
    assert autocast_dtype_of(name) is (None if dtype is torch.float32 else dtype)


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*no, float, fp32, fp16, bf16"):
        dtype_of("fp8")


def test_every_precision_option_offers_only_known_names():
    import dataclasses

    from sdtune.data.latent_cache import MIXED_PRECISIONS
    from sdtune.generate import GenerateOptions
    from sdtune.models.convert import ConvertOptions
    from sdtune.models.lora_commands import ExtractLoraOptions, MergeLoraOptions
    from sdtune.train.options import TrainOptions

    offered = set(MIXED_PRECISIONS)
    for options in (TrainOptions, GenerateOptions, ConvertOptions, MergeLoraOptions, ExtractLoraOptions):
        for field in dataclasses.fields(options):
            if "precision" in field.name or field.name == "dtype":
                offered |= set(field.metadata.get("choices") or ())
    assert offered and offered <= set(DTYPES)
    assert dtypes_of(("fp16", "float")) == {"fp16": torch.float16, "float": torch.float32}
