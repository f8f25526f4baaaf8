"""LoRA files applied while generating (``sdtune generate --lora FILE[:WEIGHT]``).

Each file becomes a :class:`sdtune.models.lora.LoraNetwork` of exactly its modules that hooks the layers it changes
(``layer(x) + weight * (alpha / rank) * up(down(x))``); the model's own weights are never touched, so an fp16 model
takes float32 LoRAs (the hooks cast, see ``_autocast`` in :mod:`sdtune.models.lora`) and several LoRAs stack. At
the same weight this is the model ``sdtune merge-lora`` writes (``W + weight * (alpha / rank) * up @ down``), up to
float rounding.

Order of the checks: :func:`read_lora_files` reads every file before the model loads (missing, unreadable, not a
LoRA); :func:`build_networks` checks each against the loaded model (a LoRA of another family, another layer
layout) before any image is made. Errors name the file. A LyCORIS file (LoHa, LoKr, ...: ``sdtune train
--network_module lycoris.kohya`` writes them) is applied by LyCORIS' own loader (:mod:`sdtune.models.lycoris`,
the ``lycoris`` extra).

**What an image records** (:class:`LoraUse`): the name (file stem), the weight and AUTOMATIC1111's hash of the
file, which its ``Lora hashes`` infotext field carries (see :func:`a1111_lora_hash`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from sdtune.errors import SdtuneError
from sdtune.models.lora_commands import parse_lora_list

if TYPE_CHECKING:
    import torch

    from sdtune.models.lora import LoraNetwork
    from sdtune.models.lycoris import LycorisFileNetwork
    from sdtune.models.sd import StableDiffusion

logger = logging.getLogger(__name__)

_LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of an image, as its PNG records it: ``name`` (the file's stem, the name A1111's prompt tag
    ``<lora:name:weight>`` uses), ``weight`` and ``hash`` (A1111's full network hash of the file, hex)."""

    name: str
    weight: float
    hash: str

    @property
    def shorthash(self) -> str:
        """The first 12 hex digits, as A1111's ``NetworkOnDisk.set_hash`` keeps them for ``Lora hashes``."""
        return self.hash[:12]


@dataclass
class LoraFile:
    """A LoRA file read from disk (not yet fitted to a model)."""

    path: Path
    weight: float
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    use: LoraUse
    lycoris: bool = False  # LoHa/LoKr/... keys: applied by LyCORIS itself (sdtune.models.lycoris)


def parse_lora_options(items: Sequence[str]) -> list[tuple[Path, float]]:
    """``--lora`` values (``FILE`` or ``FILE:WEIGHT``, weight 1.0 by default) as (path, weight), parsed by
    ``merge-lora``'s parser (:func:`sdtune.models.lora_commands.parse_lora_list`): the weight is what follows the
    last colon when it reads as a number, so ``C:\\loras\\a.safetensors:0.7`` is that file at 0.7 and an existing
    file whose name holds a colon is taken whole."""
    pairs = []
    for path, weight in parse_lora_list(list(items), []):
        if not math.isfinite(weight):
            raise SdtuneError(f"--lora {path}: the weight must be a finite number, not {weight}")
        pairs.append((Path(path), float(weight)))
    return pairs


def a1111_lora_hash(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """The hash AUTOMATIC1111 gives a LoRA file (its ``NetworkOnDisk``, extensions-builtin/Lora/network.py): for a
    ``.safetensors`` file the ``sshs_model_hash`` of its metadata when there is one (sd-scripts and sdtune write it),
    else the sha256 of everything after the safetensors header (``hashes.addnet_hash_safetensors``, kohya's
    "addnet" hash, which civitai calls AutoV3); for any other file the sha256 of the whole file."""
    path = Path(path)
    is_safetensors = path.suffix.lower() == ".safetensors"
    if is_safetensors and metadata and metadata.get("sshs_model_hash"):
        return str(metadata["sshs_model_hash"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if is_safetensors:
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora_files(pairs: Sequence[tuple[Path, float]]) -> list[LoraFile]:
    """Every ``--lora`` file read and hashed (small: a bad file fails before the model loads)."""
    from sdtune.models.files import read_state_dict
    from sdtune.models.lora import read_lora
    from sdtune.models.lycoris import is_lycoris_state_dict

    files = []
    for path, weight in pairs:
        sd, metadata = read_state_dict(path)  # a missing or unreadable file raises, naming it
        lycoris = is_lycoris_state_dict(sd, metadata)
        if not lycoris:
            sd, metadata = read_lora(path)  # not a LoRA file: raises, naming it
        use = LoraUse(path.stem, weight, a1111_lora_hash(path, metadata))
        files.append(LoraFile(path, weight, sd, metadata, use, lycoris))
    return files


def _expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (down, up) weight shapes of a rank-``rank`` LoRA module on ``layer`` (as LoraModule builds them)."""
    from torch import nn

    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    assert isinstance(layer, nn.Linear)
    return (rank, layer.in_features), (layer.out_features, rank)


def _family_hint(metadata: Mapping[str, str]) -> str:
    version = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    return f" (its metadata says {version})" if version else ""


def fit_lora(model: StableDiffusion, lora: LoraFile) -> dict[str, torch.Tensor]:
    """``lora``'s tensors checked against ``model``'s layers; raises :class:`SdtuneError` naming the file when it
    does not fit. A 1x1-convolution LoRA on a linear layer (or the reverse: SD 1.x's and SD 2.x's proj_in) is
    reshaped, as ``merge-lora`` does."""
    from sdtune.models.lora import lora_names, model_targets

    sd, where = lora.state_dict, f"--lora {lora.path}"
    names = lora_names(sd)
    known = {f"{n}.{s}" for n in names for s in _LORA_SUFFIXES}
    leftover = sorted(set(sd) - known)
    if leftover:
        raise SdtuneError(f"{where}: {len(leftover)} key(s) are not a LoRA module's (LoHa/LoKr and other formats "
                          f"are not supported), e.g. {leftover[0]}")
    targets = model_targets(model)
    description = model.family.description
    unknown = [n for n in names if n not in targets]
    if unknown:
        raise SdtuneError(f"{where}: {len(unknown)} module(s) match no layer of this {description} model, e.g. "
                          f"{unknown[0]}; is the LoRA for another model family{_family_hint(lora.metadata)}?")
    fitted = dict(sd)
    for name in names:
        if f"{name}.lora_up.weight" not in sd:
            raise SdtuneError(f"{where}: module {name} has lora_down but no lora_up weight; the file is incomplete")
        rank = int(sd[f"{name}.lora_down.weight"].shape[0])
        for part, want in zip(("lora_down", "lora_up"), _expected_shapes(targets[name], rank)):
            key = f"{name}.{part}.weight"
            have = tuple(sd[key].shape)
            if have == want:
                continue
            if sd[key].numel() == math.prod(want) and have[:2] == want[:2] and set(have[2:] + want[2:]) <= {1}:
                fitted[key] = sd[key].reshape(want)  # 1x1 convolution <-> linear
                continue
            raise SdtuneError(f"{where}: does not fit this {description} model: {key} has shape {have}, the layer "
                              f"needs {want}; is the LoRA for another model family{_family_hint(lora.metadata)}?")
    return fitted


def build_networks(model: StableDiffusion, files: Sequence[LoraFile]) -> list[LoraNetwork | LycorisFileNetwork]:
    """One network per file, on its layers' devices, in eval mode and without gradients; not applied yet. Every
    LoRA file is checked against ``model`` before the first network is built; a LyCORIS file is built by LyCORIS
    (:class:`sdtune.models.lycoris.LycorisFileNetwork`), which checks it against the model as it is built."""
    from sdtune.models.lora import LoraNetwork
    from sdtune.models.lycoris import LycorisFileNetwork

    fitted = [None if lora.lycoris else fit_lora(model, lora) for lora in files]
    networks = []
    for lora, sd in zip(files, fitted):
        if sd is None:
            network = LycorisFileNetwork(model, lora.state_dict, lora.weight, lora.path)
        else:
            network = LoraNetwork.from_weights(model, sd, multiplier=lora.weight)
            network.eval().requires_grad_(False)
        logger.info("LoRA %s at weight %g: %d modules (hash %s)", lora.path, lora.weight, len(network.loras()),
                    lora.use.shorthash)
        networks.append(network)
    return networks


@contextlib.contextmanager
def loras_applied(networks: Sequence[LoraNetwork | LycorisFileNetwork]) -> Iterator[None]:
    """A context in which every network hooks its layers. Several networks on one layer chain their hooks, so they
    are removed in the reverse order (each puts back the forward it found)."""
    applied: list[LoraNetwork] = []
    try:
        for network in networks:
            network.apply_to()
            applied.append(network)
        yield
    finally:
        for network in reversed(applied):
            network.remove()


__all__ = ["LoraFile", "LoraUse", "a1111_lora_hash", "build_networks", "fit_lora", "loras_applied",
           "parse_lora_options", "read_lora_files"]
