"""The .pt file: AUTOMATIC1111's keys and types, weights_only loading, round trips, NovelAI files, A1111's load
defaults, ComfyUI's reading of it, and errors that name the file."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.models.hypernetwork import Hypernetwork, attention_sizes
from sdtune.models.hypernetwork_layout import HypernetworkConfig
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component

METADATA_TYPES = {
    "layer_structure": list, "activation_func": str, "is_layer_norm": bool, "weight_initialization": str,
    "use_dropout": bool, "dropout_structure": list, "last_layer_dropout": bool, "activate_output": bool,
    "step": int, "name": str, "sd_checkpoint": (str, type(None)), "sd_checkpoint_name": (str, type(None)),
    "optional_info": (str, type(None)),
}


def trained_like(sizes, config: HypernetworkConfig = HypernetworkConfig(), seed: int = 0) -> Hypernetwork:
    """A hypernetwork with weights far from its initialisation (every tensor, LayerNorms included, random)."""
    hn = Hypernetwork(sizes, config, name="mine", step=12, sd_checkpoint="0123456789", sd_checkpoint_name="base")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return hn.eval()


def outputs(hn: Hypernetwork, seed: int = 5) -> dict[tuple[int, int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return {(d, i): m(torch.randn(2, 7, d, generator=g)) for d in hn.sizes for i, m in enumerate(hn.pair(d))}


# ------------------------------------------------------------------------------------------------ the format
def test_file_has_exactly_a1111s_keys_and_types_and_loads_weights_only(tmp_path):
    hn = trained_like([32, 64])
    hn.optional_info = "note"
    path = hn.save(tmp_path / "mine.pt")
    data = torch.load(path, weights_only=True)
    assert set(data) == {32, 64} | set(METADATA_TYPES)
    for key, kind in METADATA_TYPES.items():
        assert isinstance(data[key], kind), key
    assert data["layer_structure"] == [1.0, 2.0, 1.0] and all(isinstance(x, float) for x in data["layer_structure"])
    assert data["activation_func"] == "linear" and data["weight_initialization"] == "Normal"
    assert data["activate_output"] is False and data["is_layer_norm"] is False
    assert data["use_dropout"] is False and data["last_layer_dropout"] is False
    assert data["dropout_structure"] == [0.0, 0.0, 0.0]
    assert (data["step"], data["name"], data["sd_checkpoint"]) == (12, "mine", "0123456789")
    for d in (32, 64):
        pair = data[d]
        assert isinstance(pair, tuple) and len(pair) == 2
        for state in pair:
            assert list(state) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
            assert state["linear.0.weight"].shape == (2 * d, d) and state["linear.1.weight"].shape == (d, 2 * d)
            assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # written atomically: no temporary left


@pytest.mark.parametrize("options", [("1,2,1", "linear", False, None), ("1,2,1", "relu", True, "0.3"),
                                     ("1,1.5,1.5,1", "mish", False, "0,0.1,0.2,0")])
def test_round_trip_gives_the_same_layout_and_outputs(tmp_path, options):
    config = HypernetworkConfig.from_options(*options)
    hn = trained_like([32, 64], config)
    loaded = Hypernetwork.load(hn.save(tmp_path / "a.pt")).eval()
    assert loaded.config == config and loaded.sizes == [32, 64]
    assert (loaded.name, loaded.step, loaded.sd_checkpoint_name) == ("mine", 12, "base")
    expected, got = outputs(hn), outputs(loaded)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_save_precision_fp16_loads_back_into_float32(tmp_path):
    hn = trained_like([32])
    data = torch.load(hn.save(tmp_path / "h.pt", torch.float16), weights_only=True)
    assert data[32][0]["linear.0.weight"].dtype == torch.float16
    loaded = Hypernetwork.load(tmp_path / "h.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


# ------------------------------------------------------------------------------------------------ other writers
def test_novelai_files_with_linear1_linear2_and_no_metadata_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {}
    nai = {}
    for d in (32, 64):
        pair = []
        for _ in range(2):
            w1, b1 = torch.randn(2 * d, d, generator=g) * 0.1, torch.randn(2 * d, generator=g) * 0.1
            w2, b2 = torch.randn(d, 2 * d, generator=g) * 0.1, torch.randn(d, generator=g) * 0.1
            pair.append(OrderedDict([("linear1.weight", w1), ("linear1.bias", b1), ("linear2.weight", w2),
                                     ("linear2.bias", b2)]))
            weights[d, len(pair) - 1] = (w1, b1, w2, b2)
        nai[d] = pair  # NovelAI: a list, not a tuple
    torch.save(nai, tmp_path / "anime.pt")
    hn = Hypernetwork.load(tmp_path / "anime.pt")
    assert hn.name == "anime" and hn.step == 0 and hn.config == HypernetworkConfig(activate_output=True)
    x = torch.randn(3, 32, generator=g)
    w1, b1, w2, b2 = weights[32, 1]
    with torch.no_grad():
        torch.testing.assert_close(hn.pair(32)[1](x), x + (x @ w1.T + b1) @ w2.T + b2, rtol=1e-5, atol=1e-6)


def without(state: dict, *keys: str) -> dict:
    return {k: v for k, v in state.items() if k not in keys}


def test_missing_metadata_takes_a1111s_load_defaults(tmp_path):
    """A1111's Hypernetwork.load: activate_output defaults to True; without dropout_structure, use_dropout puts 0.3
    after every hidden layer but the last, and after the last too with last_layer_dropout."""
    relu = trained_like([32], HypernetworkConfig(activation="relu")).a1111_state()
    torch.save(without(relu, "activate_output"), tmp_path / "relu.pt")
    loaded = Hypernetwork.load(tmp_path / "relu.pt")
    assert loaded.config.activate_output
    assert [type(m).__name__ for m in loaded.pair(32)[0].linear] == ["Linear", "ReLU", "Linear", "ReLU"]

    for last_layer_dropout, structure in [(False, (0.0, 0.3, 0.0, 0.0)), (True, (0.0, 0.3, 0.3, 0.0))]:
        config = HypernetworkConfig.from_options("1,2,2,1", "relu", False, ",".join(map(str, structure)))
        state = without(trained_like([32], config).a1111_state(), "dropout_structure", "last_layer_dropout")
        if last_layer_dropout:
            state["last_layer_dropout"] = True
        torch.save(state, tmp_path / "dropout.pt")
        assert state["use_dropout"] is True
        assert Hypernetwork.load(tmp_path / "dropout.pt").config.dropout_structure == structure


def comfyui_modules(state: dict, index: int, size: int) -> torch.nn.Sequential:
    """How comfy/hypernetwork.py ``load_hypernetwork_patch`` rebuilds a module from the file (written here from
    its description, to check that ComfyUI reads our files as A1111 does): it takes the tensors ending in
    ``.weight`` in the file's order as Linear layers (LayerNorms too when ``is_layer_norm``), adds the activation
    after every Linear but the last unless ``activate_output``, and knows the activations below."""
    activations = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                   "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
                   "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign, "mish": torch.nn.Mish}
    activation = state.get("activation_func", "linear")
    assert activation in activations, "ComfyUI refuses this file"
    weights = state[size][index]
    names = [k[:-len(".weight")] for k in weights if k.endswith(".weight")]
    layers: list[torch.nn.Module] = []
    i = 0
    while i < len(names):
        last = i == len(names) - 1
        w, b = weights[f"{names[i]}.weight"], weights[f"{names[i]}.bias"]
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": b})
        layers.append(linear)
        if activation != "linear" and (not last or state.get("activate_output", False)):
            layers.append(activations[activation]())
        if state.get("is_layer_norm", False):
            i += 1
            norm = torch.nn.LayerNorm(weights[f"{names[i]}.weight"].shape[0])
            norm.load_state_dict({"weight": weights[f"{names[i]}.weight"], "bias": weights[f"{names[i]}.bias"]})
            layers.append(norm)
        i += 1
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("options", [("1,2,1", "linear", False, None), ("1,2,1", "relu", False, "0.3"),
                                     ("1,2,2,1", "softsign", False, None), ("1,2,1", "linear", True, None)])
def test_comfyui_reads_the_file_as_a1111_does(tmp_path, options):
    hn = trained_like([32, 64], HypernetworkConfig.from_options(*options))
    state = torch.load(hn.save(tmp_path / "h.pt"), weights_only=True)  # ComfyUI: load_torch_file(safe_load=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for d in (32, 64):
            for index in (0, 1):
                x = torch.randn(2, 5, d, generator=g)
                comfy = comfyui_modules(state, index, d).eval()
                # ComfyUI's patch: k + hn[0](k) * strength
                torch.testing.assert_close(x + comfy(x) * 0.6, hn.pair(d)[index](x, 0.6), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors
def test_sizes_of_another_family_are_refused_naming_the_file(tmp_path):
    unet = build_tiny("sd1").unet  # widths 32 and 64, text conditioning 32
    path = Hypernetwork([320, 640, 768, 1280]).save(tmp_path / "sd1-full.pt")
    hn = Hypernetwork.load(path)
    with pytest.raises(SdtuneError, match=r"sd1-full\.pt.*SD 1\.x \(768\).*trained for this model family"):
        hn.check_model(unet, path)
    missing_cross = Hypernetwork([64])  # self-attention width only: not for this text encoder
    with pytest.raises(SdtuneError, match="text conditioning 32"):
        missing_cross.check_model(unet, "x.pt")
    Hypernetwork([32, 64, 1024]).check_model(unet)  # extra widths (A1111 creates 768 and 1024 by default) are fine
    assert attention_sizes(unet) == [32, 64]


def test_files_that_are_not_hypernetworks_are_refused(tmp_path):
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "model.ckpt")
    with pytest.raises(SdtuneError, match=r"model\.ckpt: not a hypernetwork file \(it looks like a Stable Diffusion"):
        Hypernetwork.load(tmp_path / "model.ckpt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(SdtuneError, match=r"text\.pt: cannot be read as a hypernetwork"):
        Hypernetwork.load(tmp_path / "text.pt")
    with pytest.raises(SdtuneError, match="does not exist"):
        Hypernetwork.load(tmp_path / "missing.pt")
    broken = trained_like([32]).a1111_state()
    broken[32] = (broken[32][0], {"linear.0.weight": torch.zeros(3, 3)})
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(SdtuneError, match=r"broken\.pt: the value module of width 32 does not match"):
        Hypernetwork.load(tmp_path / "broken.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({32: Payload()}, f, protocol=2)
    with pytest.raises(SdtuneError, match="evil.pt: cannot be read"):
        Hypernetwork.load(path)
    assert "would run" not in capsys.readouterr().out
