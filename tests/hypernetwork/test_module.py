"""The hypernetwork module: A1111's layout and numbering, sizes from the U-Net, parameter counts, the hooks on every
attention backend."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models import attention_processor
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from sdtune.errors import SdtuneError
from sdtune.models.families import get_family
from sdtune.models.hypernetwork import Hypernetwork, HypernetworkModule, attention_sizes, expected_parameter_count
from sdtune.models.hypernetwork_layout import HypernetworkConfig
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component


def keys(config: HypernetworkConfig) -> list[str]:
    return list(HypernetworkModule(8, config).state_dict())


def layer_types(config: HypernetworkConfig) -> list[str]:
    return [type(m).__name__ for m in HypernetworkModule(8, config).linear]


# ------------------------------------------------------------------------------------------------ layout
def test_default_is_novelai_layout_two_linears_without_activation():
    config = HypernetworkConfig()
    assert config == HypernetworkConfig.from_options("1,2,1", "linear", False, None)
    module = HypernetworkModule(320, config)
    assert layer_types(config) == ["Linear", "Linear"]
    assert keys(config) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    assert module.linear[0].weight.shape == (640, 320) and module.linear[1].weight.shape == (320, 640)


@pytest.mark.parametrize("options,types_,key_indices", [
    # A1111 HypernetworkModule: per step Linear, activation (not after the last Linear), LayerNorm, Dropout (from
    # dropout_structure[i + 1], never after the last Linear); the numbering counts every module.
    (("1,2,1", "relu", False, None), ["Linear", "ReLU", "Linear"], [0, 2]),
    (("1,2,1", "relu", True, "0.3"), ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"], [0, 2, 4, 5]),
    (("1,2,2,1", "swish", False, "0,0.05,0.15,0"),
     ["Linear", "Hardswish", "Dropout", "Linear", "Hardswish", "Dropout", "Linear"], [0, 3, 6]),
    (("1,1.5,1", "linear", True, None), ["Linear", "LayerNorm", "Linear", "LayerNorm"], [0, 1, 2, 3]),
])
def test_a1111_module_order_and_numbering(options, types_, key_indices):
    config = HypernetworkConfig.from_options(*options)
    assert layer_types(config) == types_
    assert keys(config) == [f"linear.{i}.{p}" for i in key_indices for p in ("weight", "bias")]


def test_activate_output_puts_the_activation_after_the_last_layer_too():
    config = HypernetworkConfig(activation="tanh", activate_output=True)
    assert layer_types(config) == ["Linear", "Tanh", "Linear", "Tanh"]


# sdtune train's required options (the options layer refuses a config without them); nothing here reads them.
REQUIRED_TRAIN_OPTIONS = "pretrained_model_name_or_path = 'm'\nin_json = 'm.json'\ntrain_data_dir = 'd'\noutput_dir = 'o'\n"


def test_layout_options_from_a_config_file(tmp_path):
    from sdtune.options import parse_options
    from sdtune.train.loop import TrainOptions
    from sdtune.train.options import hypernetwork_config

    (tmp_path / "c.toml").write_text("hypernetwork_module = 'default'\nhypernetwork_layer_structure = [1, 1.5, 1]\n"
                                     "hypernetwork_dropout = 0.2\n" + REQUIRED_TRAIN_OPTIONS, encoding="utf-8")
    opts = parse_options(TrainOptions, ["--config_file", str(tmp_path / "c.toml")], "sdtune train")
    assert hypernetwork_config(opts).layer_structure == (1, 1.5, 1)
    assert hypernetwork_config(opts).dropout_structure == (0, 0.2, 0)


def test_dropout_option_one_value_means_every_hidden_layer():
    assert HypernetworkConfig.from_options("1,2,2,1", dropout="0.2").dropout_structure == (0, 0.2, 0.2, 0)
    config = HypernetworkConfig.from_options("1,2,1", dropout="0.3")
    assert config.use_dropout and config.last_layer_dropout


@pytest.mark.parametrize("options,message", [
    (("2,1",), "start and end with 1"),
    (("1,x,1",), "comma-separated numbers"),
    (("1,2,1", "linear", False, "0,0.3"), "one per"),
    (("1,2,1", "linear", False, "0,0.3,0.3"), "the last 0"),
    (("1,2,1", "linear", False, "1.5"), r"\[0, 1\)"),
    (("1,2,1", "nonsense"), "unknown hypernetwork activation"),
])
def test_bad_layouts_are_refused(options, message):
    with pytest.raises(SdtuneError, match=message):
        HypernetworkConfig.from_options(*options)


def test_normal_init_is_n0_001_with_zero_biases_and_seeded():
    a, b = Hypernetwork([1280]), Hypernetwork([1280])
    a.reset_parameters(7)
    b.reset_parameters(7)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    first = a.pair(1280)[0].linear[0]
    assert abs(first.weight.std().item() - 0.01) < 0.0005 and abs(first.weight.mean().item()) < 0.0005
    assert all(torch.count_nonzero(m.linear[i].bias) == 0 for m in a.pair(1280) for i in (0, 1))


# ------------------------------------------------------------------------------------------------ sizes and counts
def full_size_unet(family: str) -> UNet2DConditionModel:
    with torch.device("meta"):  # the real configuration, without allocating 860 M parameters
        return UNet2DConditionModel.from_config(get_family(family).configs()["unet"])


@pytest.mark.parametrize("family,sizes", [("sd1", [320, 640, 768, 1280]), ("sd2", [320, 640, 1024, 1280]),
                                          ("sd2-v", [320, 640, 1024, 1280])])
def test_sizes_come_from_the_unets_attentions(family, sizes):
    assert attention_sizes(full_size_unet(family)) == sizes


def formula(sizes: list[int]) -> int:
    """For each width d: two modules of Linear(d, 2d) and Linear(2d, d)."""
    return sum(2 * (d * 2 * d + 2 * d + 2 * d * d + d) for d in sizes)


def test_parameter_count_matches_the_formula_full_size_sd1_and_tiny():
    full = Hypernetwork([320, 640, 768, 1280])  # no U-Net needed: the layout depends on the widths only
    assert full.parameter_count() == formula([320, 640, 768, 1280]) == 21_939_840  # 21.9 M, 88 MB in float32
    assert expected_parameter_count(full.sizes) == full.parameter_count()
    tiny = Hypernetwork(attention_sizes(build_tiny("sd1").unet))
    assert tiny.sizes == [32, 64]
    assert tiny.parameter_count() == formula([32, 64])
    layer_norm = HypernetworkConfig.from_options("1,2,1", layer_norm=True)
    assert Hypernetwork([320], layer_norm).parameter_count() == expected_parameter_count([320], layer_norm) \
        == formula([320]) + 2 * (2 * 640 + 2 * 320)


# ------------------------------------------------------------------------------------------------ hooks
@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("sd1")
    model.unet.eval()
    return model


def unet_inputs(seed: int = 0):
    # 32x32 latents: at 8x8 the tiny U-Net's last level is 1x1 px, where group norms over two values amplify float
    # rounding ~1000-fold and backends that agree to 1e-7 per layer differ by up to 1e-3 at the output.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)


def strong_hypernetwork(sizes, seed: int = 1) -> Hypernetwork:
    hn = Hypernetwork(sizes)
    hn.reset_parameters(seed)
    with torch.no_grad():  # far from the identity, so that every comparison below sees a clear difference
        for p in hn.parameters():
            p.mul_(30)
    return hn.eval()


@torch.no_grad()
def test_attach_changes_keys_and_values_and_removes_cleanly(tiny):
    unet = tiny.unet
    x, t, states = unet_inputs()
    keys_before = list(unet.state_dict())
    base = unet(x, t, states).sample
    hn = strong_hypernetwork(attention_sizes(unet))
    with hn.attach(unet) as hooks:
        # SD's 16 transformer blocks (6 down, 1 mid, 9 up), each with self- and cross-attention, each to_k and to_v
        assert hooks.count == 16 * 2 * 2
        assert list(unet.state_dict()) == keys_before  # the U-Net's own weights and names are untouched
        changed = unet(x, t, states).sample
        hn.multiplier = 0.0
        off = unet(x, t, states).sample
        hn.multiplier = 1.0
        with pytest.raises(SdtuneError, match="already attached"):
            hn.attach(unet)
    assert (changed - base).abs().mean() > 1e-3
    assert torch.equal(off, base)  # multiplier 0 is the base model, bit for bit
    assert torch.equal(unet(x, t, states).sample, base)  # removed: the base model again


@torch.no_grad()
def test_the_context_of_to_k_and_to_v_is_x_plus_mlp_x_times_multiplier(tiny):
    """What to_k/to_v of a cross-attention receive, recorded by a hook that runs after the hypernetwork's."""
    unet = tiny.unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen: dict[str, torch.Tensor] = {}
    hn = strong_hypernetwork(attention_sizes(unet))
    x, t, states = unet_inputs()
    with hn.applied(unet, 0.7):
        handles = [attn.to_k.register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0])),
                   attn.to_v.register_forward_pre_hook(lambda m, a: seen.__setitem__("v", a[0]))]
        unet(x, t, states)
        for h in handles:
            h.remove()
    key_module, value_module = hn.pair(32)
    torch.testing.assert_close(seen["k"], states + key_module.linear(states) * 0.7, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["v"], states + value_module.linear(states) * 0.7, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="not close"):  # the key and value modules are different
        torch.testing.assert_close(seen["k"], seen["v"], rtol=1e-5, atol=1e-8)


def fake_xformers() -> types.SimpleNamespace:
    """xformers needs a GPU; its processor's only xformers call, computed with PyTorch, to run it on the CPU."""
    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)

    return types.SimpleNamespace(ops=types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention))


@torch.no_grad()
def test_every_attention_backend_gets_the_same_hypernetwork(tiny, monkeypatch):
    monkeypatch.setattr(attention_processor, "xformers", fake_xformers())
    unet = tiny.unet
    x, t, states = unet_inputs(3)
    hn = strong_hypernetwork(attention_sizes(unet))
    outputs = {}
    try:
        for name, processor in [("sdpa", AttnProcessor2_0()), ("xformers", XFormersAttnProcessor()),
                                ("mem_eff", SlicedAttnProcessor(1)), ("plain", AttnProcessor())]:
            unet.set_attn_processor(processor)
            base = unet(x, t, states).sample
            with hn.applied(unet):
                outputs[name] = unet(x, t, states).sample
            assert (outputs[name] - base).abs().mean() > 1e-3, name
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["sdpa"], rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
def test_half_precision_unet_with_float32_hypernetwork(tiny):
    unet = build_tiny("sd1").unet.eval().to(torch.bfloat16)
    x, t, states = unet_inputs()
    hn = strong_hypernetwork(attention_sizes(unet))
    with hn.applied(unet):
        out = unet(x.bfloat16(), t, states.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in hn.parameters())


def test_gradients_reach_only_the_hypernetwork(tiny):
    unet = build_tiny("sd1").unet.train().requires_grad_(False)
    hn = Hypernetwork(attention_sizes(unet))
    hn.reset_parameters(0)
    x, t, states = unet_inputs()
    with hn.applied(unet):
        unet(x, t, states).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.parameters() if p.dim() == 2)
    assert all(p.grad is None for p in unet.parameters())
