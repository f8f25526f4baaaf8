"""Reading the raw files of a Stable Diffusion model: which kind of source a path is, and the tensors and
metadata of a single file or a diffusers folder, before any model is built from them.

``.ckpt`` files are pickles; they are read with ``torch.load(weights_only=True)``, which refuses any pickle that
would construct arbitrary objects or run code. Every failure is a :class:`ModelLoadError` naming the file.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sdtune.errors import ModelLoadError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # unet/, vae/
TEXT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # text_encoder/ (transformers' names)


def detect_source(source: str | Path) -> str:
    """Which loader a model source needs: 'diffusers' (a model folder), 'single_file' or 'hub' (a repo id, for
    anything that is not a local path); raises :class:`ModelLoadError` for a path that does not exist."""
    path = Path(source)
    if path.is_dir():
        if (path / "unet").is_dir() or (path / "model_index.json").is_file():
            return "diffusers"
        raise ModelLoadError(f"{path}: a folder, but not a diffusers model folder (no unet/ or model_index.json)")
    if path.is_file():
        return "single_file"
    text = str(source)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or text.startswith((".", "/", "\\")) or ":" in text or text.count("/") != 1:
        raise ModelLoadError(f"{source}: no such file or folder")
    return "hub"


# ----------------------------------------------------------------------------------------------------------- single files
@dataclass
class Checkpoint:
    """A single file as read: its tensors, its metadata (safetensors header metadata, or the ``sdtune`` entry of a
    .ckpt) and, for a .ckpt, the top-level ``global_step`` (an int, else None)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    global_step: int | None = None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a single-file checkpoint and its metadata (safetensors header metadata, or the
    ``sdtune`` entry of a .ckpt). Raises :class:`ModelLoadError` naming the file on anything unreadable."""
    checkpoint = read_checkpoint(path)
    return checkpoint.tensors, checkpoint.metadata


def read_checkpoint(path: str | Path) -> Checkpoint:
    """:func:`read_state_dict` plus a .ckpt's top-level ``global_step``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty (an interrupted download or copy?); fetch it again")
    if path.suffix.lower() == ".safetensors":
        return Checkpoint(*_read_safetensors(path))
    return _read_pickle(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            # Copied out of the file's memory map: views into it sit at the file's byte offsets (not 64-byte aligned,
            # so CPU kernels sum in another order than for the same weights from a .ckpt: the tiny test models gave
            # images 13 levels apart) and keep the file mapped, which on Windows stops it being replaced or deleted.
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{path}: not a readable .safetensors file ({exc}); it may be truncated or not a model file"
        ) from exc
    return tensors, metadata


_ZIP_MAGIC = b"PK\x03\x04"  # PyTorch's .ckpt format since 1.6 is a zip archive
_PICKLE_PROTO = b"\x80"  # a pickle of protocol 2 or later (PyTorch's legacy format starts so)


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a PyTorch checkpoint, judged by its first bytes, or None when it may be one.

    Without this, a text file reaches torch.load and fails as "KeyError: 101" (the byte 'e' read as a pickle
    opcode), or PyTorch's refusal, whose advice is to disable the safety check."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        what = f"a text file (it begins {first!r})"
    else:
        what = f"neither a zip archive nor a pickle (it begins with bytes {head[:8].hex(' ')})"
    return (f"{path}: not a model checkpoint: a .ckpt/.pt is a PyTorch zip archive or pickle, and this is {what}. "
            "Pass the model file itself (.safetensors, .ckpt) or a diffusers folder")


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The part of PyTorch's weights_only error that says what was refused, without its advice to turn the
    check off (sdtune never passes that on)."""
    text = str(exc).split("Check the documentation of torch.load", 1)[0]
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    else:
        text = "\n".join(line for line in text.splitlines() if "weights_only" not in line)
    return " ".join(text.split()) or type(exc).__name__


def _read_pickle(path: Path) -> Checkpoint:
    reason = _not_a_checkpoint(path)
    if reason:
        raise ModelLoadError(reason)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_reason(exc)
        if "global" in detail.lower():  # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y whose module..."
            raise ModelLoadError(
                f"{path}: refused to load: this pickle asks to build objects other than tensors ({detail}), which "
                "is how a .ckpt can run code. Only load checkpoints from sources you trust, and prefer a "
                ".safetensors version of the model: it cannot carry code."
            ) from exc
        raise ModelLoadError(
            f"{path}: not a checkpoint PyTorch's safe loader can read ({detail}); it is damaged or not a model file. "
            "Fetch it again, or use a .safetensors version of the model"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError, zipfile.BadZipFile) as exc:  # what the unpickler raises on garbage
        raise ModelLoadError(
            f"{path}: not a readable checkpoint: PyTorch's loader failed with {type(exc).__name__} {exc} (garbage "
            "where it expected checkpoint data); the file is truncated or damaged, or not a model file"
        ) from exc
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    metadata: dict[str, str] = {}
    sdtune_meta = obj.get("sdtune")
    if isinstance(sdtune_meta, dict):
        metadata = {str(k): str(v) for k, v in sdtune_meta.items()}
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: its 'state_dict' entry is a {type(state).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path}: holds no tensors; it is not a model checkpoint")
    # The step the training run saved at (LDM's and sd-scripts' .ckpt layout), as diffusers reads it. Some tools
    # store it as a tensor or a float.
    step = obj.get("global_step")
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    global_step = (int(step) if isinstance(step, (int, float)) and not isinstance(step, bool)
                   and math.isfinite(step) and step == int(step) else None)
    return Checkpoint(tensors, metadata, global_step)


# ----------------------------------------------------------------------------------------------------------- folders
def read_json_config(path: Path) -> dict[str, Any]:
    """A config file of a diffusers folder as a dict; a missing or damaged one is a :class:`ModelLoadError`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing; the diffusers folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ModelLoadError(f"{path}: JSON nested too deeply to be a config; the folder is damaged") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: a JSON {type(value).__name__}, not a config object; the folder is damaged")
    return value


def read_folder_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a component folder (unet/, vae/, text_encoder/): the first of ``names`` it holds."""
    for name in names:
        path = folder / name
        if path.is_file():
            return read_state_dict(path)[0]
    raise ModelLoadError(f"{folder}: no weights file ({' or '.join(names)})")

