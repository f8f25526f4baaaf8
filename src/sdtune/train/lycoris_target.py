"""``--network_module lycoris.kohya``: a LyCORIS network (LoCon, LoHa, LoKr, ...) trained on the frozen model.

The network is LyCORIS' own, built as sd-scripts' train_network.py builds it:
``lycoris.kohya.create_network(1.0, --network_dim, --network_alpha, vae, text_encoder, unet, **--network_args)``
(the ``--network_args`` strings as given, plus ``dropout`` = --network_dropout where they have none), then
``apply_to(text_encoder, unet, train_text_encoder, train_unet)`` and, with --network_weights, ``load_weights``.
The optimizer groups are the network's ``prepare_optimizer_params(--text_encoder_lr, --unet_lr,
--learning_rate)``; --scale_weight_norms calls its ``apply_max_norm_regularization``.

Checkpoints hold the network's ``state_dict()`` (the tensors LyCORIS' ``save_weights`` writes, so LyCORIS,
AUTOMATIC1111, ComfyUI and Forge load them), written by sdtune's LoRA writer (atomically, with AUTOMATIC1111's two
``sshs_*`` hashes), with the ``ss_*`` training metadata of a LoRA run, ``ss_network_module`` ``lycoris.kohya`` and
the model spec.

**Preset.** Without ``preset=`` in --network_args (or with ``preset=full``), sdtune passes LyCORIS' ``full`` preset
restricted to SD 1.x/2.x's module classes (:data:`SD_FULL_PRESET`): lycoris-lora 4.1's own ``full`` also targets
``TimestepEmbedding`` (for other architectures) and names ``time_embedding.linear_1`` again, so it fails on SD's
U-Net with "duplicated lora name". The layers and their names are those of ``full`` in earlier LyCORIS versions.

**Text-encoder names.** LyCORIS names a module after its path in the module it is given; under transformers 5 it is
given the text encoder inside a ``text_model`` holder (:func:`text_encoder_root`), so the names are transformers 4's
(``lora_te_text_model_encoder_...``), which every loader expects.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdtune.errors import ModelLoadError, SdtuneError
from sdtune.models.lycoris import text_encoder_root
from sdtune.precision_names import dtype_of
from sdtune.seeds import derived_seed
from sdtune.train.network_options import parse_network_args
from sdtune.train.targets import NetworkTarget, freeze

if TYPE_CHECKING:
    from sdtune.models.sd import StableDiffusion
    from sdtune.train.options import TrainOptions
    from sdtune.train.state import Progress

logger = logging.getLogger(__name__)

NETWORK_MODULE = "lycoris.kohya"
# LyCORIS' "full" preset for SD 1.x/2.x (diffusers U-Net, transformers CLIP): every attention, feed-forward,
# ResNet, down/up-sample layer, conv_in/conv_out and the time embedding, and the text encoder's attention and MLP
SD_FULL_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


def create_network(opts: TrainOptions, model: StableDiffusion, args: dict[str, str]) -> nn.Module:
    """``lycoris.kohya.create_network`` with sd-scripts' arguments (see the module docstring for the preset)."""
    import lycoris.kohya
    import toml

    kwargs: dict[str, Any] = dict(args)
    with tempfile.TemporaryDirectory() as tmp:
        if kwargs.get("preset", "full") == "full":
            preset = Path(tmp) / "sd_full.toml"
            preset.write_text(toml.dumps(SD_FULL_PRESET), encoding="utf-8")
            kwargs["preset"] = str(preset)
        try:
            return lycoris.kohya.create_network(1.0, opts.network_dim, opts.network_alpha, model.vae,
                                                text_encoder_root(model.text_encoder), model.unet,
                                                warn_on_unmatched=False, **kwargs)
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            given = " ".join(opts.network_args) or "none"
            raise SdtuneError(f"--network_module lycoris.kohya: LyCORIS could not build the network for this "
                              f"{model.family.description} model with --network_args {given}: "
                              f"{type(exc).__name__}: {exc}") from exc


class LycorisTarget(NetworkTarget):
    """A LyCORIS network (--network_module lycoris.kohya) on the frozen model (:func:`freeze`), hooked into its
    layers for the whole run (steps and samples); drawn from its own seed, the same on every rank, and kept in the
    trained precision (float32 unless --full_fp16/--full_bf16)."""

    def __init__(self, opts: TrainOptions, model: StableDiffusion, device: torch.device, weight_dtype: torch.dtype,
                 seed: int, clip_skip: int, run_metadata: dict[str, str]) -> None:
        self.opts, self.model, self.clip_skip = opts, model, clip_skip
        freeze(model, device, weight_dtype, opts.mixed_precision)
        self.args: dict[str, Any] = dict(parse_network_args(opts))
        self.args.setdefault("dropout", opts.network_dropout)  # sd-scripts' "workaround for LyCORIS"
        self.dim = opts.network_dim or 4  # lycoris.kohya's default
        with torch.random.fork_rng(devices=[]):  # its own seed: not the data's draws; built on the CPU
            torch.manual_seed(derived_seed(seed, 0x4C79636F))
            network = create_network(opts, model, self.args)
        network.apply_to(model.text_encoder, model.unet, apply_text_encoder=not opts.network_train_unet_only,
                         apply_unet=not opts.network_train_text_encoder_only)
        if opts.network_weights:
            try:
                info = network.load_weights(opts.network_weights)
            except RuntimeError as exc:  # a tensor of another shape: another rank or algo
                raise ModelLoadError(f"{opts.network_weights}: does not fit this network ({exc}); use the "
                                     "--network_dim and --network_args it was trained with") from exc
            if info:
                missing, unexpected = info.get("missing keys", []), info.get("unexpected keys", [])
                first = (missing or unexpected)[0]
                raise ModelLoadError(f"{opts.network_weights}: does not fit this network ({len(missing)} missing, "
                                     f"{len(unexpected)} unexpected keys, e.g. {first}); use the --network_dim and "
                                     "--network_args (algo, preset, conv_dim) it was trained with")
        network.to(device, weight_dtype).train()
        self.network = network
        self.run_metadata = run_metadata
        groups, names = network.prepare_optimizer_params(opts.text_encoder_lr, opts.unet_lr, opts.learning_rate)
        if not groups:
            raise SdtuneError("nothing to train: every LyCORIS part has learning rate 0 (--unet_lr / "
                              "--text_encoder_lr)")
        self._train_only(groups)
        self.group_names = [name.replace(" ", "_") for name in names]
        self.trains_text_encoder = any(name.startswith("textencoder") for name in names)
        self.uses_global_rng = any(float(self.args.get(key) or 0) > 0
                                   for key in ("dropout", "rank_dropout", "module_dropout"))
        self.modules = {"lycoris": network}
        kinds = sorted({type(m).__name__ for m in network.unet_loras + network.text_encoder_loras})
        self.description = (f"training: LyCORIS ({', '.join(kinds) or 'no modules'}), dim {self.dim}, alpha "
                            f"{opts.network_alpha:g}, on {len(network.unet_loras)} U-Net and "
                            f"{len(network.text_encoder_loras)} text-encoder layers "
                            f"({sum(p.numel() for p in network.parameters()):,} parameters; trained: "
                            f"{', '.join(self.group_names)})")

    def after_update(self) -> dict[str, torch.Tensor]:
        """``--scale_weight_norms``: the network's max-norm regularisation after each update (its figures logged)."""
        if self.opts.scale_weight_norms is None:
            return {}
        device = next(self.network.parameters()).device
        scaled, mean, maximum = self.network.apply_max_norm_regularization(self.opts.scale_weight_norms, device)
        return {"keys_scaled": torch.as_tensor(scaled), "average_key_norm": torch.as_tensor(mean),
                "max_key_norm": torch.as_tensor(maximum)}

    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        """The network's tensors in --save_precision, with a LoRA run's metadata (``ss_network_module``
        ``lycoris.kohya``, ``ss_network_args`` the arguments given to LyCORIS, as sd-scripts writes them)."""
        from sdtune.models.lora import network_metadata, save_lora_file

        meta = network_metadata(self.model.family, self.dim, self.opts.network_alpha,
                                title=self.opts.output_name or path.stem,
                                resolution=self.run_metadata.get("ss_resolution"), clip_skip=self.clip_skip)
        meta["ss_network_module"] = NETWORK_MODULE
        meta["ss_network_args"] = json.dumps(self.args)
        save_lora_file(path, self.network.state_dict(), self._file_metadata(meta, progress),
                       dtype_of(self.opts.save_precision or "float"))
