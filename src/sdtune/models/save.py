"""Save a Stable Diffusion model in every format its users' tools read: an LDM single file (``.safetensors`` with
sdtune's and Stability AI's model-spec metadata, or ``.ckpt``) or a diffusers folder, always atomically.

A saved file loads back through :func:`sdtune.models.io.load_model` with the same family, prediction type and
configs, read from the metadata written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from sdtune import __version__
from sdtune.atomic import atomic_dir, atomic_path
from sdtune.models.choices import SAVE_FORMATS
from sdtune.models.ldm_keys import build_key_map, normalize_text_keys, openclip_completion
from sdtune.models.prediction import META_CONFIGS, META_FAMILY, META_PREDICTION, V as V_PREDICTION, spec_prediction_type
from sdtune.models.sd import StableDiffusion
from sdtune.precision_names import dtypes_of

PRECISIONS = dtypes_of(("float", "fp32", "fp16", "bf16"))  # the names --save_precision and loading take


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
        META_FAMILY: family.name,
        META_PREDICTION: family.prediction_type,
        META_CONFIGS: json.dumps(model.configs()),
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
