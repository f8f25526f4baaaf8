"""Option groups that several commands share, declared once and composed into each command's options by inheritance.

A command's options dataclass lists the groups it takes as bases (``class TrainOptions(ModelSource, ImageKeys, ...)``);
the group's fields come first in ``--help``, with the same type, default and meaning in every command.

* ``ModelSource`` (``--v2 --v_parameterization --vae --tokenizer``): train, generate, convert
* ``ImageFolder`` (``TRAIN_DIR``, positional, and ``--recursive``): caption, tag, merge-captions, merge-tags, prepare
* ``Recursive`` (``--recursive``): train and review, whose image folder is an option
* ``ImageKeys`` (``--full_path``): merge-captions, merge-tags, prepare, train, review
* ``LoaderWorkers`` (``--max_data_loader_n_workers``): caption, tag, prepare, train
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdtune.options import opt

# The groups are keyword-only (Python 3.10+), so that their defaults may precede a command's own positional fields.


@dataclass(kw_only=True)
class ModelSource:
    """How to read a model beyond its path: overrides of what is detected, and the parts a single file lacks."""

    v2: Optional[bool] = opt(None, "the model is SD 2.x (normally detected from the weights)")
    v_parameterization: Optional[bool] = opt(None, "the model predicts velocity (SD 2.x 768-v); default: detected "
                                             "from the file (this option overrides it)")
    vae: Optional[str] = opt(None, "use this VAE instead of the model's (diffusers folder, full model or standalone "
                             "VAE file)")
    tokenizer: Optional[str] = opt(None, "CLIP tokenizer folder for single-file models (default: the packaged "
                                   "vocabulary)")


@dataclass(kw_only=True)
class Recursive:
    """``--recursive`` alone, for the commands whose image folder is an option (train, review)."""

    recursive: bool = opt(False, "look for images in sub-folders too")


@dataclass  # not keyword-only: TRAIN_DIR stays the first positional argument, also of the options' constructor
class ImageFolder(Recursive):
    """The folder of images a preparation stage reads (sd-scripts' first positional argument)."""

    train_data_dir: Path = opt(help="folder of the training images", positional=True, metavar="TRAIN_DIR")


@dataclass(kw_only=True)
class ImageKeys:
    """How the metadata JSON names images: by file stem, or with ``--full_path`` by full path."""

    full_path: bool = opt(False, "the metadata keys are full image paths (as merge --full_path writes them; several "
                          "folders in one JSON) instead of file stems")


@dataclass(kw_only=True)
class LoaderWorkers:
    """``--max_data_loader_n_workers``: processes that decode images while the model works."""

    max_data_loader_n_workers: int = opt(2, "workers that read and decode images ahead of the model (0: in the main "
                                         "process)")
