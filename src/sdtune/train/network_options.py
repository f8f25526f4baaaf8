"""The LoRA options of ``sdtune train`` (``--network_*``): ``--network_args`` parsed and typed, and the checks made
before the model loads (:func:`sdtune.train.options.validate` calls :func:`validate_network_options`)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.models.choices import LORA_MODULES
from sdtune.train.options import ADAPTIVE_LR_OPTIMIZERS, LEARNING_RATE_DEFAULT, TrainOptions, optimizer_name

logger = logging.getLogger(__name__)

# --network_args of sdtune's LoRA (sd-scripts' networks.lora create_network reads the same keys), with their types
LORA_ARGS = {"conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float}
NETWORK_ONLY = ("network_dim", "network_dropout", "network_weights", "network_train_unet_only",
                "network_train_text_encoder_only", "unet_lr", "text_encoder_lr", "scale_weight_norms")


def parse_network_args(opts: TrainOptions) -> dict[str, Any]:
    """``--network_args key=value ...`` as a dict: typed for sdtune's LoRA (unknown keys refused, naming the known
    ones), the strings as given for lycoris.kohya (which parses its own, as sd-scripts passes them)."""
    args: dict[str, Any] = {}
    for item in opts.network_args:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SdtuneError(f"--network_args {item!r}: expected key=value, e.g. conv_dim=4")
        args[key.strip()] = value.strip()
    if opts.network_module in LORA_MODULES:
        unknown = sorted(set(args) - set(LORA_ARGS))
        if unknown:
            raise SdtuneError(f"--network_args {unknown[0]}: not an option of --network_module lora (it takes "
                              f"{', '.join(LORA_ARGS)}); block-wise dims and LoHa/LoKr need lycoris.kohya")
        for key, kind in LORA_ARGS.items():
            if key in args:
                try:
                    args[key] = kind(args[key])
                except ValueError:
                    raise SdtuneError(f"--network_args {key}={args[key]}: not a number") from None
        for key in ("rank_dropout", "module_dropout"):
            if not 0.0 <= args.get(key, 0.0) < 1.0:
                raise SdtuneError(f"--network_args {key}={args[key]}: a probability, from 0 to below 1")
        if args.get("conv_dim", 1) < 1:
            raise SdtuneError(f"--network_args conv_dim={args['conv_dim']}: must be 1 or more")
    return args


def validate_network_options(opts: TrainOptions) -> None:
    """The LoRA options (--network_*), the --network_weights file and the LyCORIS package, checked before the
    model loads."""
    if opts.network_module is None:
        given = [name for name in NETWORK_ONLY if getattr(opts, name) not in (None, False)]
        if given or opts.network_args:
            raise SdtuneError(f"--{(given or ['network_args'])[0]} needs --network_module lora: without it the model "
                              "is fine-tuned and no LoRA is trained")
        return
    if opts.hypernetwork_module:
        raise SdtuneError("--network_module and --hypernetwork_module: a run trains one of the two; drop one")
    if opts.train_text_encoder:
        raise SdtuneError("--train_text_encoder with --network_module: a LoRA run trains the text encoder's LoRA "
                          "(by default; --text_encoder_lr sets its rate), never the text encoder itself; drop "
                          "--train_text_encoder (or --network_train_unet_only for no text-encoder LoRA)")
    if opts.network_train_unet_only and opts.network_train_text_encoder_only:
        raise SdtuneError("--network_train_unet_only and --network_train_text_encoder_only together train nothing; "
                          "drop one")
    if opts.network_dim is not None and opts.network_dim < 1:
        raise SdtuneError(f"--network_dim must be 1 or more, got {opts.network_dim}")
    if opts.network_alpha < 0:
        raise SdtuneError(f"--network_alpha must be 0 (= the rank) or positive, got {opts.network_alpha}")
    if opts.network_dropout is not None and not 0.0 <= opts.network_dropout < 1.0:
        raise SdtuneError(f"--network_dropout is a probability, from 0 to below 1; got {opts.network_dropout}")
    if opts.scale_weight_norms is not None and opts.scale_weight_norms <= 0:
        raise SdtuneError(f"--scale_weight_norms must be positive (1 is typical), got {opts.scale_weight_norms}")
    if (opts.save_model_as or "").startswith("diffusers"):
        raise SdtuneError(f"--save_model_as {opts.save_model_as}: a LoRA is one file; use safetensors (the "
                          "default, what every UI loads) or ckpt")
    parse_network_args(opts)
    if opts.network_module == "lycoris.kohya" and importlib.util.find_spec("lycoris") is None:
        raise SdtuneError("--network_module lycoris.kohya needs the LyCORIS package, which is not installed: "
                          "pip install lycoris-lora (or use --network_module lora, with --network_args conv_dim=N "
                          "for LoCon)")
    if opts.network_weights:
        if not Path(opts.network_weights).is_file():
            raise SdtuneError(f"--network_weights {opts.network_weights}: no such file")
        if opts.network_module in LORA_MODULES:
            from sdtune.models.lora import read_lora

            read_lora(opts.network_weights)  # not a LoRA file: fails now, before the model loads
    if opts.unet_lr is None and opts.learning_rate == LEARNING_RATE_DEFAULT \
            and optimizer_name(opts) not in ADAPTIVE_LR_OPTIMIZERS:
        logger.warning("--learning_rate %g is the fine-tuning default; LoRAs are usually trained at 1e-4 "
                       "(--learning_rate or --unet_lr)", opts.learning_rate)
