"""Build Stable Diffusion models from the weights of every format users have.

Sources: a diffusers folder, an LDM single file (``.safetensors``, ``.ckpt``), or a hub repo id (online only).
:func:`sdtune.models.files.detect_source` tells which, from the path; for single files the family comes from
signature keys; then exactly one loader runs. Single files load fully offline: component configs come from
:mod:`sdtune.models.families` (or from the file's own sdtune metadata), the tokenizer from ``--tokenizer`` or the
CLIP vocabulary packaged with sdtune. Reading the raw files is :mod:`sdtune.models.files`; saving is
:mod:`sdtune.models.save`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from accelerate import init_empty_weights

from sdtune.errors import ConversionError, ModelLoadError
from sdtune.models.config_check import parse_configs, validate_configs
from sdtune.models.families import FAMILIES, SD1, SD2, SD2_V, Family, get_family
from sdtune.models.files import (
    DIFFUSERS_WEIGHT_FILES,
    TEXT_WEIGHT_FILES,
    detect_source,
    read_checkpoint,
    read_folder_weights,
    read_json_config,
)
from sdtune.models.ldm_keys import (
    VAE_ROOT,
    KeyMap,
    build_key_map,
    detect_text_encoder,
    normalize_ldm_keys,
    normalize_text_keys,
)
from sdtune.models.prediction import MARKER_KEYS, META_CONFIGS, META_FAMILY, V as V_PREDICTION, detect_prediction_type
from sdtune.models.sd import StableDiffusion, build_modules, place, with_prediction_type
from sdtune.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

VAE_TRAINING_PREFIXES = ("loss.",)


# ----------------------------------------------------------------------------------------------------------- family
def _single_file_family(path: Path, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                        v2: bool | None, v_parameterization: bool | None, global_step: int | None) -> Family:
    """The family from the text encoder's layout (or sdtune's metadata), the prediction type from every signal
    :mod:`sdtune.models.prediction` knows, in its order. ``global_step`` is a .ckpt's top-level one."""
    text_kind = detect_text_encoder(sd)
    if text_kind is None or not any(k.startswith("model.diffusion_model.") for k in sd):
        raise ModelLoadError(
            f"{path}: not a Stable Diffusion 1.x/2.x checkpoint (no U-Net and text-encoder weights in the LDM "
            "layout). For a LoRA, VAE or embedding file use the matching option instead (e.g. --vae)."
        )
    if v2 is not None and v2 != (text_kind == "openclip"):
        raise ModelLoadError(
            f"{path}: --v2 {'was' if v2 else 'was not'} given, but the weights have a "
            f"{'OpenCLIP (SD 2.x)' if text_kind == 'openclip' else 'CLIP (SD 1.x)'} text encoder; drop the option"
        )
    decision = detect_prediction_type(path, is_v2=text_kind == "openclip", metadata=metadata, keys=sd.keys(),
                                      ckpt_global_step=global_step, override=v_parameterization)
    if META_FAMILY in metadata:
        try:
            family = get_family(metadata[META_FAMILY])
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    elif text_kind == "openclip":
        family = SD2_V if decision.prediction_type == V_PREDICTION else SD2
    else:
        family = SD1
    return with_prediction_type(family, decision.prediction_type)


def _folder_family(configs: Mapping[str, Mapping[str, Any]], v2: bool | None, v_parameterization: bool | None,
                   recorded: str | None = None) -> Family:
    """A diffusers folder states its prediction type in scheduler_config.json; ``recorded`` is the family name
    sdtune wrote into sdtune.json (an SD 2.x 768 model trained with epsilon stays "sd2-v")."""
    is_v2 = configs["text_encoder"].get("hidden_act") == "gelu"  # OpenCLIP uses gelu, OpenAI CLIP quick_gelu
    if v2 is not None:
        is_v2 = v2
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    if v_parameterization is not None:
        prediction = "v_prediction" if v_parameterization else "epsilon"
    family = (SD2_V if prediction == "v_prediction" else SD2) if is_v2 else SD1
    if recorded is not None and recorded in FAMILIES and get_family(recorded).is_v2 == is_v2:
        family = get_family(recorded)
    return with_prediction_type(family, prediction)


# ----------------------------------------------------------------------------------------------------------- loading
def load_model(
    source: str | Path,
    *,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    vae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusion:
    """Load a Stable Diffusion model from a diffusers folder, an LDM single file or (online) a hub repo id.

    ``v2`` / ``v_parameterization`` override what is detected from the weights; ``vae`` replaces the VAE;
    ``tokenizer`` is a folder with a CLIP tokenizer (single files only; folders carry their own).
    """
    kind = detect_source(source)
    if kind == "hub":
        source = _download_from_hub(str(source))
        kind = "diffusers"
    if kind == "diffusers":
        model = _load_diffusers(Path(source), v2, v_parameterization, tokenizer)
    else:
        model = _load_single_file(Path(source), v2, v_parameterization, tokenizer)
    if vae is not None:
        model.vae = load_vae(vae)
    for module in (model.unet, model.vae, model.text_encoder):
        if module.dtype != dtype:
            place(module, dtype=dtype)
        module.eval()
    return model


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "unet/*.safetensors",
                "vae/*.safetensors", "text_encoder/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{repo_id}: not a local file or folder, and it is not in the Hugging Face cache while the hub is "
            "unreachable (offline, or HF_HUB_OFFLINE=1). Download the model once while online, or pass a local "
            "diffusers folder or .safetensors/.ckpt file."
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{repo_id}: could not download it from the Hugging Face hub: {exc}") from exc


def _load_diffusers(folder: Path, v2: bool | None, v_parameterization: bool | None,
                    tokenizer: str | Path | None) -> StableDiffusion:
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    configs = {
        "unet": read_json_config(folder / "unet" / "config.json"),
        "vae": read_json_config(folder / "vae" / "config.json"),
        "text_encoder": read_json_config(folder / "text_encoder" / "config.json"),
        "scheduler": read_json_config(scheduler_file) if scheduler_file.is_file() else {},
    }
    own = folder / "sdtune.json"
    family = _folder_family(configs, v2, v_parameterization, read_json_config(own).get("family") if own.is_file() else None)
    weights = {
        "unet": read_folder_weights(folder / "unet", DIFFUSERS_WEIGHT_FILES),
        "vae": read_folder_weights(folder / "vae", DIFFUSERS_WEIGHT_FILES),
        "text_encoder": normalize_text_keys(read_folder_weights(folder / "text_encoder", TEXT_WEIGHT_FILES)),
    }
    unet, vae, text_encoder = _instantiate(configs, weights, folder)
    tok = load_tokenizer(tokenizer if tokenizer is not None else (folder / "tokenizer" if (folder / "tokenizer").is_dir() else None),
                         family.pad_token)
    return StableDiffusion(family=family, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok)


def _instantiate(configs: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Mapping[str, torch.Tensor]],
                 source: Path, key_map: KeyMap | None = None):
    """Modules built without initialising weights (fast for full-size models), then loaded strictly. ``key_map``
    (a single file's) names a wrong tensor by its key in that file."""
    with init_empty_weights(include_buffers=False):
        modules = build_modules(dict(configs))
    for name, module in zip(("unet", "vae", "text_encoder"), modules):
        target = module.state_dict()
        prefixed = any(k.startswith("text_model.") for k in target)
        sd = {("text_model." + k if prefixed else k): v for k, v in weights[name].items()}
        given = {("text_model." + k if prefixed else k): k for k in weights[name]}  # the key as converted
        missing = sorted(set(target) - set(sd))
        unexpected = sorted(set(sd) - set(target))
        if missing or unexpected:
            raise ModelLoadError(
                f"{source}: the {name} weights do not fit its config (is this the right model family, --v2?): "
                + (f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; " if missing else "")
                + (f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
            )
        wrong = [k for k, v in sd.items() if tuple(v.shape) != tuple(target[k].shape)]
        if wrong:
            k = wrong[0]
            in_file = key_map.ldm_key(f"{name}.{given[k]}") if key_map is not None else None
            where = f"{in_file} (diffusers {name} {k})" if in_file else k
            raise ModelLoadError(
                f"{source}: {len(wrong)} {name} tensor(s) have another shape than the config expects, e.g. {where}: "
                f"{tuple(sd[k].shape)} vs {tuple(target[k].shape)}. Is this the right model family (--v2)?"
            )
        module.load_state_dict(sd, strict=True, assign=True)
    return modules


def _load_single_file(path: Path, v2: bool | None, v_parameterization: bool | None,
                      tokenizer: str | Path | None) -> StableDiffusion:
    checkpoint = read_checkpoint(path)
    sd, metadata = normalize_ldm_keys(checkpoint.tensors), checkpoint.metadata
    family = _single_file_family(path, sd, metadata, v2, v_parameterization, checkpoint.global_step)
    for marker in MARKER_KEYS:  # read above; not weights
        sd.pop(marker, None)
    if META_CONFIGS in metadata:
        # untrusted header text: checked against the family and the weights before anything is built
        configs = validate_configs(parse_configs(metadata[META_CONFIGS], path, META_CONFIGS), family, path,
                                   META_CONFIGS, sd)
    else:
        configs = family.configs()
        conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
        if conv_in is not None:  # inpainting models take 9 input channels
            configs["unet"]["in_channels"] = int(conv_in.shape[1])
    key_map = build_key_map(configs, family.text_encoder)
    try:
        converted, extras = key_map.to_diffusers(sd)
    except ConversionError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    weights = _split_components(converted)
    unet, vae, text_encoder = _instantiate(configs, weights, path, key_map)
    tok = load_tokenizer(tokenizer, family.pad_token)
    return StableDiffusion(family=family, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                           ldm_extras=extras)


def _split_components(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, value in sd.items():
        component, _, rest = key.partition(".")
        out[component][rest] = value
    return out


# ----------------------------------------------------------------------------------------------------------- the VAE
def load_vae(source: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE from a diffusers model or VAE folder, a full single-file checkpoint, or a standalone VAE file
    (LDM keys such as ``encoder.down.0...`` or diffusers keys, optionally under ``first_stage_model.``)."""
    path = Path(source)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        config = read_json_config(folder / "config.json")
        weights = read_folder_weights(folder, DIFFUSERS_WEIGHT_FILES)
    elif path.is_file():
        config, weights = _file_vae(path)
    else:
        raise ModelLoadError(f"{source}: no such VAE file or folder")
    from diffusers import AutoencoderKL

    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    try:
        vae.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: the VAE weights do not fit an SD VAE: {str(exc)[:400]}") from exc
    return place(vae, dtype=dtype).eval()


def _file_vae(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and diffusers-keyed weights of a single file's VAE: a whole checkpoint's or a standalone one."""
    checkpoint = read_checkpoint(path)
    sd, metadata = checkpoint.tensors, checkpoint.metadata
    family_vae = None
    if any(k.startswith("model.diffusion_model.") for k in sd):  # a whole checkpoint: take its VAE part
        if META_CONFIGS not in metadata and detect_text_encoder(sd) is not None:
            # The config load_model gives this file's VAE, so that prepare (which loads only the VAE) and
            # training print the same VAE fingerprint and the latent caches stay valid.
            family = _single_file_family(path, normalize_ldm_keys(sd), metadata, None, None, checkpoint.global_step)
            family_vae = family.configs()["vae"]
        sd = {k: v for k, v in sd.items() if k.startswith(VAE_ROOT)}
    sd = {k.removeprefix(VAE_ROOT): v for k, v in sd.items() if not k.startswith("model_ema.")}
    # Training-only tensors of ldm's AutoencoderKL (its LPIPSWithDiscriminator: loss.logvar,
    # loss.perceptual_loss.*, loss.discriminator.*), as in CompVis' kl-f8 model.ckpt; sd-scripts' and diffusers'
    # VAE converters copy only the weights they know. Any other unknown key is still refused below.
    dropped = [k for k in sd if k.startswith(VAE_TRAINING_PREFIXES)]
    if dropped:
        logger.info("%s: ignoring %d training-only VAE tensor(s) (%s...)", path, len(dropped), dropped[0])
        sd = {k: v for k, v in sd.items() if not k.startswith(VAE_TRAINING_PREFIXES)}
    if any(k.startswith("encoder.down.") for k in sd):  # LDM layout
        return _ldm_vae(sd, metadata, family_vae, path)
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        config = _infer_vae_config(
            {"encoder.conv_out.weight": sd["encoder.conv_out.weight"],
             **{k.replace("down_blocks.", "down.").replace(".resnets.", ".block."): v
                for k, v in sd.items() if k.startswith("encoder.down_blocks.")}}, path)
        return config, sd
    raise ModelLoadError(f"{path}: not a VAE (no encoder/decoder weights)")


def _ldm_vae(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family_vae: dict[str, Any] | None,
             path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An LDM-keyed VAE's config and its weights converted to diffusers keys. ``family_vae`` is the config
    load_model would give it when it came from a whole checkpoint."""
    # sdtune's own files carry their configs; any other VAE's layout is read from its shapes
    if META_CONFIGS in metadata:
        config = _header_vae_config(metadata, path)
    else:
        config = _infer_vae_config(sd, path)
        # the same layout but the family's sample_size (which sizes tiles only): take the family's config
        if family_vae is not None and {**config, "sample_size": family_vae["sample_size"]} == family_vae:
            config = family_vae
    key_map = build_key_map({"unet": _EMPTY_UNET, "vae": config, "text_encoder": {"num_hidden_layers": 0}}, "clip")
    try:
        converted, _ = key_map.to_diffusers({VAE_ROOT + k: v for k, v in sd.items()})
    except ConversionError as exc:
        raise ModelLoadError(f"{path}: not a Stable Diffusion VAE: {exc}") from exc
    return config, {k.removeprefix("vae."): v for k, v in converted.items()}


def _header_vae_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The VAE config of a file's ``sdtune.configs``, checked as :func:`validate_configs` checks a whole model's
    (against the family the header names, else SD1's VAE, which every SD 1.x/2.x family shares)."""
    configs = parse_configs(metadata[META_CONFIGS], path, META_CONFIGS)
    family = SD1
    if META_FAMILY in metadata:
        try:
            family = get_family(metadata[META_FAMILY])
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    reference = family.configs()
    checked = validate_configs({**reference, "vae": configs.get("vae")}, family, path, META_CONFIGS)
    return checked["vae"]


def _infer_vae_config(ldm_vae: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """A standalone VAE file has no config; its shapes tell the widths, depth and latent channels."""
    config = SD1.configs()["vae"]
    try:
        levels = sorted({int(k.split(".")[2]) for k in ldm_vae if k.startswith("encoder.down.")})
        widths = [int(ldm_vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        depth = len({k.split(".")[4] for k in ldm_vae if k.startswith("encoder.down.0.block.")})
        latent = int(ldm_vae["encoder.conv_out.weight"].shape[0]) // 2
    except (KeyError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"{path}: not a Stable Diffusion VAE (cannot read its layout: {exc})") from exc
    n = len(widths)
    config.update(block_out_channels=widths, layers_per_block=depth, latent_channels=latent,
                  down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    return config


# A U-Net config with no blocks, for building a key map that covers only the VAE.
_EMPTY_UNET: dict[str, Any] = {"layers_per_block": 0, "down_block_types": [], "up_block_types": []}


# ----------------------------------------------------------------------------------------------------------- summary

def model_summary(model: StableDiffusion) -> str:
    """One line for the log: the family (at the U-Net's native size) and each component's parameter count."""
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("unet", model.unet), ("vae", model.vae), ("text encoder", model.text_encoder))}
    parts = ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in counts.items())
    description = model.family.description
    native = native_resolution(model)
    if native != model.family.resolution:  # a model of the family's layout trained for another size (tests' tiny)
        description = description.replace(f"{model.family.resolution} px", f"{native} px")
    return f"{description}; {parts} parameters"


def native_resolution(model: StableDiffusion) -> int:
    """The image side the U-Net was built for: its latent sample size times the VAE's downscaling."""
    vae_scale = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return int(model.unet.config.sample_size) * vae_scale
