"""Crafted model files: the ``sdtune.configs`` header of a .safetensors is untrusted text (issue 12, item 4).

Each case must end in a ModelLoadError (an SdtuneError) naming the file, checked before any module is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.errors import ModelLoadError, SdtuneError
from sdtune.models import io as model_io, sd as model_sd
from sdtune.models.io import load_model, load_vae

pytestmark = pytest.mark.component


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _craft(src: Path, dest: Path, **changes: str | None) -> Path:
    metadata = _header(src)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(str(src)), str(dest), metadata=metadata)
    return dest


def _configs(src: Path) -> dict:
    return json.loads(_header(src)["sdtune.configs"])


@pytest.fixture()
def tiny_file(saved_model) -> Path:
    return saved_model("sd1", "safetensors")


@pytest.fixture()
def no_build(monkeypatch):
    """Fails the test if any module is built: the check must come first."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a module was built from a header that should have been refused")

    monkeypatch.setattr(model_sd, "build_modules", refuse)
    monkeypatch.setattr(model_io, "build_modules", refuse)
    return calls


def test_absurd_position_count_is_refused_before_anything_is_built(tiny_file, tmp_path, no_build):
    configs = _configs(tiny_file)
    configs["text_encoder"]["max_position_embeddings"] = 2**27
    crafted = _craft(tiny_file, tmp_path / "huge.safetensors", sdtune__configs=json.dumps(configs))
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError) as info:
            load_model(crafted)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(crafted) in message and "max_position_embeddings" in message
    assert "sdtune.configs" in message  # says which header entry to remove
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the refusal"
    assert not no_build


CHILD = """
import resource, sys
from sdtune.errors import ModelLoadError
from sdtune.models.io import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1])
except ModelLoadError as exc:
    print("refused:", exc)
print("grew_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_absurd_position_count_costs_no_memory_in_a_fresh_process(tiny_file, tmp_path):
    """torch allocates outside tracemalloc's view: the process's peak resident memory is the honest measure."""
    configs = _configs(tiny_file)
    configs["text_encoder"]["max_position_embeddings"] = 2**27
    crafted = _craft(tiny_file, tmp_path / "huge.safetensors", sdtune__configs=json.dumps(configs))
    run = subprocess.run([sys.executable, "-c", CHILD, str(crafted)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused:" in run.stdout and "max_position_embeddings" in run.stdout
    grew = int(run.stdout.split("grew_kib")[1])
    assert grew < 256 * 1024, f"peak memory grew by {grew / 1024:.0f} MiB while refusing the file"


@pytest.mark.parametrize("field, value", [
    ("unet.block_out_channels", [2**20, 32, 64, 64]),
    ("text_encoder.vocab_size", 10**12),
    ("unet.layers_per_block", float("nan")),
    ("unet.block_out_channels", list(range(1000))),
    ("text_encoder.hidden_size", "wide"),
    ("text_encoder.num_attention_heads", "many"),
    ("unet.norm_num_groups", "32"),
    ("unet", ["not", "a", "dict"]),
])
def test_absurd_or_wrong_kind_sizes_are_refused(tiny_file, tmp_path, no_build, field, value):
    configs = _configs(tiny_file)
    component, _, key = field.partition(".")
    if key:
        configs[component][key] = value
    else:
        configs[component] = value
    crafted = _craft(tiny_file, tmp_path / "crafted.safetensors", sdtune__configs=json.dumps(configs))
    with pytest.raises(ModelLoadError, match="crafted.safetensors"):
        load_model(crafted)
    assert not no_build


def test_a_size_that_contradicts_the_weights_is_refused(tiny_file, tmp_path, no_build):
    configs = _configs(tiny_file)
    configs["text_encoder"]["max_position_embeddings"] = 4096  # in bounds, but the file has 77 positions
    crafted = _craft(tiny_file, tmp_path / "lying.safetensors", sdtune__configs=json.dumps(configs))
    with pytest.raises(ModelLoadError, match=r"lying.safetensors.*max_position_embeddings = 4096.*weights have 77"):
        load_model(crafted)
    assert not no_build


@pytest.mark.parametrize("text, says", [
    ("{not json", "not JSON"),
    ("[1, 2, 3]", "not an object"),
    ('"a string"', "not an object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_configs_that_are_not_a_json_object_name_the_file(tiny_file, tmp_path, text, says):
    crafted = _craft(tiny_file, tmp_path / "bad-header.safetensors", sdtune__configs=text)
    with pytest.raises(ModelLoadError) as info:
        load_model(crafted)
    assert "bad-header.safetensors" in str(info.value) and says in str(info.value)
    with pytest.raises(ModelLoadError, match="bad-header.safetensors"):  # prepare loads only the VAE
        load_vae(crafted)


def test_vae_only_load_checks_the_header_too(tiny_file, tmp_path, no_build, monkeypatch):
    configs = _configs(tiny_file)
    configs["vae"]["block_out_channels"] = [2**30, 32, 64, 64]
    crafted = _craft(tiny_file, tmp_path / "vae-bomb.safetensors", sdtune__configs=json.dumps(configs))
    with pytest.raises(ModelLoadError, match="vae-bomb.safetensors.*block_out_channels"):
        load_vae(crafted)


def test_unknown_family_name_is_a_clear_error(tiny_file, tmp_path):
    crafted = _craft(tiny_file, tmp_path / "family.safetensors", sdtune__family="sd9", sdtune__prediction_type=None,
                     sdtune__configs=None)
    with pytest.raises(SdtuneError, match=r"family.safetensors.*unknown model family 'sd9'"):
        load_model(crafted)


def test_non_numeric_global_step_does_not_stop_a_load(tiny_file, tmp_path):
    crafted = _craft(tiny_file, tmp_path / "step.safetensors", global_step="many", epoch="[]")
    model = load_model(crafted)
    assert model.family.name == "sd1"


def test_the_files_sdtune_writes_still_load(saved_model):
    for family in ("sd1", "sd2", "sd2-v"):
        assert load_model(saved_model(family, "safetensors")).family.name == family


@pytest.mark.parametrize("key", ["model.diffusion_model.out.2.weight",  # the U-Net's last conv, as LDM names it
                                 "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                                 "first_stage_model.decoder.conv_out.weight"])
def test_a_wrong_shape_names_the_key_in_the_users_file(tiny_file, tmp_path, key):
    tensors = load_file(str(tiny_file))
    tensors[key] = tensors[key][:2].contiguous()
    crafted = tmp_path / "reshaped.safetensors"
    save_file(tensors, str(crafted), metadata=_header(tiny_file))
    with pytest.raises(ModelLoadError) as info:
        load_model(crafted)
    message = str(info.value)
    assert "reshaped.safetensors" in message and key in message, message


@pytest.mark.parametrize("name, text", [("sdtune.json", "[1, 2]"), ("unet/config.json", "[" * 100_000 + "]" * 100_000),
                                        ("text_encoder/config.json", '"text"')])
def test_a_diffusers_folder_with_a_config_that_is_not_an_object_names_it(saved_model, tmp_path, name, text):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model("sd1", "diffusers_safetensors"), folder)
    (folder / name).write_text(text, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=str(folder / name).replace("\\", "\\\\")):
        load_model(folder)
