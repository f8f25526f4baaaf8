"""Each memory/speed option is shown to be active, not merely accepted."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

from sdtune.errors import SdtuneError
from sdtune.models.attention import set_attention
from sdtune.models.tiny import build_tiny
from sdtune.train.loop import Trainer, train
from sdtune.train.optim import HalfWeightAdamW, build_lr_scheduler, build_optimizer
from sdtune.train.precision import LossScaler
from tests.train.test_train import options

pytestmark = pytest.mark.component


def saved_activation_bytes(trainer: Trainer) -> int:
    keys, _ = trainer.data.epoch_batches(0, 0, 2, 1, 0)[0]
    batch = trainer.data.load_batch(keys, 0, 0)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    return total


def test_gradient_checkpointing_reduces_saved_activations(prepared, tmp_path):
    plain = Trainer(options(prepared, tmp_path / "a"))
    checkpointed = Trainer(options(prepared, tmp_path / "b", gradient_checkpointing=True))
    assert checkpointed.model.unet.is_gradient_checkpointing
    assert saved_activation_bytes(checkpointed) < 0.7 * saved_activation_bytes(plain)


def test_8bit_adam_keeps_uint8_state(prepared, tmp_path):
    trainer = Trainer(options(prepared, tmp_path, use_8bit_adam=True, max_train_steps=1))
    trainer.run()
    state = trainer.optimizer.state[trainer.model.unet.conv_in.weight]
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    large = [p for p in trainer.trainable if p.numel() >= 4096]
    assert all(trainer.optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    assert state  # every parameter has state after a step


def test_full_fp16_keeps_fp16_weights_and_gradients(prepared, tmp_path, caplog):
    caplog.set_level("INFO", logger="sdtune")
    trainer = Trainer(options(prepared, tmp_path, mixed_precision="fp16", full_fp16=True, max_train_steps=3,
                              learning_rate=1e-4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.run()
    assert all(p.dtype == torch.float16 for p in trainer.model.unet.parameters())
    assert trainer.scaler is not None and trainer.scaler.scale > 0
    # The first steps overflow at the initial scale and are skipped; the schedule still moves on, without PyTorch's
    # misleading "lr_scheduler.step() before optimizer.step()" warning reaching the user.
    assert trainer.scaler.scale < LossScaler().scale
    assert "step 1: gradients overflowed in fp16; skipped, loss scale now 32768" in caplog.text  # 2^16 halved
    assert not [w for w in caught if "lr_scheduler.step" in str(w.message)]
    assert all(torch.isfinite(torch.tensor(x)) for x in result["losses"])


def test_full_bf16_keeps_bf16_weights(prepared, tmp_path):
    trainer = Trainer(options(prepared, tmp_path, mixed_precision="bf16", full_bf16=True, max_train_steps=2,
                              half_weight_rounding="stochastic"))
    trainer.run()
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.unet.parameters())
    # AdamW keeps fp32 moments and writes with the rounding asked for (tests/train/test_precision.py: fidelity)
    assert isinstance(trainer.optimizer, HalfWeightAdamW) and trainer.optimizer.rounding == "stochastic"
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in trainer.optimizer.state.values())


def test_loss_scaler_skips_overflowing_steps_and_adapts():
    scaler = LossScaler(scale=1024.0, growth_interval=2)
    grad = torch.tensor([1024.0, 2048.0, float("inf")])
    found_inf = scaler.unscale_([grad])
    assert found_inf.item() == 1.0
    scaler.update(found_inf)
    assert scaler.scale == 512.0
    grad = torch.tensor([512.0, 1024.0, 0.0])
    found_inf = scaler.unscale_([grad])
    assert found_inf.item() == 0.0
    torch.testing.assert_close(grad, torch.tensor([1.0, 2.0, 0.0]))  # fp32 gradients are unscaled in place
    half = torch.tensor([512.0, 1024.0], dtype=torch.float16)
    assert scaler.unscale_([half]).item() == 0.0
    torch.testing.assert_close(half, torch.tensor([512.0, 1024.0], dtype=torch.float16))  # fp16: left for the optimizer
    scaler.update(found_inf)
    scaler.update(found_inf)
    assert scaler.scale == 1024.0
    again = LossScaler()
    again.load_state_dict(scaler.state_dict())
    assert again.state_dict() == scaler.state_dict()


def test_mem_eff_attention_is_sliced_and_gives_the_same_result():
    model = build_tiny("sd1")
    unet = model.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)  # see unet_inputs in tests/hypernetwork/test_module.py
    t = torch.tensor([10])
    states = torch.randn(1, 77, 32, generator=g)
    cross = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    # Large inputs make the softmax far from uniform, so a wrong scale or head split shows (x1.3 scale: 0.08 of 0.25).
    hidden = 10 * torch.randn(1, 64, cross.inner_dim, generator=g)
    set_attention(unet, "sdpa")
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with torch.no_grad():
        reference = unet(x, t, states).sample
        reference_layer = cross(hidden, 10 * states)
    set_attention(unet, "mem_eff")
    assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())
    with torch.no_grad():
        sliced = unet(x, t, states).sample
        sliced_layer = cross(hidden, 10 * states)
    torch.testing.assert_close(reference_layer, sliced_layer, rtol=1e-5, atol=1e-5)  # another summation order
    torch.testing.assert_close(reference, sliced, rtol=1e-5, atol=1e-4)


def test_xformers_missing_gives_clear_error(prepared, tmp_path):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(SdtuneError, match="pip install xformers"):
        train(options(prepared, tmp_path, xformers=True))


@pytest.mark.parametrize("name,kwargs", [("Lion", {}), ("Adafactor", {}), ("SGDNesterov", {}),
                                         ("AdamW", {"weight_decay": 0.1, "betas": (0.8, 0.9)})])
def test_optimizers_step(name, kwargs):
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = build_optimizer(name, [{"params": [p], "lr": 0.1}], 0.1, kwargs)
    p.grad = torch.ones(4, 4)
    opt.step()
    assert torch.all(p < 1)
    if name == "AdamW":
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def lrs(name: str, total: int = 10, warmup: int = 2) -> list[float]:
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(name, opt, warmup, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_by_hand():
    assert lrs("constant") == [1.0] * 10
    assert lrs("constant_with_warmup") == [0.0, 0.5] + [1.0] * 8
    linear = lrs("linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[3] == pytest.approx(7 / 8)
    cosine = lrs("cosine")
    assert cosine[2] == 1.0 and cosine[6] == pytest.approx(0.5)
    assert lrs("polynomial")[3] == pytest.approx(7 / 8, rel=1e-3)
    assert lrs("cosine_with_restarts")[2] == 1.0
