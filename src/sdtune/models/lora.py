"""LoRA and LoCon networks in kohya-ss sd-scripts' file format (``networks/lora.py``), which AUTOMATIC1111, ComfyUI,
Forge and diffusers load.

Which layers get a LoRA module (as sd-scripts chooses them):

* U-Net: every ``nn.Linear`` and ``nn.Conv2d`` inside a ``Transformer2DModel`` (attention q/k/v/out, feed-forward,
  proj_in/proj_out: 1x1 convolutions in SD 1.x, linear layers in SD 2.x);
* with ``conv_dim`` (LoCon) also those inside ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``: their 3x3
  convolutions get rank ``conv_dim`` / ``conv_alpha``, their linear and 1x1 layers (time_emb_proj, conv_shortcut)
  ``dim`` / ``alpha``;
* text encoder: every linear layer of ``CLIPAttention`` and ``CLIPMLP`` (SD 2.x's OpenCLIP is a transformers
  CLIPTextModel in sdtune, so its names are the ones sd-scripts writes for SD 2.x too).

A module is named ``lora_unet_`` / ``lora_te_`` + its diffusers / transformers path with ``.`` -> ``_``; its tensors
are ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha``. The update of a layer is
``W + multiplier * (alpha / rank) * up @ down`` (for a 3x3 convolution ``down`` is the 3x3 kernel, ``up`` 1x1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from sdtune import __version__
from sdtune.atomic import atomic_path
from sdtune.errors import ModelLoadError, SdtuneError

if TYPE_CHECKING:
    from sdtune.models.families import Family
    from sdtune.models.sd import StableDiffusion

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
NETWORK_MODULE = "networks.lora"  # ss_network_module: what kohya's tools (and GUIs) expect of this format
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


# ------------------------------------------------------------------------------------------------------ targets
def is_conv3x3(layer: nn.Module) -> bool:
    """A convolution whose kernel is not 1x1 (LoCon's 3x3 layers): it takes ``conv_dim``'s rank, not ``dim``'s."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def _targets(root: nn.Module, prefix: str, classes: tuple[str, ...], root_path: str = "") -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        name = root_path + name
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                lora_name = f"{prefix}.{name}.{child_name}".replace(".", "_")
                if lora_name in found and found[lora_name] is not child:
                    raise SdtuneError(f"two layers map to the LoRA name {lora_name}")
                found[lora_name] = child
    return found


def unet_targets(unet: nn.Module, conv: bool = False) -> dict[str, nn.Module]:
    """LoRA name -> layer of the U-Net; ``conv``: the ResNet blocks' and samplers' layers too (LoCon)."""
    return _targets(unet, PREFIX_UNET, UNET_TARGETS + (UNET_CONV_TARGETS if conv else ()))


def text_encoder_targets(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """LoRA name -> layer of the text encoder. The names are those of transformers 4's CLIPTextModel
    (``text_model.encoder.layers.N...``), which every loader expects; transformers 5 dropped the ``text_model``
    level, so it is put back here."""
    nested = any(name == "text_model" for name, _ in text_encoder.named_children())
    return _targets(text_encoder, PREFIX_TEXT_ENCODER, TEXT_ENCODER_TARGETS, "" if nested else "text_model.")


def model_targets(model: StableDiffusion) -> dict[str, nn.Module]:
    """Every layer a LoRA file of this format may hold, by its LoRA name (U-Net with LoCon layers, text encoder)."""
    return {**text_encoder_targets(model.text_encoder), **unet_targets(model.unet, conv=True)}


# ------------------------------------------------------------------------------------------------------ modules
class LoraModule(nn.Module):
    """One layer's low-rank update. :meth:`apply_to` replaces the layer's ``forward`` (the layer, its weights and
    its place in the model stay as they were); :meth:`remove` puts the original ``forward`` back."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(dim)
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d layer, not {type(org_module).__name__}")
        alpha = float(alpha) if alpha else float(self.lora_dim)  # sd-scripts: alpha 0 / None means alpha = rank
        self.scale = alpha / self.lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        # sd-scripts' (and Microsoft's loralib's) initialisation: the update starts at zero
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = [org_module]  # a list: not a sub-module, so the base weights are not in this state_dict
        self._saved_forward: Any = None
        self.applied = False

    @property
    def org_module(self) -> nn.Module:
        """The layer this module hooks (not a sub-module, so its weights stay out of the LoRA's state dict)."""
        return self._org[0]

    def apply_to(self) -> None:
        """Route the layer's forward through this module (the layer's weights are untouched); ``remove`` undoes it."""
        if self.applied:
            return
        org = self.org_module
        self._saved_forward = org.__dict__.get("forward")  # an instance-level forward someone else set, if any
        self.org_forward = org.forward
        org.forward = self.forward
        self.applied = True

    def remove(self) -> None:
        """Give the layer its own forward back (or the instance-level one it had before ``apply_to``)."""
        if not self.applied:
            return
        org = self.org_module
        if self._saved_forward is None:
            del org.forward  # the class's forward shows through again
        else:
            org.forward = self._saved_forward
        self._saved_forward = None
        del self.org_forward
        self.applied = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return out
        lx = self.lora_down(x if _autocast(x) else x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)  # text encoder: (batch, tokens, rank)
            elif lx.dim() == 4:
                mask = mask[:, :, None, None]  # convolution: (batch, rank, h, w)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)  # as sd-scripts: as if the rank were smaller
        return out + (self.lora_up(lx) * (self.multiplier * scale)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / rank) * up @ down`` in the layer's weight shape, float32 (multiplier not applied)."""
        return lora_delta(self.lora_up.weight, self.lora_down.weight, float(self.alpha),
                          self.org_module.weight.shape)


def _autocast(x: torch.Tensor) -> bool:
    """Autocast is on for ``x``'s device (it then picks the matmul dtype; otherwise a float32 LoRA on an fp16 base
    casts its input)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None, shape: Iterable[int]) -> torch.Tensor:
    """``(alpha / rank) * up @ down`` reshaped to a layer weight of ``shape`` (float32). For a convolution
    ``W[o, i, kh, kw] += sum_r up[o, r] * down[r, i, kh, kw]``; a 1x1 LoRA on a linear layer (SD 1.x's proj_in on
    an SD 2.x-layout model) or the reverse is reshaped, as sd-scripts' merge_lora.py does."""
    rank = down.shape[0]
    scale = (alpha if alpha else rank) / rank
    delta = up.float().flatten(1) @ down.float().flatten(1)
    return (delta * scale).reshape(tuple(shape))


class LoraNetwork(nn.Module):
    """The LoRA modules of one model. Its ``state_dict()`` keys are the file's (``lora_unet_...lora_down.weight``).

    ``modules_dim`` / ``modules_alpha`` (LoRA name -> rank / alpha) build exactly the modules a file holds (see
    :meth:`from_weights`); otherwise every target layer gets ``dim`` / ``alpha`` (``conv_dim`` / ``conv_alpha`` for
    3x3 convolutions, which get no module without ``conv_dim``).
    """

    def __init__(self, model: StableDiffusion, dim: int = 4, alpha: float = 1.0, conv_dim: int | None = None,
                 conv_alpha: float | None = None, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, train_unet: bool = True, train_text_encoder: bool = True,
                 multiplier: float = 1.0, modules_dim: Mapping[str, int] | None = None,
                 modules_alpha: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if conv_dim is not None and conv_alpha is None:
            conv_alpha = 1.0  # sd-scripts' create_network
        self.dim, self.alpha, self.conv_dim, self.conv_alpha = dim, alpha, conv_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._model = [model]
        self._multiplier = multiplier
        conv = conv_dim is not None or modules_dim is not None
        parts = []
        if train_text_encoder:
            parts.append(("text_encoder", text_encoder_targets(model.text_encoder)))
        if train_unet:
            parts.append(("unet", unet_targets(model.unet, conv=conv)))
        self.unet_loras: list[LoraModule] = []
        self.text_encoder_loras: list[LoraModule] = []
        for part, targets in parts:
            for name, layer in targets.items():
                if modules_dim is not None:
                    if name not in modules_dim:
                        continue
                    rank, a = modules_dim[name], (modules_alpha or {}).get(name)
                elif is_conv3x3(layer):
                    if conv_dim is None:
                        continue
                    rank, a = conv_dim, conv_alpha
                else:
                    rank, a = dim, alpha
                if not rank:
                    continue
                module = LoraModule(name, layer, multiplier, rank, a, dropout, rank_dropout, module_dropout)
                module.to(device=layer.weight.device)
                self.add_module(name, module)
                (self.unet_loras if part == "unet" else self.text_encoder_loras).append(module)
        logger.info("LoRA: %d text encoder and %d U-Net modules (dim %s, alpha %s, conv_dim %s, conv_alpha %s)",
                    len(self.text_encoder_loras), len(self.unet_loras), dim, alpha, conv_dim, conv_alpha)

    # -------------------------------------------------------------------------------------------- building
    @classmethod
    def from_weights(cls, model: StableDiffusion, weights: str | Path | Mapping[str, torch.Tensor],
                     multiplier: float = 1.0) -> LoraNetwork:
        """A network holding exactly the modules of a LoRA file (or state dict), its weights loaded."""
        sd = read_lora(weights)[0] if isinstance(weights, (str, Path)) else dict(weights)
        names = lora_names(sd)
        dims = {n: int(sd[f"{n}.lora_down.weight"].shape[0]) for n in names}
        alphas = {n: float(sd[f"{n}.alpha"]) if f"{n}.alpha" in sd else float(dims[n]) for n in names}
        unknown = sorted(set(names) - set(model_targets(model)))
        if unknown:
            raise ModelLoadError(f"{weights if isinstance(weights, (str, Path)) else 'LoRA'}: {len(unknown)} "
                                 f"module(s) match no layer of this {model.family.description} model, e.g. "
                                 f"{unknown[0]}; is the LoRA for another model family?")
        network = cls(model, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas)
        network.load_state_dict(_with_alphas(sd, network), strict=True)
        return network

    @property
    def multiplier(self) -> float:
        """The scale of every module's update (the LoRA's strength); setting it sets every module's."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for lora in self.loras():
            lora.multiplier = self._multiplier

    def loras(self) -> list[LoraModule]:
        """Every module: the text encoder's, then the U-Net's."""
        return self.text_encoder_loras + self.unet_loras

    # -------------------------------------------------------------------------------------------- hooking
    def apply_to(self, model: StableDiffusion | None = None) -> LoraNetwork:
        """Hook every module's layer; the model's weights are not touched (``remove`` undoes it)."""
        if model is not None and model is not self._model[0]:
            raise SdtuneError("this LoRA network was built for another model; build one for this model")
        for lora in self.loras():
            lora.apply_to()
        return self

    def remove(self) -> None:
        """Unhook every module: the model runs as it does without the LoRA."""
        for lora in self.loras():
            lora.remove()

    def parameter_groups(self, unet_lr: float | None, text_encoder_lr: float | None,
                         default_lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``name`` ``"unet"`` / ``"textencoder"``, as sd-scripts' descriptions): a
        part whose learning rate is None takes ``default_lr``; a part with lr 0 (or None) is left out."""
        groups = []
        for name, loras, lr in (("textencoder", self.text_encoder_loras, text_encoder_lr),
                                ("unet", self.unet_loras, unet_lr)):
            lr = default_lr if lr is None else lr
            params = [p for lora in loras for p in lora.parameters()]
            if params and lr:
                groups.append({"params": params, "lr": lr, "name": name})
        return groups

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> dict[str, torch.Tensor]:
        """sd-scripts' max-norm regularisation (``--scale_weight_norms``, its ``apply_max_norm_regularization``):
        a module whose update ``(alpha / rank) * up @ down`` has a norm above ``max_norm`` gets ``up`` and ``down``
        scaled by sqrt(max_norm / norm) (norms below ``max_norm / 2`` count as ``max_norm / 2``). Computed on the
        device without waiting for it; returns ``keys_scaled``, ``average_key_norm`` and ``max_key_norm`` (the
        norms after scaling) as tensors."""
        scaled, norms = [], []
        for lora in self.loras():
            up, down = lora.lora_up.weight, lora.lora_down.weight
            if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
                updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
            elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
                updown = nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            else:
                updown = up @ down
            updown = updown * (lora.alpha.to(updown.device) / lora.lora_dim)
            norm = updown.norm().clamp(min=max_norm / 2)
            ratio = torch.clamp(norm, max=max_norm) / norm
            up.mul_(ratio.sqrt().to(up.dtype))
            down.mul_(ratio.sqrt().to(down.dtype))
            scaled.append(ratio != 1)
            norms.append(updown.norm() * ratio)
        norm_values = torch.stack(norms).float()
        return {"keys_scaled": torch.stack(scaled).sum(), "average_key_norm": norm_values.mean(),
                "max_key_norm": norm_values.max()}

    # -------------------------------------------------------------------------------------------- files
    def load_weights(self, path: str | Path) -> None:
        """Load a LoRA file (``--network_weights``) of exactly this network's modules and ranks."""
        sd = read_lora(path)[0]
        own = self.state_dict()
        missing = sorted(set(own) - set(sd) - {k for k in own if k.endswith(".alpha")})
        unexpected = sorted(set(sd) - set(own))
        wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                      else f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)}")
            raise ModelLoadError(f"{path}: does not fit this network ({len(missing)} missing, {len(unexpected)} "
                                 f"unexpected, {len(wrong)} of another shape; {detail}); use the same --network_dim, "
                                 "--network_args (conv_dim) and model family it was trained with")
        for k, v in _with_alphas(sd, self).items():
            if k.endswith(".alpha") and not torch.isclose(v.float(), own[k].float()):
                logger.warning("%s: %s is %s, not the %s given; the file's alpha is used", path, k, float(v),
                               float(own[k]))
        self.load_state_dict(_with_alphas(sd, self), strict=True)
        for lora in self.loras():  # alpha may have changed with the file
            lora.scale = float(lora.alpha) / lora.lora_dim

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None,
             dtype: torch.dtype | None = None) -> Path:
        """Write the network as sd-scripts does (``.safetensors`` with metadata and A1111's hashes, else a torch
        pickle of the state dict), atomically."""
        return save_lora_file(path, self.state_dict(), metadata, dtype)


def _with_alphas(sd: Mapping[str, torch.Tensor], network: LoraNetwork) -> dict[str, torch.Tensor]:
    """A file without ``.alpha`` tensors (old LoRAs) means alpha = rank."""
    out = dict(sd)
    for lora in network.loras():
        out.setdefault(f"{lora.lora_name}.alpha", torch.tensor(float(lora.lora_dim)))
    return out


def lora_names(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The module names of a LoRA state dict (those with a ``lora_down.weight``), sorted."""
    return sorted({k.split(".", 1)[0] for k in sd if k.endswith(".lora_down.weight")})


# ------------------------------------------------------------------------------------------------------ merging
@torch.no_grad()
def merge_lora_into(model: StableDiffusion, lora_state_dict: Mapping[str, torch.Tensor],
                    weight: float = 1.0) -> list[str]:
    """Add ``weight * (alpha / rank) * up @ down`` of every module of a LoRA state dict to the model's weights, in
    place (computed in float32, stored in each layer's dtype). Every key must be a LoRA module of this model's
    layers: a file for another family, or of another kind (LoHa, LoKr), is refused before anything changes.
    Returns the names of the merged modules."""
    targets = model_targets(model)
    names = lora_names(lora_state_dict)
    known = {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    leftover = sorted(set(lora_state_dict) - known)
    if leftover:
        raise SdtuneError(f"{len(leftover)} LoRA key(s) are not a LoRA module's (LoHa/LoKr/other formats are not "
                          f"supported), e.g. {leftover[0]}")
    unknown = [n for n in names if n not in targets or f"{n}.lora_up.weight" not in lora_state_dict]
    if unknown:
        raise SdtuneError(f"{len(unknown)} LoRA module(s) match no layer of this {model.family.description} model "
                          f"(or lack lora_up), e.g. {unknown[0]}; is the LoRA for another model family?")
    for name in names:
        layer = targets[name]
        alpha = lora_state_dict.get(f"{name}.alpha")
        delta = lora_delta(lora_state_dict[f"{name}.lora_up.weight"].to(layer.weight.device),
                           lora_state_dict[f"{name}.lora_down.weight"].to(layer.weight.device),
                           float(alpha) if alpha is not None else None, layer.weight.shape)
        layer.weight.copy_((layer.weight.float() + weight * delta).to(layer.weight.dtype))
    return names


# ------------------------------------------------------------------------------------------------------ files
def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata (``.safetensors``; ``.ckpt``/``.pt`` read with the weights-only loader)."""
    from sdtune.models.files import read_state_dict

    sd, metadata = read_state_dict(path)
    if not lora_names(sd):
        raise ModelLoadError(f"{path}: not a LoRA file (no '*.lora_down.weight' tensors)")
    return sd, metadata


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as sd-scripts' ``precalculate_safetensors_hashes`` computes them for
    AUTOMATIC1111's additional-networks extension: the file serialised with only its ``ss_*`` metadata; the model
    hash is the sha256 of everything after the safetensors header, the legacy hash the first 8 hex digits of the
    sha256 of 0x10000 bytes at offset 0x100000."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora_file(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a LoRA state dict atomically: ``.safetensors`` with ``metadata`` plus the two addnet hashes, any
    other suffix as a torch pickle (as sd-scripts' ``save_weights``). ``dtype`` casts every tensor (alpha too)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: (v.detach().to("cpu", dtype) if dtype is not None else v.detach().cpu()).contiguous()
               for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
            save_file(tensors, str(tmp), metadata=meta)
        else:
            torch.save(tensors, str(tmp))
    return path


def network_metadata(family: Family, dim: int, alpha: float, network_args: Mapping[str, Any] | None = None, *,
                     title: str, resolution: str | int | None = None, clip_skip: int | None = None,
                     timestamp: float | None = None) -> dict[str, str]:
    """The metadata every LoRA file of sdtune carries: sd-scripts' minimum ``ss_*`` keys (train_util's
    ``SS_METADATA_MINIMUM_KEYS``) and Stability AI's model spec as sd-scripts' sai_model_spec.py writes it for an
    SD 1.x/2.x LoRA. The trainer adds its training ``ss_*`` keys to these."""
    from sdtune.models.prediction import spec_prediction_type
    from sdtune.models.save import modelspec_architecture

    timestamp = time.time() if timestamp is None else timestamp
    version = "sd_v2" if family.is_v2 else "sd_v1"  # sd-scripts' get_model_version_str_for_sd1_sd2
    if family.v_parameterization:
        version += "_v"
    if resolution is None:
        resolution = family.resolution
    if isinstance(resolution, int):
        resolution = f"{resolution}x{resolution}"
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({k: str(v) for k, v in (network_args or {}).items()}),
        "ss_v2": str(bool(family.is_v2)),
        "ss_base_model_version": version,
        "sdtune.version": __version__,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(family.is_v2, family.prediction_type) + "/lora",
        "modelspec.implementation": "diffusers",  # sai_model_spec.py's IMPL_DIFFUSERS for SD 1.x/2.x LoRA
        "modelspec.title": title,
        "modelspec.date": datetime.fromtimestamp(int(timestamp), timezone.utc).isoformat(),
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": spec_prediction_type(family.prediction_type),
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    return meta
