"""--use_ema: the saved model is the moving average of the weight history, computed here by hand from the
recipe (diffusers' EMAModel: the first step copies the weights; then s = d * s + (1 - d) * w with a fixed d, or
d = 1 - (1 + step / inv_gamma) ** -power capped at --ema_decay); --resume continues it bit-exactly.

--ema_device cpu: the average lives on the CPU and sdtune updates it itself (not EMAModel.step), with the same
bits as EMAModel's. --save_ema_separately: the model file holds the training weights, ``<name>-ema`` the average,
for every kind of target and save format; rotation removes both."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.models.hypernetwork import Hypernetwork
from sdtune.models.io import load_model
from sdtune.train import base_model
from sdtune.train.ema import Ema, copies_to
from sdtune.train.loop import Trainer
from tests.train.test_train import options

pytestmark = pytest.mark.component

CPU = torch.device("cpu")


def _trained_weights(trainer) -> dict[str, torch.Tensor]:
    """The trained modules' weights (the U-Net's, the LoRA's, the hypernetwork's), by their state-dict names."""
    return {k: v.detach().clone() for module in trainer.target.modules.values()
            for k, v in module.state_dict().items()}


def _history(trainer) -> list[dict[str, torch.Tensor]]:
    """The trained weights after every optimizer step of ``trainer.run()``."""
    history = []
    after_step = trainer.after_step

    def snapshot():
        history.append(_trained_weights(trainer))
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


def _fixed(decay):
    return lambda step: decay


def _assert_close_all(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=lambda m, k=key: f"{what}: {k}: {m}")


def _assert_equal_all(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{what}: {k}: {m}")


def _forbid_ema_model_step(monkeypatch) -> None:
    """--ema_device cpu must run sdtune's own update, even where the training device is the CPU as well."""
    monkeypatch.setattr(EMAModel, "step", lambda *a, **k: pytest.fail("EMAModel.step ran with --ema_device cpu"))


# ------------------------------------------------------------------------------------------------ the average
@pytest.mark.parametrize("inv_gamma", [None, 1.0])
def test_the_saved_model_is_the_hand_computed_average_on_either_device(prepared, tmp_path, inv_gamma, monkeypatch):
    """The default run (EMAModel.step on the training device) and the --ema_device cpu run (sdtune's update of an
    average in host memory) both save the hand-computed average, and the same bits: the same arithmetic."""
    decay, power = 0.6, 0.75
    runs = {}
    for device in (None, "cpu"):
        if device == "cpu":
            _forbid_ema_model_step(monkeypatch)
        trainer = Trainer(options(prepared, tmp_path / str(device), max_train_steps=4, use_ema=True, ema_decay=decay,
                                  ema_inv_gamma=inv_gamma, ema_power=power, save_model_as="diffusers_safetensors",
                                  learning_rate=1e-2, ema_device=device))
        history = _history(trainer)
        saved = load_file(str(tmp_path / str(device) / "out" / "last" / "unet" / "diffusion_pytorch_model.safetensors"))
        runs[device] = trainer, history, saved

    def decay_of(step):
        if inv_gamma is None:
            return decay
        return min(decay, 1 - (1 + (step - 1) / inv_gamma) ** -power)  # diffusers counts from the step before

    (default, history, saved), (on_cpu, cpu_history, cpu_saved) = runs[None], runs["cpu"]
    _assert_equal_all(cpu_history[-1], history[-1], "the training weights")
    _assert_close_all(saved, _hand_ema(history, decay_of), "the average")
    trained = history[-1]
    assert any(not torch.allclose(saved[k], trained[k]) for k in trained)  # the average, not the last weights
    _assert_equal_all(cpu_saved, saved, "the average kept on the CPU")
    a, b = default.ema.average, on_cpu.ema.average
    assert (b.optimization_step, b.cur_decay_value) == (a.optimization_step, a.cur_decay_value) == (4, decay_of(4))
    assert on_cpu.ema.storage_devices == {CPU}
    params = {p.data_ptr() for p in on_cpu.trainable}
    assert not any(s.data_ptr() in params for s in b.shadow_params)  # a copy of its own, not the weights
    for trainer in (default, on_cpu):  # the training weights are back after the save
        _assert_equal_all(_trained_weights(trainer), trained, "the weights after the save")


def test_the_cpu_update_is_ema_models_bit_for_bit_frozen_tensors_copied_and_weights_swapped_back():
    """Ema(device="cpu") against diffusers' own EMAModel.step on the same parameter history, a tensor without
    requires_grad included (EMAModel copies it); weights() puts the average in and the training weights back."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen)),
              torch.nn.Parameter(torch.randn(2, 2, generator=gen), requires_grad=False)]
    ours = Ema(params, decay=0.9, inv_gamma=1.0, power=0.75, device="cpu")
    reference = EMAModel(params, decay=0.9, min_decay=0.0, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen))
        ours.step()
        reference.step(params)
    assert ours.average.optimization_step == reference.optimization_step == 5
    assert ours.average.cur_decay_value == reference.cur_decay_value
    for s, r in zip(ours.average.shadow_params, reference.shadow_params):
        torch.testing.assert_close(s, r, rtol=0, atol=0)
    torch.testing.assert_close(ours.average.shadow_params[2], params[2].detach(), rtol=0, atol=0)  # copied
    before = [p.detach().clone() for p in params]
    with ours.weights():
        for p, s in zip(params, reference.shadow_params):
            torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_an_ema_file_of_other_weights_is_refused_and_a_good_one_lands_on_the_ema_device(tmp_path, device):
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    saved = Ema(params, decay=0.5, device=device)
    saved.step()
    saved.save(tmp_path)
    state = torch.load(tmp_path / "ema.pt", weights_only=True, map_location="cpu")
    other = Ema([torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(5))], decay=0.5, device=device)
    with pytest.raises(SdtuneError, match="does not hold an average of this run's trained weights"):
        other.load(state)
    with pytest.raises(SdtuneError, match="does not hold an average"):
        other.load({"shadow_params": "not tensors"})
    fresh = Ema(params, decay=0.5, device=device)
    fresh.load(state)
    assert fresh.average.optimization_step == 1 and fresh.storage_devices == {CPU}
    for a, b in zip(fresh.average.shadow_params, saved.average.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_copies_to_hands_out_each_parameter_with_its_values_in_order():
    params = [torch.nn.Parameter(torch.full((2,), float(i))) for i in range(3)]
    pairs = list(copies_to(params, CPU))
    assert [p for p, _ in pairs] == params
    for p, value in pairs:
        torch.testing.assert_close(value, p.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_resume_is_bit_exact_with_ema(prepared, tmp_path, device):
    common = dict(use_ema=True, ema_decay=0.7, save_state=True, max_train_steps=5, learning_rate=1e-2,
                  save_model_as="diffusers_safetensors", ema_device=device)
    Trainer(options(prepared, tmp_path / "a", save_every_n_steps=2, **common)).run()
    state = tmp_path / "a" / "out" / "step-00000002-state"
    assert (state / "ema.pt").is_file()
    resumed = Trainer(options(prepared, tmp_path / "b", resume=str(state), **common))
    if device == "cpu":
        assert resumed.ema.storage_devices == {CPU}
    resumed.run()
    for name in ("last/unet/diffusion_pytorch_model.safetensors", "last-state/unet.safetensors"):
        a, b = (load_file(str(tmp_path / run / "out" / name)) for run in ("a", "b"))
        _assert_equal_all(b, a, name)
    a, b = (torch.load(tmp_path / run / "out" / "last-state" / "ema.pt", weights_only=True) for run in ("a", "b"))
    assert a.pop("optimization_step") == b.pop("optimization_step") == 5
    for x, y in zip(a.pop("shadow_params"), b.pop("shadow_params"), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert a == b


# ------------------------------------------------------------------------------------------------ --save_ema_separately
def _unet_of(path):
    return load_model(path).unet.state_dict()


def _hypernetwork_of(path):
    return Hypernetwork.load(path).state_dict()


SEPARATE_RUNS = {  # what is trained: (options, the save of "last", the -ema copy, how a save is read)
    "diffusers": (dict(save_model_as="diffusers_safetensors"), "last", "last-ema", _unet_of),
    "single-file": (dict(save_model_as="safetensors"), "last.safetensors", "last-ema.safetensors", _unet_of),
    "lora": (dict(network_module="lora"), "last.safetensors", "last-ema.safetensors",
             lambda path: load_file(str(path))),
    "hypernetwork": (dict(hypernetwork_module="default"), "last.pt", "last-ema.pt", _hypernetwork_of),
}


@pytest.mark.parametrize("kind", list(SEPARATE_RUNS))
def test_save_ema_separately_writes_the_training_weights_and_the_average_beside_them(prepared, tmp_path, kind):
    """Step saves at every step (the last one kept) and the final save: each a model with the training weights of
    its step and an ``-ema`` copy with the hand-computed average up to it; the expired step save goes with its copy."""
    extra, last, last_ema, read = SEPARATE_RUNS[kind]
    decay = 0.6
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=4, use_ema=True, ema_decay=decay,
                              save_ema_separately=True, learning_rate=1e-2, save_every_n_steps=1,
                              save_last_n_steps=1, **extra))
    history = _history(trainer)
    out = tmp_path / "out"
    suffix = last.removeprefix("last")
    _assert_equal_all(read(out / last), history[-1], "the model: the training weights")
    _assert_close_all(read(out / last_ema), _hand_ema(history, _fixed(decay)), "the -ema copy: the average")
    assert any(not torch.allclose(read(out / last_ema)[k], v) for k, v in history[-1].items())
    step3 = out / f"step-00000003{suffix}"
    _assert_equal_all(read(step3), history[2], "step 3's model")
    _assert_close_all(read(out / f"step-00000003-ema{suffix}"), _hand_ema(history[:3], _fixed(decay)),
                      "step 3's copy")
    saves = sorted(p.name for p in out.iterdir() if re.match(r"(step-|last)", p.name))
    names = ["last", "last-ema", "step-00000002", "step-00000002-ema", "step-00000003", "step-00000003-ema"]
    assert saves == sorted(n + suffix for n in names)  # step 1 and its -ema copy were removed by --save_last_n_steps
    listed = [n + suffix for n in ("step-00000001", "step-00000001-ema", "step-00000002", "step-00000002-ema",
                                   "step-00000003", "step-00000003-ema", "last", "last-ema")]
    assert [p.name for p in trainer.saved] == listed
    _assert_equal_all(_trained_weights(trainer), history[-1], "the weights after the saves")


def test_rotation_removes_the_ema_copy_and_the_state_with_their_save(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=5, use_ema=True, save_ema_separately=True,
                              save_state=True, save_every_n_steps=2, save_last_n_steps=1))
    result = trainer.run()
    assert f"EMA weights: {tmp_path / 'out' / 'last-ema.safetensors'}" in caplog.text  # the closing summary
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if re.match(r"(step-|last)", p.name)) == [
        "last-ema.safetensors", "last-state", "last.safetensors",
        "step-00000004-ema.safetensors", "step-00000004-state", "step-00000004.safetensors"]
    assert result["model"] == out / "last.safetensors"
    assert result["saved"][-2:] == [out / "last.safetensors", out / "last-ema.safetensors"]
    trainer.checkpoints.remove("step-00000004")
    assert not any(p.name.startswith("step-") for p in out.iterdir())


# ------------------------------------------------------------------------------------------------ option errors
@pytest.mark.parametrize("overrides", [dict(ema_decay=0.99), dict(ema_inv_gamma=1.0), dict(ema_device="cpu"),
                                       dict(save_ema_separately=True)])
def test_ema_options_without_use_ema_are_refused_before_the_model_loads(prepared, tmp_path, monkeypatch, overrides):
    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SdtuneError, match="--ema_decay / --ema_inv_gamma / --ema_device / --save_ema_separately "
                                          "need --use_ema"):
        Trainer(options(prepared, tmp_path, **overrides))


@pytest.mark.parametrize("decay", [1.5, 0.0, 1.0])
def test_an_ema_decay_outside_0_1_is_refused_before_the_model_loads(prepared, tmp_path, monkeypatch, decay):
    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SdtuneError, match="--ema_decay is a factor between 0 and 1"):
        Trainer(options(prepared, tmp_path, use_ema=True, ema_decay=decay))
