"""LyCORIS files (LoHa, LoKr, LoCon with LyCORIS' own keys, ...) applied to a model by LyCORIS itself.

sdtune trains them with ``--network_module lycoris.kohya`` (:mod:`sdtune.train.lycoris_target`) and applies them
while generating (``sdtune generate --lora FILE``) through the package's own loader, ``lycoris.kohya.
create_network_from_weights``, as sd-scripts' ``gen_img.py`` does: the module types and their arithmetic are
LyCORIS', never re-written here. The package is an optional extra (``pip install lycoris-lora``), imported when a
LyCORIS file is used.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    from pathlib import Path

    from sdtune.models.sd import StableDiffusion

# Tensor-name endings of LyCORIS' module types other than a plain LoRA's (lora_down/lora_up/alpha)
LYCORIS_KEY_ENDINGS = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w1_a", ".lokr_w2",
                       ".lokr_w2_a", ".oft_blocks", ".oft_diag", ".diff", ".diff_b", ".dora_scale", ".w_norm",
                       ".b_norm", ".lora_mid.weight", ".weight_1", ".weight_2")


def is_lycoris_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool:
    """A file LyCORIS wrote (or sdtune with ``--network_module lycoris.kohya``): its metadata says so, or it has
    tensors of a LyCORIS module type."""
    if str(metadata.get("ss_network_module", "")).startswith("lycoris"):
        return True
    return any(key.endswith(LYCORIS_KEY_ENDINGS) for key in sd)


def text_encoder_root(text_encoder: nn.Module) -> nn.Module:
    """What LyCORIS is given as the text encoder: the model itself under transformers 4, under transformers 5 (no
    ``text_model`` level) a holder with the model as ``text_model``, so that the modules get the names every loader
    expects (``lora_te_text_model_encoder_layers_N_...``, as :func:`sdtune.models.lora.text_encoder_targets`)."""
    if any(name == "text_model" for name, _ in text_encoder.named_children()):
        return text_encoder
    holder = nn.Module()
    holder.text_model = text_encoder
    return holder


class LycorisFileNetwork:
    """A LyCORIS file on ``model`` at ``weight``, built by LyCORIS' ``create_network_from_weights``; the same
    interface as :class:`sdtune.models.lora.LoraNetwork` for :func:`sdtune.sampling.loras.loras_applied`:
    :meth:`apply_to` hooks the layers (LyCORIS replaces their ``forward``), :meth:`remove` puts them back."""

    def __init__(self, model: StableDiffusion, state_dict: Mapping[str, torch.Tensor], weight: float,
                 path: Path, option: str = "--lora") -> None:
        where = f"{option} {path}"
        if importlib.util.find_spec("lycoris") is None:
            raise SdtuneError(f"{where}: a LyCORIS file (LoHa/LoKr/...); applying it needs the LyCORIS package: "
                              "pip install lycoris-lora")
        from lycoris import kohya

        self.model, self.path, self.weight, self.where = model, path, weight, where
        self.te_root = text_encoder_root(model.text_encoder)
        weights = dict(state_dict)
        try:  # LyCORIS sizes each module from the model's layer and copies the file's tensors in
            self.network, _ = kohya.create_network_from_weights(weight, None, model.vae, self.te_root, model.unet,
                                                                weights_sd=weights, for_inference=True)
        except RuntimeError as exc:  # a tensor of another shape than its layer's module
            raise SdtuneError(f"{where}: does not fit this {model.family.description} model: LyCORIS could "
                              f"not load it ({str(exc)[:200]}); is it for another model family?") from exc
        self.has_te = any(k.startswith(kohya.LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER) for k in weights)
        self.has_unet = any(k.startswith(kohya.LycorisNetworkKohya.LORA_PREFIX_UNET) for k in weights)
        names = {key.split(".", 1)[0] for key in weights if "." in key}
        found = {m.lora_name for m in self.loras()}
        missing = sorted(names - found)
        if missing:
            raise SdtuneError(f"{where}: {len(missing)} LyCORIS module(s) match no layer of this "
                              f"{model.family.description} model, e.g. {missing[0]}; is it for another model "
                              "family?")
        taken = {f"{m.lora_name}.{key}" for m in self.loras() for key in m.state_dict()}
        if taken != set(weights):  # LyCORIS copied the file's tensors into its modules: every one must be used
            left, lacking = sorted(set(weights) - taken), sorted(taken - set(weights))
            raise SdtuneError(f"{where}: the LyCORIS network built from it does not take every tensor (unused "
                              f"{left[:3]}, missing {lacking[:3]}); the file is damaged or of another model")
        unet_param = next(model.unet.parameters())
        for module in self.loras():  # kept in lists, not as sub-modules, until apply_to: moved one by one
            module.to(unet_param.device, unet_param.dtype).eval().requires_grad_(False)

    def loras(self) -> list[nn.Module]:
        """The network's modules (one per changed layer)."""
        return list(self.network.unet_loras) + list(self.network.text_encoder_loras)

    def apply_to(self) -> None:
        """Hook the layers (the modules hold the file's tensors since they were built)."""
        self.network.apply_to(self.te_root, self.model.unet, apply_text_encoder=self.has_te, apply_unet=self.has_unet)

    @torch.no_grad()
    def merge(self) -> int:
        """Add each module's change at the file's weight to the model's weights, in place, with LyCORIS' own
        ``merge_to`` (``sdtune merge-lora``); returns how many layers changed."""
        for module in self.loras():
            module.merge_to(self.weight)
        return len(self.loras())

    def remove(self) -> None:
        """Put back the forward each hooked layer had (in reverse order, as hooks chain)."""
        for module in reversed(self.network.loras):
            module.restore()


__all__ = ["LYCORIS_KEY_ENDINGS", "LycorisFileNetwork", "is_lycoris_state_dict", "text_encoder_root"]
