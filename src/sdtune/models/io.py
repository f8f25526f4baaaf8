"""Load Stable Diffusion models from every format users have, and save them in every format their tools read.

Sources: a diffusers folder, an LDM single file (``.safetensors``, ``.ckpt``), or a hub repo id (online only).
The format is detected from the path and, for single files, from signature keys; then exactly one loader runs.
Single files load fully offline: component configs come from :mod:`sdtune.models.families` (or from the file's own
sdtune metadata), the tokenizer from ``--tokenizer`` or the CLIP vocabulary packaged with sdtune.

``.ckpt`` files are pickles; they are read with ``torch.load(weights_only=True)``, which refuses any pickle that
would construct arbitrary objects or run code.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdtune import __version__
from sdtune.atomic import atomic_dir, atomic_path
from sdtune.errors import ConversionError, ModelLoadError
from sdtune.models.choices import SAVE_FORMATS
from sdtune.models.config_check import parse_configs, validate_configs
from sdtune.models.families import FAMILIES, SD1, SD2, SD2_V, Family, get_family
from sdtune.models.ldm_keys import (
    VAE_ROOT,
    KeyMap,
    build_key_map,
    detect_text_encoder,
    normalize_ldm_keys,
    normalize_text_keys,
    openclip_completion,
)
from sdtune.models.prediction import (
    META_CONFIGS,
    META_FAMILY,
    META_PREDICTION,
    MARKER_KEYS,
    V as V_PREDICTION,
    detect_prediction_type,
    spec_prediction_type,
)
from sdtune.models.sd import StableDiffusion, build_modules, place, with_prediction_type
from sdtune.models.tokenizer import load_tokenizer
from sdtune.precision_names import dtypes_of

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PRECISIONS = dtypes_of(("float", "fp32", "fp16", "bf16"))  # the names --save_precision and loading take
VAE_TRAINING_PREFIXES = ("loss.",)
_META_FAMILY = META_FAMILY
_META_CONFIGS = META_CONFIGS


# ----------------------------------------------------------------------------------------------------------- reading
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
def detect_source(source: str | Path) -> str:
    """'diffusers', 'single_file' or 'hub'."""
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


def _read_json(path: Path) -> dict[str, Any]:
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


def _folder_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        path = folder / name
        if path.is_file():
            return read_state_dict(path)[0]
    raise ModelLoadError(f"{folder}: no weights file ({' or '.join(names)})")


_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TEXT_FILES = ("model.safetensors", "pytorch_model.bin")


def _load_diffusers(folder: Path, v2: bool | None, v_parameterization: bool | None,
                    tokenizer: str | Path | None) -> StableDiffusion:
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    configs = {
        "unet": _read_json(folder / "unet" / "config.json"),
        "vae": _read_json(folder / "vae" / "config.json"),
        "text_encoder": _read_json(folder / "text_encoder" / "config.json"),
        "scheduler": _read_json(scheduler_file) if scheduler_file.is_file() else {},
    }
    own = folder / "sdtune.json"
    family = _folder_family(configs, v2, v_parameterization, _read_json(own).get("family") if own.is_file() else None)
    weights = {
        "unet": _folder_weights(folder / "unet", _UNET_FILES),
        "vae": _folder_weights(folder / "vae", _UNET_FILES),
        "text_encoder": normalize_text_keys(_folder_weights(folder / "text_encoder", _TEXT_FILES)),
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
    if _META_CONFIGS in metadata:
        # untrusted header text: checked against the family and the weights before anything is built
        configs = validate_configs(parse_configs(metadata[_META_CONFIGS], path, _META_CONFIGS), family, path,
                                   _META_CONFIGS, sd)
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


def load_vae(source: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE from a diffusers model or VAE folder, a full single-file checkpoint, or a standalone VAE file
    (LDM keys such as ``encoder.down.0...`` or diffusers keys, optionally under ``first_stage_model.``)."""
    path = Path(source)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        config = _read_json(folder / "config.json")
        weights = _folder_weights(folder, _UNET_FILES)
    elif path.is_file():
        checkpoint = read_checkpoint(path)
        sd, metadata = checkpoint.tensors, checkpoint.metadata
        family_vae = None
        if any(k.startswith("model.diffusion_model.") for k in sd):  # a whole checkpoint: take its VAE part
            if _META_CONFIGS not in metadata and detect_text_encoder(sd) is not None:
                # The config load_model gives this file's VAE, so that prepare (which loads only the VAE) and
                # training print the same VAE fingerprint and the latent caches stay valid.
                family = _single_file_family(path, normalize_ldm_keys(sd), metadata, None, None,
                                             checkpoint.global_step)
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
            # sdtune's own files carry their configs; any other VAE's layout is read from its shapes
            if _META_CONFIGS in metadata:
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
            weights = {k.removeprefix("vae."): v for k, v in converted.items()}
        elif any(k.startswith("encoder.down_blocks.") for k in sd):
            weights = sd
            config = _infer_vae_config(
                {"encoder.conv_out.weight": sd["encoder.conv_out.weight"],
                 **{k.replace("down_blocks.", "down.").replace(".resnets.", ".block."): v
                    for k, v in sd.items() if k.startswith("encoder.down_blocks.")}}, path)
        else:
            raise ModelLoadError(f"{path}: not a VAE (no encoder/decoder weights)")
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


def _header_vae_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The VAE config of a file's ``sdtune.configs``, checked as :func:`validate_configs` checks a whole model's
    (against the family the header names, else SD1's VAE, which every SD 1.x/2.x family shares)."""
    configs = parse_configs(metadata[_META_CONFIGS], path, _META_CONFIGS)
    family = SD1
    if _META_FAMILY in metadata:
        try:
            family = get_family(metadata[_META_FAMILY])
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    reference = family.configs()
    checked = validate_configs({**reference, "vae": configs.get("vae")}, family, path, _META_CONFIGS)
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


# ----------------------------------------------------------------------------------------------------------- saving
def _cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; floating tensors in ``dtype``, others (position_ids) unchanged."""
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in sd.items()}


def diffusers_state_dict(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """All weights with ``unet.`` / ``vae.`` / ``text_encoder.`` prefixes (text keys without ``text_model.``)."""
    out = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    out.update({f"vae.{k}": v for k, v in model.vae.state_dict().items()})
    out.update({f"text_encoder.{k}": v for k, v in normalize_text_keys(model.text_encoder.state_dict()).items()})
    return out


def ldm_state_dict(model: StableDiffusion, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model as one LDM state dict, as A1111 and ComfyUI read it (SD2: with OpenCLIP's full layout)."""
    configs = model.configs()
    key_map = build_key_map(configs, model.family.text_encoder)
    dsd = _cast(diffusers_state_dict(model), dtype)
    ldm = key_map.to_ldm(dsd)
    if model.family.text_encoder == "openclip":
        ldm.update(_cast(openclip_completion(model.ldm_extras, dsd, key_map.text_layers), dtype))
    else:
        positions = int(configs["text_encoder"]["max_position_embeddings"])
        ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return ldm


def modelspec_architecture(is_v2: bool, prediction_type: str) -> str:
    """The model-spec architecture id, chosen as sd-scripts' ``determine_architecture`` does: SD 2.x is
    ``-768-v`` when it predicts v and ``-512`` otherwise; SD 1.x has one id for both objectives."""
    if is_v2:
        return "stable-diffusion-v2-768-v" if prediction_type == V_PREDICTION else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def _metadata(model: StableDiffusion, epoch: int, global_step: int, title: str) -> dict[str, str]:
    family = model.family
    return {
        _META_FAMILY: family.name,
        META_PREDICTION: family.prediction_type,
        _META_CONFIGS: json.dumps(model.configs()),
        "sdtune.version": __version__,
        "epoch": str(epoch),
        "global_step": str(global_step),
        # Stability AI's model spec (https://github.com/Stability-AI/ModelSpec; sd-scripts'
        # library/sai_model_spec.py writes the same fields), read by UIs to tell model types apart.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(family.is_v2, family.prediction_type),
        "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion" if family.is_v2
        else "https://github.com/CompVis/stable-diffusion",
        "modelspec.title": title,
        "modelspec.prediction_type": spec_prediction_type(family.prediction_type),
        "modelspec.resolution": f"{family.resolution}x{family.resolution}",
    }


def save_model(model: StableDiffusion, dest: str | Path, fmt: str = "safetensors", precision: str = "float",
               epoch: int = 0, global_step: int = 0, title: str | None = None) -> Path:
    """Write ``model`` as ``fmt`` (ckpt | safetensors | diffusers | diffusers_safetensors) atomically.

    ``title`` is the model spec's required ``modelspec.title``; by default the file's stem."""
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {fmt!r}; expected one of {', '.join(SAVE_FORMATS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of float, fp16, bf16")
    dtype = PRECISIONS[precision]
    dest = Path(dest)
    if fmt in ("diffusers", "diffusers_safetensors"):
        _save_diffusers(model, dest, dtype, safetensors=(fmt == "diffusers_safetensors"))
        return dest
    ldm = ldm_state_dict(model, dtype)
    metadata = _metadata(model, epoch, global_step, title or dest.stem)
    if fmt == "safetensors":
        with atomic_path(dest) as tmp:
            save_file(ldm, str(tmp), metadata=metadata)
    else:
        with atomic_path(dest) as tmp:
            torch.save({"state_dict": ldm, "epoch": epoch, "global_step": global_step, "sdtune": metadata}, str(tmp))
    return dest


def _save_diffusers(model: StableDiffusion, dest: Path, dtype: torch.dtype, safetensors: bool) -> None:
    """A folder diffusers' StableDiffusionPipeline.from_pretrained loads. Text-encoder weights keep the
    ``text_model.`` prefix, which every transformers version and ComfyUI's diffusers loader accept."""
    import diffusers
    from diffusers import DDIMScheduler

    configs = model.configs()
    with atomic_dir(dest) as tmp:
        for name, module in (("unet", model.unet), ("vae", model.vae)):
            (tmp / name).mkdir()
            module.save_config(tmp / name)
            _write_weights(_cast(module.state_dict(), dtype), tmp / name, "diffusion_pytorch_model", safetensors)
        (tmp / "text_encoder").mkdir()
        model.text_encoder.config.save_pretrained(tmp / "text_encoder")
        text_sd = {"text_model." + k: v for k, v in normalize_text_keys(model.text_encoder.state_dict()).items()}
        _write_weights(_cast(text_sd, dtype), tmp / "text_encoder", "model" if safetensors else "pytorch_model",
                       safetensors)
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _save_slow_tokenizer_files(model.tokenizer, tmp / "tokenizer")
        scheduler = DDIMScheduler.from_config(configs["scheduler"])
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / "sdtune.json").write_text(json.dumps({"family": model.family.name, "version": __version__}) + "\n",
                                         encoding="utf-8")


def _write_weights(sd: dict[str, torch.Tensor], folder: Path, stem: str, safetensors: bool) -> None:
    if safetensors:
        save_file(sd, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, str(folder / f"{stem}.bin"))


def _save_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt beside tokenizer.json, for tools that use transformers' pure-Python CLIPTokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not (folder / "vocab.json").exists():
        backend.model.save(str(folder))


def model_summary(model: StableDiffusion) -> str:
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
