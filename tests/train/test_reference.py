"""sdtune's training step beside an independent reference step, written here from the public recipes.

The reference is diffusers' ``train_text_to_image.py`` step (``DDPMScheduler.add_noise``, ``get_velocity``,
``diffusers.training_utils.compute_snr`` for Min-SNR, a ``torch.amp.GradScaler`` for fp16 as accelerate uses,
``clip_grad_norm_``) with sd-scripts' text conditioning (``library/train_util.py``: prompts padded to
``max_token_length + 2`` and cut into 75-token chunks framed by <BOS>/<EOS>, CLIP skip as
``final_layer_norm(hidden_states[-N])``, the chunks' states re-joined as <BOS> + 75 per chunk + the last state; for
SD 2.x an empty chunk's <EOS> state replaced by the padding state after it, as sd-scripts' comment intends). It runs
on a separately loaded copy of the model, through torch and diffusers only; the two steps get the same batch, noise
and timesteps and must agree on the loss and on every gradient.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdtune.models.io import load_model
from sdtune.train.loop import Trainer, TrainOptions

pytestmark = pytest.mark.component

SD_SCALING_FACTOR = 0.18215  # the SD VAE's latent scale (CompVis configs: scale_factor)
LONG = ", ".join(f"word{i} thing{i}" for i in range(70))  # about 280 tokens: cut off in every chunk mode
MEDIUM = ", ".join(f"red{i}" for i in range(30))  # about 90 tokens: the third 225-chunk is empty


def options(prepared, tmp_path: Path, family: str, **overrides) -> TrainOptions:
    model, train_dir, meta = prepared(family)
    base = dict(pretrained_model_name_or_path=str(model), in_json=str(meta), train_data_dir=str(train_dir),
                output_dir=str(tmp_path / "out"), train_batch_size=4, learning_rate=1e-4, max_train_steps=1,
                seed=3, max_data_loader_n_workers=0)
    base.update(overrides)
    return TrainOptions(**base)


def batch_and_draw(seed: int = 0, low: int = 0, high: int = 1000, batch: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=g) * 5  # VAE latents before scaling: std ~5 like SD's
    noise = torch.randn(batch, 4, size, size, generator=g)
    timesteps = torch.randint(low, high, (batch,), generator=g)
    captions = ["a red square", LONG, MEDIUM, ""][:batch]
    return {"latents": latents, "captions": captions, "weight": 1.0}, noise, timesteps


def sdtune_step(trainer: Trainer, batch, noise, timesteps):
    """sdtune's real optimizer step on one batch with the given noise and timesteps; the loss and the gradients
    the optimizer received (unscaled and clipped), by parameter name."""
    trainer.draw = lambda _batch, _generator: (noise, timesteps)
    names = {id(p): n for n, p in _named_trainables(trainer.model, trainer.opts.train_text_encoder)}
    seen: dict[str, torch.Tensor] = {}

    def capture(_optimizer, _args, _kwargs):
        for p in trainer.trainable:
            if p.grad is not None:
                seen[names[id(p)]] = p.grad.detach().float().clone()

    hook = trainer.optimizer.register_step_pre_hook(capture)
    loss = trainer.optimizer_step([batch])
    hook.remove()
    return loss, seen


def _named_trainables(model, train_text_encoder: bool):
    yield from (("unet." + n, p) for n, p in model.unet.named_parameters())
    if train_text_encoder:
        yield from (("text_encoder." + n, p) for n, p in model.text_encoder.named_parameters())


# ------------------------------------------------------------------------------------------- the reference
def reference_ids(tokenizer, captions, max_token_length: int) -> torch.Tensor:
    """sd-scripts' get_input_ids: [batch, chunks, 77]."""
    length = max_token_length + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt").input_ids
    if max_token_length == 75:
        return ids[:, None]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for row in ids:
        chunks = []
        for i in range(1, length - 77 + 2, 75):
            chunk = torch.cat([row[:1], row[i:i + 75], row[-1:]])
            if pad != eos:  # SD 2.x: frame the chunk the way a 77-token prompt is framed
                if chunk[-2] != eos and chunk[-2] != pad:
                    chunk[-1] = eos
                if chunk[1] == pad:
                    chunk[1] = eos
            chunks.append(chunk)
        out.append(torch.stack(chunks))
    return torch.stack(out)


def reference_states(text_encoder, tokenizer, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    batch, chunks, _ = ids.shape
    flat = ids.reshape(-1, 77)
    out = text_encoder(flat, output_hidden_states=True, return_dict=True)
    states = out.last_hidden_state if clip_skip == 1 else \
        getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-clip_skip])
    states = states.reshape(batch, chunks * 77, -1)
    if chunks == 1:
        return states
    parts = [states[:, :1]]
    for c, i in enumerate(range(1, chunks * 77, 77)):
        chunk = states[:, i:i + 75]
        if c > 0 and tokenizer.pad_token_id != tokenizer.eos_token_id:
            fixed = []
            for j in range(batch):
                row = chunk[j]
                if ids[j, c, 1] == tokenizer.eos_token_id:  # <BOS> <EOS> <PAD>...: an empty chunk
                    row = torch.cat([row[1:2], row[1:]])
                fixed.append(row)
            chunk = torch.stack(fixed)
        parts.append(chunk)
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


def reference_step(model_path, batch, noise, timesteps, *, prediction_type: str, precision: str, clip_skip: int,
                   max_token_length: int, train_text_encoder: bool, min_snr_gamma, max_grad_norm: float = 1.0, scale: float = 2.0**16):
    model = load_model(model_path)
    unet, text_encoder, tokenizer = model.unet, model.text_encoder, model.tokenizer
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    text_encoder.requires_grad_(train_text_encoder)
    if dtype and not train_text_encoder:
        text_encoder.to(dtype)  # a frozen text encoder is kept in the half type (sd-scripts, diffusers)

    latents = batch["latents"] * SD_SCALING_FACTOR
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    with autocast:
        with torch.set_grad_enabled(train_text_encoder):
            states = reference_states(text_encoder, tokenizer,
                                      reference_ids(tokenizer, batch["captions"], max_token_length), clip_skip)
        pred = unet(noisy, timesteps, states).sample
    if min_snr_gamma is None:
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()

    optimizer = torch.optim.SGD(params, lr=0.0)  # only for the scaler's unscale_
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=precision == "fp16")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    found_inf = bool(sum(v.item() for v in scaler._found_inf_per_device(optimizer).values())) \
        if precision == "fp16" else False
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    grads = {n: p.grad.detach().float().clone() for n, p in _named_trainables(model, train_text_encoder)
             if p.grad is not None}
    if found_inf:
        scaler.update()
        return float(loss.detach()), {"found_inf": True, "scale_after": scaler.get_scale()}
    return float(loss.detach()), grads


# ------------------------------------------------------------------------------------------- the comparisons
# (precision, gradient tolerance relative to the largest gradient): fp32 runs the same operations, so only
# summation order differs; under autocast both sides round the same operations to 16 bits.
TOLERANCE = {"no": 1e-5, "fp16": 2e-3, "bf16": 2e-2}
CASES = [
    # family, precision, clip_skip, max_token_length, train_text_encoder, min_snr_gamma
    ("sd1", "no", 1, 75, False, None),
    ("sd1", "no", 2, 225, True, None),
    ("sd1", "fp16", 2, 225, True, None),
    ("sd1", "fp16", 1, 75, False, 5.0),
    ("sd1", "bf16", 2, 150, True, 5.0),
    ("sd2", "fp16", 1, 225, True, None),
    ("sd2-v", "no", 1, 225, True, 5.0),
    ("sd2-v", "fp16", 2, 75, False, 5.0),
    ("sd2-v", "bf16", 1, 150, False, None),
]


@pytest.mark.parametrize("family,precision,clip_skip,tokens,text_encoder,gamma", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_one_step_matches_the_reference(prepared, tmp_path, family, precision, clip_skip, tokens, text_encoder,
                                        gamma):
    opts = options(prepared, tmp_path, family, mixed_precision=precision, clip_skip=clip_skip,
                   max_token_length=tokens, train_text_encoder=text_encoder, min_snr_gamma=gamma)
    trainer = Trainer(opts)
    assert (trainer.scaler is not None) == (precision == "fp16")  # fp16 gradients are scaled; bf16 need not be
    batch, noise, timesteps = batch_and_draw(seed=len(family) + tokens)
    scale = 2.0**16  # GradScaler's and sdtune's first scale
    while True:  # on overflow both skip the step and halve the scale; then the next step is compared
        loss, grads = sdtune_step(trainer, batch, noise, timesteps)
        ref_loss, ref_grads = reference_step(
            opts.pretrained_model_name_or_path, batch, noise, timesteps,
            prediction_type=trainer.model.prediction_type, precision=precision, clip_skip=clip_skip,
            max_token_length=tokens, train_text_encoder=text_encoder, min_snr_gamma=gamma, scale=scale)
        if "found_inf" not in ref_grads:
            break
        assert grads == {}, "the reference overflowed; sdtune must skip the step"
        assert trainer.scaler.scale == ref_grads["scale_after"]
        scale = ref_grads["scale_after"]
    assert trainer.model.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    tol = TOLERANCE[precision]
    assert math.isclose(loss, ref_loss, rel_tol=tol), (loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)  # the same parameters learn (clip skip: not the skipped layers)
    assert any(n.startswith("text_encoder.") for n in grads) == text_encoder
    largest = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=tol, atol=tol * largest, msg=lambda m: f"{name}: {m}")


def test_noise_offset_is_a_per_sample_per_channel_constant(prepared, tmp_path):
    """sd-scripts' recipe: noise + offset * randn(B, C, 1, 1); drawn after the noise and timesteps, from the step's
    generator."""
    trainer = Trainer(options(prepared, tmp_path, "sd1", noise_offset=0.1))
    batch, _, _ = batch_and_draw()
    noise, timesteps = trainer.draw(batch, torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    base = torch.randn(batch["latents"].shape, generator=g)
    ref_timesteps = torch.randint(0, 1000, (4,), generator=g)
    ref_noise = base + 0.1 * torch.randn((4, 4, 1, 1), generator=g)
    torch.testing.assert_close(noise, ref_noise)
    torch.testing.assert_close(timesteps, ref_timesteps)

    plain = Trainer(options(prepared, tmp_path / "plain", "sd1"))
    unchanged, same_t = plain.draw(batch, torch.Generator().manual_seed(11))
    torch.testing.assert_close(unchanged, base)  # without the offset, the same noise and timesteps
    torch.testing.assert_close(same_t, ref_timesteps)


# ------------------------------------------------------------------------------------------- fp16 for real
def test_mixed_precision_fp16_runs_the_unet_in_fp16_on_the_cpu(prepared, tmp_path):
    trainer = Trainer(options(prepared, tmp_path, "sd1", mixed_precision="fp16"))
    dtypes = []
    hook = trainer.model.unet.conv_out.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    batch, noise, timesteps = batch_and_draw()
    sdtune_step(trainer, batch, noise, timesteps)
    hook.remove()
    assert dtypes == [torch.float16]
    assert all(p.dtype == torch.float32 for p in trainer.trainable)  # the weights stay fp32 (mixed precision)


def test_fp16_step_with_tiny_gradients_moves_as_many_weights_as_fp32(prepared, tmp_path):
    """Small timesteps with Min-SNR give gradients far below fp16's smallest normal number; loss scaling keeps
    them, so AdamW's first step (which moves every weight with a non-zero gradient by about lr) moves as many
    weights as in fp32."""
    batch, noise, timesteps = batch_and_draw(seed=5, low=0, high=20, size=32)
    moved = {}
    for precision in ("no", "fp16"):
        trainer = Trainer(options(prepared, tmp_path / precision, "sd1", mixed_precision=precision,
                                  min_snr_gamma=5.0, learning_rate=1e-6, optimizer_args=["weight_decay=0"]))
        before = [p.detach().clone() for p in trainer.trainable]
        sdtune_step(trainer, batch, noise, timesteps)
        changed = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.trainable, before))
        moved[precision] = changed / sum(b.numel() for b in before)
        if precision == "fp16":  # the same step without loss scaling, as before: the small gradients vanish
            trainer = Trainer(options(prepared, tmp_path / "unscaled", "sd1", mixed_precision=precision,
                                      min_snr_gamma=5.0, learning_rate=1e-6, optimizer_args=["weight_decay=0"]))
            trainer.scaler = None
            before = [p.detach().clone() for p in trainer.trainable]
            sdtune_step(trainer, batch, noise, timesteps)
            changed = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.trainable, before))
            moved["fp16 unscaled"] = changed / sum(b.numel() for b in before)
    assert moved["fp16"] >= moved["no"] - 0.03, moved
    assert moved["fp16 unscaled"] < moved["no"] - 0.1, moved  # what the scaling saves, on this very step
