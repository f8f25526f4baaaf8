"""sdtune train --hypernetwork_module: learning with the model frozen, file names, bit-exact resume, mixed
precision, samples with the hypernetwork, option errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.models.hypernetwork import Hypernetwork
from sdtune.models.io import load_model
from sdtune.sampling.pipeline import generate_images
from sdtune.sampling.prompts import read_prompt_file
from sdtune.train.loop import Trainer, train
from tests.train.test_train import options

pytestmark = pytest.mark.component


def hn_options(prepared, tmp_path: Path, family: str = "sd1", **overrides):
    return options(prepared, tmp_path, family, hypernetwork_module="default", **overrides)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a hypernetwork file, flattened to names."""
    data = torch.load(path, weights_only=True)
    return {f"{d}.{i}.{k}": v for d in data if isinstance(d, int) for i, state in enumerate(data[d])
            for k, v in state.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_overfitting_trains_only_the_hypernetwork_and_lowers_the_loss(prepared, attention_heavy_model, tmp_path,
                                                                      family):
    """Two runs with the same seed see the same batches, noise and timesteps; one learns (lr 3e-2), the other does
    not (lr 0, its hypernetwork stays as initialised). The learning run's loss falls, below the other's too."""
    model = attention_heavy_model(family)
    common = dict(pretrained_model_name_or_path=str(model), max_train_steps=60, train_batch_size=3)
    learner = Trainer(hn_options(prepared, tmp_path / "a", family, learning_rate=3e-2, **common))
    learned = learner.run()
    still = train(hn_options(prepared, tmp_path / "b", family, learning_rate=0.0, **common))
    a, b = np.array(learned["losses"]), np.array(still["losses"])
    assert len(a) == len(b) == 60 and learned["model"].name == "last.pt"
    assert a[-10:].mean() < a[:10].mean() - 0.03, a
    assert (a[-10:] - b[-10:]).mean() < -0.03, a - b  # the same draws: the difference is what was learned
    # every hypernetwork tensor moved away from the initialisation; nothing else changed, bit for bit
    trained, initial = tensors(learned["model"]), tensors(still["model"])
    assert trained.keys() == initial.keys() and len(trained) == 2 * 2 * 4  # widths 32, 64; key and value
    assert all(not torch.equal(trained[k], initial[k]) for k in trained)
    base = load_model(model)
    for name in ("unet", "text_encoder"):
        now = getattr(learner.model, name).state_dict()
        assert all(torch.equal(now[k], v) for k, v in getattr(base, name).state_dict().items()), name
        assert not any(p.requires_grad for p in getattr(learner.model, name).parameters())


def test_resume_is_bit_exact_mid_epoch_with_dropout_and_names_the_files(prepared, tmp_path):
    """6 images in 2 buckets of 3, batch 2: 4 batches an epoch; the step-5 state falls in the second epoch. Dropout
    draws from torch's global RNG: seeded per micro-batch, it too repeats after --resume."""
    common = dict(shuffle_caption=True, lr_scheduler="cosine", lr_warmup_steps=2, save_state=True,
                  max_train_steps=8, output_name="hn", hypernetwork_activation="relu",
                  hypernetwork_layer_norm=True, hypernetwork_dropout="0.3")
    straight = train(hn_options(prepared, tmp_path / "a", save_every_n_steps=5, save_every_n_epochs=1, **common))
    out = tmp_path / "a" / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "hn-000001-state", "hn-000001.pt", "hn-state", "hn-step00000005-state", "hn-step00000005.pt", "hn.pt"]
    state = out / "hn-step00000005-state"
    assert sorted(p.name for p in state.iterdir()) == [
        "hypernetwork.safetensors", "optimizer.pt", "progress.json", "provenance.json",
        "scheduler.pt"]  # no U-Net, no text encoder
    step5 = torch.load(out / "hn-step00000005.pt", weights_only=True)
    assert (step5["step"], step5["name"], step5["sd_checkpoint_name"]) == (5, "hn", "tiny-sd1-diffusers_safetensors")
    assert step5["is_layer_norm"] and step5["use_dropout"] and step5["dropout_structure"] == [0.0, 0.3, 0.0]

    resumed = train(hn_options(prepared, tmp_path / "c", resume=str(state), **common))
    assert resumed["losses"] == straight["losses"][5:]
    a = load_file(str(out / "hn-state" / "hypernetwork.safetensors"))
    c = load_file(str(tmp_path / "c" / "out" / "hn-state" / "hypernetwork.safetensors"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    final_a, final_c = tensors(out / "hn.pt"), tensors(tmp_path / "c" / "out" / "hn.pt")
    assert all(torch.equal(final_a[k], final_c[k]) for k in final_a)
    assert torch.load(out / "hn.pt", weights_only=True)["step"] == 8


def test_resume_with_another_layout_or_mode_says_what_to_do(prepared, tmp_path):
    train(hn_options(prepared, tmp_path / "a", max_train_steps=2, save_state=True))
    state = str(tmp_path / "a" / "out" / "last-state")
    with pytest.raises(SdtuneError, match="another layout.*--hypernetwork_\\* options"):
        train(hn_options(prepared, tmp_path / "b", max_train_steps=3, resume=state,
                         hypernetwork_layer_structure="1,1,1"))
    with pytest.raises(SdtuneError, match="has no unet.safetensors"):
        train(options(prepared, tmp_path / "c", max_train_steps=3, resume=state))


def test_mixed_precision_keeps_the_frozen_model_in_half_and_the_hypernetwork_in_float(prepared, tmp_path):
    trainer = Trainer(hn_options(prepared, tmp_path, mixed_precision="bf16", max_train_steps=2))
    result = trainer.run()
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.text_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.target.hypernetwork.parameters())
    assert all(np.isfinite(result["losses"]))
    assert all(t.dtype == torch.float32 for t in tensors(result["model"]).values())


def test_samples_during_training_use_the_hypernetwork_being_trained(prepared, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 3 --d 5\n", encoding="utf-8")
    result = train(hn_options(prepared, tmp_path, max_train_steps=4, learning_rate=3e-2, sample_prompts=str(prompts),
                              sample_every_n_steps=3, save_every_n_steps=3))
    sample = tmp_path / "out" / "sample" / "sample_000003_00.png"
    with Image.open(sample) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        assert "Hypernet: hypernetwork, Hypernet strength: 1.0" in image.text["parameters"]
    base = load_model(prepared("sd1")[0])
    specs = read_prompt_file(prompts)
    step3 = Hypernetwork.load(tmp_path / "out" / "step-00000003.pt")  # the weights at the time of the sample
    with_hn = generate_images(base, specs, sampler="ddim", hypernetwork=step3, progress=False)[0]
    without = generate_images(base, specs, sampler="ddim", progress=False)[0]
    assert np.abs(np.asarray(with_hn.image, dtype=np.int16) - pixels).max() <= 1
    assert np.abs(np.asarray(without.image, dtype=np.int16) - pixels).mean() > 1
    assert result["model"].name == "last.pt"


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("overrides,message", [
    (dict(hypernetwork_weights="x.pt"), "--hypernetwork_weights needs --hypernetwork_module"),
    (dict(hypernetwork_module="default", train_text_encoder=True), "trains only the hypernetwork"),
    (dict(hypernetwork_module="default", hypernetwork_layer_structure="2,1"), "start and end with 1"),
    (dict(hypernetwork_module="default", hypernetwork_weights="missing.pt"), "missing.pt: no such file"),
    (dict(hypernetwork_module="default", hypernetwork_weights=__file__), r"test_train\.py: cannot be read"),
])
def test_bad_hypernetwork_options_fail_before_the_model_loads(prepared, tmp_path, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("sdtune.train.base_model.load_model", no_loading)
    with pytest.raises(SdtuneError, match=message):
        Trainer(options(prepared, tmp_path, **overrides)).run()


def test_weights_of_another_family_are_refused_naming_the_file(prepared, tmp_path):
    path = Hypernetwork([320, 640, 1024, 1280]).save(tmp_path / "sd2-style.pt")
    with pytest.raises(SdtuneError, match=r"sd2-style\.pt.*SD 2\.x \(1024\).*trained for this model family"):
        train(hn_options(prepared, tmp_path, hypernetwork_weights=str(path)))


def test_training_continues_from_hypernetwork_weights(prepared, tmp_path):
    first = train(hn_options(prepared, tmp_path / "a", max_train_steps=2))
    # the file's layout wins over (default) layout options; the run trains it further
    second = train(hn_options(prepared, tmp_path / "b", max_train_steps=2, hypernetwork_weights=str(first["model"])))
    a, b = tensors(first["model"]), tensors(second["model"])
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a)


def test_help_says_which_activations_comfyui_refuses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ComfyUI's loader refuses gelu and silu" in text
    assert "--hypernetwork_module {default,hypernetwork_nai,networks.hypernetwork_nai}" in text
