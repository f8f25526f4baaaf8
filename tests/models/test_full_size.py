"""Full-size SD1.5- and SD2.1-shaped models with random weights: every key maps, both ways.

Slow (about a minute, a few GB of memory) but CI runs it: the tiny models cannot prove that the key maps cover
the real block counts and widths.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from sdtune.models.families import get_family
from sdtune.models.io import load_model
from sdtune.models.save import diffusers_state_dict, ldm_state_dict, save_model
from sdtune.models.sd import StableDiffusion, build_modules
from sdtune.models.tokenizer import packaged_tokenizer

pytestmark = pytest.mark.component


def random_full_size(name: str) -> StableDiffusion:
    family = get_family(name)
    with init_empty_weights(include_buffers=False):
        unet, vae, text = build_modules(family.configs())
    generator = torch.Generator().manual_seed(0)
    for module in (unet, vae, text):
        module.to_empty(device="cpu")
        module.to(torch.float16)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(torch.float16))
    return StableDiffusion(family, unet, vae, text, packaged_tokenizer(family.pad_token))


# Key counts of the released checkpoints' model weights (v1-5-pruned and v2-1_768-ema-pruned, without the DDPM
# schedule buffers and EMA copies): U-Net 686, VAE 248; SD1's CLIP 12 layers x 16 + 4 (+ position_ids), SD2's
# OpenCLIP 24 layers x 12 + 6 (token and positional embeddings, ln_final, text_projection, logit_scale).
EXPECTED_LDM_KEYS = {"sd1": 686 + 248 + 12 * 16 + 4 + 1, "sd2-v": 686 + 248 + 24 * 12 + 6}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd1", "sd2-v"])
def test_full_size_model_converts_both_ways(tmp_path, name):
    model = random_full_size(name)
    ldm = ldm_state_dict(model, torch.float16)
    assert len(ldm) == EXPECTED_LDM_KEYS[name]
    path = save_model(model, tmp_path / "full.safetensors", "safetensors", "fp16")
    del ldm
    back = load_model(path, dtype=torch.float16)  # strict: any missing or unexpected key raises
    original = diffusers_state_dict(model)
    reloaded = diffusers_state_dict(back)
    assert set(original) == set(reloaded)
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert back.family.name == name
    assert back.unet.config.cross_attention_dim == (1024 if name == "sd2-v" else 768)


# ------------------------------------------------------------------------- prediction type of files from elsewhere
@pytest.fixture(scope="module")
def bare_full_sd2() -> dict[str, torch.Tensor]:
    """A full-size random SD 2.x LDM state dict (fp16), built once for the cases below."""
    return ldm_state_dict(random_full_size("sd2-v"), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("case,expected,signal", [
    # (a) the 512-base release's .ckpt carries only its step (diffusers single_file_utils: 875000 -> epsilon)
    ("ckpt_global_step", "epsilon", "global_step 875000"),
    # (b) Stability AI's model spec as sd-scripts writes it (sai_model_spec.py PRED_TYPE_EPSILON)
    ("modelspec_epsilon", "epsilon", "modelspec.prediction_type=epsilon"),
    # (c) ComfyUI's marker: model_base.py state_dict_for_saving adds unet_state_dict["v_pred"] = torch.tensor([])
    ("comfyui_v_pred", "v_prediction", "v_pred"),
])
def test_full_size_sd2_without_sdtune_metadata_is_detected(tmp_path, bare_full_sd2, caplog, case, expected, signal):
    import logging

    from safetensors.torch import save_file

    if case == "ckpt_global_step":
        path = tmp_path / "512-base-ema.ckpt"
        torch.save({"state_dict": bare_full_sd2, "epoch": 0, "global_step": 875000}, str(path))
    elif case == "modelspec_epsilon":
        path = tmp_path / "spec.safetensors"
        save_file(bare_full_sd2, str(path), metadata={
            "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v2-512",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": "Checkpoint", "modelspec.resolution": "512x512", "modelspec.prediction_type": "epsilon"})
    else:
        path = tmp_path / "comfy.safetensors"
        save_file({**bare_full_sd2, "v_pred": torch.tensor([])}, str(path))
    with caplog.at_level(logging.INFO, logger="sdtune.models.prediction"):
        model = load_model(path, dtype=torch.float16)
    assert model.prediction_type == expected
    assert model.family.name == ("sd2" if expected == "epsilon" else "sd2-v")
    assert model.noise_scheduler().config.prediction_type == expected
    decided = [r.getMessage() for r in caplog.records if path.name in r.getMessage()]
    assert any(signal in m for m in decided), decided
    reference = bare_full_sd2["model.diffusion_model.out.2.weight"]
    torch.testing.assert_close(model.unet.conv_out.weight, reference)


@pytest.mark.slow
def test_prepare_and_training_see_the_same_vae_of_a_file_from_elsewhere(tmp_path, bare_full_sd2):
    """prepare loads only the VAE (load_vae), training the whole model (load_model): the same fingerprint, or every
    latent cache of an SD 2.x 768-v file would look stale to training."""
    from safetensors.torch import save_file

    from sdtune.data.latent_cache import vae_fingerprint
    from sdtune.models.io import load_vae

    path = tmp_path / "v2-768.safetensors"
    save_file(bare_full_sd2, str(path))
    alone = load_vae(path, dtype=torch.float16)
    assert alone.config.sample_size == 768
    assert vae_fingerprint(alone) == vae_fingerprint(load_model(path, dtype=torch.float16).vae)
