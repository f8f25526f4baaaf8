"""sdtune train --network_module lora: learning with the model frozen, the rank/alpha scaling and LoCon layers of
sd-scripts, bit-exact resume, --network_weights, --scale_weight_norms, the file (names, ss_* metadata, hashes),
samples with the LoRA, option errors.

Every expectation is worked out here from sd-scripts' rules (networks/lora.py, library/train_util.py,
train_network.py) or from the base model file, never read back from sdtune's own helpers.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.models.io import load_model
from sdtune.train.loop import Trainer, train
from tests.train.test_train import options

pytestmark = pytest.mark.component

# sd-scripts' networks/lora.py: the classes whose Linear/Conv2d children get a module
UNET_CLASSES = ("Transformer2DModel",)
LOCON_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def lora_options(prepared, tmp_path: Path, family: str = "sd1", **overrides):
    return options(prepared, tmp_path, family, network_module="lora", **overrides)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def expected_names(model, conv: bool) -> dict[str, torch.nn.Module]:
    """sd-scripts' module names: ``lora_unet_`` / ``lora_te_`` + the diffusers / transformers-4 path, dots to
    underscores (the text encoder's path starts with ``text_model.``)."""
    names = {}
    classes = UNET_CLASSES + (LOCON_CLASSES if conv else ())
    for root, prefix, wanted in ((model.unet, "lora_unet", classes), (model.text_encoder, "lora_te", TE_CLASSES)):
        for path, module in root.named_modules():
            if type(module).__name__ not in wanted:
                continue
            if prefix == "lora_te" and not path.startswith("text_model."):
                path = "text_model." + path  # transformers 5 has no text_model level; the files keep it
            for child, layer in module.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    names[f"{prefix}_{path}_{child}".replace(".", "_")] = layer
    return names


def layer_of(model, lora_name: str) -> torch.nn.Module:
    """The layer of ``model`` a LoRA module name stands for (sd-scripts' naming, worked backwards)."""
    for root, prefix in ((model.unet, "lora_unet_"), (model.text_encoder, "lora_te_")):
        for path, layer in root.named_modules():
            full = path if prefix == "lora_unet_" or path.startswith("text_model.") else "text_model." + path
            if prefix + full.replace(".", "_") == lora_name:
                return layer
    raise KeyError(lora_name)


def effective_weight(base_weight: torch.Tensor, sd: dict[str, torch.Tensor], name: str, scale: float) -> torch.Tensor:
    """``W + scale * up @ down``, by hand (up and down flattened; a 3x3 down kernel's taps kept)."""
    delta = sd[f"{name}.lora_up.weight"].flatten(1) @ sd[f"{name}.lora_down.weight"].flatten(1)
    return base_weight + (scale * delta).reshape(base_weight.shape)


def reference_forward(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        out = x @ weight.T
        return out + layer.bias if layer.bias is not None else out
    return torch.nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


def random_input(layer: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(2, 5, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 8, 8, generator=generator)


# ------------------------------------------------------------------------------------------------ one LoCon run
LOCON = dict(network_dim=8, network_alpha=8.0, network_args=["conv_dim=4", "conv_alpha=2"], learning_rate=1e-2,
             max_train_steps=36, train_batch_size=3, output_name="locon", clip_skip=2, max_token_length=150)


@pytest.fixture(scope="module")
def locon(prepared, tmp_path_factory):
    """One 36-step LoCon run (dim 8 / alpha 8, conv_dim 4 / conv_alpha 2), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("locon")
    started = time.time()
    trainer = Trainer(lora_options(prepared, root, **LOCON))
    result = trainer.run()
    return {"trainer": trainer, "result": result, "out": root / "out", "started": started, "finished": time.time()}


def test_a_locon_run_lowers_the_loss_on_its_images(locon):
    losses = np.array(locon["result"]["losses"])
    assert len(losses) == 36 and locon["result"]["global_step"] == 36
    assert losses[-6:].mean() < 0.7 * losses[:6].mean(), losses


def test_the_base_model_stays_bit_identical_and_only_the_lora_file_is_written(prepared, locon):
    trainer = locon["trainer"]
    assert sorted(p.name for p in locon["out"].iterdir()) == ["locon.safetensors"]
    base = load_model(prepared("sd1")[0])
    network = trainer.target.network
    network.remove()
    try:
        for part in ("unet", "text_encoder"):
            module = getattr(trainer.model, part)
            assert not any("forward" in m.__dict__ for m in module.modules()), part  # the hooks are gone
            now, want = module.state_dict(), getattr(base, part).state_dict()
            assert now.keys() == want.keys()
            assert all(torch.equal(now[k].cpu(), want[k]) for k in want), part
            assert not any(p.requires_grad for p in module.parameters())
    finally:
        network.apply_to()


@pytest.mark.parametrize("dim,alpha,scale", [(4, 1.0, 0.25), (8, 8.0, 1.0)])
def test_rank_and_alpha_scale_the_update_as_sd_scripts_does(prepared, tmp_path, dim, alpha, scale):
    """From the saved file, ``W + (alpha / rank) * up @ down`` worked out by hand gives what the hooked layer
    computes, for linear layers, a 1x1 convolution (SD 1.x's proj_in) and text-encoder layers."""
    trainer = Trainer(lora_options(prepared, tmp_path, network_dim=dim, network_alpha=alpha, learning_rate=2e-2,
                                   max_train_steps=3))
    result = trainer.run()
    sd, _ = read_file(result["model"])
    base = load_model(prepared("sd1")[0])
    names = sorted({k.split(".", 1)[0] for k in sd})
    assert all(sd[f"{n}.lora_down.weight"].shape[0] == dim and sd[f"{n}.lora_up.weight"].shape[1] == dim
               for n in names)
    assert all(sd[f"{n}.alpha"].item() == alpha for n in names)
    generator = torch.Generator().manual_seed(0)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_down_blocks_0_attentions_0_proj_in",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        hooked, original = layer_of(trainer.model, name), layer_of(base, name)
        x = random_input(original, generator)
        with torch.no_grad():
            got = hooked(x.to(hooked.weight.device)).cpu()
            plain = original(x)
            want = reference_forward(original, effective_weight(original.weight, sd, name, scale), x)
            unscaled = reference_forward(original, effective_weight(original.weight, sd, name, 1.0), x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert (got - plain).abs().max() > 1e-3, name  # the update is there, far above the tolerance
        if scale != 1:
            assert (unscaled - want).abs().max() > 1e-3, name  # and scaled


def test_without_conv_dim_the_resnet_convolutions_get_no_modules(prepared, tmp_path):
    result = train(lora_options(prepared, tmp_path, max_train_steps=1))
    sd, _ = read_file(result["model"])
    names = {k.split(".", 1)[0] for k in sd}
    assert names == set(expected_names(load_model(prepared("sd1")[0]), conv=False))
    assert not any("resnets" in n or "samplers" in n for n in names)


def test_conv_dim_puts_trained_modules_on_the_resnet_and_sampler_convolutions(prepared, locon):
    """LoCon as sd-scripts builds it: the 3x3 convolutions of the ResNet blocks and down/upsamplers get rank
    conv_dim / conv_alpha; the blocks' linear and 1x1 layers (time_emb_proj, conv_shortcut) dim / alpha."""
    sd, _ = read_file(locon["out"] / "locon.safetensors")
    base = load_model(prepared("sd1")[0])
    layers = expected_names(base, conv=True)
    assert {k.split(".", 1)[0] for k in sd} == set(layers)
    convs = [n for n, layer in layers.items() if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (3, 3)]
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in convs and "lora_unet_mid_block_resnets_1_conv2" in convs
    assert any("downsamplers_0_conv" in n for n in convs) and any("upsamplers_0_conv" in n for n in convs)
    for name, layer in layers.items():
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        rank, want_alpha = (4, 2.0) if name in convs else (8, 8.0)
        assert down.shape[0] == rank and up.shape[1] == rank and alpha.item() == want_alpha, name
        if name in convs:
            assert down.shape == (rank, layer.in_channels, 3, 3) and up.shape == (layer.out_channels, rank, 1, 1)
    assert all(sd[f"{n}.lora_up.weight"].abs().max() > 0 for n in convs)  # trained (they start at zero)
    # a hooked 3x3 convolution computes conv2d with W + (conv_alpha / conv_dim) * up @ down
    generator = torch.Generator().manual_seed(1)
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv"):
        original = layer_of(base, name)
        x = random_input(original, generator)
        with torch.no_grad():
            hooked = layer_of(locon["trainer"].model, name)
            got = hooked(x.to(hooked.weight.device)).cpu()
            want = reference_forward(original, effective_weight(original.weight, sd, name, 2 / 4), x)
            assert (got - original(x)).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ resume, weights
def test_resume_is_bit_exact_mid_epoch(prepared, tmp_path):
    """6 images in 2 buckets of 3, batch 2: 4 batches an epoch; the step-5 state falls in the second epoch.
    Dropout draws from torch's global RNG, seeded per batch: it too repeats after --resume."""
    common = dict(network_dim=4, network_args=["conv_dim=2"], network_dropout=0.1, shuffle_caption=True,
                  lr_scheduler="cosine", lr_warmup_steps=2, learning_rate=1e-2, save_state=True, max_train_steps=8)
    straight = train(lora_options(prepared, tmp_path / "a", save_every_n_steps=5, **common))
    out = tmp_path / "a" / "out"
    state = out / "step-00000005-state"
    assert (state / "lora.safetensors").is_file() and not (state / "unet.safetensors").exists()
    resumed = train(lora_options(prepared, tmp_path / "c", resume=str(state), **common))
    assert resumed["global_step"] == 8 and resumed["losses"] == straight["losses"][5:]
    for a_path, c_path in ((out / "last.safetensors", tmp_path / "c" / "out" / "last.safetensors"),
                           (out / "last-state" / "lora.safetensors",
                            tmp_path / "c" / "out" / "last-state" / "lora.safetensors")):
        a, c = load_file(str(a_path)), load_file(str(c_path))
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert read_file(tmp_path / "c" / "out" / "last.safetensors")[1]["ss_steps"] == "8"


def test_network_weights_start_the_run_from_that_file(prepared, tmp_path):
    common = dict(network_dim=4, network_args=["conv_dim=2"], learning_rate=1e-2, max_train_steps=2)
    first = train(lora_options(prepared, tmp_path / "a", **common))
    saved = load_file(str(first["model"]))
    trainer = Trainer(lora_options(prepared, tmp_path / "b", network_weights=str(first["model"]), **common))
    initial = trainer.target.network.state_dict()
    assert initial.keys() == saved.keys()
    assert all(torch.equal(initial[k].cpu(), saved[k]) for k in saved)
    second = trainer.run()
    # the same seed, batches and noise: the first loss differs only because the network starts from the file
    assert second["losses"][0] != first["losses"][0]
    again = load_file(str(second["model"]))
    assert any(not torch.equal(again[k], saved[k]) for k in saved if k.endswith("weight"))  # trained further


# ------------------------------------------------------------------------------------------------ max norm
def max_norm_reference(sd: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], int, float,
                                                                               float]:
    """sd-scripts' LoRANetwork.apply_max_norm_regularization, on a copy of a state dict: each module's update
    ``(alpha / dim) * up @ down`` (flattened) has its norm clamped to at least max_norm / 2; a norm above max_norm
    scales up and down by sqrt(max_norm / norm). Returns the weights, keys scaled, mean and max norm after."""
    sd = {k: v.detach().clone().float() for k, v in sd.items()}
    keys_scaled, norms = 0, []
    for down_key in [k for k in sd if "lora_down" in k and "weight" in k]:
        up_key, alpha_key = down_key.replace("lora_down", "lora_up"), down_key.replace("lora_down.weight", "alpha")
        down, up, alpha = sd[down_key], sd[up_key], sd[alpha_key]
        updown = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = torch.clamp(norm, max=max_norm) / norm
        if ratio != 1:
            keys_scaled += 1
            sd[up_key] = sd[up_key] * ratio ** 0.5
            sd[down_key] = sd[down_key] * ratio ** 0.5
        norms.append((updown.norm() * ratio).item())
    return sd, keys_scaled, sum(norms) / len(norms), max(norms)


def test_scale_weight_norms_rescales_after_every_step_as_sd_scripts_does(prepared, tmp_path, monkeypatch):
    trainer = Trainer(lora_options(prepared, tmp_path, network_dim=4, network_alpha=4.0, network_args=["conv_dim=2"],
                                   learning_rate=5e-2, max_train_steps=4, scale_weight_norms=0.05))
    network = trainer.target.network
    real = trainer.target.after_update
    seen = []

    def checked():
        before = {k: v.clone() for k, v in network.state_dict().items()}
        want, keys_scaled, mean_norm, max_norm = max_norm_reference(before, 0.05)
        figures = real()
        after = network.state_dict()
        for k in want:
            torch.testing.assert_close(after[k], want[k], rtol=1e-5, atol=1e-8)
        assert int(figures["keys_scaled"]) == keys_scaled
        assert float(figures["average_key_norm"]) == pytest.approx(mean_norm, rel=1e-5)
        assert float(figures["max_key_norm"]) == pytest.approx(max_norm, rel=1e-5)
        seen.append(keys_scaled)
        return figures

    monkeypatch.setattr(trainer.target, "after_update", checked)
    result = trainer.run()
    assert len(seen) == 4 and seen[-1] > 0  # called after every step, and it did scale
    saved, now = load_file(str(result["model"])), network.state_dict()
    assert all(torch.equal(saved[k], now[k].cpu()) for k in saved)  # the file holds the scaled weights
    assert max_norm_reference(saved, 0.05)[3] <= 0.05 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------ the file
def expected_tag_frequency(meta_json: Path) -> dict[str, int]:
    """sd-scripts' fine-tuning dataset: caption + ", " + tags, each comma-separated tag lower-cased and counted."""
    counts: dict[str, int] = {}
    for entry in json.loads(meta_json.read_text(encoding="utf-8")).values():
        caption = ", ".join(x for x in (entry.get("caption"), entry.get("tags")) if x)
        for tag in {t.strip().lower() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return counts


def check_addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """sd-scripts' precalculate_safetensors_hashes: the tensors saved with only the ss_* metadata; the model hash
    is the sha256 of what follows the 8-byte length and the header, the legacy hash the first 8 hex digits of the
    sha256 of the 0x10000 bytes at 0x100000."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_the_file_has_sd_scripts_names_metadata_and_hashes(prepared, locon):
    path = locon["out"] / "locon.safetensors"
    tensors, meta = read_file(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                         ".alpha")) for k in tensors)
    _, train_dir, meta_json = prepared("sd1")
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8.0")
    network_args = json.loads(meta["ss_network_args"])  # the strings as given (sd-scripts adds "dropout")
    assert {k: network_args[k] for k in ("conv_dim", "conv_alpha")} == {"conv_dim": "4", "conv_alpha": "2"}
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert (meta["ss_clip_skip"], meta["ss_max_token_length"]) == ("2", "150")
    assert meta["ss_output_name"] == "locon"
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("36", "18")  # 6 images in 2 buckets of 3, batch 3
    assert meta["ss_resolution"] == "(64, 64)"  # the data's max_resolution 64,64 (conftest), as sd-scripts' tuple
    images = len(json.loads(meta_json.read_text(encoding="utf-8")))
    assert json.loads(meta["ss_dataset_dirs"]) == {meta_json.name: {"n_repeats": 1, "img_count": images}}
    assert json.loads(meta["ss_tag_frequency"]) == {meta_json.name: expected_tag_frequency(meta_json)}
    assert 0 <= int(meta["ss_session_id"]) < 2**32
    assert locon["started"] <= float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"]) \
        <= locon["finished"]
    assert path.stat().st_size > 0x110000  # the legacy hash covers real tensor bytes
    check_addnet_hashes(tensors, meta)


def test_an_sd2_v_file_says_so_and_keeps_sd_scripts_text_encoder_names(prepared, tmp_path):
    result = train(lora_options(prepared, tmp_path, "sd2-v", max_train_steps=1, learning_rate=1e-2))
    tensors, meta = read_file(result["model"])
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", "sd_v2_v")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert {k.split(".", 1)[0] for k in tensors} == set(expected_names(load_model(prepared("sd2-v")[0]), conv=False))
    assert "ss_network_args" not in meta or json.loads(meta["ss_network_args"]) == {}
    check_addnet_hashes(tensors, meta)


# ------------------------------------------------------------------------------------------------ samples
def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_samples_during_training_are_the_images_of_generate_with_the_saved_lora(prepared, tmp_path):
    """The sample of step 3 is the image ``sdtune generate --lora`` makes with the LoRA saved at step 3 (no dropout
    at sampling), not the base model's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 3 --d 5\n", encoding="utf-8")
    train(lora_options(prepared, tmp_path, max_train_steps=4, learning_rate=3e-2, network_args=["conv_dim=4"],
                       network_dropout=0.3, sample_prompts=str(prompts), sample_every_n_steps=3, save_every_n_steps=3))
    sample = pixels(tmp_path / "out" / "sample" / "sample_000003_00.png")
    step3 = tmp_path / "out" / "step-00000003.safetensors"  # the weights at the time of the sample
    args = ["generate", "--ckpt", str(prepared("sd1")[0]), "--prompt", "a red square", "--W", "64", "--H", "64",
            "--steps", "3", "--seed", "5", "--sampler", "ddim"]
    assert main([*args, "--lora", str(step3), "--outdir", str(tmp_path / "with")]) == 0
    assert main([*args, "--outdir", str(tmp_path / "without")]) == 0
    (with_lora,), (without,) = (tmp_path / "with").iterdir(), (tmp_path / "without").iterdir()
    assert np.abs(pixels(with_lora) - sample).max() <= 1
    assert np.abs(pixels(without) - sample).mean() > 1


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("overrides,message", [
    (dict(network_dim=8), "--network_dim needs --network_module"),
    (dict(network_module="lora", hypernetwork_module="default"), "--network_module and --hypernetwork_module"),
    (dict(network_module="lora", train_text_encoder=True), "--train_text_encoder with --network_module"),
    (dict(network_module="lora", network_train_unet_only=True, network_train_text_encoder_only=True),
     "--network_train_unet_only and --network_train_text_encoder_only"),
    (dict(network_module="lora", network_args=["conv_rank=4"]), "--network_args conv_rank.*conv_dim"),
    (dict(network_module="lora", network_args=["conv_dim"]), "--network_args 'conv_dim': expected key=value"),
    (dict(network_module="lora", network_args=["conv_dim=0"]), "--network_args conv_dim=0: must be 1 or more"),
    (dict(network_module="lora", save_model_as="diffusers"), "--save_model_as diffusers"),
    (dict(network_module="lora", network_weights="missing.safetensors"),
     "--network_weights missing.safetensors: no such file"),
])
def test_bad_lora_options_fail_before_the_model_loads(prepared, tmp_path, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("sdtune.train.base_model.load_model", no_loading)
    with pytest.raises(SdtuneError, match=message):
        Trainer(options(prepared, tmp_path, **overrides)).run()


def test_networks_lora_is_the_same_module_as_lora(prepared, tmp_path):
    a = train(lora_options(prepared, tmp_path / "a", max_train_steps=2, learning_rate=1e-2))
    b = train(options(prepared, tmp_path / "b", network_module="networks.lora", max_train_steps=2, learning_rate=1e-2))
    assert a["losses"] == b["losses"]
    x, y = load_file(str(a["model"])), load_file(str(b["model"]))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert read_file(b["model"])[1]["ss_network_module"] == "networks.lora"
