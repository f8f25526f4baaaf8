"""Saving and resuming training state.

A state folder holds everything needed to continue exactly where a run stopped:

    progress.json       global_step, epoch, batches consumed in that epoch, seed, world size, batch size
    unet.safetensors    trainable weights (fp32 master copies as trained)
    text_encoder.safetensors   (when the text encoder is trained)
    optimizer.pt        optimizer state (read back with weights_only=True)
    scheduler.pt        learning-rate scheduler state
    scaler.json         loss-scaler state (--full_fp16)

Every random draw of the loop is derived from (seed, rank, step) or (seed, epoch, item), so no global RNG state is
needed for an exact resume. The folder is written atomically (a new folder renamed into place).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtune.atomic import atomic_dir
from sdtune.errors import SdtuneError

STATE_VERSION = 1


@dataclass
class Progress:
    global_step: int = 0
    epoch: int = 0  # 0-based epoch currently running
    batch_in_epoch: int = 0  # this rank's batches of `epoch` already consumed
    seed: int = 0
    world_size: int = 1
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    version: int = STATE_VERSION

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise SdtuneError(f"unknown field {key!r} in progress.json (written by a newer sdtune?)")
            setattr(self, key, value)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_state(folder: Path, progress: Progress, modules: dict[str, torch.nn.Module], optimizer, scheduler,
               scaler_state: dict[str, Any] | None = None) -> Path:
    with atomic_dir(folder) as tmp:
        for name, module in modules.items():
            save_file(_weights(module), str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), str(tmp / "optimizer.pt"))
        torch.save(scheduler.state_dict(), str(tmp / "scheduler.pt"))
        if scaler_state is not None:
            (tmp / "scaler.json").write_text(json.dumps(scaler_state), encoding="utf-8")
        (tmp / "progress.json").write_text(json.dumps(progress.state_dict(), indent=2) + "\n", encoding="utf-8")
    return folder


def read_progress(folder: Path) -> Progress:
    path = Path(folder) / "progress.json"
    if not path.is_file():
        raise SdtuneError(f"{folder}: not a training state folder (no progress.json); pass a folder that "
                          "--save_state wrote, e.g. <output_dir>/last-state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SdtuneError(f"{path}: damaged ({exc})") from exc
    progress = Progress()
    progress.load_state_dict(data)
    return progress


def load_module_weights(folder: Path, name: str, module: torch.nn.Module) -> None:
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise SdtuneError(f"{folder}: has no {name}.safetensors; was the state saved with the same options "
                          "(--train_text_encoder, hypernetwork)?")
    module.load_state_dict(load_file(str(path)), strict=True)


def load_optimizer_and_scheduler(folder: Path, optimizer, scheduler) -> dict[str, Any] | None:
    folder = Path(folder)
    optimizer.load_state_dict(torch.load(str(folder / "optimizer.pt"), weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(str(folder / "scheduler.pt"), weights_only=True))
    scaler = folder / "scaler.json"
    return json.loads(scaler.read_text(encoding="utf-8")) if scaler.is_file() else None
