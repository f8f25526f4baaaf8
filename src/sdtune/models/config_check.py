"""Validation of the component configs a model file carries about itself (``sdtune.configs`` in a .safetensors
header, or a .ckpt's ``sdtune`` entry): untrusted text, checked before any module is built.

A header is written by whoever made the file. Without this check an 18 MB file asking for
``max_position_embeddings = 2**27`` costs gigabytes of memory before anything refuses it (issue 12, item 4), and a
list or a string where a dict is expected ends in a traceback. Each config must have the family's shape: the same
keys with values of the same kind (a number where the family has a number, a list of the same length where it has
a list), every size within bounds no Stable Diffusion 1.x/2.x model comes near, and the sizes the weights show
(positions, vocabulary, widths) equal to those the config states.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.errors import ModelLoadError
from sdtune.models.families import Family

# The largest real value of any size field in SD 1.x/2.x is 49,408 (the CLIP vocabulary); 2**16 leaves room for
# any fine-tune while an absurd size is refused before it can be allocated.
MAX_SIZE = 2**16
MAX_LIST = 16  # block lists have 4 entries in every SD 1.x/2.x U-Net and VAE
MAX_HEADER_JSON = 1 << 20  # the configs of a full-size model are about 4 KB of JSON
_COMPONENTS = ("unet", "vae", "text_encoder")
# Fields whose value a real model file may give a kind the family's reference does not (diffusers writes them either
# way): attention_head_dim is an int in SD1 and a list in SD2; trained_betas None or a list.
_FREE_KIND = {("unet", "attention_head_dim"), ("unet", "num_attention_heads"), ("scheduler", "trained_betas"),
              ("text_encoder", "architectures")}
_LONG_LISTS = {("scheduler", "trained_betas"): 10_000}  # one beta a timestep


def parse_configs(text: str, path: Path, field: str) -> dict[str, Any]:
    """The JSON object in the header field ``field`` of ``path``, or a :class:`ModelLoadError` naming both."""
    if not isinstance(text, str):
        raise ModelLoadError(f"{path}: its metadata {field} is a {type(text).__name__}, not JSON text")
    if len(text) > MAX_HEADER_JSON:
        raise ModelLoadError(f"{path}: its metadata {field} is {len(text):,} characters long (model configs take a "
                             "few thousand); the header is damaged or crafted. " + _fix(field))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: its metadata {field} is not JSON ({exc}). " + _fix(field)) from exc
    except RecursionError as exc:
        raise ModelLoadError(f"{path}: its metadata {field} is JSON nested too deeply to be model configs. "
                             + _fix(field)) from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: its metadata {field} is a JSON {type(value).__name__}, not an object of "
                             "component configs (unet, vae, text_encoder). " + _fix(field))
    return value


def _fix(field: str) -> str:
    return (f"Remove the {field} entry from the file's header (the family's standard configs are then used), "
            "or fetch the file again")


def _check_value(path: Path, where: str, value: Any, reference: Any, longest: int = MAX_LIST) -> None:
    if isinstance(value, bool) or isinstance(reference, bool):
        if reference is not None and isinstance(value, bool) != isinstance(reference, bool):
            raise ModelLoadError(f"{path}: {where} is {value!r}; the family has {reference!r} there")
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ModelLoadError(f"{path}: {where} is {value!r}; expected a finite number")
        if isinstance(value, int) and not -MAX_SIZE <= value <= MAX_SIZE and not where.endswith("_token_id"):
            raise ModelLoadError(f"{path}: {where} is {value:,}; no Stable Diffusion 1.x/2.x model has a size above "
                                 f"{MAX_SIZE:,} (the header is damaged or crafted)")
        if isinstance(value, int) and where.endswith("_token_id") and not 0 <= value <= MAX_SIZE:
            raise ModelLoadError(f"{path}: {where} is {value:,}; a token id lies in the vocabulary")
        if reference is not None and not isinstance(reference, (int, float)):
            raise ModelLoadError(f"{path}: {where} is the number {value!r}; the family has "
                                 f"{type(reference).__name__} {reference!r} there")
        return
    if isinstance(value, list):
        if len(value) > longest:
            raise ModelLoadError(f"{path}: {where} lists {len(value):,} entries; Stable Diffusion models have at "
                                 f"most {longest}")
        if isinstance(reference, list) and len(value) != len(reference):
            raise ModelLoadError(f"{path}: {where} lists {len(value)} entries; the family has {len(reference)}")
        for i, item in enumerate(value):
            ref = reference[i] if isinstance(reference, list) and i < len(reference) else None
            if isinstance(item, (dict, list)):
                raise ModelLoadError(f"{path}: {where}[{i}] is a nested {type(item).__name__}; expected a value")
            _check_value(path, f"{where}[{i}]", item, ref)
        return
    if isinstance(value, dict):
        if reference is not None:
            raise ModelLoadError(f"{path}: {where} is a nested object; the family has {reference!r} there")
        return  # a field sdtune does not use (e.g. transformers' id2label); bounded by MAX_HEADER_JSON
    if value is not None and not isinstance(value, str):
        raise ModelLoadError(f"{path}: {where} is a {type(value).__name__}")
    if isinstance(value, str) and reference is not None and not isinstance(reference, str):
        raise ModelLoadError(f"{path}: {where} is the text {value[:40]!r}; the family has {reference!r} there")
    if isinstance(value, str) and len(value) > 200:
        raise ModelLoadError(f"{path}: {where} is a {len(value):,}-character string")


def validate_configs(configs: Mapping[str, Any], family: Family, path: Path, field: str,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """``configs`` checked against ``family``'s (see the module docstring), or a :class:`ModelLoadError` naming
    ``path``, the field and the fix. ``tensors`` (diffusers keys, ``text_encoder.`` etc. prefixed, or LDM keys)
    are the file's weights: the sizes they show must be those the config states."""
    reference = family.configs()
    out: dict[str, dict[str, Any]] = {}
    for name in (*_COMPONENTS, "scheduler"):
        component = configs.get(name)
        if component is None and name == "scheduler":
            continue
        if not isinstance(component, dict):
            what = "missing" if component is None else f"a {type(component).__name__}"
            raise ModelLoadError(f"{path}: its metadata {field} has no {name} config ({name} is {what}). "
                                 + _fix(field))
        ref = reference[name]
        for key, value in component.items():
            if not isinstance(key, str) or len(key) > 100:
                raise ModelLoadError(f"{path}: its metadata {field} {name} has a key {str(key)[:40]!r}. " + _fix(field))
            where = f"{field} {name}.{key}"
            _check_value(path, where, value, None if (name, key) in _FREE_KIND else ref.get(key),
                         _LONG_LISTS.get((name, key), MAX_LIST))
        if name in _COMPONENTS:
            for key in ("_class_name", "model_type"):
                if key in ref and key in component and component[key] != ref[key]:
                    raise ModelLoadError(f"{path}: {field} {name}.{key} is {component[key]!r}; a {family.name} "
                                         f"model has {ref[key]!r}. " + _fix(field))
        out[name] = dict(component)
    for name in configs:
        if name not in (*_COMPONENTS, "scheduler"):
            raise ModelLoadError(f"{path}: its metadata {field} has an unknown component {name!r}. " + _fix(field))
    if tensors is not None:
        _check_against_weights(out, family, path, field, tensors)
    return out


def _check_against_weights(configs: Mapping[str, Mapping[str, Any]], family: Family, path: Path, field: str,
                           tensors: Mapping[str, torch.Tensor]) -> None:
    text = configs["text_encoder"]
    prefix = ("cond_stage_model.model." if family.text_encoder == "openclip"
              else "cond_stage_model.transformer.text_model.")
    positions = tensors.get(prefix + ("positional_embedding" if family.text_encoder == "openclip"
                                      else "embeddings.position_embedding.weight"))
    tokens = tensors.get(prefix + ("token_embedding.weight" if family.text_encoder == "openclip"
                                   else "embeddings.token_embedding.weight"))
    checks = []
    if positions is not None and positions.dim() == 2:
        checks += [("text_encoder.max_position_embeddings", text.get("max_position_embeddings"), positions.shape[0]),
                   ("text_encoder.hidden_size", text.get("hidden_size"), positions.shape[1])]
    if tokens is not None and tokens.dim() == 2:
        checks.append(("text_encoder.vocab_size", text.get("vocab_size"), tokens.shape[0]))
    conv_in = tensors.get("model.diffusion_model.input_blocks.0.0.weight")
    blocks = configs["unet"].get("block_out_channels")
    if conv_in is not None and conv_in.dim() == 4 and isinstance(blocks, list) and blocks:
        checks += [("unet.block_out_channels[0]", blocks[0], conv_in.shape[0]),
                   ("unet.in_channels", configs["unet"].get("in_channels"), conv_in.shape[1])]
    for where, stated, actual in checks:
        if stated is not None and stated != actual:
            raise ModelLoadError(f"{path}: its metadata {field} says {where} = {stated!r}, but the file's weights "
                                 f"have {actual}; the header does not describe these weights. " + _fix(field))
