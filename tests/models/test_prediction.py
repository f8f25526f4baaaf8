"""The prediction type: recorded on save, and read from every signal other tools leave in a file.

The signal values are those the writing tools' own code writes (quoted in each case), not sdtune's:
- Stability AI's model spec as sd-scripts writes it (library/sai_model_spec.py: PRED_TYPE_EPSILON = "epsilon",
  PRED_TYPE_V = "v"; ARCH_SD_V2_512 = "stable-diffusion-v2-512", ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v");
- ComfyUI (comfy/model_base.py: ``unet_state_dict["v_pred"] = torch.tensor([])`` for v models;
  comfy_extras/nodes_model_merging.py: ``metadata["modelspec.predict_key"] = "epsilon" | "v"``;
  comfy/supported_models.py: ``"ztsnr" in state_dict`` next to ``v_pred``);
- sd-scripts' ``ss_base_model_version`` (library/model_util.py get_model_version_str_for_sd1_sd2: "sd_v2_v"...);
- the 512-base .ckpt's top-level global_step 875000 (diffusers loaders/single_file_utils.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from sdtune.errors import ModelLoadError
from sdtune.models import io
from sdtune.models.files import read_checkpoint, read_state_dict
from sdtune.models.io import load_model
from sdtune.models.save import save_model
from sdtune.models.sd import with_prediction_type
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component


# ------------------------------------------------------------------------------------------ item 1: kept on save
@pytest.mark.parametrize("family,objective", [("sd1", "v_prediction"), ("sd2-v", "epsilon"), ("sd2", "v_prediction")])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "diffusers_safetensors"])
def test_trained_objective_survives_save_and_reload(tmp_path, family, objective, fmt):
    model = build_tiny(family)
    model.family = with_prediction_type(model.family, objective)  # as --v_parameterization does
    path = save_model(model, tmp_path / f"m.{fmt}" if fmt != "diffusers_safetensors" else tmp_path / "m", fmt)
    reloaded = load_model(path)
    assert reloaded.prediction_type == objective
    assert reloaded.family.name == family
    assert reloaded.noise_scheduler().config.prediction_type == objective


def test_files_of_earlier_sdtune_versions_keep_their_objective(tmp_path):
    """Before sdtune.prediction_type existed, the objective lived only in sdtune.configs' scheduler entry."""
    model = build_tiny("sd1")
    model.family = with_prediction_type(model.family, "v_prediction")
    path = save_model(model, tmp_path / "m.safetensors")
    sd, metadata = read_state_dict(path)
    del metadata["sdtune.prediction_type"]
    metadata["modelspec.prediction_type"] = "v_prediction"  # the old, wrong spelling
    save_file(sd, str(tmp_path / "old.safetensors"), metadata=metadata)
    assert load_model(tmp_path / "old.safetensors").prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ item 3: the model spec
# The spec's MUST fields, as sd-scripts' library/sai_model_spec.py (BASE_METADATA, "=== MUST ===") lists them.
SPEC_REQUIRED = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                 "modelspec.resolution")


@pytest.mark.parametrize("family,objective,architecture,spec_type", [
    ("sd1", "epsilon", "stable-diffusion-v1", "epsilon"),
    ("sd1", "v_prediction", "stable-diffusion-v1", "v"),
    ("sd2", "epsilon", "stable-diffusion-v2-512", "epsilon"),
    ("sd2-v", "v_prediction", "stable-diffusion-v2-768-v", "v"),
    ("sd2-v", "epsilon", "stable-diffusion-v2-512", "epsilon"),  # sd-scripts: v2 and not v -> the 512 id
])
def test_model_spec_is_written_per_spec(tmp_path, family, objective, architecture, spec_type):
    model = build_tiny(family)
    model.family = with_prediction_type(model.family, objective)
    path = save_model(model, tmp_path / "my-model.safetensors")
    _, metadata = read_state_dict(path)
    assert all(metadata.get(k) for k in SPEC_REQUIRED), [k for k in SPEC_REQUIRED if not metadata.get(k)]
    assert metadata["modelspec.prediction_type"] == spec_type
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.title"] == "my-model"
    titled = save_model(model, tmp_path / "t.safetensors", title="My Model v2")
    assert read_state_dict(titled)[1]["modelspec.title"] == "My Model v2"


# ------------------------------------------------------------------------------------------ item 2: every signal
@pytest.fixture(scope="module")
def bare_sd2(tmp_path_factory):
    """A tiny SD 2.x state dict with no metadata at all: a file from another tool."""
    folder = tmp_path_factory.mktemp("bare")
    path = save_model(build_tiny("sd2-v"), folder / "src.safetensors")
    return read_state_dict(path)[0]


EPS, V = "epsilon", "v_prediction"


@pytest.mark.parametrize("metadata,markers,step,expected,signal", [
    ({}, (), None, V, "no signal"),  # diffusers' default for SD 2.x
    ({}, (), 875000, EPS, "global_step 875000"),
    ({}, (), 110000, V, "global_step 110000"),  # the 2.1 768-v release's step
    ({"modelspec.prediction_type": "epsilon"}, (), None, EPS, "modelspec.prediction_type=epsilon"),
    ({"modelspec.prediction_type": "v"}, (), 875000, V, "modelspec.prediction_type=v"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, (), None, EPS, "modelspec.architecture"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, (), 875000, V, "modelspec.architecture"),
    ({"modelspec.predict_key": "epsilon"}, (), None, EPS, "modelspec.predict_key=epsilon"),
    ({}, ("v_pred",), 875000, V, "v_pred"),
    ({}, ("v_pred", "ztsnr"), None, V, "v_pred"),
    ({"ss_base_model_version": "sd_v2"}, (), None, EPS, "ss_base_model_version=sd_v2"),
    ({"ss_base_model_version": "sd_v2_v"}, (), 875000, V, "ss_base_model_version=sd_v2_v"),
])
def test_sd2_prediction_type_from_other_tools_signals(tmp_path, bare_sd2, caplog, metadata, markers, step,
                                                      expected, signal):
    sd = dict(bare_sd2)
    sd.update({k: torch.tensor([]) for k in markers})
    path = tmp_path / "third-party.ckpt"
    torch.save({"state_dict": sd, **({"global_step": step} if step is not None else {})}, str(path))
    checkpoint = read_checkpoint(path)
    assert checkpoint.global_step == step
    with caplog.at_level(logging.INFO, logger="sdtune.models.prediction"):
        family = io._single_file_family(path, checkpoint.tensors, metadata, None, None, checkpoint.global_step)
    assert family.prediction_type == expected
    assert family.name == ("sd2-v" if expected == V else "sd2")
    assert any(signal in r.getMessage() and "third-party.ckpt" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_sd1_signals(tmp_path, saved_model):
    sd, _ = read_state_dict(saved_model("sd1", "safetensors"))
    path = tmp_path / "x.safetensors"
    assert io._single_file_family(path, sd, {}, None, None, None).prediction_type == EPS
    assert io._single_file_family(path, {**sd, "v_pred": torch.tensor([])}, {}, None, None, None).prediction_type == V
    assert io._single_file_family(path, sd, {"modelspec.prediction_type": "v"}, None, None, None).prediction_type == V
    # sd-scripts writes the v1 architecture id for both objectives: it decides nothing on its own
    assert io._single_file_family(path, {**sd, "v_pred": torch.tensor([])}, {"modelspec.architecture":
                                  "stable-diffusion-v1"}, None, None, None).prediction_type == V
    assert io._single_file_family(path, sd, {"ss_base_model_version": "sd_v1_v"}, None, None, None).prediction_type == V


def test_v_parameterization_overrides_every_signal(tmp_path, bare_sd2, caplog):
    path = tmp_path / "f.safetensors"
    metadata = {"modelspec.prediction_type": "v", "sdtune.family": "sd2-v", "sdtune.prediction_type": "v_prediction"}
    with caplog.at_level(logging.INFO, logger="sdtune.models.prediction"):
        family = io._single_file_family(path, {**bare_sd2, "v_pred": torch.tensor([])}, metadata, None, False, None)
    assert family.prediction_type == EPS
    assert "--v_parameterization false" in caplog.text


def test_sdtune_metadata_comes_before_other_tools(tmp_path, bare_sd2):
    metadata = {"sdtune.family": "sd2", "sdtune.prediction_type": "epsilon", "modelspec.prediction_type": "v"}
    assert io._single_file_family(tmp_path / "f", bare_sd2, metadata, None, None, None).prediction_type == EPS


def test_unknown_spec_value_is_an_error_naming_file_and_fix(tmp_path, bare_sd2):
    with pytest.raises(ModelLoadError, match=r"odd\.safetensors.*'flow'.*--v_parameterization"):
        io._single_file_family(tmp_path / "odd.safetensors", bare_sd2, {"modelspec.prediction_type": "flow"},
                               None, None, None)


def test_comfyui_ztsnr_file_loads(tmp_path, saved_model, caplog):
    """Was: "no conversion rule: ztsnr"."""
    sd, metadata = read_state_dict(saved_model("sd2-v", "safetensors"))
    del metadata["sdtune.prediction_type"], metadata["sdtune.family"]
    sd.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    save_file(sd, str(tmp_path / "zsnr.safetensors"), metadata=metadata)
    with caplog.at_level(logging.INFO, logger="sdtune.models.prediction"):
        model = load_model(tmp_path / "zsnr.safetensors")
    assert model.prediction_type == V
    assert "ztsnr" in caplog.text
    again = save_model(model, tmp_path / "again.safetensors")
    assert not {"v_pred", "ztsnr"} & set(read_state_dict(again)[0])  # markers are not weights


def test_ckpt_global_step_as_other_tools_store_it(tmp_path, bare_sd2):
    for step, expected in ((875000, 875000), (torch.tensor(875000), 875000), (875000.0, 875000), ("875000", None),
                           (float("inf"), None), (True, None)):
        torch.save({"state_dict": {"a": torch.zeros(1)}, "global_step": step}, str(tmp_path / "s.ckpt"))
        assert read_checkpoint(tmp_path / "s.ckpt").global_step == expected, step


def test_disagreeing_signals_are_named(tmp_path, bare_sd2, caplog):
    metadata = {"modelspec.prediction_type": "epsilon", "modelspec.predict_key": "bogus"}
    with caplog.at_level(logging.INFO, logger="sdtune.models.prediction"):
        family = io._single_file_family(tmp_path / "mixed.safetensors", {**bare_sd2, "v_pred": torch.tensor([])},
                                        metadata, None, None, None)
    assert family.prediction_type == EPS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ComfyUI's v_pred marker key says v_prediction" in w for w in warnings), warnings
    assert any("'bogus'" in w and "ignored" in w for w in warnings), warnings
