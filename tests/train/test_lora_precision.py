"""A LoRA (issue 14) trained in every precision and with every memory option: a few steps give a finite loss and a
LoRA file that loads back with the trained (changed) weights, and the precision asked for is the one used.

On a CPU the trainer's ``torch.autocast`` computes in fp16 / bf16 for real (not accelerate's, which returns float32
under fp16 on a CPU): the hooks below record the dtype the LoRA modules compute in.
"""

from __future__ import annotations

import pytest
import torch

from sdtune.models.io import load_model
from sdtune.models.lora import LoraNetwork, read_lora
from sdtune.train.loop import Trainer
from tests.train.test_train import options

pytestmark = pytest.mark.component

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def lora_options(prepared, tmp_path, **overrides):
    """A LoCon with a text-encoder LoRA; alpha = rank (scale 1) so that a few steps move the weights visibly."""
    settings = dict(network_module="lora", network_dim=4, network_alpha=4.0, network_args=["conv_dim=2"],
                    max_train_steps=3, learning_rate=1e-3)
    return options(prepared, tmp_path, **{**settings, **overrides})


def run_recording(trainer: Trainer) -> tuple[dict, set, set]:
    """Run; returns the result, the dtypes the LoRA modules' outputs had (U-Net and text encoder) and the dtypes
    of the gradients the optimizer received."""
    network = trainer.target.network
    computed: set = set()
    hooks = [m.lora_up.register_forward_hook(lambda _m, _i, out: computed.add(out.dtype))
             for m in (network.unet_loras[0], network.unet_loras[-1], network.text_encoder_loras[0])]
    grads: set = set()
    pre = trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update(p.grad.dtype for p in trainer.trainable if p.grad is not None))
    try:
        result = trainer.run()
    finally:
        for h in hooks:
            h.remove()
        pre.remove()
    return result, computed, grads


def check_file(trainer: Trainer, result: dict, start: dict[str, torch.Tensor]) -> None:
    """Finite losses; the saved file loads onto the base model (every module, no key left) with the trained
    weights, which differ from the initial ones (a fresh LoRA's up weights are zero)."""
    assert result["global_step"] == trainer.opts.max_train_steps
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"]), result["losses"]
    path = result["model"]
    saved, _ = read_lora(path)
    loaded = LoraNetwork.from_weights(load_model(trainer.opts.pretrained_model_name_or_path), path)
    assert loaded.state_dict().keys() == start.keys() == saved.keys()
    assert all(v.dtype == torch.float32 for v in saved.values())  # --save_precision's default: float
    trained = trainer.target.network.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[key].float(), msg=lambda m, key=key: f"{key}: {m}")
    ups = [k for k in saved if k.endswith("lora_up.weight")]
    moved = [k for k in ups if saved[k].any()]
    assert len(moved) > 0.5 * len(ups), f"{len(moved)} of {len(ups)} up weights moved"
    assert any(k.startswith("lora_te_") for k in moved) and any(k.startswith("lora_unet_") for k in moved)


def initial(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in trainer.target.network.state_dict().items()}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_a_float32_lora_on_a_half_precision_base(prepared, tmp_path, precision):
    """--mixed_precision: the frozen base is held in the half type (half the memory; autocast computes in it
    anyway), the LoRA's weights and gradients stay float32, and its modules compute in the half type."""
    trainer = Trainer(lora_options(prepared, tmp_path, mixed_precision=precision,
                                   max_train_steps=4 if precision == "fp16" else 3))
    half = HALF[precision]
    assert {p.dtype for p in trainer.model.unet.parameters()} == {half}
    assert {p.dtype for p in trainer.model.text_encoder.parameters()} == {half}
    assert {p.dtype for p in trainer.target.network.parameters()} == {torch.float32}
    assert (trainer.scaler is not None) == (precision == "fp16")  # fp16 gradients are loss-scaled
    start = initial(trainer)
    result, computed, grads = run_recording(trainer)
    assert computed == {half}  # autocast on the CPU for real: the LoRA's matmuls ran in the half type
    assert grads == {torch.float32}
    check_file(trainer, result, start)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_full_half_precision_trains_a_half_precision_lora(prepared, tmp_path, precision):
    """--full_fp16 / --full_bf16: the LoRA's weights and gradients are in the half type too (the base as well);
    AdamW keeps fp32 moments. The file is still written in float (--save_precision's default)."""
    half = HALF[precision]
    trainer = Trainer(lora_options(prepared, tmp_path, mixed_precision=precision, full_fp16=precision == "fp16",
                                   full_bf16=precision == "bf16", max_train_steps=4 if precision == "fp16" else 3,
                                   learning_rate=1e-2))
    assert {p.dtype for p in trainer.target.network.parameters()} == {half}
    assert {p.dtype for p in trainer.model.unet.parameters()} == {half}
    assert {p.dtype for p in trainer.model.text_encoder.parameters()} == {half}
    start = initial(trainer)
    result, computed, grads = run_recording(trainer)
    assert computed == {half} and grads == {half}
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    check_file(trainer, result, start)


def test_8bit_adam_trains_the_lora_with_uint8_state(prepared, tmp_path):
    """--use_8bit_adam (bitsandbytes runs on the CPU): the LoRA's tensors of 4096 values or more (bitsandbytes'
    min_8bit_size; conv_dim 4 makes the widest 3x3 down weights 4 x 128 x 9) keep uint8 moments."""
    trainer = Trainer(lora_options(prepared, tmp_path, use_8bit_adam=True, network_args=["conv_dim=4"]))
    start = initial(trainer)
    result = trainer.run()
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    large = [p for p in trainer.trainable if p.numel() >= 4096]
    assert large, "no LoRA tensor is large enough for bitsandbytes' 8-bit state"
    assert all(trainer.optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    check_file(trainer, result, start)


def test_gradient_checkpointing_trains_the_same_lora(prepared, tmp_path):
    """--gradient_checkpointing recomputes the U-Net's blocks in backward; the LoRA modules inside them must still
    get their gradients (a checkpoint whose inputs need no gradient would drop them): the same LoRA as without,
    with fewer activations kept (checkpointing is on in the frozen, eval-mode U-Net too)."""
    from tests.train.test_memory_options import saved_activation_bytes

    plain = Trainer(lora_options(prepared, tmp_path / "plain", max_train_steps=2))
    plain.run()
    checkpointed = Trainer(lora_options(prepared, tmp_path / "ckpt", gradient_checkpointing=True, max_train_steps=2))
    assert checkpointed.model.unet.is_gradient_checkpointing
    assert checkpointed.model.text_encoder.is_gradient_checkpointing  # its LoRA trains: as sd-scripts
    start = initial(checkpointed)
    result = checkpointed.run()
    check_file(checkpointed, result, start)
    want = plain.target.network.state_dict()
    for key, value in checkpointed.target.network.state_dict().items():
        torch.testing.assert_close(value, want[key], msg=lambda m, key=key: f"{key}: {m}")
    assert saved_activation_bytes(checkpointed) < 0.7 * saved_activation_bytes(plain)
