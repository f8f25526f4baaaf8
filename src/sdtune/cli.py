"""The ``sdtune`` command: one sub-command per stage.

Only argument handling lives here. Each sub-command names an options dataclass and one library function that takes
it and returns an exit code; the stage's module is imported only when that sub-command runs, so ``sdtune --help``
is instant.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Sequence

from sdtune.errors import SdtuneError
from sdtune.options import OptionsError, parse_options


@dataclass(frozen=True)
class Command:
    """One sub-command: its name and summary for ``--help``, the module, options dataclass and function that run it,
    and the sd-scripts script it stands in for (``seed_equivalent``)."""

    name: str
    summary: str
    module: str
    options: str
    function: str
    seed_equivalent: str = ""
    # where ``options`` is declared when not in ``module``: a module without torch, so --help is instant
    options_module: str = ""


COMMANDS: tuple[Command, ...] = (
    Command("caption", "caption images with BLIP, one .caption file per image",
            "sdtune.label.blip", "CaptionOptions", "caption_images", "finetune/make_captions.py"),
    Command("tag", "tag images with a WD14 tagger (ONNX), one .txt file per image",
            "sdtune.label.wd14", "TagOptions", "tag_images", "finetune/tag_images_by_wd14_tagger.py"),
    Command("merge-captions", "merge caption files into the metadata JSON",
            "sdtune.data.metadata", "MergeOptions", "merge_captions_command", "finetune/merge_captions_to_metadata.py"),
    Command("merge-tags", "merge tag files (WD14 or DeepDanbooru .txt) into the metadata JSON",
            "sdtune.data.metadata", "MergeTagsOptions", "merge_tags_command", "finetune/merge_dd_tags_to_metadata.py"),
    Command("clean", "clean captions and tags in a metadata JSON",
            "sdtune.data.clean", "CleanOptions", "clean_command", "finetune/clean_captions_and_tags.py"),
    Command("prepare", "assign aspect-ratio buckets and cache VAE latents",
            "sdtune.data.prepare", "PrepareOptions", "prepare_command", "finetune/prepare_buckets_latents.py"),
    Command("train", "fine-tune the U-Net (and optionally the text encoder) or train a hypernetwork",
            "sdtune.train.loop", "TrainOptions", "train_command", "fine_tune.py", "sdtune.train.options"),
    Command("generate", "text-to-image with a model sdtune loads or wrote",
            "sdtune.generate", "GenerateOptions", "generate_command", "gen_img_diffusers.py"),
    Command("convert", "convert a model between .ckpt, .safetensors and diffusers formats",
            "sdtune.models.convert", "ConvertOptions", "convert_command", "tools/convert_diffusers20_original_sd.py"),
    Command("merge-lora", "fold LoRA files (each with a weight) into a model and save it in any format",
            "sdtune.models.lora_commands", "MergeLoraOptions", "merge_lora_command", "networks/merge_lora.py"),
    Command("extract-lora", "a LoRA from the difference of a fine-tuned model and its base (SVD)",
            "sdtune.models.lora_commands", "ExtractLoraOptions", "extract_lora_command",
            "networks/extract_lora_from_models.py"),
    Command("review", "write a static page showing the dataset as training sees it (crops, buckets, tokens)",
            "sdtune.review.command", "ReviewOptions", "review_command", ""),
    Command("demo", "run the whole pipeline on a generated dataset and a tiny model (no download)",
            "sdtune.demo", "DemoOptions", "demo_command", ""),
)


def _top_help() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [
        "usage: sdtune COMMAND [options]   (sdtune COMMAND --help lists a command's options)",
        "",
        "Fine-tune Stable Diffusion 1.x and 2.x on your own images.",
        "",
        "commands:",
    ]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    return "\n".join(lines)


def find_command(name: str) -> Command | None:
    """The command called ``name`` (``merge_tags`` for ``merge-tags`` too), or None."""
    normalized = name.replace("_", "-")
    return next((c for c in COMMANDS if c.name == normalized), None)


def _not_about_4bit_kernels(record: logging.LogRecord) -> bool:
    """diffusers imports bitsandbytes for its quantizers, and bitsandbytes' CPU backend then warns on every command
    that its optional 4-bit kernels package is missing; sdtune never uses 4-bit layers, so that one warning is
    noise. Every other bitsandbytes message passes."""
    return "gemm_4bit" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sdtune`` program: run the sub-command ``argv`` names and return its exit code (2: bad usage, options or
    ``SdtuneError``; 130: interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if args else 2
    if args[0] == "--version":
        from sdtune import __version__

        print(__version__)
        return 0
    command = find_command(args[0])
    if command is None:
        print(f"sdtune: unknown command {args[0]!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    # sdtune's own progress at INFO; other libraries (tensorboard, diffusers) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdtune").setLevel(logging.INFO)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_about_4bit_kernels)
    try:
        options_module = importlib.import_module(command.options_module or command.module)
    except ModuleNotFoundError as exc:
        if exc.name != (command.options_module or command.module):
            raise
        print(f"sdtune {command.name}: not implemented yet", file=sys.stderr)
        return 3
    options_cls = getattr(options_module, command.options)
    try:
        options = parse_options(options_cls, args[1:], prog=f"sdtune {command.name}", description=command.summary,
                                commands=[c.name for c in COMMANDS])
        module = importlib.import_module(command.module)  # after parsing: --help and option errors need no torch
        return int(getattr(module, command.function)(options) or 0)
    except (SdtuneError, OptionsError) as exc:
        print(f"sdtune {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        try:
            print(f"sdtune {command.name}: interrupted ({name})", file=sys.stderr)
        except (BrokenPipeError, ValueError):
            pass  # stderr's reader (| tee) is gone: there is no one left to tell
        return int(getattr(exc, "exit_code", 130))
