"""Noise schedule and targets against hand computation; captions; batches."""

from __future__ import annotations

import math

import numpy as np
import torch

from sdtune.data.dataset import build_caption, shuffle_caption
from sdtune.models.families import SD2_V
from diffusers import DDPMScheduler
from sdtune.train import noise


def test_schedule_is_sds_scaled_linear():
    sched = DDPMScheduler.from_config(SD2_V.scheduler_config())
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sched.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6)


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
        assert torch.allclose(v[i], math.sqrt(abar) * eps[i] - math.sqrt(1 - abar) * x0[i], atol=1e-6)
        noisy = noise.add_noise(sched, x0, eps, t)[i]
        assert torch.allclose(noisy, math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * eps[i], atol=1e-6)
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-6)  # diffusers agrees


def test_caption_is_caption_plus_tags():
    assert build_caption({"caption": "a cat", "tags": "cat, sitting"}) == "a cat, cat, sitting"
    assert build_caption({"tags": "cat"}) == "cat"
    assert build_caption({"caption": "a cat"}) == "a cat"


def test_shuffle_keeps_first_tokens_and_every_part():
    caption = "sks person, a, b, c, d, e, f"
    seen = set()
    for seed in range(20):
        out = shuffle_caption(caption, 1, np.random.default_rng(seed))
        parts = out.split(", ")
        assert parts[0] == "sks person"
        assert sorted(parts[1:]) == ["a", "b", "c", "d", "e", "f"]
        seen.add(out)
    assert len(seen) > 10  # it does shuffle
    assert shuffle_caption(caption, 7, np.random.default_rng(0)) == caption
