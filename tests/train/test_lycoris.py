"""sdtune train --network_module lycoris.kohya: a LoCon and a LoHa trained for two steps, read back by LyCORIS itself
(its create_network_from_weights on the same model), with sd-scripts' metadata; samples made with the network; the
error when LyCORIS is not installed. The training tests need the optional package (pip install lycoris-lora, the
``lycoris`` extra)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.models.io import load_model
from sdtune.train.loop import train
from tests.train.test_train import options

pytestmark = pytest.mark.component

# the tensors of one module of each algorithm (LyCORIS' file format)
ALGO_KEYS = {"locon": ("lora_down.weight", "lora_up.weight"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                                       "hada_w2_b")}


@pytest.fixture
def lycoris_kohya():
    pytest.importorskip("lycoris")
    import lycoris.kohya

    return lycoris.kohya


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_a_lycoris_run_writes_a_file_lycoris_loads_back(prepared, tmp_path, lycoris_kohya, algo):
    from sdtune.train.lycoris_target import text_encoder_root

    opts = options(prepared, tmp_path, network_module="lycoris.kohya", network_dim=4, network_alpha=2.0,
                   network_args=[f"algo={algo}", "conv_dim=2", "conv_alpha=1"], learning_rate=1e-3,
                   max_train_steps=2, output_name="style")
    result = train(opts)
    path = tmp_path / "out" / "style.safetensors"
    assert result["global_step"] == 2 and path.is_file()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": algo, "conv_dim": "2", "conv_alpha": "1", "dropout": None}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "2"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    names = {k.split(".", 1)[0] for k in tensors}
    # the loaders' names: transformers 4's text_model level, diffusers' U-Net paths; conv_in and the ResNets too
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_") for n in names)
    assert {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1"} <= names
    assert any(n.startswith("lora_unet_down_blocks_0_resnets_0_conv1") for n in names)
    for name in names:
        assert all(f"{name}.{suffix}" in tensors for suffix in ALGO_KEYS[algo]), name
    zero_at_start = "lora_up.weight" if algo == "locon" else "hada_w2_a"  # LyCORIS starts with a zero update
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith(zero_at_start))

    # LyCORIS itself rebuilds the network from the file, on the base model, and takes every tensor
    model = load_model(opts.pretrained_model_name_or_path)
    network, weights = lycoris_kohya.create_network_from_weights(
        1.0, str(path), model.vae, text_encoder_root(model.text_encoder), model.unet)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(names)
    network.apply_to(model.text_encoder, model.unet, apply_text_encoder=True, apply_unet=True)
    missing, unexpected = network.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value.float(), weights[key].float(), msg=key)


def test_resume_is_bit_exact_and_network_weights_start_from_a_file(prepared, tmp_path, lycoris_kohya):
    from sdtune.train.loop import Trainer

    common = dict(network_module="lycoris.kohya", network_args=["algo=loha", "rank_dropout=0.2"], learning_rate=1e-2,
                  max_train_steps=4, save_state=True)
    straight = train(options(prepared, tmp_path / "a", save_every_n_steps=2, **common))
    state = tmp_path / "a" / "out" / "step-00000002-state"
    assert (state / "lycoris.safetensors").is_file()
    resumed = train(options(prepared, tmp_path / "b", resume=str(state), **common))
    assert resumed["global_step"] == 4 and resumed["losses"] == straight["losses"][2:]
    a, b = load_file(str(straight["model"])), load_file(str(resumed["model"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    trainer = Trainer(options(prepared, tmp_path / "c", network_weights=str(straight["model"]), **common))
    start = trainer.target.network.state_dict()
    assert all(torch.equal(start[k].float(), a[k].float()) for k in a)


def test_samples_during_training_use_the_network(prepared, tmp_path, lycoris_kohya):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 3 --d 5\n", encoding="utf-8")
    train(options(prepared, tmp_path, network_module="lycoris.kohya", network_args=["algo=loha"], max_train_steps=2,
                  learning_rate=3e-2, sample_prompts=str(prompts), sample_every_n_steps=2))
    with Image.open(tmp_path / "out" / "sample" / "sample_000002_00.png") as image:
        sample = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert main(["generate", "--ckpt", str(prepared("sd1")[0]), "--prompt", "a red square", "--W", "64", "--H", "64",
                 "--steps", "3", "--seed", "5", "--sampler", "ddim", "--outdir", str(tmp_path / "base")]) == 0
    (base,) = (tmp_path / "base").iterdir()
    with Image.open(base) as image:
        assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - sample).mean() > 1


def test_missing_lycoris_package_fails_before_the_model_loads(prepared, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lycoris" else real(name, *a))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sdtune.train.base_model.load_model", no_load)
    with pytest.raises(SdtuneError, match=r"lycoris.kohya needs the LyCORIS package.*pip install lycoris-lora"):
        train(options(prepared, tmp_path, network_module="lycoris.kohya", network_args=["algo=loha"]))
