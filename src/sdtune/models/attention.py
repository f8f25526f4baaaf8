"""Choosing the U-Net's attention implementation.

* ``sdpa`` (default): PyTorch's scaled_dot_product_attention, which picks a flash or memory-efficient kernel on
  GPUs by itself. Nothing to install; the fastest choice on current PyTorch.
* ``xformers``: xformers' memory-efficient attention (``pip install xformers``, GPU only). Useful on old PyTorch
  builds; with PyTorch >= 2 SDPA is as fast.
* ``mem_eff``: sliced attention (diffusers' ``SlicedAttnProcessor``): attention computed for a few heads at a
  time, so the attention matrix of all heads never exists at once. That caps the transient memory of *plain*
  attention, but each slice's matrix is still kept for backward: next to SDPA's fused kernels it costs memory
  (SD 1.5, 512 px, batch 1: 4.47 GiB of activations instead of 1.74; ``bench/bench_memory.py``) and time. It is
  here for sd-scripts' ``--mem_eff_attn`` and for devices where SDPA has no fused kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

from sdtune.errors import SdtuneError

ATTENTION_CHOICES = ("sdpa", "xformers", "mem_eff")


def set_attention(unet: UNet2DConditionModel, kind: str) -> None:
    """Switch the U-Net's attention to ``kind``: ``sdpa`` (PyTorch's), ``xformers`` or ``mem_eff`` (sliced)."""
    if kind == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif kind == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise SdtuneError(
                "--xformers needs the xformers package, which is not installed: pip install xformers "
                "(GPU only), or use the default --sdpa, which needs nothing extra"
            ) from exc
        unet.enable_xformers_memory_efficient_attention()
    elif kind == "mem_eff":
        unet.set_attention_slice("auto")
    else:
        raise SdtuneError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
