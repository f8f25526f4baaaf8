"""Saving and resuming training state.

A state folder holds everything needed to continue exactly where a run stopped:

    progress.json       global_step, epoch, batches consumed in that epoch, seed, world size, batch size
    unet.safetensors    trainable weights, in the precision they train in (fp16/bf16 with --full_fp16/--full_bf16;
                        their rounding compensation is optimizer state)
    text_encoder.safetensors   (when the text encoder is trained)
    optimizer.pt        optimizer state (read back with weights_only=True)
    scheduler.pt        learning-rate scheduler state
    scaler.json         loss-scaler state (--mixed_precision fp16)

Every random draw of the loop is derived from (seed, rank, step) or (seed, epoch, item), so no global RNG state is
needed for an exact resume. The folder is written atomically (a new folder renamed into place).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdtune.atomic import atomic_dir
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Progress:
    """Where a run is (step, epoch, batch) and the settings a resume must match; saved as progress.json."""
    global_step: int = 0
    epoch: int = 0  # 0-based epoch currently running
    batch_in_epoch: int = 0  # this rank's batches of `epoch` already consumed
    seed: int = 0
    world_size: int = 1
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    version: int = STATE_VERSION

    def state_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the fields from progress.json, refusing unknown keys and values that are not counts."""
        kinds = {f.name: f.type for f in fields(self)}
        for key, value in state.items():
            if not hasattr(self, key):
                raise SdtuneError(f"unknown field {key!r} in progress.json (written by a newer sdtune?)")
            # every field is a count: a damaged or edited file must not reach the loop as a string or a float
            if kinds[key] in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SdtuneError(f"progress.json: {key} is {value!r}; expected a whole number >= 0")
            setattr(self, key, value)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_state(folder: Path, progress: Progress, modules: dict[str, torch.nn.Module], optimizer, scheduler,
               scaler_state: dict[str, Any] | None = None) -> Path:
    """Write a resumable state folder atomically: the trained modules, optimizer, scheduler, scaler, progress."""
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
    """The progress.json of a state folder, every failure an error naming the file and the fix."""
    path = Path(folder) / "progress.json"
    if not path.is_file():
        raise SdtuneError(f"{folder}: not a training state folder (no progress.json); pass a folder that "
                          "--save_state wrote, e.g. <output_dir>/last-state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SdtuneError(f"{path}: damaged ({type(exc).__name__}: {str(exc)[:200]}); resume from another state "
                          "folder (e.g. an earlier <output_dir>/*-state)") from exc
    if not isinstance(data, dict):
        raise SdtuneError(f"{path}: damaged (a JSON {type(data).__name__}, not an object); resume from another "
                          "state folder")
    progress = Progress()
    try:
        progress.load_state_dict(data)
    except SdtuneError as exc:
        raise SdtuneError(f"{path}: {str(exc).removeprefix('progress.json: ')}") from exc
    return progress


_DAMAGED = ("; the state folder is damaged (a copy cut short, a full disk?) or was altered: resume from another "
            "state folder (e.g. an earlier <output_dir>/*-state), or start again without --resume")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SdtuneError(f"{path}: not a readable .safetensors file ({exc})" + _DAMAGED) from exc


def _load_pickle(path: Path) -> Any:
    """A .pt of the state folder, read with weights_only=True (never anything else: a state folder may come from
    anywhere), every failure as an error naming the file."""
    if not path.is_file():
        raise SdtuneError(f"{path}: missing" + _DAMAGED)
    try:
        return torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        from sdtune.models.files import _unpickling_reason

        detail = _unpickling_reason(exc)
        if "global" in detail.lower():
            raise SdtuneError(f"{path}: refused to load: it asks to build objects other than tensors ({detail}), "
                              "which is how a pickle runs code. sdtune never writes such a file: it was replaced; "
                              "do not use this state folder") from exc
        raise SdtuneError(f"{path}: not readable by PyTorch's safe loader ({detail})" + _DAMAGED) from exc
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError, zipfile.BadZipFile) as exc:  # what the unpickler raises on garbage
        raise SdtuneError(f"{path}: not readable ({type(exc).__name__}: {str(exc)[:200]})" + _DAMAGED) from exc


def load_pickled_state(folder: Path, name: str) -> Any:
    """``<folder>/<name>`` (a .pt the state folder holds, e.g. the EMA's), read with ``weights_only=True``."""
    return _load_pickle(Path(folder) / name)


def load_module_weights(folder: Path, name: str, module: torch.nn.Module) -> None:
    """Load ``<name>.safetensors`` of a state folder into ``module`` (strict)."""
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise SdtuneError(f"{folder}: has no {name}.safetensors; was the state saved with the same options "
                          "(--train_text_encoder, hypernetwork)?")
    module.load_state_dict(_load_tensors(path), strict=True)


def load_optimizer_and_scheduler(folder: Path, optimizer, scheduler) -> dict[str, Any] | None:
    """Restore the optimizer and scheduler of a state folder; returns the saved scaler state, if any."""
    folder = Path(folder)
    optimizer_state = _load_pickle(folder / "optimizer.pt")
    scheduler_state = _load_pickle(folder / "scheduler.pt")
    for name, state in (("optimizer.pt", optimizer_state), ("scheduler.pt", scheduler_state)):
        if not isinstance(state, dict):
            raise SdtuneError(f"{folder / name}: holds a {type(state).__name__}, not a state dict" + _DAMAGED)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as exc:  # torch: "loaded state dict contains a parameter group ..."
        raise SdtuneError(f"{folder / 'optimizer.pt'}: does not fit this run's optimizer ({exc}); resume with the "
                          "options the state was saved with (--optimizer_type, --train_text_encoder, "
                          "hypernetwork)") from exc
    scheduler.load_state_dict(scheduler_state)
    scaler = folder / "scaler.json"
    if not scaler.is_file():
        return None
    try:
        return json.loads(scaler.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SdtuneError(f"{scaler}: damaged ({type(exc).__name__})" + _DAMAGED) from exc


def resolve_resume(path: Path) -> Path:
    """The state folder ``--resume PATH`` means: PATH itself, or, for an output folder holding state folders, the
    one furthest along (said in the log)."""
    if not path.exists():
        raise SdtuneError(f"--resume {path}: no such folder")
    if (path / "progress.json").is_file() or not path.is_dir():
        return path
    states = []
    for candidate in path.iterdir():
        if (candidate / "progress.json").is_file():
            states.append((read_progress(candidate).global_step, candidate.stat().st_mtime, candidate))
    if not states:
        raise SdtuneError(f"--resume {path}: no state folder in it (those are written by --save_state, e.g. "
                          f"{path / 'last-state'})")
    step, _, newest = max(states, key=lambda s: (s[0], s[1]))
    logger.info("--resume %s: resuming from the state furthest along in it, %s (step %d)%s", path, newest, step,
                f"; the others: {', '.join(sorted(s[2].name for s in states if s[2] != newest))}"
                if len(states) > 1 else "")
    return newest


def check_resume_compatible(opts: Any, progress: Progress, world_size: int) -> None:
    """A state resumes only with the batch layout it was saved with, so that the epoch continues where it stopped."""
    p = progress
    if (p.world_size, p.train_batch_size, p.gradient_accumulation_steps) != (
            world_size, opts.train_batch_size, opts.gradient_accumulation_steps):
        raise SdtuneError(
            f"--resume {opts.resume}: that run used {p.world_size} process(es), batch size {p.train_batch_size} and "
            f"gradient accumulation {p.gradient_accumulation_steps}; resume with the same values so the epoch "
            "continues where it stopped"
        )
    if opts.seed is not None and opts.seed != p.seed:
        logger.warning("--seed %d ignored: resuming with the saved seed %d", opts.seed, p.seed)


def start_progress(opts: Any, world_size: int, is_main: bool,
                   metadata_sha256: Callable[[], str]) -> tuple[Progress, Optional[dict[str, Any]]]:
    """A new run's progress (its seed drawn when --seed is not given), or with --resume the state's, checked
    against this run's options, and the state's provenance record (a changed --in_json is warned about)."""
    from sdtune.train.provenance import metadata_changed, read_provenance

    if not opts.resume:
        progress = Progress(train_batch_size=opts.train_batch_size, world_size=world_size,
                            gradient_accumulation_steps=opts.gradient_accumulation_steps)
        progress.seed = opts.seed if opts.seed is not None else random.randint(0, 2**31 - 1)
        return progress, None
    progress = read_progress(Path(opts.resume))
    check_resume_compatible(opts, progress, world_size)
    provenance = read_provenance(Path(opts.resume))
    changed = metadata_changed(provenance, opts.in_json, metadata_sha256())
    if changed and is_main:
        logger.warning("%s", changed)
    held = (provenance or {}).get("validation_split")
    if held is not None and held != getattr(opts, "validation_split", 0.0):
        raise SdtuneError(f"--resume {opts.resume}: that run held out --validation_split {held:g} of the images; "
                          "resume with the same share (another one changes which images train, in the middle of "
                          "the run)")
    return progress, provenance
