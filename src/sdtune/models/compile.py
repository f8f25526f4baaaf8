"""``--torch_compile``: the U-Net's repeated blocks compiled in place, and ``--channels_last``.

**What is compiled.** Each ``BasicTransformerBlock`` (attention + feed-forward) and each ``ResnetBlock2D``, with
:meth:`torch.nn.Module.compile`, as OneTrainer compiles transformer blocks: the blocks are where the time goes, a
block compiles in seconds (the whole U-Net takes minutes and recompiles for any change around it), and blocks of the
same shape share one compiled graph. ``Module.compile`` compiles the module's forward *in place*: the module is not
wrapped, so its parameter names, and every checkpoint saved from it, stay as they were (no ``_orig_mod.`` prefix),
and hooks (LoRA, hypernetworks) on layers inside a block still run (dynamo traces through them).

**Bucket shapes.** ``dynamic=None`` is torch's automatic-dynamic mode: a block is compiled for the first shape it
sees, and again with the sizes that changed symbolic when a bucket changes them. The traced graphs then serve every
bucket (with the ``aot_eager`` backend nothing compiles again), but inductor's kernels add size guards of their own,
so with inductor each new bucket still compiles once, the first time it comes: measured on a CPU by
``bench/bench_compile.py``, 37-50 s per new bucket for a small U-Net against 71-72 s with a static compile per
bucket (``dynamic=False``), and no better with ``dynamic=True``; later epochs compile nothing. ``--
dynamo_backend`` / ``--torch_compile_mode`` choose torch's backend (``inductor``, the default, generates kernels;
``aot_eager`` and ``eager`` only trace, for debugging) and inductor's mode (``default``, ``reduce-overhead``: CUDA
graphs, ``max-autotune``).

**channels_last** stores 4-D weights and activations as NHWC, which NVIDIA's tensor-core convolutions prefer; on a
CPU it changes the kernels PyTorch picks. The values are the same (up to float rounding); weights are made
contiguous again when saved.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Optional

import torch
from torch import nn

from sdtune.models.choices import COMPILE_MODES, DYNAMO_BACKENDS

logger = logging.getLogger(__name__)

COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
RECOMPILE_LIMIT = 64  # per block class, at the least (recompile_limit: a run's, from its buckets)


def compile_blocks(unet: nn.Module, backend: str = "inductor", mode: Optional[str] = None,
                   dynamic: Optional[bool] = None) -> int:
    """Compile every transformer and ResNet block of ``unet`` in place; returns how many were compiled.
    ``dynamic``: torch.compile's (None: automatic dynamic, sizes turn symbolic when they change; True: every size
    symbolic from the first compile)."""
    assert backend in DYNAMO_BACKENDS and (mode is None or mode in COMPILE_MODES), (backend, mode)
    options: dict = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor" and mode not in (None, "default"):
        options["mode"] = mode
    count = 0
    for module in unet.modules():
        if type(module).__name__ in COMPILED_BLOCKS:
            module.compile(**options)
            count += 1
    logger.info("torch.compile (%s%s): %d U-Net blocks, each compiled on first use (slow first steps)", backend,
                f", {mode}" if options.get("mode") else "", count)
    return count


def recompile_limit(unet: nn.Module, buckets: int) -> int:
    """How many compiled versions of one block class's code a run with ``buckets`` bucket shapes may need: each
    block may want its own entry for every bucket (inductor's kernels guard on sizes, so a new bucket compiles again
    even after the sizes turned symbolic: ``bench/bench_compile.py``), plus the first, static one. So the most
    blocks of one class times ``buckets + 1``, and never less than :data:`RECOMPILE_LIMIT`."""
    counts = Counter(type(m).__name__ for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS)
    return max(RECOMPILE_LIMIT, max(counts.values(), default=0) * (buckets + 1))


def recompile_room(enabled: bool = True, limit: int = RECOMPILE_LIMIT) -> contextlib.AbstractContextManager:
    """A context in which torch.compile may compile each block class's code for up to ``limit`` shapes (torch's
    default, 8, is shared by all the blocks of one class: an SD 1.5 U-Net's ResNet blocks alone come in about a
    dozen channel layouts, and past the limit torch silently runs the rest uncompiled; :func:`recompile_limit`
    gives a run's). Scoped: torch's setting is back as it was outside the context."""
    if not enabled:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=limit)


def compiled_blocks(unet: nn.Module) -> int:
    """How many of ``unet``'s modules are compiled in place (``Module.compile`` was called on them)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in unet.modules())


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module``'s 4-D weights in channels-last memory order (in place; returns it)."""
    return module.to(memory_format=torch.channels_last)


__all__ = ["COMPILED_BLOCKS", "RECOMPILE_LIMIT", "compile_blocks", "compiled_blocks", "recompile_limit",
           "recompile_room", "to_channels_last"]
