"""Option groups shared by several commands are declared once: same type, default and meaning everywhere (issue 13)."""

from __future__ import annotations

import dataclasses
import importlib
import typing

import pytest

from sdtune import option_groups
from sdtune.cli import COMMANDS, main
from sdtune.options import parse_options
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.unit

GROUPS = [option_groups.ModelSource, option_groups.ImageFolder, option_groups.ImageKeys, option_groups.LoaderWorkers]
GROUP_FIELDS = {f.name: f for group in GROUPS for f in dataclasses.fields(group)}


def options_class(command):
    return getattr(importlib.import_module(command.options_module or command.module), command.options)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_a_shared_option_means_the_same_in_every_command(command):
    cls = options_class(command)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in GROUP_FIELDS or f.name in ("v2", "vae", "tokenizer", "train_data_dir"):
            continue  # prepare's --v2 and review's --vae/--tokenizer/TRAIN_DIR are other options of those names
        group_field = GROUP_FIELDS[f.name]
        assert f.metadata == group_field.metadata, f"{command.name} --{f.name} is declared apart from its group"
        assert f.default == group_field.default
        group = next(g for g in GROUPS if f.name in {x.name for x in dataclasses.fields(g)})
        assert hints[f.name] == typing.get_type_hints(group)[f.name]


@pytest.mark.parametrize("name,cls", [("train", "TrainOptions"), ("generate", "GenerateOptions"),
                                      ("convert", "ConvertOptions")])
def test_the_model_source_options_are_one_group(name, cls):
    options = options_class(next(c for c in COMMANDS if c.name == name))
    assert issubclass(options, option_groups.ModelSource)


def test_loader_workers_have_one_default_in_every_command():
    defaults = {c.name: {f.name: f.default for f in dataclasses.fields(options_class(c))}.get(
        "max_data_loader_n_workers") for c in COMMANDS}
    assert {defaults[n] for n in ("caption", "tag", "prepare", "train")} == {2}


def test_merge_tags_takes_the_merge_options_with_its_own_extension():
    from sdtune.data.metadata import MergeOptions, MergeTagsOptions

    assert issubclass(MergeTagsOptions, MergeOptions)
    assert [f.name for f in dataclasses.fields(MergeTagsOptions)] == [f.name for f in dataclasses.fields(MergeOptions)]
    assert (MergeOptions.caption_extension, MergeTagsOptions.caption_extension) == (".caption", ".txt")


def test_diffusers_xformers_is_an_alias_of_xformers():
    base = ["--pretrained_model_name_or_path", "m", "--in_json", "j", "--train_data_dir", "d", "--output_dir", "o"]
    opts = parse_options(TrainOptions, [*base, "--diffusers_xformers"], "sdtune train")
    assert opts.xformers is True
    assert "diffusers_xformers" not in {f.name for f in dataclasses.fields(TrainOptions)}


def test_the_options_layer_refuses_a_missing_required_option(capsys):
    assert main(["generate", "--prompt", "a cat"]) == 2
    assert "--pretrained_model_name_or_path is required" in capsys.readouterr().err


def test_optimizer_names_are_taken_in_any_letter_case_as_sd_scripts_does(tmp_path, capsys):
    """sd-scripts lower-cases --optimizer_type (train_util.get_optimizer), so command lines with `adamw8bit` or
    `prodigy` work there; here too, on the command line and in a config file, as the listed spelling."""
    base = ["--pretrained_model_name_or_path", "m", "--in_json", "j", "--train_data_dir", "d", "--output_dir", "o"]
    assert parse_options(TrainOptions, [*base, "--optimizer_type", "adamw8bit"], "t").optimizer_type == "AdamW8bit"
    assert parse_options(TrainOptions, [*base, "--optimizer_type", "PRODIGY"], "t").optimizer_type == "Prodigy"
    config = tmp_path / "c.toml"
    config.write_text('[train]\noptimizer_type = "dadaptadam"\n', encoding="utf-8")
    opts = parse_options(TrainOptions, [*base, "--config_file", str(config)], "t")
    assert opts.optimizer_type == "DAdaptAdam"
    with pytest.raises(SystemExit):
        parse_options(TrainOptions, [*base, "--optimizer_type", "adamw9bit"], "t")
    assert "invalid choice: 'adamw9bit'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other choices keep their exact spelling
        parse_options(TrainOptions, [*base, "--lr_scheduler", "COSINE"], "t")
