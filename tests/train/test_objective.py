"""Noise schedule and targets against hand computation; captions; batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.data.dataset import CaptionRules, build_caption
from sdtune.models.families import SD2_V
from sdtune.train import noise

pytestmark = pytest.mark.unit


def test_schedule_is_sds_scaled_linear():
    sched = DDPMScheduler.from_config(SD2_V.scheduler_config())
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-6)


def test_epsilon_and_velocity_targets_by_hand():
    sched = DDPMScheduler.from_config(SD2_V.scheduler_config())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=g)
    eps = torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([10, 900])
    assert torch.equal(noise.target("epsilon", sched, x0, eps, t), eps)
    v = noise.target("v_prediction", sched, x0, eps, t)
    for i, step in enumerate(t.tolist()):
        abar = float(sched.alphas_cumprod[step])
        torch.testing.assert_close(v[i], math.sqrt(abar) * eps[i] - math.sqrt(1 - abar) * x0[i], rtol=1e-5, atol=1e-6)
        noisy = noise.add_noise(sched, x0, eps, t)[i]
        torch.testing.assert_close(noisy, math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * eps[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)  # diffusers agrees


def test_caption_is_caption_plus_tags():
    assert build_caption({"caption": "a cat", "tags": "cat, sitting"}) == "a cat, cat, sitting"
    assert build_caption({"tags": "cat"}) == "cat"
    assert build_caption({"caption": "a cat"}) == "a cat"


def test_shuffle_keeps_first_tokens_and_every_part():
    caption = "sks person, a, b, c, d, e, f"
    seen = set()
    for seed in range(20):
        out = CaptionRules(shuffle=True, keep_tokens=1).apply(caption, 0, np.random.default_rng(seed))
        parts = out.split(", ")
        assert parts[0] == "sks person"
        assert sorted(parts[1:]) == ["a", "b", "c", "d", "e", "f"]
        seen.add(out)
    assert len(seen) > 10  # it does shuffle
    assert CaptionRules(shuffle=True, keep_tokens=7).apply(caption, 0, np.random.default_rng(0)) == caption


def test_caption_dropout_rules():
    caption = "sks person, red, hat, smiling, outdoors"
    every_2nd = CaptionRules(dropout_every_n_epochs=2)
    assert [every_2nd.apply(caption, epoch, np.random.default_rng(0)) for epoch in range(4)] == \
        [caption, "", caption, ""]  # the 2nd and 4th epochs, counting from 1 as the log does
    assert CaptionRules(dropout_rate=1.0).apply(caption, 0, np.random.default_rng(0)) == ""
    half = CaptionRules(dropout_rate=0.5)
    dropped = sum(half.apply(caption, 0, np.random.default_rng(seed)) == "" for seed in range(2000))
    assert 900 < dropped < 1100


def test_caption_tag_dropout_keeps_the_first_tokens_and_the_order():
    caption = "sks person, red, hat, smiling, outdoors"
    assert CaptionRules(keep_tokens=1, tag_dropout_rate=1.0).apply(caption, 0, np.random.default_rng(0)) == \
        "sks person"
    rules = CaptionRules(keep_tokens=1, tag_dropout_rate=0.5)
    kept = {"red": 0, "hat": 0, "smiling": 0, "outdoors": 0}
    for seed in range(1000):
        parts = rules.apply(caption, 0, np.random.default_rng(seed)).split(", ")
        assert parts[0] == "sks person"
        assert parts[1:] == [p for p in kept if p in parts[1:]]  # no shuffle asked: the order stays
        for part in parts[1:]:
            kept[part] += 1
    assert all(400 < n < 600 for n in kept.values()), kept


def test_caption_rules_off_leave_the_caption_and_the_generator_alone():
    rng, untouched = np.random.default_rng(3), np.random.default_rng(3)
    assert CaptionRules().apply(" a,b ,c", 0, rng) == " a,b ,c"
    assert rng.random() == untouched.random()  # no draw: runs without the options pick what they always picked


def test_noise_offset_adds_a_per_channel_constant_and_leaves_the_rest_alone():
    latents = torch.zeros(64, 4, 6, 6)
    plain, t_plain = noise.sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(5))
    offset, t_offset = noise.sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(5), 0.1)
    assert torch.equal(t_plain, t_offset)  # the same timesteps: a run without the offset draws what it always drew
    shift = offset - plain
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=1e-5, atol=1e-6)  # per channel
    per_channel = shift[:, :, 0, 0]
    assert 0.08 < per_channel.std().item() < 0.12  # scaled by the offset (256 draws of 0.1 * N(0, 1))
    assert per_channel.unique().numel() == 256  # independent per sample and channel


def test_min_snr_weights_by_hand():
    sched = DDPMScheduler.from_config(SD2_V.scheduler_config())
    t = torch.tensor([0, 100, 500, 999])
    abar = sched.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    eps = noise.min_snr_weights("epsilon", sched, t, 5.0).double()
    v = noise.min_snr_weights("v_prediction", sched, t, 5.0).double()
    for i in range(4):
        want_eps = min(snr[i].item(), 5.0) / snr[i].item()
        want_v = min(snr[i].item(), 5.0) / (snr[i].item() + 1)
        assert eps[i].item() == pytest.approx(want_eps, rel=1e-5)
        assert v[i].item() == pytest.approx(want_v, rel=1e-5)
    assert eps[0] < 0.01 and eps[3] == 1.0  # the nearly clean timestep is damped; noisy ones keep weight 1


def test_timestep_range():
    latents = torch.zeros(500, 4, 2, 2)
    _, everything = noise.sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(1))
    noise_a, limited = noise.sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(1),
                                                        min_timestep=200, max_timestep=300)
    assert everything.min() < 100 and everything.max() > 900
    assert limited.min() >= 200 and limited.max() <= 299 and limited.unique().numel() > 90
    noise_b, _ = noise.sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(noise_a, noise_b)  # the range changes the timesteps only
