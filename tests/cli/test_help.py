"""What a new user meets on the command line: help text, misspelt options, config files (issue 18, items 7, 11, 14)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdtune.cli import COMMANDS, main
from sdtune.options import OptionsError, parse_options

pytestmark = pytest.mark.unit

NAMES = [c.name for c in COMMANDS]


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """Each option's (or positional's) help, joined onto one line, keyed by its first name."""
    body = text.split("\n\n", 2)[-1]
    blocks: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        match = re.match(r"^  (-{0,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line.strip()
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", NAMES)
def test_help_states_each_default_once_and_never_contradicts_it(command, capsys):
    blocks = option_blocks(help_text(command, capsys))
    assert len(blocks) > 3
    for name, block in blocks.items():
        stated = re.findall(r"\(the default\)|\(default\b|\bdefault:", block, flags=re.IGNORECASE)
        assert len(stated) <= 1, f"{command} {name}: {block}"
        assert "(default: None)" not in block and "(default: False)" not in block, f"{command} {name}: {block}"


def test_sdpa_is_not_called_the_default_and_false(capsys):
    block = option_blocks(help_text("train", capsys))["--sdpa"]
    assert "(the default)" in block and "False" not in block


def test_required_options_are_marked_and_positionals_are_not_optional(capsys):
    text = help_text("train", capsys)
    blocks = option_blocks(text)
    for name in ("--pretrained_model_name_or_path", "--in_json", "--train_data_dir", "--output_dir"):
        assert "(required)" in blocks[name]
    assert "(required)" not in blocks["--learning_rate"]
    usage = help_text("convert", capsys).split("\n\n")[0]
    assert re.search(r"\bSRC DST\b", usage) and "[SRC]" not in usage and "[DST]" not in usage
    # review's folder has a default: it stays optional
    assert "[TRAIN_DIR]" in help_text("review", capsys).split("\n\n")[0]


def test_a_misspelt_option_is_one_short_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lerning_rate", "1e-5", "--sed", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean --learning_rate?" in err and "did you mean --seed?" in err
    assert "usage:" not in err and len(err.splitlines()) <= 5, err
    assert "'1e-5'" not in err  # the unknown option's value is not reported as a second problem


def test_a_missing_positional_is_named_without_the_usage_block(capsys):
    with pytest.raises(SystemExit):
        main(["convert"])
    err = capsys.readouterr().err
    assert "SRC, DST" in err and "usage:" not in err


def test_sd_scripts_tag_and_prefix_options_are_not_ambiguous(tmp_path):
    from sdtune.label.wd14 import TagOptions

    opts = parse_options(TagOptions, [str(tmp_path), "--onnx", "--character_tags_first"], "sdtune tag")
    assert opts.onnx and opts.character_tags_first
    # sd-scripts' order, the flag before the folder: the flag does not take the folder for its value
    opts = parse_options(TagOptions, ["--onnx", "--recursive", str(tmp_path)], "sdtune tag")
    assert opts.onnx and opts.recursive and opts.train_data_dir == tmp_path
    assert parse_options(TagOptions, ["--recursive", "no", str(tmp_path)], "sdtune tag").recursive is False
    # a prefix is not silently taken for another option
    with pytest.raises(SystemExit):
        parse_options(TagOptions, [str(tmp_path), "--onnx_prov", "CPU"], "sdtune tag")


# ------------------------------------------------------------------------------------------------ config files
def convert_options(tmp_path: Path, toml: str, *argv: str):
    from sdtune.models.convert import ConvertOptions

    config = tmp_path / "sdtune.toml"
    config.write_text(toml, encoding="utf-8")
    return parse_options(ConvertOptions, ["src", "dst", "--config_file", str(config), *argv], "sdtune convert",
                         commands=NAMES)


def test_a_section_named_after_the_command_applies_and_other_commands_sections_are_skipped(tmp_path):
    toml = ('save_precision = "bf16"\n'
            '[convert]\nsave_precision = "fp16"\n'
            '[prepare]\nbatch_size = 4\nmax_resolution = "512,512"\n'
            '[merge_captions]\ncaption_extension = ".txt"\n')
    assert convert_options(tmp_path, toml).save_precision == "fp16"
    # the command line still wins over the file's section
    assert convert_options(tmp_path, toml, "--save_precision", "float").save_precision == "float"


def test_sd_scripts_grouping_sections_still_only_group(tmp_path):
    assert convert_options(tmp_path, '[model_arguments]\nsave_precision = "fp16"\n').save_precision == "fp16"


def test_a_type_error_names_the_file_and_the_option(tmp_path):
    with pytest.raises(OptionsError, match=r"sdtune\.toml.*global_step = 'ten'"):
        convert_options(tmp_path, 'global_step = "ten"\n')
    with pytest.raises(OptionsError, match=r"sdtune\.toml.*save_precision.*choose one of"):
        convert_options(tmp_path, 'save_precision = "half"\n')


def test_a_bad_value_in_the_file_is_no_error_when_the_command_line_overrides_it(tmp_path):
    assert convert_options(tmp_path, 'global_step = "ten"\n', "--global_step", "7").global_step == 7


def test_an_unknown_key_gets_a_suggestion(tmp_path, capsys):
    with pytest.raises(OptionsError, match="save_precison; did you mean save_precision"):
        convert_options(tmp_path, 'save_precison = "fp16"\n')
    # through the command: one line, exit 2, the file named
    config = tmp_path / "sdtune.toml"
    assert main(["convert", "a", "b", "--config_file", str(config)]) == 2
    assert "sdtune.toml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ sd-scripts options
def test_debug_logs_each_file_as_sd_scripts_does(tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    (tmp_path / "cat.caption").write_text("a small black cat", encoding="utf-8")
    with caplog.at_level("DEBUG", logger="sdtune"):
        assert main(["merge-captions", str(tmp_path), str(tmp_path / "meta.json")]) == 0
    assert "a small black cat" not in caplog.text
    caplog.clear()
    assert main(["merge-captions", str(tmp_path), str(tmp_path / "meta.json"), "--debug"]) == 0
    assert "cat.png: a small black cat" in caplog.text


def test_prepare_accepts_v2(tmp_path):
    from sdtune.data.prepare import PrepareOptions

    opts = parse_options(PrepareOptions, [str(tmp_path), "in.json", "out.json", "model", "--v2"], "sdtune prepare")
    assert opts.v2


def test_caption_weights_is_refused_with_the_fix_before_any_model_loads(tmp_path, capsys):
    pth = tmp_path / "model_large_caption.pth"
    pth.write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "img").mkdir()
    assert main(["caption", str(tmp_path / "img"), "--caption_weights", str(pth)]) == 2
    err = capsys.readouterr().err
    assert "model_large_caption.pth" in err and "--model" in err and "Salesforce/blip-image-captioning-large" in err


def test_caption_weights_naming_a_transformers_folder_is_the_model(tmp_path):
    from sdtune.label.blip import CaptionOptions, _validate

    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text("{}", encoding="utf-8")
    opts = parse_options(CaptionOptions, [str(tmp_path), "--caption_weights", str(tmp_path / "blip")], "sdtune caption")
    _validate(opts)
    assert opts.model == str(tmp_path / "blip")


@pytest.mark.parametrize("command,option", [("train", "--hypernetwork_activation"), ("convert", "--save_model_as")])
def test_help_imports_no_torch(command, option):
    # issue 18: train --help took 4.6 s because torch was imported before parsing (an import check, not a timing)
    import subprocess
    import sys

    code = ("import sys\n"
            "from sdtune.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert option in result.stdout
