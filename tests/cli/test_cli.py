"""The command line: help, option spellings, config files, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdtune.cli import COMMANDS, main
from sdtune.models.files import read_state_dict
from sdtune.models.io import load_model

pytestmark = pytest.mark.e2e


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command.name in out


def test_convert_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--save_model_as", "--save-model-as", "--save_precision", "--v2", "--config_file", "SRC", "DST"):
        assert option.lower() in out.lower()


def test_python_m_sdtune_runs():
    result = subprocess.run([sys.executable, "-m", "sdtune", "--help"], capture_output=True, text=True, check=True)
    assert "merge-captions" in result.stdout


def test_library_import_noise_stays_out_of_the_terminal():
    # diffusers imports bitsandbytes, whose CPU backend warns about optional 4-bit kernels on every command.
    result = subprocess.run([sys.executable, "-m", "sdtune", "generate", "--help"], capture_output=True, text=True,
                            check=True)
    assert "--sampler" in result.stdout
    assert "gemm_4bit" not in result.stderr and "WARNING" not in result.stderr, result.stderr


def test_convert_by_cli_with_hyphenated_alias_and_config_file(tmp_path, saved_model):
    src = saved_model("sd1", "diffusers")
    config = tmp_path / "convert.toml"
    config.write_text('[model]\nsave_precision = "bf16"\nsave_model_as = "ckpt"\n', encoding="utf-8")
    out = tmp_path / "out.model"
    # the command line overrides the file: fp16 wins over bf16
    assert main(["convert", str(src), str(out), "--config_file", str(config), "--save-precision", "fp16"]) == 0
    sd, _ = read_state_dict(out)  # a ckpt, as the file asked, though the suffix says nothing
    assert sd["model.diffusion_model.out.2.weight"].dtype.itemsize == 2
    import torch

    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert load_model(out).family.name == "sd1"


def test_convert_infers_format_from_suffix(tmp_path, saved_model):
    src = saved_model("sd2-v", "ckpt")
    assert main(["convert", str(src), str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert load_model(tmp_path / "folder").family.name == "sd2-v"


def test_errors_name_the_file_and_exit_nonzero(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage" * 20)
    assert main(["convert", str(bad), str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "Traceback" not in err


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("save_precison = 'fp16'\n", encoding="utf-8")
    assert main(["convert", "a", "b", "--config_file", str(config)]) == 2
    assert "save_precison" in capsys.readouterr().err


def test_missing_positional_is_reported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert"])
    assert exit_info.value.code == 2
    assert "SRC" in capsys.readouterr().err


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_subcommand_help_lists_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"sdtune {command}" in out and "--config_file" in out
    assert out.count("--") >= 4  # its own options, not just the common ones
