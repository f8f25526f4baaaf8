"""End-to-end training runs on tiny models: learning, saving, resuming, logging, failure."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.models.io import load_model
from sdtune.sampling.pipeline import generate_images
from sdtune.sampling.prompts import PromptSpec
from sdtune.train import base_model, loop
from sdtune.train.loop import Trainer, TrainingDiverged, TrainOptions, train

pytestmark = pytest.mark.component


def options(prepared, tmp_path: Path, family: str = "sd1", flip_aug: bool = False, **overrides) -> TrainOptions:
    model, train_dir, meta = prepared(family, flip_aug)
    base = dict(pretrained_model_name_or_path=str(model), in_json=str(meta), train_data_dir=str(train_dir),
                output_dir=str(tmp_path / "out"), train_batch_size=2, learning_rate=1e-3, max_train_steps=6,
                seed=3, max_data_loader_n_workers=0)
    base.update(overrides)
    return TrainOptions(**base)


def mean(values):
    return float(np.mean(values))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_overfitting_lowers_the_loss_and_the_model_loads_back(prepared, tmp_path, family):
    result = train(options(prepared, tmp_path, family, max_train_steps=36, train_batch_size=3))
    losses = result["losses"]
    assert len(losses) == 36 and result["global_step"] == 36
    assert mean(losses[-6:]) < 0.6 * mean(losses[:6]), losses
    trained = load_model(result["model"])
    assert trained.family.name == family
    base = load_model(prepared(family)[0])
    assert not torch.equal(trained.unet.conv_in.weight, base.unet.conv_in.weight)
    assert torch.equal(trained.text_encoder.final_layer_norm.weight, base.text_encoder.final_layer_norm.weight)


@pytest.mark.parametrize("fmt", ["ckpt", "diffusers", "diffusers_safetensors"])
def test_every_save_format_loads_back_with_the_trained_weights(prepared, tmp_path, fmt):
    trainer = Trainer(options(prepared, tmp_path, save_model_as=fmt, max_train_steps=2, save_precision="fp16"))
    result = trainer.run()
    path = result["model"]
    assert path.name == ("last.ckpt" if fmt == "ckpt" else "last")
    reloaded = load_model(path)
    expected = trainer.model.unet.state_dict()
    got = reloaded.unet.state_dict()
    assert all(torch.equal(expected[k].half(), got[k].half()) for k in expected)
    images = generate_images(reloaded, [PromptSpec("a red square")], steps=2, width=64, height=64, seed=1,
                             progress=False)
    assert images[0].image.size == (64, 64)
    if fmt.startswith("diffusers"):  # diffusers itself loads the folder
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        assert torch.equal(pipe.unet.conv_in.weight, got["conv_in.weight"])


def test_text_encoder_training_changes_it(prepared, tmp_path):
    result = train(options(prepared, tmp_path, train_text_encoder=True, learning_rate_te=1e-3, max_train_steps=2))
    base = load_model(prepared("sd1")[0])
    trained = load_model(result["model"])
    assert not torch.equal(trained.text_encoder.encoder.layers[0].mlp.fc1.weight,
                           base.text_encoder.encoder.layers[0].mlp.fc1.weight)


@pytest.mark.parametrize("accumulation,stop_at", [(1, 5), (2, 3)])
def test_resume_is_bit_exact_mid_epoch(prepared, tmp_path, accumulation, stop_at):
    """6 images in 2 buckets of 3, batch 2: 4 batches an epoch. The state saved after step 5 (or step 3 with
    accumulation 2) falls in the middle of the second epoch; resuming from it must end with the weights of the
    uninterrupted run."""
    common = dict(flip_aug=True, shuffle_caption=True, train_text_encoder=True, lr_scheduler="cosine",
                  lr_warmup_steps=2, gradient_accumulation_steps=accumulation, save_state=True)
    total = 8 if accumulation == 1 else 4
    straight = train(options(prepared, tmp_path / "a", max_train_steps=total, save_every_n_steps=stop_at, **common))
    state = tmp_path / "a" / "out" / f"step-{stop_at:08d}-state"
    resumed = train(options(prepared, tmp_path / "c", max_train_steps=total, resume=str(state), **common))
    assert resumed["global_step"] == total and len(resumed["losses"]) == total - stop_at
    assert resumed["losses"] == straight["losses"][stop_at:]
    for name in ("unet", "text_encoder"):
        a = load_file(str(tmp_path / "a" / "out" / "last-state" / f"{name}.safetensors"))
        c = load_file(str(tmp_path / "c" / "out" / "last-state" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a)
    assert '"global_step": %d' % total in (tmp_path / "c" / "out" / "last-state" / "progress.json").read_text()


def run_with_ctrl_c_after(trainer: Trainer, monkeypatch, step: int) -> None:
    """Run ``trainer`` with a Ctrl-C (KeyboardInterrupt) arriving just after optimizer step ``step``."""
    def interrupt():
        if trainer.progress.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def test_ctrl_c_saves_state_that_resumes_exactly(prepared, tmp_path, monkeypatch):
    straight = train(options(prepared, tmp_path / "a", max_train_steps=5))
    trainer = Trainer(options(prepared, tmp_path / "b", max_train_steps=5, save_state=True))
    run_with_ctrl_c_after(trainer, monkeypatch, 2)
    state = tmp_path / "b" / "out" / "interrupted-state"
    assert (state / "progress.json").is_file()
    resumed = train(options(prepared, tmp_path / "b", max_train_steps=5, resume=str(state)))
    assert resumed["losses"] == straight["losses"][2:]


def test_epoch_and_step_saves_with_rotation(prepared, tmp_path):
    # 6 images in 2 buckets of 3, batch 2 -> 4 steps an epoch; 16 steps = 4 epochs
    result = train(options(prepared, tmp_path, max_train_steps=16, save_every_n_epochs=1, save_last_n_epochs=2,
                           save_every_n_steps=5, output_name="mine", save_state=True))
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert "mine.safetensors" in names and "mine-state" in names
    assert "mine-000001.safetensors" not in names  # rotated away: only the last 2 epoch saves stay
    assert "mine-000002.safetensors" in names and "mine-000003.safetensors" in names
    assert "mine-step00000005.safetensors" in names and "mine-step00000015.safetensors" in names
    assert "mine-000004.safetensors" not in names  # the final epoch is saved as mine.safetensors
    assert result["epoch"] == 4


def test_save_n_epoch_ratio_and_save_last_n_steps(prepared, tmp_path):
    # 4 steps an epoch, 16 steps = 4 epochs; ratio 2 -> a save every 2 epochs
    train(options(prepared, tmp_path, max_train_steps=16, save_n_epoch_ratio=2, save_every_n_steps=2,
                  save_last_n_steps=4, output_name="r", save_state=True))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert sorted(n for n in names if n.startswith("r-0")) == ["r-000002-state", "r-000002.safetensors"]
    steps = sorted(n for n in names if "-step" in n and n.endswith(".safetensors"))
    assert steps == ["r-step00000010.safetensors", "r-step00000012.safetensors", "r-step00000014.safetensors"]
    assert sorted(n for n in names if "-step" in n and n.endswith("-state")) == [
        "r-step00000010-state", "r-step00000012-state", "r-step00000014-state"]  # states rotate with them


def test_nan_loss_stops_and_keeps_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    real_target = loop.noise_lib.target
    calls = {"n": 0}

    def target(*args):
        calls["n"] += 1
        value = real_target(*args)
        return value * float("nan") if calls["n"] > 3 else value

    monkeypatch.setattr(loop.noise_lib, "target", target)
    with pytest.raises(TrainingDiverged, match="step 4"):
        train(options(prepared, tmp_path, max_train_steps=6, save_every_n_steps=2))
    out = tmp_path / "out"
    assert (out / "step-00000002.safetensors").is_file()
    assert not (out / "last.safetensors").exists()
    load_model(out / "step-00000002.safetensors")  # intact


def test_missing_latent_is_encoded_on_the_fly(prepared, tmp_path):
    model, train_dir, meta = prepared("sd1", False)
    copy = tmp_path / "train"
    copy.mkdir()
    for path in train_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "img00.npz").unlink()
    trainer = Trainer(dataclasses.replace(options(prepared, tmp_path, max_train_steps=2), train_data_dir=str(copy)))
    result = trainer.run()
    assert result["encoded_on_the_fly"] == 1
    # the same latents prepare cached: same bucket, resize, crop and VAE
    cached = torch.from_numpy(np.load(train_dir / "img00.npz")["latents"])
    torch.testing.assert_close(trainer.data.in_memory["img00"], cached, rtol=1e-5, atol=1e-5)


def test_tensorboard_logs(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(options(prepared, tmp_path, max_train_steps=4, logging_dir=str(tmp_path / "logs"), log_prefix="run-"))
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run-")
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/step", "loss/epoch", "lr/unet"} <= set(tags)
    assert len(events.Scalars("loss/step")) == 4


def test_cli_train_with_config_file(prepared, tmp_path, capsys):
    model, train_dir, meta = prepared("sd1", False)
    config = tmp_path / "train.toml"
    config.write_text(
        f'[model]\npretrained_model_name_or_path = "{model.as_posix()}"\n'
        f'[data]\nin_json = "{meta.as_posix()}"\ntrain_data_dir = "{train_dir.as_posix()}"\n'
        f'[train]\nmax_train_steps = 2\ntrain_batch_size = 2\nmax_data_loader_n_workers = 0\n', encoding="utf-8")
    assert main(["train", "--config_file", str(config), "--output-dir", str(tmp_path / "out"), "--seed", "1"]) == 0
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_options_are_validated_before_loading_a_model(tmp_path, capsys):
    assert main(["train", "--pretrained_model_name_or_path", "missing", "--in_json", str(tmp_path / "x.json"),
                 "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path), "--full_fp16"]) == 2
    assert "--full_fp16 needs --mixed_precision fp16" in capsys.readouterr().err


def test_samples_appear_at_the_requested_steps(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2\n# a comment\na blue square --w 64 --h 64 --s 2 --d 5\n",
                       encoding="utf-8")
    # 4 steps an epoch: samples at steps 3 and 6 (every 3 steps) and at the end of epoch 1 (step 4)
    train(options(prepared, tmp_path, max_train_steps=6, sample_prompts=str(prompts), sample_every_n_steps=3,
                  sample_every_n_epochs=1, logging_dir=str(tmp_path / "logs")))
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert names == [f"sample_{step:06d}_{i:02d}.png" for step in (3, 4, 6) for i in (0, 1)]
    events = EventAccumulator(str(next((tmp_path / "logs").iterdir())), size_guidance={"images": 0})
    events.Reload()
    assert {"sample/0", "sample/1"} <= set(events.Tags()["images"])


def test_bad_sample_prompt_file_fails_before_training(prepared, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --x 3\n", encoding="utf-8")
    with pytest.raises(SdtuneError, match="prompts.txt:1"):
        train(options(prepared, tmp_path, sample_prompts=str(prompts), sample_every_n_steps=1))


def test_use_safetensors_turns_ckpt_and_diffusers_bin_into_safetensors():
    from sdtune.train.targets import save_format

    def fmt(**kw):
        return save_format(TrainOptions(**kw))

    assert fmt() == "safetensors"
    assert fmt(save_model_as="ckpt") == "ckpt"
    assert fmt(save_model_as="ckpt", use_safetensors=True) == "safetensors"
    assert fmt(save_model_as="diffusers", use_safetensors=True) == "diffusers_safetensors"
    assert fmt(save_model_as="diffusers") == "diffusers"


def test_data_loader_workers_do_not_change_the_run(prepared, tmp_path):
    common = dict(max_train_steps=5, shuffle_caption=True, flip_aug=True)
    in_process = train(options(prepared, tmp_path / "a", max_data_loader_n_workers=0, **common))
    workers = train(options(prepared, tmp_path / "b", max_data_loader_n_workers=2, **common))
    assert workers["losses"] == in_process["losses"]


def test_epochs_and_repeats_set_the_number_of_steps(prepared, tmp_path):
    # 6 images in 2 buckets of 3, batch 2: 4 batches an epoch; with 2 repeats, 6 images x 2 in batches of 2 = 6
    result = train(options(prepared, tmp_path, max_train_epochs=2, max_train_steps=999))
    assert result["global_step"] == 8 and result["epoch"] == 2
    trainer = Trainer(options(prepared, tmp_path / "r", dataset_repeats=2, max_train_epochs=1))
    result = trainer.run()
    assert trainer.plan.batches_per_epoch == 6 and result["global_step"] == 6


def test_min_snr_gamma_and_noise_offset_change_the_loss_as_documented(prepared, tmp_path):
    def loss_of(name: str, **overrides) -> float:
        trainer = Trainer(options(prepared, tmp_path / name, **overrides))
        keys, _ = trainer.data.epoch_batches(0, 0, 2, 1, 0)[0]
        batch = trainer.data.load_batch(keys, 0, 0)
        with torch.no_grad():
            return trainer.loss(batch, torch.Generator().manual_seed(0)).item()

    plain = loss_of("plain")
    # gamma above every timestep's SNR: every weight is 1 and the loss is the plain one.
    assert loss_of("huge", min_snr_gamma=1e9) == pytest.approx(plain, rel=1e-5)
    # gamma far below: every sample is weighted gamma / SNR < 1.
    assert loss_of("tiny", min_snr_gamma=1e-3) < 0.5 * plain
    assert loss_of("offset", noise_offset=0.5) != pytest.approx(plain, rel=1e-3)


def test_training_with_min_snr_and_noise_offset_resumes_exactly(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    extra = dict(min_snr_gamma=5.0, noise_offset=0.1, max_train_steps=4, save_model_as="safetensors")
    straight = train(options(prepared, tmp_path / "a", **extra))
    assert "objective: noise offset 0.1; min-SNR gamma 5" in caplog.text  # the start-up summary says what is on
    first = train(options(prepared, tmp_path / "b", **{**extra, "max_train_steps": 2}, save_state=True))
    assert first["losses"] == straight["losses"][:2]
    state = next(p for p in (tmp_path / "b" / "out").iterdir() if p.is_dir() and "state" in p.name)
    resumed = train(options(prepared, tmp_path / "b", **extra, resume=str(state)))
    assert resumed["losses"] == straight["losses"][2:]
    a = load_file(tmp_path / "a" / "out" / "last.safetensors")
    b = load_file(tmp_path / "b" / "out" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [{"noise_offset": -0.1}, {"min_snr_gamma": 0.0}])
def test_bad_noise_options_are_refused(prepared, tmp_path, bad):
    with pytest.raises(SdtuneError, match="noise_offset|min_snr_gamma"):
        Trainer(options(prepared, tmp_path, **bad))


def test_caption_dropout_reaches_the_text_encoder(prepared, tmp_path):
    def captions_seen(name: str, **overrides) -> list[str]:
        trainer = Trainer(options(prepared, tmp_path / name, max_train_steps=3, **overrides))
        seen: list[str] = []
        encode_captions = trainer.conditioning

        def recording(captions, *encoder):
            seen.extend(captions)
            return encode_captions(captions, *encoder)

        trainer.conditioning = recording
        trainer.run()
        return seen

    plain = captions_seen("plain")
    assert all(plain) and any("," in c for c in plain)
    dropped = captions_seen("dropped", caption_dropout_rate=1.0)
    assert dropped and set(dropped) == {""}
    tags = captions_seen("tags", keep_tokens=1, caption_tag_dropout_rate=1.0)
    assert tags and all(c and "," not in c for c in tags)  # only the first part is left


def test_loader_workers_start_under_spawn_as_on_windows(prepared, tmp_path, request):
    opts = options(prepared, tmp_path, max_train_steps=2, max_data_loader_n_workers=1, shuffle_caption=True,
                   caption_dropout_rate=0.1)  # prepared first: its own loader runs in the main process
    request.getfixturevalue("spawn_workers")
    result = train(opts)
    assert len(result["losses"]) == 2


@pytest.mark.parametrize("low, high", [(-1, 1000), (500, 500), (0, 1001)])
def test_bad_timestep_range_is_refused(prepared, tmp_path, low, high):
    with pytest.raises(SdtuneError, match="min_timestep"):
        Trainer(options(prepared, tmp_path, min_timestep=low, max_timestep=high))


def test_timestep_range_reaches_the_training_step(prepared, tmp_path, monkeypatch):
    seen: list[int] = []
    real = loop.noise_lib.sample_noise_and_timesteps

    def recording(*args, **kwargs):
        noise, timesteps = real(*args, **kwargs)
        seen.extend(timesteps.tolist())
        return noise, timesteps

    monkeypatch.setattr(loop.noise_lib, "sample_noise_and_timesteps", recording)
    train(options(prepared, tmp_path, max_train_steps=4, min_timestep=700, max_timestep=710))
    assert len(seen) >= 4 and all(700 <= t < 710 for t in seen)


@pytest.mark.parametrize("args,message", [
    (["--lr_warmup_steps", "10"], "--lr_warmup_steps 10 does nothing with --lr_scheduler constant"),
    (["--use_8bit_adam", "--optimizer_type", "Lion"], "--use_8bit_adam and --optimizer_type Lion name two optimizers"),
])
def test_options_that_would_be_ignored_are_refused(prepared, tmp_path, capsys, args, message):
    """sd-scripts refuses warm-up with the constant schedule; --use_8bit_adam used to replace an explicit
    --optimizer_type without a word."""
    model, train_dir, meta = prepared("sd1")
    code = main(["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta),
                 "--train_data_dir", str(train_dir), "--output_dir", str(tmp_path / "out"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_data_loader_workers_start_once_for_the_whole_run(prepared, tmp_path, monkeypatch):
    """3 epochs, 2 worker processes: one DataLoader iteration (one start of the workers) for the run, and the
    same batches as loading in the main process."""
    starts = []
    original = torch.utils.data.DataLoader.__iter__

    def iterate(self):
        starts.append(self.num_workers)
        return original(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iterate)
    in_workers = train(options(prepared, tmp_path / "w", max_train_steps=12, max_data_loader_n_workers=2))
    assert in_workers["epoch"] == 3
    assert starts == [2]
    in_main = train(options(prepared, tmp_path / "m", max_train_steps=12, max_data_loader_n_workers=0))
    assert in_workers["losses"] == in_main["losses"]


def test_the_start_up_summary_says_device_precision_optimizer_attention_and_the_real_resolution(
        prepared, tmp_path, caplog):
    """Issue 18: a user must be able to confirm that 8-bit Adam or fp16 is on, and a 64-px model is not "512 px"."""
    caplog.set_level("INFO", logger="sdtune")
    train(options(prepared, tmp_path / "a", max_train_steps=1, mixed_precision="fp16", use_8bit_adam=True,
                  gradient_checkpointing=True, lr_scheduler="cosine", lr_warmup_steps=1))
    assert "device: cpu; precision: fp16 autocast, fp32 weights, dynamic loss scaling" in caplog.text
    assert "optimizer: AdamW8bit, learning rate 0.001, cosine after 1 warm-up steps; attention: sdpa; gradient " \
           "checkpointing" in caplog.text
    assert "epsilon prediction, 64 px)" in caplog.text and "512 px" not in caplog.text
    caplog.clear()
    train(options(prepared, tmp_path / "b", max_train_steps=1, mixed_precision="bf16", full_bf16=True))
    assert "precision: bf16 weights and gradients" in caplog.text
    assert "optimizer: AdamW (fp32 moments, kahan rounding of the half-precision weights)" in caplog.text


def test_samples_without_a_size_use_the_most_used_bucket_and_say_what_they_do(prepared, tmp_path, caplog):
    """Issue 18: a 64-px model trained on small buckets sampled at 512 px for minutes, with no word."""
    from PIL import Image

    caplog.set_level("INFO", logger="sdtune")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --s 1\n", encoding="utf-8")
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=1, sample_prompts=str(prompts),
                              sample_every_n_steps=1))
    trainer.run()
    (bucket, _), = sorted(trainer.data.buckets.counts().items(), key=lambda item: -item[1])[:1]
    with Image.open(tmp_path / "out" / "sample" / "sample_000001_00.png") as image:
        assert image.size == bucket
    assert f"step 1: sampling 1 image(s) (ddim, 30 steps, {bucket[0]}x{bucket[1]} unless a line says otherwise)" \
        in caplog.text


def test_every_missing_required_option_is_named_at_once(tmp_path, capsys):
    assert main(["train", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--pretrained_model_name_or_path, --in_json, --train_data_dir are required" in err


@pytest.mark.skipif(__import__("importlib").util.find_spec("xformers") is not None, reason="xformers is installed")
def test_a_missing_xformers_is_reported_before_the_model_loads(prepared, tmp_path, capsys, monkeypatch):

    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    model, train_dir, meta = prepared("sd1")
    assert main(["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta), "--train_data_dir",
                 str(train_dir), "--output_dir", str(tmp_path / "out"), "--xformers"]) == 2
    assert "--xformers needs the xformers package" in capsys.readouterr().err
