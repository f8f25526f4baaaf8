"""--cache_text_encoder_outputs: each distinct caption encoded once, the run the same as without the cache, the
disk cache (``<stem>_te_outputs.npz``) reused only while its caption, model, clip skip and token length hold."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.models.save import save_model
from sdtune.models.tiny import build_tiny
from sdtune.train import base_model, loop
from sdtune.train.loop import Trainer, train
from sdtune.train.text_cache import TE_OUTPUTS_SUFFIX
from tests.train.test_train import options

pytestmark = pytest.mark.component


@pytest.fixture()
def encoder_calls(monkeypatch):
    """Counts the text encoder's forward passes (the trainer's ``encode``), by batch size."""
    calls: list[int] = []
    real = loop.encode

    def counting(text_encoder, ids, *args, **kwargs):
        calls.append(int(ids.shape[0]))
        return real(text_encoder, ids, *args, **kwargs)

    monkeypatch.setattr(loop, "encode", counting)
    return calls


def test_training_from_the_cache_equals_training_without_it(prepared, tmp_path, encoder_calls):
    common = dict(max_train_steps=4, learning_rate=1e-3)
    plain = train(options(prepared, tmp_path / "plain", output_dir=str(tmp_path / "plain"), **common))
    per_step = len(encoder_calls)
    assert per_step == 4  # one forward per batch without the cache
    encoder_calls.clear()
    cached = train(options(prepared, tmp_path / "cached", output_dir=str(tmp_path / "cached"),
                           cache_text_encoder_outputs=True, **common))
    # the images' distinct captions, encoded once at start-up in one batch; none during the 4 steps
    assert encoder_calls == [len(set(_captions(prepared)))]
    torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
    a, b = load_file(str(plain["model"])), load_file(str(cached["model"]))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def _captions(prepared) -> list[str]:
    from sdtune.data.dataset import build_caption

    meta = json.loads(prepared("sd1")[2].read_text(encoding="utf-8"))
    return [build_caption(entry) for entry in meta.values()]


@pytest.mark.parametrize("overrides, message", [
    (dict(shuffle_caption=True), "--shuffle_caption"),
    (dict(caption_dropout_rate=0.1), "--caption_dropout_rate"),
    (dict(caption_dropout_every_n_epochs=2), "--caption_dropout_every_n_epochs"),
    (dict(caption_tag_dropout_rate=0.1), "--caption_tag_dropout_rate"),
    (dict(train_text_encoder=True), "--train_text_encoder"),
    (dict(network_module="lora"), "a LoRA that trains the text encoder"),
    (dict(cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=True),
     "--cache_text_encoder_outputs_to_disk needs --cache_text_encoder_outputs"),
])
def test_the_cache_is_refused_where_captions_or_the_encoder_change(prepared, tmp_path, monkeypatch, overrides,
                                                                     message):
    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SdtuneError, match=message.replace("-", r"\-")):
        Trainer(options(prepared, tmp_path, **{"cache_text_encoder_outputs": True, **overrides}))


def test_a_unet_only_lora_trains_from_the_cache(prepared, tmp_path, encoder_calls):
    result = train(options(prepared, tmp_path, network_module="lora", network_train_unet_only=True,
                           cache_text_encoder_outputs=True, max_train_steps=2))
    assert len(encoder_calls) == 1 and result["global_step"] == 2


def _cache_log(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("text-encoder outputs cached")]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_disk_cache_is_reused_and_renewed_when_caption_model_or_clip_skip_change(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    model, train_dir, meta = prepared("sd1")
    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    images = json.loads(meta.read_text(encoding="utf-8"))
    n = len(images)

    def run(**overrides):
        caplog.clear()
        opts = dict(train_data_dir=str(data), in_json=str(tmp_path / "meta.json"), cache_text_encoder_outputs=True,
                    cache_text_encoder_outputs_to_disk=True, max_train_steps=1,
                    output_dir=str(tmp_path / f"out{len(list(tmp_path.glob('out*')))}"))
        opts.update(overrides)
        train(options(prepared, tmp_path, **opts))
        return _cache_log(caplog)

    (tmp_path / "meta.json").write_text(json.dumps(images), encoding="utf-8")
    first = run()
    assert f"0 read from and {n} written to *{TE_OUTPUTS_SUFFIX}" in first
    files = sorted(data.glob(f"*{TE_OUTPUTS_SUFFIX}"))
    assert len(files) == n
    assert "0 read from and 0 written" not in first
    again = run()
    assert f", 0 encoded; {n} read from and 0 written" in again  # nothing encoded: every file was valid

    key = sorted(images)[0]
    images[key]["caption"] = images[key].get("caption", "") + " changed"
    (tmp_path / "meta.json").write_text(json.dumps(images), encoding="utf-8")
    changed = run()
    assert f"{n - 1} read from and 1 written" in changed  # only the changed caption

    clip = run(clip_skip=2)
    assert f"0 read from and {n} written" in clip

    other = build_tiny("sd1")  # the same VAE (the latents stay valid), another text encoder
    other.text_encoder = build_tiny("sd1", seed=7).text_encoder
    save_model(other, tmp_path / "other", "diffusers_safetensors")
    assert f"0 read from and {n} written" in run(clip_skip=2, pretrained_model_name_or_path=str(tmp_path / "other"))


def test_a_damaged_disk_cache_file_is_encoded_again(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    model, train_dir, meta = prepared("sd1")
    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    common = dict(train_data_dir=str(data), cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True,
                  max_train_steps=1)
    train(options(prepared, tmp_path, output_dir=str(tmp_path / "a"), **common))
    victim = sorted(data.glob(f"*{TE_OUTPUTS_SUFFIX}"))[0]
    victim.write_bytes(b"not a zip")
    caplog.clear()
    train(options(prepared, tmp_path, output_dir=str(tmp_path / "b"), **common))
    assert f"{victim}: unreadable text-encoder cache" in caplog.text
    assert "1 written" in _cache_log(caplog)
