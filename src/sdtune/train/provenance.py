"""What a training state was trained from, so that ``--resume`` cannot silently mix two runs.

A state folder holds the trained weights only; the rest of the model (the VAE, a frozen text encoder) comes from
``--pretrained_model_name_or_path`` again at resume. Resuming with another base model of the same family would train
a hybrid (the state's U-Net on the new model's text encoder) with no error; with another family it fails in torch's
size-mismatch listing. ``provenance.json`` beside the state records:

* ``base_fingerprint``: a hash of the base model's weights as loaded (names, shapes and the first values of every
  tensor of the U-Net, text encoder and VAE), independent of the file format: the same model as ``.ckpt``,
  ``.safetensors`` or a diffusers folder has one fingerprint; another model has another. Computed in well under a
  second for SD 1.5 (it reads 256 values per tensor).
* ``metadata_sha256``: the hash of the ``--in_json`` file's bytes.

At resume a different base model is refused, naming both; a changed metadata file is a warning (the run continues
with the new data, but the epoch no longer continues where it stopped).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from sdtune.atomic import write_json_atomic
from sdtune.errors import SdtuneError

FILE_NAME = "provenance.json"
VALUES_PER_TENSOR = 256


def model_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """A short hash of the modules' shapes and first values: tells two base models apart cheaply."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        for key, tensor in sorted(modules[name].state_dict().items()):
            head = tensor.detach().flatten()[:VALUES_PER_TENSOR].to("cpu", torch.float32).contiguous()
            digest.update(f"{name}.{key}:{tuple(tensor.shape)}".encode())
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_provenance(folder: Path, record: dict[str, Any]) -> None:
    """Write the record of a state folder atomically."""
    write_json_atomic(Path(folder) / FILE_NAME, record)


def read_provenance(folder: Path) -> Optional[dict[str, Any]]:
    """The record of ``folder``, or None for states written before sdtune recorded it."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SdtuneError(f"{path}: damaged ({exc}); delete it to resume without the base-model check") from exc
    if not isinstance(data, dict):
        raise SdtuneError(f"{path}: damaged (not a JSON object); delete it to resume without the base-model check")
    return data


def check_base_model(folder: Path, saved: Optional[dict[str, Any]], model_path: str, fingerprint: str) -> None:
    """Refuse a --resume whose state was trained from another base model (when the state recorded one)."""
    if saved is None or not saved.get("base_fingerprint"):
        return
    if saved["base_fingerprint"] != fingerprint:
        raise SdtuneError(
            f"--resume {folder}: that state was trained from {saved.get('base_model', '?')} (weights fingerprint "
            f"{saved['base_fingerprint']}), but --pretrained_model_name_or_path {model_path} is another model "
            f"({fingerprint}); resuming would join the state's trained weights to this model's other parts. Resume "
            "with the model the run started from")


def metadata_changed(saved: Optional[dict[str, Any]], in_json: str, sha256: str) -> Optional[str]:
    """A warning when ``in_json`` (whose hash is ``sha256``) is not the metadata the state was trained on (None: the
    same, or unknown)."""
    if saved is None or not saved.get("metadata_sha256"):
        return None
    if saved["metadata_sha256"] == sha256:
        return None
    return (f"--in_json {in_json} is not the metadata the state was trained on ({saved.get('metadata_file', '?')}, "
            "changed since): training continues on the new data, but the interrupted epoch's order of batches does "
            "not, so the result will differ from an uninterrupted run")
