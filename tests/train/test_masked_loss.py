"""--masked_loss: the loss weighted by each image's cached mask in latent space, against sd-scripts' recipe written
out here (library/custom_train_functions.py ``apply_masked_loss``: the elementwise loss times
``F.interpolate(mask, size=loss.shape[2:], mode="area")``, then the mean per sample, min-SNR weights, the mean),
and whole runs of every training target."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdtune.data.metadata import save_metadata
from sdtune.data.prepare import PrepareOptions, prepare_latents
from sdtune.errors import SdtuneError
from sdtune.models.io import load_vae
from sdtune.models.tiny import build_tiny
from sdtune.train import loop
from sdtune.train.loop import Trainer
from sdtune.train.noise import prediction_loss
from tests.train.conftest import make_images
from tests.train.test_train import options

pytestmark = pytest.mark.component


def mask_image(kind: str, size: tuple[int, int]) -> Image.Image:
    """white: all 255; half: the left half black; grey: a ramp of greys with a darker top third."""
    w, h = size
    if kind == "white":
        values = np.full((h, w), 255.0)
    elif kind == "half":
        values = np.full((h, w), 255.0)
        values[:, : w // 2] = 0
    else:
        y, x = np.mgrid[0:h, 0:w]
        values = 30 + 200 * x / (w - 1) * np.where(y < h // 3, 0.5, 1.0)
    return Image.fromarray(values.astype(np.uint8), "L")


@pytest.fixture(scope="module")
def masked(tmp_path_factory, saved_model):
    """masked(kind, every=1) -> a ``prepared``-like callable for test_train's ``options``: the tiny model and six
    prepared images (64x64 and 128x48, whose 96x32 bucket crops rows 2..34), every ``every``-th of them with a
    ``kind`` mask (prepare --mask_dir)."""
    cache: dict[tuple, tuple[Path, Path, Path, Path]] = {}

    def get(kind: str, every: int = 1):
        if (kind, every) not in cache:
            model = saved_model("sd1", "diffusers_safetensors")
            root = tmp_path_factory.mktemp(f"masked-{kind}")
            train_dir, masks = root / "train", root / "masks"
            save_metadata(root / "meta.json", make_images(train_dir))
            masks.mkdir()
            for image in sorted(train_dir.glob("*.png"))[::every]:
                with Image.open(image) as im:
                    mask_image(kind, im.size).save(masks / image.name)
            options = PrepareOptions(train_data_dir=train_dir, in_json=root / "meta.json",
                                     out_json=root / "meta_lat.json", model_name_or_path=str(model),
                                     max_resolution="64,64", min_bucket_reso=32, max_bucket_reso=128,
                                     bucket_reso_steps=32, max_data_loader_n_workers=0, mask_dir=masks)
            prepare_latents(options, load_vae(model))
            cache[kind, every] = (model, train_dir, root / "meta_lat.json", masks)
        model, train_dir, meta, masks = cache[kind, every]
        return (lambda family="sd1", flip_aug=False: (model, train_dir, meta)), masks

    return get


def sd_scripts_loss(pred, target, pixel_mask, snr_weights=None):
    """sd-scripts' train_network.py with --masked_loss: mse (none) -> apply_masked_loss -> mean over C, H, W ->
    (min-SNR weights) -> mean."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss * F.interpolate(pixel_mask, size=loss.shape[2:], mode="area")
    loss = loss.mean([1, 2, 3])
    if snr_weights is not None:
        loss = loss * snr_weights
    return loss.mean()


def snr_weights(scheduler, timesteps, gamma):
    """min(SNR, gamma) / SNR for epsilon (Hang et al. 2023), from the scheduler's alphas_cumprod."""
    abar = scheduler.alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    return torch.minimum(snr, torch.full_like(snr, gamma)) / snr


def test_the_gradient_is_zero_outside_the_mask():
    model = build_tiny("sd1", seed=2)
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    states = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.tensor([100, 700])
    pred = model.unet(noisy, timesteps, states).sample
    target = torch.randn(pred.shape, generator=gen)
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :4] = 0  # the left half
    for gamma in (None, 5.0):
        loss = prediction_loss("epsilon", model.noise_scheduler(), pred, target, timesteps, gamma, mask)
        (grad,) = torch.autograd.grad(loss, pred, retain_graph=True)
        assert torch.all(grad[..., :4] == 0)
        assert torch.all(grad[..., 4:] != 0)
        if gamma is None:  # d/dpred of mean(mask * (pred - target)^2)
            torch.testing.assert_close(grad, 2 * (pred - target).detach() * mask / pred.numel())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_a_white_mask_is_exactly_the_unmasked_loss(prediction_type, gamma):
    scheduler = build_tiny("sd1").noise_scheduler()
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 8, 12, generator=gen), torch.randn(3, 4, 8, 12, generator=gen)
    timesteps = torch.tensor([5, 400, 990])
    plain = prediction_loss(prediction_type, scheduler, pred, target, timesteps, gamma)
    white = prediction_loss(prediction_type, scheduler, pred, target, timesteps, gamma, torch.ones(3, 1, 8, 12))
    torch.testing.assert_close(white, plain, rtol=0, atol=0)
    # and a half mask is not: about half the loss (the check above can fail)
    half = torch.ones(3, 1, 8, 12)
    half[..., :6] = 0
    ratio = prediction_loss(prediction_type, scheduler, pred, target, timesteps, gamma, half) / plain
    assert 0.3 < float(ratio) < 0.7


def test_the_trainers_loss_is_sd_scripts_masked_loss_for_a_grey_cropped_mask(masked, tmp_path):
    prepared, masks = masked("grey")
    trainer = Trainer(options(prepared, tmp_path, masked_loss=True, min_snr_gamma=5.0))
    # img01 is 128x48 in a 96x32 bucket: resized to 96x36, rows 2..34 kept
    batch = trainer.data.load_batch(["img01\x000", "img03\x000"], epoch=0, seed=3)
    assert batch["latents"].shape == (2, 4, 4, 12)
    with Image.open(masks / "img01.png") as im:
        pixel = np.asarray(im.convert("L").resize((96, 36), Image.Resampling.LANCZOS).crop((0, 2, 96, 34)))
    with Image.open(masks / "img03.png") as im:
        pixel3 = np.asarray(im.convert("L").resize((96, 36), Image.Resampling.LANCZOS).crop((0, 2, 96, 34)))
    pixel_mask = torch.from_numpy(np.stack([pixel, pixel3])[:, None].astype(np.float32) / 255)
    assert 0.05 < float(pixel_mask.min()) and float(pixel_mask.max()) < 0.95  # greys, no black or white

    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(batch["latents"].shape, generator=gen)
    timesteps = torch.tensor([30, 600])
    with torch.no_grad():
        loss = trainer.loss_for(batch, noise, timesteps)
        pred, target = trainer.predict(batch, noise, timesteps)
    expected = sd_scripts_loss(pred, target, pixel_mask, snr_weights(trainer.noise_scheduler, timesteps, 5.0))
    torch.testing.assert_close(loss, expected)
    unmasked = sd_scripts_loss(pred, target, torch.ones_like(pixel_mask),
                               snr_weights(trainer.noise_scheduler, timesteps, 5.0))
    assert abs(float(loss - unmasked)) > 0.05 * float(unmasked)  # the mask counts


def _run(prepared, tmp_path, **kw):
    trainer = Trainer(options(prepared, tmp_path, **kw))
    before = [p.detach().clone() for p in trainer.trainable]
    result = trainer.run()
    return trainer, result, before, [p.detach().clone() for p in trainer.trainable]


def test_a_run_with_white_masks_is_the_run_without_masked_loss(masked, tmp_path):
    prepared, _ = masked("white")
    _, plain, _, plain_weights = _run(prepared, tmp_path / "a", max_train_steps=4)
    trainer, white, _, white_weights = _run(prepared, tmp_path / "b", max_train_steps=4, masked_loss=True)
    assert (trainer.mask_counts.with_mask, trainer.mask_counts.without_mask) == (6, 0)
    torch.testing.assert_close(torch.tensor(white["losses"]), torch.tensor(plain["losses"]))
    for a, b in zip(white_weights, plain_weights):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("target", [{}, {"hypernetwork_module": "default"}, {"network_module": "lora"}],
                         ids=["fine-tune", "hypernetwork", "lora"])
def test_every_target_trains_with_a_half_mask_and_differently(masked, tmp_path, target):
    prepared, _ = masked("half")
    common = dict(max_train_steps=2, learning_rate=1e-2, **target)
    _, plain, before, plain_weights = _run(prepared, tmp_path / "a", **common)
    _, half, _, half_weights = _run(prepared, tmp_path / "b", masked_loss=True, **common)
    assert any(not torch.equal(a, b) for a, b in zip(half_weights, before))  # it trains
    assert any(not torch.equal(a, b) for a, b in zip(half_weights, plain_weights))  # differently
    # the same noise and timesteps: the first loss is that of half the latent pixels
    assert 0.25 < half["losses"][0] / plain["losses"][0] < 0.75


def test_the_timestep_quarters_log_the_masked_loss(masked, tmp_path):
    from tests.train.test_timestep_quartiles import _scalars

    prepared, _ = masked("half")
    result = Trainer(options(prepared, tmp_path, max_train_steps=3, logging_dir=str(tmp_path / "logs"),
                             min_timestep=0, max_timestep=250, masked_loss=True)).run()
    scalars = _scalars(tmp_path / "logs")
    assert {f"loss/q{i}" for i in range(4)} & set(scalars) == {"loss/q0"}
    torch.testing.assert_close(torch.tensor(scalars["loss/q0"]), torch.tensor(result["losses"]), rtol=1e-5,
                               atol=1e-7)


def test_masked_loss_without_masks_fails_before_the_model_loads(prepared, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loop, "load_base_model", no_model)
    with pytest.raises(SdtuneError, match=r"--masked_loss: none of the 6 prepared images has a cached mask.*"
                                          r"sdtune prepare --alpha_mask.*--mask_dir"):
        Trainer(options(prepared, tmp_path, masked_loss=True))


def test_images_without_masks_are_counted_and_masks_are_off_by_default(masked, tmp_path, monkeypatch, caplog):
    prepared, _ = masked("half", every=2)
    seen: list[bool] = []
    loss_for = Trainer.loss_for

    def spy(self, batch, noise, timesteps):
        seen.append("masks" in batch)
        return loss_for(self, batch, noise, timesteps)

    monkeypatch.setattr(Trainer, "loss_for", spy)
    plain = Trainer(options(prepared, tmp_path / "a", max_train_steps=2))
    assert plain.mask_counts is None
    plain.run()
    assert seen == [False, False]  # masks cached, --masked_loss off: no batch has them

    seen.clear()
    caplog.set_level(logging.INFO)
    trainer = Trainer(options(prepared, tmp_path / "b", max_train_steps=2, masked_loss=True))
    counts = trainer.mask_counts
    assert (counts.with_mask, counts.without_mask, counts.encoded_on_the_fly) == (3, 3, 0)
    assert "--masked_loss: 3 of 6 images have a mask; 3 train whole" in caplog.text
    trainer.run()
    assert seen == [True, True]
    assert "masked loss: 3 image(s) with a mask, 3 without (trained whole)" in caplog.text  # the start-up summary
