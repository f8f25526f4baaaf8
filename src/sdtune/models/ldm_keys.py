"""LDM (original Stable Diffusion checkpoint) <-> diffusers key mapping, as data.

The mapping is a table of (diffusers prefix, LDM prefix) pairs generated from the component configs, so tiny test
models and full-size models go through the same code. One strict function applies a table in either direction and
raises on any key that no rule maps; the reverse direction is the same table read the other way.

Diffusers-side keys are prefixed with the component: ``unet.``, ``vae.``, ``text_encoder.``. Text-encoder keys are
those of ``CLIPTextModel`` without the ``text_model.`` prefix (transformers >= 5 layout; :func:`normalize_text_keys`
accepts the older one).

Two things are not renames and are declared as data too:
- the VAE's mid-block attention stores q/k/v/out as 1x1 convolutions in LDM files and as linear layers in diffusers;
- OpenCLIP (SD 2.x) fuses q/k/v into one ``in_proj`` tensor per layer.
Layout references: CompVis/stable-diffusion ``ldm/modules/diffusionmodules/openaimodel.py`` (U-Net block indices),
``ldm/modules/diffusionmodules/model.py`` (VAE), mlfoundations/open_clip ``transformer.py`` (OpenCLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from sdtune.errors import ConversionError

UNET_ROOT = "model.diffusion_model."
VAE_ROOT = "first_stage_model."
CLIP_ROOT = "cond_stage_model.transformer.text_model."  # SD 1.x: Hugging Face CLIP inside LDM
OPENCLIP_ROOT = "cond_stage_model.model."  # SD 2.x: OpenCLIP

# LDM keys that carry no weights diffusers needs: the DDPM schedule (recomputed from the scheduler config), EMA
# copies (A1111 and ComfyUI load the non-EMA weights too) and CLIP's position_ids buffer.
_IGNORED_LDM_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "v_pred", CLIP_ROOT + "embeddings.position_ids",
}
# ... and the VAE's training loss (LPIPS and discriminator weights), which some merged checkpoints carry.
_IGNORED_LDM_PREFIXES = ("model_ema.", "first_stage_model.loss.")


def _resnet_pairs(d: str, l: str) -> list[tuple[str, str]]:
    """U-Net ResBlock: diffusers ResnetBlock2D names vs openaimodel.ResBlock's Sequential indices."""
    return [
        (d + "norm1.", l + "in_layers.0."),
        (d + "conv1.", l + "in_layers.2."),
        (d + "time_emb_proj.", l + "emb_layers.1."),
        (d + "norm2.", l + "out_layers.0."),
        (d + "conv2.", l + "out_layers.3."),
        (d + "conv_shortcut.", l + "skip_connection."),
    ]


def unet_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """U-Net pairs. LDM numbers input blocks 0 (conv_in), then per level: ``layers_per_block`` (resnet[, attention])
    blocks and one downsampler; output blocks per level: ``layers_per_block + 1`` blocks, the last one holding the
    upsampler after its attention (index 2) or resnet (index 1). Transformer blocks keep their names."""
    d, l = "unet.", UNET_ROOT
    lpb = int(config["layers_per_block"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    pairs = [
        (d + "time_embedding.linear_1.", l + "time_embed.0."),
        (d + "time_embedding.linear_2.", l + "time_embed.2."),
        (d + "conv_in.", l + "input_blocks.0.0."),
        (d + "conv_norm_out.", l + "out.0."),
        (d + "conv_out.", l + "out.2."),
    ]
    for i, block in enumerate(down):
        for j in range(lpb):
            n = 1 + i * (lpb + 1) + j
            pairs += _resnet_pairs(f"{d}down_blocks.{i}.resnets.{j}.", f"{l}input_blocks.{n}.0.")
            if block.startswith("CrossAttn"):
                pairs.append((f"{d}down_blocks.{i}.attentions.{j}.", f"{l}input_blocks.{n}.1."))
        if i < len(down) - 1:
            pairs.append((f"{d}down_blocks.{i}.downsamplers.0.conv.", f"{l}input_blocks.{(i + 1) * (lpb + 1)}.0.op."))
    pairs += _resnet_pairs(f"{d}mid_block.resnets.0.", f"{l}middle_block.0.")
    pairs.append((f"{d}mid_block.attentions.0.", f"{l}middle_block.1."))
    pairs += _resnet_pairs(f"{d}mid_block.resnets.1.", f"{l}middle_block.2.")
    for i, block in enumerate(up):
        has_attention = block.startswith("CrossAttn")
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            pairs += _resnet_pairs(f"{d}up_blocks.{i}.resnets.{j}.", f"{l}output_blocks.{n}.0.")
            if has_attention:
                pairs.append((f"{d}up_blocks.{i}.attentions.{j}.", f"{l}output_blocks.{n}.1."))
        if i < len(up) - 1:
            last = i * (lpb + 1) + lpb
            pairs.append((f"{d}up_blocks.{i}.upsamplers.0.conv.", f"{l}output_blocks.{last}.{2 if has_attention else 1}.conv."))
    return pairs


def _vae_resnet_pairs(d: str, l: str) -> list[tuple[str, str]]:
    return [(d + "conv_shortcut.", l + "nin_shortcut."), (d, l)]


def _vae_mid_pairs(d: str, l: str) -> list[tuple[str, str]]:
    return [
        *_vae_resnet_pairs(d + "resnets.0.", l + "block_1."),
        *_vae_resnet_pairs(d + "resnets.1.", l + "block_2."),
        (d + "attentions.0.group_norm.", l + "attn_1.norm."),
        (d + "attentions.0.to_q.", l + "attn_1.q."),
        (d + "attentions.0.to_k.", l + "attn_1.k."),
        (d + "attentions.0.to_v.", l + "attn_1.v."),
        (d + "attentions.0.to_out.0.", l + "attn_1.proj_out."),
    ]


def vae_pairs(config: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """VAE pairs, and the diffusers keys stored as 1x1 convolutions in LDM. The LDM decoder numbers its levels
    from the lowest resolution up (``decoder.up.{n-1-i}`` is diffusers' ``up_blocks.{i}``)."""
    d, l = "vae.", VAE_ROOT
    n = len(config["block_out_channels"])
    lpb = int(config["layers_per_block"])
    pairs = [(d + "quant_conv.", l + "quant_conv."), (d + "post_quant_conv.", l + "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{d}{part}.conv_in.", f"{l}{part}.conv_in."),
            (f"{d}{part}.conv_norm_out.", f"{l}{part}.norm_out."),
            (f"{d}{part}.conv_out.", f"{l}{part}.conv_out."),
        ]
        pairs += _vae_mid_pairs(f"{d}{part}.mid_block.", f"{l}{part}.mid.")
    for i in range(n):
        for j in range(lpb):
            pairs += _vae_resnet_pairs(f"{d}encoder.down_blocks.{i}.resnets.{j}.", f"{l}encoder.down.{i}.block.{j}.")
        if i < n - 1:
            pairs.append((f"{d}encoder.down_blocks.{i}.downsamplers.0.conv.", f"{l}encoder.down.{i}.downsample.conv."))
        k = n - 1 - i
        for j in range(lpb + 1):
            pairs += _vae_resnet_pairs(f"{d}decoder.up_blocks.{i}.resnets.{j}.", f"{l}decoder.up.{k}.block.{j}.")
        if i < n - 1:
            pairs.append((f"{d}decoder.up_blocks.{i}.upsamplers.0.conv.", f"{l}decoder.up.{k}.upsample.conv."))
    conv1x1 = [
        f"{d}{part}.mid_block.attentions.0.{name}.weight"
        for part in ("encoder", "decoder")
        for name in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    return pairs, conv1x1


def clip_pairs() -> list[tuple[str, str]]:
    """SD 1.x: the LDM file holds Hugging Face's CLIPTextModel under ``cond_stage_model.transformer.``."""
    d = "text_encoder."
    return [(d + name, CLIP_ROOT + name) for name in ("embeddings.", "encoder.", "final_layer_norm.")]


def openclip_pairs(num_layers: int) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, str, str]]]]:
    """SD 2.x: OpenCLIP names, and the per-layer fused attention input projection (q, k, v stacked on dim 0)."""
    d, l = "text_encoder.", OPENCLIP_ROOT
    pairs = [
        (d + "embeddings.token_embedding.", l + "token_embedding."),
        (d + "embeddings.position_embedding.weight", l + "positional_embedding"),
        (d + "final_layer_norm.", l + "ln_final."),
    ]
    fused: list[tuple[str, tuple[str, str, str]]] = []
    for i in range(num_layers):
        dl, ll = f"{d}encoder.layers.{i}.", f"{l}transformer.resblocks.{i}."
        pairs += [
            (dl + "layer_norm1.", ll + "ln_1."),
            (dl + "layer_norm2.", ll + "ln_2."),
            (dl + "self_attn.out_proj.", ll + "attn.out_proj."),
            (dl + "mlp.fc1.", ll + "mlp.c_fc."),
            (dl + "mlp.fc2.", ll + "mlp.c_proj."),
        ]
        for kind in ("weight", "bias"):
            fused.append((
                f"{ll}attn.in_proj_{kind}",
                tuple(f"{dl}self_attn.{p}_proj.{kind}" for p in "qkv"),  # type: ignore[misc]
            ))
    return pairs, fused


@dataclass(frozen=True)
class KeyMap:
    """A complete mapping between a diffusers model (three components) and an LDM single-file state dict."""

    pairs: tuple[tuple[str, str], ...]
    conv1x1: frozenset[str]
    fused: tuple[tuple[str, tuple[str, str, str]], ...]
    text_encoder: str  # "clip" or "openclip"
    text_layers: int

    def to_ldm(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers (``unet.``/``vae.``/``text_encoder.`` keys) -> LDM. Raises on any unmapped key."""
        sd = dict(state_dict)
        out: dict[str, torch.Tensor] = {}
        for ldm_key, parts in self.fused:
            missing = [p for p in parts if p not in sd]
            if missing:
                raise ConversionError(f"text encoder weights are incomplete: missing {', '.join(missing)}")
            out[ldm_key] = torch.cat([sd.pop(p) for p in parts], dim=0)
        for key in self.conv1x1:
            if key in sd and sd[key].dim() == 2:
                sd[key] = sd[key][:, :, None, None]
        out.update(_rename(sd, {d: l for d, l in self.pairs}, "diffusers"))
        return out

    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """LDM -> diffusers. Returns (converted weights, LDM-only extras kept for a faithful write-back).

        Raises on any key that is neither mapped, a known extra, nor a known ignorable buffer.
        """
        sd = {k: v for k, v in state_dict.items()
              if k not in _IGNORED_LDM_KEYS and not k.startswith(_IGNORED_LDM_PREFIXES)}
        extras = {k: sd.pop(k) for k in list(sd) if self._is_extra(k)}
        out: dict[str, torch.Tensor] = {}
        for ldm_key, parts in self.fused:
            if ldm_key not in sd:
                raise ConversionError(f"missing {ldm_key}: the text encoder has fewer layers than the model config")
            for part, chunk in zip(parts, sd.pop(ldm_key).chunk(3, dim=0)):
                out[part] = chunk.clone()
        out.update(_rename(sd, {l: d for d, l in self.pairs}, "LDM"))
        for key in self.conv1x1:
            if key in out and out[key].dim() == 4:
                out[key] = out[key][:, :, 0, 0]
        return out, extras

    def ldm_key(self, diffusers_key: str) -> str | None:
        """The LDM key a diffusers key (``unet.``/``vae.``/``text_encoder.`` prefixed) comes from, for messages
        that must name the key as it is in the user's file; None when no rule maps it."""
        for ldm_key, parts in self.fused:
            if diffusers_key in parts:
                return ldm_key
        return _lookup_table({d: l for d, l in self.pairs}, diffusers_key)

    def _is_extra(self, key: str) -> bool:
        """OpenCLIP tensors diffusers' 23-layer text encoder has no place for: layers past the last one it keeps,
        the text projection and logit scale (A1111 and ComfyUI expect them in SD2 files)."""
        if self.text_encoder != "openclip" or not key.startswith(OPENCLIP_ROOT):
            return False
        rest = key[len(OPENCLIP_ROOT):]
        if rest in ("text_projection", "logit_scale"):
            return True
        if rest.startswith("transformer.resblocks."):
            return int(rest.split(".")[2]) >= self.text_layers
        return False


def _lookup_table(table: Mapping[str, str], key: str) -> str | None:
    if key in table:
        return table[key]
    end = len(key)
    while True:
        end = key.rfind(".", 0, end)
        if end < 0:
            return None
        prefix = key[: end + 1]
        if prefix in table:
            return table[prefix] + key[end + 1:]


def _rename(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in sd.items():
        new_key = _lookup_table(table, key)
        if new_key is None:
            unmatched.append(key)
        else:
            out[new_key] = value
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:8])
        more = f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else ""
        raise ConversionError(f"{len(unmatched)} {source} key(s) match no conversion rule: {shown}{more}")
    return out


def build_key_map(configs: Mapping[str, Mapping[str, Any]], text_encoder: str) -> KeyMap:
    """The key map of a model with these diffusers component configs (``unet``, ``vae``, ``text_encoder``)."""
    vae, conv1x1 = vae_pairs(configs["vae"])
    layers = int(configs["text_encoder"]["num_hidden_layers"])
    if text_encoder == "clip":
        text, fused = clip_pairs(), []
    elif text_encoder == "openclip":
        text, fused = openclip_pairs(layers)
    else:
        raise ValueError(f"unknown text encoder kind {text_encoder!r}")
    pairs = unet_pairs(configs["unet"]) + vae + text
    return KeyMap(tuple(pairs), frozenset(conv1x1), tuple(fused), text_encoder, layers)


def normalize_text_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys without the ``text_model.`` prefix (transformers < 5 adds it; >= 5 does not)."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def normalize_ldm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the old SD 1.x layout whose CLIP keys lack ``text_model.`` (transformers < 4.20 at save time)."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(CLIP_ROOT) for k in state_dict):
        return dict(state_dict)
    return {(CLIP_ROOT + k[len(old):] if k.startswith(old) else k): v for k, v in state_dict.items()}


def openclip_completion(extras: Mapping[str, torch.Tensor], text_sd: Mapping[str, torch.Tensor],
                        num_layers: int) -> dict[str, torch.Tensor]:
    """The OpenCLIP tensors an SD2 file needs beyond diffusers' text encoder, for A1111 and ComfyUI.

    Tensors kept from a loaded LDM file are used as they are. Otherwise (a model that came from diffusers) the
    missing final layer is a copy of the last trained one -- SD2 never reads its output, since it conditions on
    the penultimate layer -- the projection is the identity and logit_scale is CLIP's ln(100), as sd-scripts does.
    """
    out = dict(extras)
    last = f"{OPENCLIP_ROOT}transformer.resblocks.{num_layers}."
    if not any(k.startswith(last) for k in out):
        src = f"text_encoder.encoder.layers.{num_layers - 1}."
        layer = {k[len(src):]: v for k, v in text_sd.items() if k.startswith(src)}
        for kind in ("weight", "bias"):
            out[f"{last}attn.in_proj_{kind}"] = torch.cat([layer[f"self_attn.{p}_proj.{kind}"] for p in "qkv"]).clone()
        names = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                 "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
        for d_name, l_name in names.items():
            for kind in ("weight", "bias"):
                out[f"{last}{l_name}{kind}"] = layer[f"{d_name}{kind}"].clone()
    width = text_sd["text_encoder.final_layer_norm.weight"].shape[0]
    dtype = text_sd["text_encoder.final_layer_norm.weight"].dtype
    out.setdefault(OPENCLIP_ROOT + "text_projection", torch.eye(width, dtype=dtype))
    out.setdefault(OPENCLIP_ROOT + "logit_scale", torch.tensor(4.6052, dtype=dtype))
    return out


def detect_text_encoder(state_dict: Iterable[str]) -> str | None:
    """"openclip" (SD 2.x), "clip" (SD 1.x) or None, from an LDM file's text-encoder keys."""
    keys = list(state_dict)
    if any(k.startswith(OPENCLIP_ROOT + "transformer.resblocks.") for k in keys):
        return "openclip"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "clip"
    return None
