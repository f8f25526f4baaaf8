"""accelerate, as the trainer uses it: one Accelerator per process, and the modes sdtune refuses."""

from __future__ import annotations

import os
from typing import Any

import torch

from sdtune.errors import SdtuneError


def check_distributed_type(accelerator: Any) -> None:
    """Refuse accelerate's sharded modes before any work: sdtune's optimizer, loss scaler, gradient reduction and
    checkpoint writer work on whole (unsharded) modules, so under FSDP or DeepSpeed they would train shards they
    do not see and save shards as if they were the model. A clear refusal beats a checkpoint that is silently
    wrong."""
    from accelerate.utils import DistributedType

    sharded = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
               DistributedType.MEGATRON_LM: "Megatron-LM"}
    name = sharded.get(accelerator.distributed_type)
    if name is not None:
        raise SdtuneError(
            f"sdtune train does not support accelerate's {name} mode yet (it would save sharded weights as if they "
            "were the model). Run with a plain multi-GPU config instead (accelerate config -> multi-GPU, no "
            "FSDP/DeepSpeed; or torchrun --nproc_per_node N -m sdtune train ...): DDP, where each GPU holds the "
            "whole model. On 12 GB cards see the README's memory recipes (--gradient_checkpointing, "
            "--use_8bit_adam, --mixed_precision, --full_fp16).")


def make_accelerator() -> Any:
    """accelerate's Accelerator for this process; mixed precision is left to the loop (see the module docstring)."""
    from accelerate import Accelerator

    # Under torchrun on a machine without a GPU, accelerate joins the processes (gloo) only when told cpu=True.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # Mixed precision is torch.autocast, entered by the loop itself: accelerate's autocast under fp16 on a CPU
    # computes in float32, which would make every CPU test of the fp16 path a test of fp32.
    accelerator = Accelerator(mixed_precision="no", cpu=cpu_ranks)
    check_distributed_type(accelerator)
    return accelerator
