"""--use_ema: the saved model is the moving average of the weight history, computed here by hand from the
recipe (diffusers' EMAModel: the first step copies the weights; then s = d * s + (1 - d) * w with a fixed d, or
d = 1 - (1 + step / inv_gamma) ** -power capped at --ema_decay); --resume continues it bit-exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.train import base_model
from sdtune.train.loop import Trainer
from tests.train.test_train import options

pytestmark = pytest.mark.component


def _history(trainer) -> list[dict[str, torch.Tensor]]:
    """The U-Net's training weights after every optimizer step of ``trainer.run()``."""
    history = []
    after_step = trainer.after_step

    def snapshot():
        history.append({k: v.detach().clone() for k, v in trainer.model.unet.state_dict().items()})
        after_step()

    trainer.after_step = snapshot
    trainer.run()
    return history


def _hand_ema(history, decay_of):
    average = {k: v.clone() for k, v in history[0].items()}  # step 1: decay 0, a copy
    for step, weights in enumerate(history[1:], start=2):
        d = decay_of(step)
        for k in average:
            average[k] = d * average[k] + (1 - d) * weights[k]
    return average


@pytest.mark.parametrize("inv_gamma", [None, 1.0])
def test_the_saved_model_is_the_hand_computed_average(prepared, tmp_path, inv_gamma):
    decay, power = 0.6, 0.75
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=4, use_ema=True, ema_decay=decay,
                              ema_inv_gamma=inv_gamma, ema_power=power, save_model_as="diffusers_safetensors",
                              learning_rate=1e-2))
    history = _history(trainer)

    def decay_of(step):
        if inv_gamma is None:
            return decay
        return min(decay, 1 - (1 + (step - 1) / inv_gamma) ** -power)  # diffusers counts from the step before

    expected = _hand_ema(history, decay_of)
    saved = load_file(str(tmp_path / "out" / "last" / "unet" / "diffusion_pytorch_model.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, msg=lambda m, k=key: f"{k}: {m}")
    trained = history[-1]
    assert any(not torch.allclose(saved[k], trained[k]) for k in trained)  # the average, not the last weights
    for key, value in trainer.model.unet.state_dict().items():  # the training weights are back after the save
        assert torch.equal(value, trained[key]), key


def test_resume_is_bit_exact_with_ema(prepared, tmp_path):
    common = dict(use_ema=True, ema_decay=0.7, save_state=True, max_train_steps=5, learning_rate=1e-2,
                  save_model_as="diffusers_safetensors")
    Trainer(options(prepared, tmp_path / "a", save_every_n_steps=2, **common)).run()
    state = tmp_path / "a" / "out" / "step-00000002-state"
    assert (state / "ema.pt").is_file()
    Trainer(options(prepared, tmp_path / "b", resume=str(state), **common)).run()
    for name in ("last/unet/diffusion_pytorch_model.safetensors", "last-state/unet.safetensors"):
        a, b = (load_file(str(tmp_path / run / "out" / name)) for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ema_options_are_checked_before_the_model_loads(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SdtuneError, match="--ema_decay / --ema_inv_gamma need --use_ema"):
        Trainer(options(prepared, tmp_path, ema_decay=0.99))
    with pytest.raises(SdtuneError, match="--ema_decay is a factor between 0 and 1"):
        Trainer(options(prepared, tmp_path, use_ema=True, ema_decay=1.5))
