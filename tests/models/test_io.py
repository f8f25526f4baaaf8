"""Loading and saving every format: round trips, an independent loader, bad files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.errors import ModelLoadError
from sdtune.models import io, save as model_save
from sdtune.models.files import read_state_dict
from sdtune.models.io import load_model, load_vae
from sdtune.models.ldm_keys import OPENCLIP_ROOT
from sdtune.models.save import diffusers_state_dict, ldm_state_dict, save_model
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component

FAMILIES = ["sd1", "sd2-v"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:10]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_diffusers_to_single_file_to_diffusers_is_bit_identical(tmp_path, saved_model, family, fmt):
    source = load_model(saved_model(family, "diffusers_safetensors"))
    single = save_model(source, tmp_path / f"model.{fmt}", fmt)
    back = save_model(load_model(single), tmp_path / "back", "diffusers")
    reloaded = load_model(back)
    assert reloaded.family.name == family
    assert_same_weights(diffusers_state_dict(source), diffusers_state_dict(reloaded))
    # every component actually holds the source's tensors, not a fresh initialisation
    assert torch.equal(reloaded.unet.conv_in.weight, build_tiny(family).unet.conv_in.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_keeps_every_ldm_tensor(tmp_path, saved_model, family):
    path = saved_model(family, "safetensors")
    original, _ = read_state_dict(path)
    again = save_model(load_model(path), tmp_path / "again.safetensors", "safetensors")
    assert_same_weights(original, read_state_dict(again)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_own_single_file_loader_agrees(tmp_path, saved_model, family):
    """An independent implementation of the LDM layout: diffusers' from_single_file."""
    from diffusers import StableDiffusionPipeline

    model = build_tiny(family)
    pipe = StableDiffusionPipeline.from_single_file(
        str(saved_model(family, "safetensors")), config=str(saved_model(family, "diffusers")), local_files_only=True
    )
    theirs = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    theirs.update({f"vae.{k}": v for k, v in pipe.vae.state_dict().items()})
    theirs.update({f"text_encoder.{k.removeprefix('text_model.')}": v for k, v in pipe.text_encoder.state_dict().items()
                   if not k.endswith("position_ids")})
    assert_same_weights(diffusers_state_dict(model), theirs)
    assert pipe.scheduler.config.prediction_type == model.family.prediction_type


def test_sd2_file_carries_full_openclip_layout(saved_model):
    """A1111 and ComfyUI build a 24-layer OpenCLIP with a text projection; diffusers keeps 23 layers."""
    sd, metadata = read_state_dict(saved_model("sd2-v", "safetensors"))
    layers = build_tiny("sd2-v").text_encoder.config.num_hidden_layers
    assert f"{OPENCLIP_ROOT}transformer.resblocks.{layers}.attn.in_proj_weight" in sd
    assert f"{OPENCLIP_ROOT}transformer.resblocks.{layers + 1}.attn.in_proj_weight" not in sd
    width = sd[OPENCLIP_ROOT + "ln_final.weight"].shape[0]
    assert torch.equal(sd[OPENCLIP_ROOT + "text_projection"], torch.eye(width))
    assert sd[OPENCLIP_ROOT + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v"  # the spec's value (sd-scripts: PRED_TYPE_V)


def test_sd1_file_has_hf_clip_layout(saved_model):
    sd, metadata = read_state_dict(saved_model("sd1", "safetensors"))
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in sd
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd and sd["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4
    assert metadata["sdtune.family"] == "sd1"


def test_ckpt_holds_state_dict_epoch_and_step(tmp_path):
    path = save_model(build_tiny("sd1"), tmp_path / "m.ckpt", "ckpt", epoch=3, global_step=120)
    obj = torch.load(path, weights_only=True)
    assert obj["epoch"] == 3 and obj["global_step"] == 120
    assert "model.diffusion_model.out.2.weight" in obj["state_dict"]


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("float", torch.float32)])
def test_save_precision(tmp_path, precision, dtype):
    path = save_model(build_tiny("sd1"), tmp_path / "m.safetensors", "safetensors", precision)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == dtype
        assert f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64
    folder = save_model(build_tiny("sd1"), tmp_path / "d", "diffusers_safetensors", precision)
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == dtype


def test_detects_family_from_weights_without_metadata(tmp_path, saved_model):
    sd, _ = read_state_dict(saved_model("sd2-v", "safetensors"))
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))  # no sdtune metadata: a third-party file
    family = io._single_file_family(bare, sd, {}, None, None, None)
    assert family.name == "sd2-v" and family.v_parameterization
    assert io._single_file_family(bare, sd, {}, None, None, 875000).name == "sd2"  # the 512-base checkpoint
    assert io._single_file_family(bare, sd, {}, None, False, None).prediction_type == "epsilon"
    sd1, _ = read_state_dict(saved_model("sd1", "safetensors"))
    assert io._single_file_family(bare, sd1, {}, None, None, None).name == "sd1"
    with pytest.raises(ModelLoadError, match="--v2"):
        io._single_file_family(bare, sd1, {}, True, None, None)


def test_third_party_file_with_mismatched_family_gives_clear_error(tmp_path, saved_model):
    sd, _ = read_state_dict(saved_model("sd1", "safetensors"))
    bare = tmp_path / "tiny-without-metadata.safetensors"
    save_file(sd, str(bare))  # tiny widths, but no metadata: packaged full-size configs do not fit
    with pytest.raises(ModelLoadError, match="tiny-without-metadata.safetensors.*do not fit"):
        load_model(bare)


def test_v_parameterization_override(saved_model):
    model = load_model(saved_model("sd2-v", "diffusers"), v_parameterization=False)
    assert model.prediction_type == "epsilon"
    assert load_model(saved_model("sd2-v", "diffusers")).prediction_type == "v_prediction"
    assert load_model(saved_model("sd1", "ckpt")).prediction_type == "epsilon"


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_ckpt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload(marker)}, str(evil))
    with pytest.raises(ModelLoadError, match="evil.ckpt.*refused"):
        load_model(evil)
    assert not marker.exists()
    with open(evil.with_suffix(".pkl"), "wb") as f:  # a plain (non-zip) pickle too
        pickle.dump({"state_dict": Payload(marker)}, f)
    with pytest.raises(ModelLoadError, match="refused"):
        read_state_dict(evil.with_suffix(".pkl"))
    assert not marker.exists()


@pytest.mark.parametrize("name,content", [
    ("empty.safetensors", b""),
    ("text.safetensors", b"this is not a model\n" * 10),
    ("text.ckpt", b"this is not a model\n" * 10),
    ("notes.ckpt", b"{\"json\": true}"),
])
def test_non_model_files_give_one_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_model(path)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_truncated_file_gives_clear_error(tmp_path, saved_model, fmt):
    data = saved_model("sd1", fmt).read_bytes()
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=f"truncated.{fmt}"):
        load_model(path)


def test_wrong_model_file_is_named(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, str(path))
    with pytest.raises(ModelLoadError, match="lora.safetensors.*not a Stable Diffusion"):
        load_model(path)


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = save_model(build_tiny("sd1"), tmp_path / "m.safetensors", "safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_save, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(build_tiny("sd1", seed=1), path, "safetensors")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_interrupted_diffusers_save_keeps_previous_folder(tmp_path, monkeypatch):
    folder = save_model(build_tiny("sd1"), tmp_path / "model", "diffusers_safetensors")
    before = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_save, "_write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(build_tiny("sd1", seed=1), folder, "diffusers_safetensors")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_separate_vae_from_folder_and_single_files(tmp_path, saved_model):
    other = build_tiny("sd1", seed=7)
    expected = {k: v for k, v in other.vae.state_dict().items()}
    other.vae.save_pretrained(tmp_path / "vae-folder")
    ldm = {k.removeprefix("first_stage_model."): v for k, v in ldm_state_dict(other).items()
           if k.startswith("first_stage_model.")}
    save_file(ldm, str(tmp_path / "vae-ldm.safetensors"))  # a standalone VAE, as vae-ft-mse-840000 ships
    torch.save({"state_dict": ldm}, str(tmp_path / "vae-ldm.ckpt"))
    for source in (tmp_path / "vae-folder", tmp_path / "vae-ldm.safetensors", tmp_path / "vae-ldm.ckpt"):
        assert_same_weights(expected, load_vae(source).state_dict())
    model = load_model(saved_model("sd1", "safetensors"), vae=tmp_path / "vae-ldm.safetensors")
    assert_same_weights(expected, model.vae.state_dict())
    assert_same_weights(build_tiny("sd1").vae.state_dict(), load_vae(saved_model("sd1", "diffusers")).state_dict())
    assert_same_weights(build_tiny("sd1").vae.state_dict(), load_vae(saved_model("sd1", "ckpt")).state_dict())


def test_hub_id_offline_fails_fast_with_clear_message():
    with pytest.raises(ModelLoadError, match="offline|HF_HUB_OFFLINE"):
        load_model("someone/not-a-cached-model")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere.safetensors"):
        load_model(tmp_path / "nowhere.safetensors")


def test_tokenizer_option_is_used_for_single_files_with_the_familys_padding(tmp_path, saved_model):
    from sdtune.models.tokenizer import packaged_tokenizer

    tok = packaged_tokenizer("<|endoftext|>")  # an SD1-style folder ...
    tok.model_max_length = 123  # ... marked so the test can tell it from the packaged one
    tok.save_pretrained(str(tmp_path / "tok"))
    model = load_model(saved_model("sd2-v", "safetensors"), tokenizer=tmp_path / "tok")
    assert model.tokenizer.model_max_length == 123
    assert model.tokenizer.pad_token == "!" and model.tokenizer.pad_token_id == 0  # ... padded as SD2 needs
    assert load_model(saved_model("sd2-v", "safetensors")).tokenizer.model_max_length == 77
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_model(saved_model("sd1", "safetensors"), tokenizer=tmp_path / "nowhere")


# Key names of the training loss ldm's AutoencoderKL saves with its weights (ldm/modules/losses/contperceptual.py
# LPIPSWithDiscriminator: logvar, perceptual_loss = LPIPS (scaling_layer, net.slice*, lin*), discriminator =
# NLayerDiscriminator (main.*)), as in CompVis' kl-f8 model.ckpt.
VAE_LOSS_KEYS = ("loss.logvar", "loss.perceptual_loss.scaling_layer.shift", "loss.perceptual_loss.net.slice1.0.weight",
                 "loss.perceptual_loss.lin0.model.1.weight", "loss.discriminator.main.0.weight",
                 "loss.discriminator.main.0.bias", "loss.discriminator.main.2.running_mean")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_vae_with_training_loss_keys_loads_and_unknown_keys_are_still_refused(tmp_path, fmt):
    other = build_tiny("sd1", seed=3)
    ldm = {k.removeprefix("first_stage_model."): v for k, v in ldm_state_dict(other).items()
           if k.startswith("first_stage_model.")}
    with_loss = {**ldm, **{k: torch.randn(3) for k in VAE_LOSS_KEYS}}
    path = tmp_path / f"kl-f8.{fmt}"
    if fmt == "ckpt":
        torch.save({"state_dict": with_loss, "global_step": 246803}, str(path))
    else:
        save_file(with_loss, str(path))
    assert_same_weights(other.vae.state_dict(), load_vae(path).state_dict())
    odd = tmp_path / f"odd.{fmt}"
    extra = {**with_loss, "encoder.mystery.weight": torch.zeros(1)}
    torch.save({"state_dict": extra}, str(odd)) if fmt == "ckpt" else save_file(extra, str(odd))
    with pytest.raises(ModelLoadError, match=r"odd\..*encoder\.mystery"):
        load_vae(odd)


def test_full_checkpoint_with_vae_loss_keys_loads(tmp_path, saved_model):
    sd, metadata = read_state_dict(saved_model("sd1", "safetensors"))
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    save_file(sd, str(tmp_path / "merged.safetensors"), metadata=metadata)
    assert_same_weights(build_tiny("sd1").vae.state_dict(), load_model(tmp_path / "merged.safetensors").vae.state_dict())
