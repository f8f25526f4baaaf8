"""sdtune's LoRA files as other programs load them: diffusers' ``StableDiffusionPipeline.load_lora_weights`` (with
PEFT) and ComfyUI's LoRA key mapping, re-stated below. Each loader must use every key of the file, and the weights
it patches must equal those of :func:`sdtune.models.lora.merge_lora_into`.

ComfyUI's mapping (comfyanonymous/ComfyUI comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip`` and
comfy/utils.py ``unet_to_diffusers``, read at commit 00728eb2): a U-Net LoRA name is ``lora_unet_`` + a diffusers
U-Net weight's path without ``.weight``, dots turned to underscores; the weight is patched in the LDM checkpoint under
the LDM name that diffusers path has. A text-encoder name ``lora_te_text_model_encoder_layers_<b>_<c>`` patches
``text_model.encoder.layers.<b>.<c'>.weight`` of the HF-layout CLIP (SD 2.x's OpenCLIP converted to it), with ``c``
one of mlp_fc1, mlp_fc2, self_attn_{q,k,v,out}_proj. The patch of a "lora" entry is
``W += strength * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)``.

The tiny-model checks run on three LoRA files of each family: one with random weights (every module's rank and
alpha set), one written by a real ``sdtune train --network_module lora`` run (a LoCon with a text-encoder LoRA) and
one written by ``sdtune extract-lora`` from a model and a changed copy of it. The full-size check (SD 1.5 and SD 2.1
base shapes, random weights) uses a LoCon trained by sdtune's own loop, one step, and checks both loaders; not an
extracted one: extracting from a full-size pair takes about 10 minutes per model on a CPU (the SVD of ~350 layers,
the widest 1280 x 11520).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from sdtune.models.ldm_keys import normalize_text_keys
from sdtune.models.lora import lora_names, merge_lora_into, network_metadata, read_lora
from sdtune.models.save import ldm_state_dict
from sdtune.models.tiny import build_tiny
from tests.models.lora_helpers import random_lora

pytestmark = pytest.mark.component

FAMILIES = ["sd1", "sd2-v"]
SOURCES = ["random", "trained", "extracted"]
WEIGHT = 0.8


# ------------------------------------------------------------------------------ the LoRA files
def train_lora(family: str, model: Path, root: Path) -> Path:
    """``sdtune train --network_module lora`` on the tiny model: 3 steps of a LoCon (conv_dim 2) with a
    text-encoder LoRA, alpha = rank and a high learning rate, so that the up weights (zero at the start) are far
    from zero."""
    from accelerate.state import AcceleratorState

    from sdtune.cli import main
    from sdtune.data.metadata import save_metadata
    from sdtune.data.prepare import PrepareOptions, prepare_latents
    from sdtune.models.io import load_vae
    from tests.train.conftest import make_images

    train_dir = root / "train"
    save_metadata(root / "meta.json", make_images(train_dir, 4))
    prepare_latents(PrepareOptions(train_data_dir=train_dir, in_json=root / "meta.json",
                                   out_json=root / "meta_lat.json", model_name_or_path=str(model),
                                   max_resolution="64,64", min_bucket_reso=32, max_bucket_reso=128,
                                   bucket_reso_steps=32, max_data_loader_n_workers=0), load_vae(model))
    try:
        assert main(["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(root / "meta_lat.json"),
                     "--train_data_dir", str(train_dir), "--output_dir", str(root / "out"), "--network_module",
                     "lora", "--network_dim", "4", "--network_alpha", "4", "--network_args", "conv_dim=2",
                     "--max_train_steps", "3", "--train_batch_size", "2", "--learning_rate", "1e-2", "--seed", "5",
                     "--max_data_loader_n_workers", "0"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)  # accelerate's process-wide state
    return root / "out" / "last.safetensors"


def extract_lora_file(family: str, root: Path) -> Path:
    """``sdtune extract-lora --dim 4 --conv_dim 2`` from the tiny model to a copy whose U-Net and text-encoder
    weights (every layer a LoRA may hold) were changed at random."""
    from sdtune.cli import main
    from sdtune.models.lora import model_targets
    from sdtune.models.save import save_model

    base = build_tiny(family)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model_targets(tuned).values():
            layer.weight.add_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
    save_model(base, root / "base.safetensors")
    save_model(tuned, root / "tuned.safetensors")
    out = root / "extracted.safetensors"
    assert main(["extract-lora", "--model_org", str(root / "base.safetensors"), "--model_tuned",
                 str(root / "tuned.safetensors"), "--save_to", str(out), "--dim", "4", "--conv_dim", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, saved_model) -> Callable[[str, str], Path]:
    """lora_file(source, family) -> a LoRA .safetensors for ``build_tiny(family)``, made once per module."""
    cache: dict[tuple[str, str], Path] = {}

    def get(source: str, family: str) -> Path:
        if (source, family) not in cache:
            root = tmp_path_factory.mktemp(f"lora-{source}-{family}")
            if source == "random":
                base = build_tiny(family)
                network = random_lora(base)
                cache[source, family] = network.save(root / "random.safetensors", network_metadata(
                    base.family, 4, 2.0, {"conv_dim": 3, "conv_alpha": 1.5}, title="random"))
            elif source == "trained":
                cache[source, family] = train_lora(family, saved_model(family, "diffusers_safetensors"), root)
            else:
                cache[source, family] = extract_lora_file(family, root)
            check_lora_file(cache[source, family], family)
        return cache[source, family]

    return get


def check_lora_file(path: Path, family: str) -> None:
    """What makes the agreement below mean something: modules on the text encoder, the U-Net's attention and its
    3x3 convolutions (LoCon), and updates large enough that a wrong or missing patch cannot pass as rounding."""
    lora, _ = read_lora(path)
    names = lora_names(lora)
    assert any(n.startswith("lora_te_") for n in names) and any("attn" in n for n in names)
    assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in lora.items() if k.endswith("lora_down.weight"))
    ups = [k for k in lora if k.endswith("lora_up.weight")]
    assert sum(bool(lora[k].any()) for k in ups) > 0.5 * len(ups)
    base = build_tiny(family)
    merged = copy.deepcopy(base)
    merge_lora_into(merged, lora, WEIGHT)
    before = base.unet.state_dict()
    change = max(float((v - before[k]).abs().max()) for k, v in merged.unet.state_dict().items())
    assert change > 1e-3, change  # 1000 x the comparisons' atol


# ------------------------------------------------------------------------------ ComfyUI's key map, in the test's words
# diffusers ResNet layer -> LDM ResBlock layer
RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}


def ldm_block_paths(unet_config: dict) -> dict[str, str]:
    """diffusers U-Net block path -> LDM block path (for the blocks LoRA touches: ResNets, attentions, samplers),
    walking the U-Net as the LDM layout numbers it."""
    levels = len(unet_config["block_out_channels"])
    per_level = unet_config["layers_per_block"]
    paths: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for i in range(per_level):
            paths[f"down_blocks.{level}.resnets.{i}"] = f"input_blocks.{index}.0"
            paths[f"down_blocks.{level}.attentions.{i}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            paths[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    paths["mid_block.resnets.0"] = "middle_block.0"
    paths["mid_block.attentions.0"] = "middle_block.1"
    paths["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for level, kind in enumerate(unet_config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for i in range(per_level + 1):
            paths[f"up_blocks.{level}.resnets.{i}"] = f"output_blocks.{index}.0"
            paths[f"up_blocks.{level}.attentions.{i}"] = f"output_blocks.{index}.1"
            if i == per_level and level < levels - 1:
                paths[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return paths


def ldm_unet_key(diffusers_key: str, blocks: dict[str, str]) -> str | None:
    """The LDM key (``diffusion_model.`` less the ``model.`` root) of a diffusers U-Net weight, or None."""
    for prefix in sorted(blocks, key=len, reverse=True):
        if diffusers_key.startswith(prefix + "."):
            rest = diffusers_key[len(prefix) + 1:]
            if ".resnets." in prefix:
                layer, _, tail = rest.partition(".")
                if layer not in RESNET_LAYERS:
                    return None
                rest = f"{RESNET_LAYERS[layer]}.{tail}"
            return f"{blocks[prefix]}.{rest}"
    return None


CLIP_LAYERS = {"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "self_attn_q_proj": "self_attn.q_proj",
               "self_attn_k_proj": "self_attn.k_proj", "self_attn_v_proj": "self_attn.v_proj",
               "self_attn_out_proj": "self_attn.out_proj"}


def comfy_key_map(model) -> dict[str, tuple[str, str]]:
    """LoRA name -> ("unet", LDM U-Net key) or ("clip", HF text-encoder key), as ComfyUI builds it."""
    blocks = ldm_block_paths(dict(model.unet.config))
    key_map: dict[str, tuple[str, str]] = {}
    for key in model.unet.state_dict():
        if key.endswith(".weight"):
            ldm = ldm_unet_key(key, blocks)
            if ldm is not None:
                key_map["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = ("unet", ldm)
    for b in range(model.text_encoder.config.num_hidden_layers):
        for c, layer in CLIP_LAYERS.items():
            key_map[f"lora_te_text_model_encoder_layers_{b}_{c}"] = ("clip", f"encoder.layers.{b}.{layer}.weight")
    return key_map


def comfy_patch(ldm_unet: dict, clip: dict, lora: dict, strength: float, key_map) -> set[str]:
    """Patch ``ldm_unet`` (LDM U-Net keys) and ``clip`` (HF keys) in place as ComfyUI's load_lora + weight patching
    do; returns the LoRA keys it used."""
    used = set()
    for name in {k.split(".", 1)[0] for k in lora}:
        if name not in key_map or f"{name}.lora_up.weight" not in lora:
            continue
        where, key = key_map[name]
        target = ldm_unet if where == "unet" else clip
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        alpha = float(lora[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in lora else 1.0
        diff = (up.flatten(1) @ down.flatten(1)).reshape(target[key].shape)
        target[key] = (target[key].float() + diff.mul_(strength * alpha)).to(target[key].dtype)
        used |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"} & set(lora)
    return used


def check_with_comfy(base, merged, lora, strength, rtol=1e-5, atol=1e-6) -> None:
    key_map = comfy_key_map(base)
    root = "model.diffusion_model."
    ldm_unet = {k[len(root):]: v for k, v in ldm_state_dict(base).items() if k.startswith(root)}
    clip = normalize_text_keys(base.text_encoder.state_dict())
    clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    used = comfy_patch(ldm_unet, clip, lora, strength, key_map)
    assert used == set(lora), sorted(set(lora) - used)[:5]  # ComfyUI would warn "lora key not loaded"
    want_unet = {k[len(root):]: v for k, v in ldm_state_dict(merged).items() if k.startswith(root)}
    want_clip = {k.removeprefix("text_model."): v for k, v in
                 normalize_text_keys(merged.text_encoder.state_dict()).items()}
    assert set(want_unet) == set(ldm_unet) and set(want_clip) == set(clip)
    for key in ldm_unet:
        torch.testing.assert_close(ldm_unet[key], want_unet[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
    for key in clip:
        torch.testing.assert_close(clip[key], want_clip[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_mapping_uses_every_key_and_patches_as_merge(lora_file, family, source):
    base = build_tiny(family)
    lora, _ = read_lora(lora_file(source, family))
    merged = copy.deepcopy(base)
    merge_lora_into(merged, lora, WEIGHT)
    check_with_comfy(base, merged, lora, WEIGHT)


def test_comfyui_mapping_is_not_trivially_satisfied():
    """The check can fail: a LoRA merged at another weight, or a name ComfyUI does not know, is caught."""
    base = build_tiny("sd1")
    lora = random_lora(base).state_dict()
    merged = copy.deepcopy(base)
    merge_lora_into(merged, lora, 0.5)
    with pytest.raises(AssertionError):
        check_with_comfy(base, merged, lora, WEIGHT)
    renamed = {k.replace("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attns_0_proj_in"):
               v for k, v in lora.items()}
    with pytest.raises(AssertionError):
        check_with_comfy(base, merged, renamed, 0.5)


# ------------------------------------------------------------------------------ diffusers
def diffusers_patched(model, path, strength: float, caplog) -> int:
    """Load the file with diffusers' own LoRA loader into a pipeline of ``model``'s modules (in place), fuse it
    into the weights and unload the adapter. Returns the number of layers PEFT wrapped."""
    pytest.importorskip("peft", reason="diffusers loads LoRAs through PEFT (pip install peft)")
    import peft
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(model.family.scheduler_config())
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    caplog.clear()  # only what the loader says
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))  # diffusers raises on a kohya key it cannot convert
    unused = [r.getMessage() for r in caplog.records
              if re.search(r"unexpected|not found|missing", r.getMessage(), re.I)]
    assert not unused, unused[:3]
    wrapped = sum(isinstance(m, peft.tuners.lora.LoraLayer)
                  for m in list(model.unet.modules()) + list(model.text_encoder.modules()))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return wrapped


def assert_same_weights(got, want, rtol=1e-5, atol=1e-6) -> None:
    for part in ("unet", "text_encoder"):
        a = normalize_text_keys(getattr(got, part).state_dict())
        b = normalize_text_keys(getattr(want, part).state_dict())
        assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{part} {key}: {m}")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_every_module_and_patches_as_merge(lora_file, family, source, caplog):
    base = build_tiny(family)
    path = lora_file(source, family)
    lora, _ = read_lora(path)
    merged = copy.deepcopy(base)
    merge_lora_into(merged, lora, WEIGHT)
    theirs = copy.deepcopy(base)
    assert diffusers_patched(theirs, path, WEIGHT, caplog) == len(lora_names(lora))
    assert_same_weights(theirs, merged)


# ------------------------------------------------------------------------------ full size
def latent_dataset(root: Path, model_path: Path, count: int, resolution: int) -> tuple[Path, Path]:
    """``count`` images with captions, metadata and latent files as ``sdtune prepare`` writes them (random latents;
    cache keys and VAE fingerprint valid for the saved model, so training never runs the VAE): bench/bench_gpu.py's
    ``write_dataset``, the one writer of such data."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[2] / "bench" /
                                                  "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    return bench_gpu.write_dataset(root, model_path, count, resolution)


def train_full_size_lora(model_path: Path, root: Path) -> Path:
    """One step of sdtune's own training loop on the saved full-size model: a LoCon (rank 4, alpha 2; 3x3
    convolutions rank 2, alpha 1) with a text-encoder LoRA, batch 1 of one 64 px image, float32 (the fastest on a
    CPU). One Adam step moves each up weight (zero at the start) by up to the learning rate."""
    from accelerate.state import AcceleratorState

    from sdtune.train.loop import TrainOptions, train

    train_dir, meta = latent_dataset(root, model_path, 1, 64)
    try:
        result = train(TrainOptions(
            pretrained_model_name_or_path=str(model_path), in_json=str(meta), train_data_dir=str(train_dir),
            output_dir=str(root / "out"), network_module="lora", network_dim=4, network_alpha=2,
            network_args=["conv_dim=2", "conv_alpha=1"], max_train_steps=1, learning_rate=1e-3,
            train_batch_size=1, mixed_precision="no", seed=0, max_data_loader_n_workers=0))
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)  # accelerate's process-wide state
    assert result["global_step"] == 1 and result["encoded_on_the_fly"] == 0
    return Path(result["model"])


def release_memory() -> None:
    """Collect, and hand what malloc keeps of the freed full-size tensors back to the system (glibc's
    ``malloc_trim``; elsewhere nothing): the next model's allocations would come on top of it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_trained_lora_loads_in_comfyui_and_diffusers_as_merged(tmp_path, family, caplog):
    """A random SD 1.5- / SD 2.1-base-shaped model, a LoCon trained on it by sdtune (one step): diffusers'
    ``load_lora_weights`` wraps a layer for every module of the file (no unused-key warning) and ComfyUI's key map
    uses every key, and the weights each patches equal ``merge_lora_into``'s, all in float32 (a CPU's fp16
    arithmetic is several times slower, and float32 makes the comparison tight: a one-step LoRA's updates, RMS
    mostly 1e-6 to 1e-4 a layer, are far above float32 rounding and about fp16's).

    One model in memory: the fp16 model is built, saved and dropped before training (the trainer loads its own),
    then loaded back in float32. diffusers fuses the file into it (``fuse_lora``, its own code, in place, about
    as fast as computing each PEFT layer's delta); then, a slice of modules at a time, each layer's patched
    weight is kept, its base weight read back from the saved file into the layer, ComfyUI's patch computed from
    it, merge_lora_into merges the slice in place, and the layer is compared with both. On a 2-core CPU (one
    torch thread): SD 1.5 about 75 s and 6 GB at most, SD 2.1 about 85 s and 7 GB."""
    # diffusers' and transformers' modules imported before the model is built: a lazy import's failure logged with
    # its traceback (bitsandbytes' CPU kernels) holds the frames it ran in, and pytest's log capture holds the
    # record, so a model built in those frames would never be freed
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from safetensors import safe_open
    from transformers import CLIPTextModel  # noqa: F401

    from sdtune.models.io import load_model
    from sdtune.models.lora import model_targets
    from sdtune.models.save import save_model
    from tests.models.lora_helpers import full_size_fp16

    model = full_size_fp16(family)
    model_path = save_model(model, tmp_path / "model", "diffusers_safetensors", "fp16")
    del model
    release_memory()
    path = train_full_size_lora(model_path, tmp_path)
    release_memory()  # the trainer's model: else the float32 model below comes on top of what malloc kept

    # the file: a LoCon with a text-encoder LoRA as sdtune trained it
    lora, metadata = read_lora(path)
    names = lora_names(lora)
    assert sum(n.startswith("lora_te_") for n in names) == (12 if family == "sd1" else 23) * 6
    assert sum(".lora_down.weight" in k and v.dim() == 4 and v.shape[-1] == 3 for k, v in lora.items()) > 40
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_steps"] == "1" and '"conv_dim": "2"' in metadata["ss_network_args"]
    # trained (the up weights start at zero: every module's update is non-zero), and by enough that a missing patch
    # cannot pass as rounding: the RMS of each module's update, ||up @ down||_F / sqrt(numel) from the rank x rank
    # Gram matrices, is above 1e-6 for 9 modules in 10, several times the comparisons' tolerance over the whole
    # layer (atol 1e-7 + rtol 1e-6 x |W|, |W| about 0.03)
    rms = []
    for n in names:
        up, down = lora[f"{n}.lora_up.weight"].flatten(1).double(), lora[f"{n}.lora_down.weight"].flatten(1).double()
        scale = WEIGHT * float(lora[f"{n}.alpha"]) / down.shape[0]
        numel = up.shape[0] * down.shape[1]
        rms.append(scale * (float(torch.trace((up.T @ up) @ (down @ down.T))) / numel) ** 0.5)
    assert min(rms) > 0 and sorted(rms)[len(rms) // 10] > 1e-6, sorted(rms)[:: len(rms) // 10]

    # diffusers: every module wrapped, no unused key; fused in float32 into the model
    model = load_model(model_path)  # float32: the fp16 weights cast exactly
    assert diffusers_patched(model, path, WEIGHT, caplog) == len(names)

    # ComfyUI and merge_lora_into, a slice of modules at a time: each layer's diffusers-patched weight is kept, its
    # base weight read back from the saved file into the layer, ComfyUI's patch computed from it (comfy_patch makes
    # new tensors), merge_lora_into merges the slice in place, and the layer is compared with both
    key_map = comfy_key_map(model)
    assert set(names) <= set(key_map)
    targets = model_targets(model)
    where = {id(m): ("unet", p) for p, m in model.unet.named_modules()}
    where.update({id(m): ("text_encoder", p) for p, m in model.text_encoder.named_modules()})
    files = {part: next((model_path / part).glob("*.safetensors")) for part in ("unet", "text_encoder")}
    file_keys = {}
    for part, file in files.items():
        with safe_open(str(file), "pt") as f:
            file_keys[part] = {k.removeprefix("text_model."): k for k in f.keys()}
    saved = {}  # LoRA name -> (part, key) of its layer's weight in the saved (fp16) files
    for name in names:
        part, module_path = where[id(targets[name])]
        saved[name] = part, file_keys[part][f"{module_path}.weight".removeprefix("text_model.")]
    del where
    # sdtune's LDM layout of the model (views of its weights): where ComfyUI's key must find the merged layer
    root = "model.diffusion_model."
    merged_ldm = {k[len(root):]: v for k, v in ldm_state_dict(model).items() if k.startswith(root)}
    merged_clip = {k.removeprefix("text_model."): v for k, v in
                   normalize_text_keys(model.text_encoder.state_dict()).items()}
    chunks: list[list[str]] = [[]]
    size = 0
    for name in names:  # slices of up to 40 M weights: two float32 copies of a slice at a time
        size += targets[name].weight.numel()
        if size > 40_000_000 and chunks[-1]:
            chunks.append([])
            size = targets[name].weight.numel()
        chunks[-1].append(name)
    used: set[str] = set()
    with torch.no_grad():
        for chunk in chunks:
            part_lora = {k: v for k, v in lora.items() if k.split(".", 1)[0] in chunk}
            diffusers_weights, ldm_unet, clip = {}, {}, {}
            for part in files:
                with safe_open(str(files[part]), "pt") as f:  # opened per slice: its mapped pages go with it
                    for name in chunk:
                        if saved[name][0] == part:
                            weight = targets[name].weight
                            diffusers_weights[name] = weight.clone()
                            weight.copy_(f.get_tensor(saved[name][1]))  # fp16 -> float32, exact
                            side, key = key_map[name]
                            (ldm_unet if side == "unet" else clip)[key] = weight  # comfy_patch makes new tensors
            used |= comfy_patch(ldm_unet, clip, part_lora, WEIGHT, key_map)
            merge_lora_into(model, part_lora, WEIGHT)
            for name in chunk:
                side, key = key_map[name]
                merged = (merged_ldm if side == "unet" else merged_clip)[key]
                assert merged.data_ptr() == targets[name].weight.data_ptr()  # ComfyUI's key is this layer's
                comfy = (ldm_unet if side == "unet" else clip)[key]
                torch.testing.assert_close(comfy, merged, rtol=1e-6, atol=1e-7, msg=lambda m: f"ComfyUI {key}: {m}")
                torch.testing.assert_close(diffusers_weights.pop(name), merged, rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"diffusers {name}: {m}")
    assert used == set(lora), sorted(set(lora) - used)[:5]  # ComfyUI would warn "lora key not loaded"
    del model, targets, merged_ldm, merged_clip, ldm_unet, clip, merged, comfy
    release_memory()
