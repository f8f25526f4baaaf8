"""Precision names -> torch dtypes: the one table behind every option that names a precision.

``no`` (``--mixed_precision no``), ``float`` and ``fp32`` (``--save_precision``, ``--dtype``) all mean float32;
``fp16`` and ``bf16`` their half types. Each option offers the subset that makes sense for it (its ``choices``);
this module only says what a name means. It imports torch and nothing else of sdtune.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "no": torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


def dtype_of(name: str) -> torch.dtype:
    """The dtype of precision ``name`` (see ``DTYPES``); ``ValueError`` listing the names for any other."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(DTYPES)}") from None


def autocast_dtype_of(name: str) -> torch.dtype | None:
    """The dtype mixed precision ``name`` autocasts to (fp16, bf16); None for the float32 names (no autocast)."""
    dtype = dtype_of(name)
    return None if dtype == torch.float32 else dtype


def dtypes_of(names: tuple[str, ...]) -> dict[str, torch.dtype]:
    """``{name: dtype}`` for an option's ``names`` (its choices), in their order."""
    return {name: dtype_of(name) for name in names}


__all__ = ["DTYPES", "autocast_dtype_of", "dtype_of", "dtypes_of"]
