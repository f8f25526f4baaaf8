"""The validation loss (--validation_split / --validation_data_dir, --validate_every_n_*, --save_best).

The score is checked against diffusers' own training recipe written out here (``DDPMScheduler.add_noise`` on the
cached latents, the U-Net's prediction, its mean squared error against the noise), not against sdtune's loss.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.train.loop import Trainer, train
from sdtune.train.validation import draw_noise, draw_timesteps, held_out_keys
from tests.train.test_timestep_quartiles import _scalars
from tests.train.test_train import options

pytestmark = pytest.mark.component


# ------------------------------------------------------------------------------------------------ the set
def test_the_held_out_images_depend_on_the_keys_only():
    keys = [f"img{i:03d}" for i in range(200)]
    held = held_out_keys(keys, 0.05)
    assert len(held) == 10
    assert held_out_keys(list(reversed(keys)), 0.05) == held  # not the order of the metadata
    assert held_out_keys(keys + [f"new{i}" for i in range(10)], 0.05) & held  # adding images keeps most
    assert len(held_out_keys(keys[:6], 0.05)) == 1  # at least one
    with pytest.raises(SdtuneError, match="leaves none to train on"):
        held_out_keys(keys[:1], 0.5)


def test_timesteps_fall_one_in_each_quarter_of_the_trained_range():
    for key in ("a", "b", "img07"):
        steps = draw_timesteps(key, 4, 0, 1000)
        assert [t // 250 for t in steps] == [0, 1, 2, 3]
        assert draw_timesteps(key, 4, 0, 1000) == steps  # drawn once: the same every time
        assert all(200 <= t < 600 for t in draw_timesteps(key, 4, 200, 600))
    assert draw_timesteps("a", 4, 0, 1000) != draw_timesteps("b", 4, 0, 1000)
    torch.testing.assert_close(draw_noise("a", 1, (4, 8, 8)), draw_noise("a", 1, (4, 8, 8)), rtol=0, atol=0)


@pytest.mark.parametrize("overrides, message", [
    ({"validation_split": 1.0}, "from 0 to below 1"),
    ({"validation_data_dir": "x"}, "go together"),
    ({"validate_every_n_steps": 2}, "needs a validation set"),
    ({"save_best": True}, "needs a validation set"),
    ({"validation_split": 0.2, "validation_timesteps": 0}, "must be 1 or more"),
])
def test_bad_validation_options_fail_before_the_model_loads(prepared, tmp_path, overrides, message):
    with pytest.raises(SdtuneError, match=message):
        Trainer(options(prepared, tmp_path, **overrides))


# ------------------------------------------------------------------------------------------------ the score
def _reference_loss(trainer: Trainer) -> float:
    """The validation loss by diffusers' recipe: for every held-out image and each of its fixed timesteps, the
    U-Net's epsilon prediction of DDPMScheduler.add_noise(latents * scaling_factor, noise, t), squared error."""
    images = trainer.validation.images
    scheduler, unet, total, count = trainer.model.noise_scheduler(), trainer.model.unet, 0.0, 0
    tok = trainer.model.tokenizer
    for key, example in sorted(images.data.examples.items()):
        with np.load(example.latents) as cache:
            latents = torch.from_numpy(cache["latents"])[None] * trainer.scaling_factor
        ids = tok([example.caption], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            states = trainer.model.text_encoder(ids)[0]
            for k, t in enumerate(images.timesteps[key]):
                noise = draw_noise(key, k, tuple(latents.shape[1:]))[None]
                noisy = scheduler.add_noise(latents, noise, torch.tensor([t]))
                pred = unet(noisy, torch.tensor([t]), states).sample
                total += torch.nn.functional.mse_loss(pred, noise, reduction="mean").item()
                count += 1
    return total / count


def test_the_score_is_diffusers_recipe_on_the_held_out_images_and_repeats_bit_for_bit(prepared, tmp_path):
    trainer = Trainer(options(prepared, tmp_path, validation_split=0.34))  # 2 of 6 images
    assert trainer.validation.images.images == 2 and len(trainer.data.examples) == 4
    first = trainer.validate()
    second = trainer.validate()
    assert first == second  # the same weights: the same figures, bit for bit
    assert set(first) == {"loss/validation", *(f"loss/validation_q{i}" for i in range(4))}
    assert math.isclose(first["loss/validation"], _reference_loss(trainer), rel_tol=1e-5)


def test_no_validation_image_is_ever_trained(prepared, tmp_path):
    trainer = Trainer(options(prepared, tmp_path, validation_split=0.34, max_train_steps=8))
    held = set(trainer.validation.images.data.examples)
    trained: set[str] = set()
    loss = trainer.loss

    def recording(batch, generator):
        trained.update(batch["keys"])
        return loss(batch, generator)

    trainer.loss = recording
    trainer.run()
    assert trained and held and not trained & held
    assert trained | held == {f"img{i:02d}" for i in range(6)}  # the others all trained


@pytest.mark.parametrize("target, lr", [
    ({}, 1e-3),
    ({"network_module": "lora", "network_dim": 4, "network_alpha": 4.0, "network_dropout": 0.3,
      "network_args": ["module_dropout=0.2"]}, 1e-2),
])
def test_the_validation_loss_drops_while_the_model_learns(prepared, tmp_path, target, lr):
    """Fine-tune and LoRA (with dropout: in eval mode it is off, so the scores of one set of weights repeat
    exactly, and the modules train again after)."""
    trainer = Trainer(options(prepared, tmp_path, validation_split=0.34, max_train_steps=24, train_batch_size=2,
                              learning_rate=lr, validate_every_n_steps=12, **target))
    modes = {name: module.training for name, module in trainer.target.modules.items()}
    result = trainer.run()
    assert [step for step, _ in result["validation"]] == [0, 12, 24]
    losses = [loss for _, loss in result["validation"]]
    assert losses[-1] < losses[0], losses
    assert {name: module.training for name, module in trainer.target.modules.items()} == modes
    assert trainer.validate()["loss/validation"] == losses[-1]  # eval mode: dropout did not change it


def test_a_hypernetwork_run_is_scored_with_its_hypernetwork_in_eval_mode(prepared, tmp_path):
    """The tiny model's hypernetwork learns too little in a few steps to lower a held-out loss reliably; what is
    checked: the score follows the hypernetwork's weights, and with dropout it repeats exactly (eval mode)."""
    trainer = Trainer(options(prepared, tmp_path, validation_split=0.34, max_train_steps=6, learning_rate=3e-2,
                              hypernetwork_module="default", hypernetwork_dropout="0.3"))
    before = trainer.validate()["loss/validation"]
    result = trainer.run()
    after = result["validation"][-1][1]
    assert after != before and trainer.validate()["loss/validation"] == after
    assert trainer.target.modules["hypernetwork"].training
    with torch.no_grad():
        for p in trainer.target.modules["hypernetwork"].parameters():
            p.zero_()
    assert trainer.validate()["loss/validation"] != after


def test_validation_is_logged_and_summarised(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train(options(prepared, tmp_path, validation_split=0.34, max_train_epochs=2, logging_dir=str(tmp_path / "logs")))
    scalars = _scalars(tmp_path / "logs")
    assert len(scalars["loss/validation"]) == 3  # the start, and each of the 2 epochs (the last is the end)
    assert {f"loss/validation_q{i}" for i in range(4)} <= set(scalars)  # 4 timesteps: one in each quarter
    text = caplog.text
    assert "validation: 2 image(s) held out of the training images (0.34), never trained" in text
    assert "images: 4 " in text  # the training images the plan counts
    assert "validation loss (2 image(s)):" in text


def test_a_separate_validation_folder(prepared, tmp_path):
    model, train_dir, meta = prepared("sd1", False)
    _, other_dir, other_meta = prepared("sd1", False, count=8)  # another prepared folder, the same kind of images
    trainer = Trainer(options(prepared, tmp_path, validation_data_dir=str(other_dir),
                              validation_in_json=str(other_meta)))
    assert trainer.validation.images.images == 8 and len(trainer.data.examples) == 6
    with pytest.raises(SdtuneError, match="training images too"):
        Trainer(options(prepared, tmp_path / "2", validation_data_dir=str(train_dir), validation_in_json=str(meta)))
    unprepared = tmp_path / "unprepared.json"
    unprepared.write_text('{"img00": {"caption": "a red square"}}', encoding="utf-8")  # no train_resolution
    with pytest.raises(SdtuneError, match=r"the validation set \(--validation_data_dir .*no trainable images"):
        Trainer(options(prepared, tmp_path / "3", validation_data_dir=str(other_dir),
                        validation_in_json=str(unprepared)))


def test_with_ema_the_score_is_the_saved_models(prepared, tmp_path):
    """The last validation of an EMA run scores the average: the saved model, scored from scratch, gets it."""
    result = train(options(prepared, tmp_path, validation_split=0.34, max_train_steps=6, use_ema=True,
                           ema_decay=0.5, learning_rate=1e-2))
    again = Trainer(options(prepared, tmp_path / "again", validation_split=0.34,
                            pretrained_model_name_or_path=str(result["model"])))
    assert math.isclose(again.validate()["loss/validation"], result["validation"][-1][1], rel_tol=1e-5)


def test_the_cached_text_encoder_covers_the_validation_captions(prepared, tmp_path):
    plain = Trainer(options(prepared, tmp_path / "a", validation_split=0.34)).validate()
    cached = Trainer(options(prepared, tmp_path / "b", validation_split=0.34,
                             cache_text_encoder_outputs=True)).validate()
    assert math.isclose(plain["loss/validation"], cached["loss/validation"], rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------ --save_best
def test_save_best_keeps_the_checkpoint_of_the_lowest_scripted_loss(prepared, tmp_path, monkeypatch):
    """Scripted losses 0.5 (start), 0.4, 0.45, 0.3, 0.35, 0.6 (steps 1-5): the best is step 3's model."""
    script = iter([0.5, 0.4, 0.45, 0.3, 0.35, 0.6])
    trainer = Trainer(options(prepared, tmp_path, validation_split=0.34, max_train_steps=5, validate_every_n_steps=1,
                              save_every_n_steps=1, save_best=True, save_model_as="safetensors"))
    monkeypatch.setattr(trainer.validation.images, "totals",
                        lambda score, device: torch.tensor([[next(script)] * 4, [1.0] * 4]))
    result = trainer.run()
    assert [round(loss, 6) for _, loss in result["validation"]] == [0.5, 0.4, 0.45, 0.3, 0.35, 0.6]
    assert trainer.validation.best.step == 3
    out = tmp_path / "out"
    best, step3, step4 = (load_file(str(out / name)) for name in
                          ("best.safetensors", "step-00000003.safetensors", "step-00000004.safetensors"))
    assert best.keys() == step3.keys()
    assert all(torch.equal(best[k], step3[k]) for k in best)
    assert any(not torch.equal(best[k], step4[k]) for k in best)
    assert not (out / "best-state").exists()  # the best is a model, not a state


def test_a_resumed_run_replaces_the_best_only_with_a_better_one(prepared, tmp_path, monkeypatch):
    first = Trainer(options(prepared, tmp_path, validation_split=0.34, max_train_steps=2, validate_every_n_steps=1,
                            save_best=True, save_state=True, save_model_as="safetensors"))
    script = iter([0.5, 0.2, 0.3])
    monkeypatch.setattr(first.validation.images, "totals",
                        lambda score, device: torch.tensor([[next(script)] * 4, [1.0] * 4]))
    first.run()
    best_before = (tmp_path / "out" / "best.safetensors").read_bytes()
    resumed = Trainer(options(prepared, tmp_path, validation_split=0.34, max_train_steps=4, validate_every_n_steps=1,
                              save_best=True, save_state=True, save_model_as="safetensors",
                              resume=str(tmp_path / "out" / "last-state")))
    assert (round(resumed.validation.best.loss, 6), resumed.validation.best.step) == (0.2, 1)
    later = iter([0.25, 0.3])
    monkeypatch.setattr(resumed.validation.images, "totals",
                        lambda score, device: torch.tensor([[next(later)] * 4, [1.0] * 4]))
    resumed.run()
    assert (tmp_path / "out" / "best.safetensors").read_bytes() == best_before



def test_a_resume_with_another_validation_split_is_refused(prepared, tmp_path):
    train(options(prepared, tmp_path, validation_split=0.34, max_train_steps=1, save_state=True))
    with pytest.raises(SdtuneError, match="held out --validation_split 0.34"):
        Trainer(options(prepared, tmp_path, max_train_steps=2, resume=str(tmp_path / "out" / "last-state")))
