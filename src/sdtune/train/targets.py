"""What a training run trains, and how its checkpoints are written.

:class:`FineTuneTarget`: the U-Net (and with ``--train_text_encoder`` the text encoder); checkpoints are whole
models in any save format. :class:`HypernetworkTarget`: a hypernetwork with the model frozen; checkpoints are
AUTOMATIC1111 ``.pt`` files. The loop in :mod:`sdtune.train.loop` is the same for both.
"""

from __future__ import annotations

import abc
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.models.hypernetwork import HypernetworkConfig
from sdtune.models.save import save_model
from sdtune.models.sd import place
from sdtune.precision_names import dtype_of
from sdtune.seeds import derived_seed
from sdtune.train.options import hypernetwork_config
from sdtune.train.state import Progress, load_module_weights

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdtune.models.sd import StableDiffusion
    from sdtune.train.options import TrainOptions

logger = logging.getLogger(__name__)


def save_format(opts: TrainOptions) -> str:
    """--save_model_as, with sd-scripts' --use_safetensors turning ckpt into safetensors and diffusers' .bin
    weights into .safetensors; safetensors when neither is given."""
    fmt = opts.save_model_as or "safetensors"
    if opts.use_safetensors:
        fmt = {"ckpt": "safetensors", "diffusers": "diffusers_safetensors"}.get(fmt, fmt)
    return fmt


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen modules are kept in: half precision when autocast computes in it anyway."""
    return dtype_of(mixed_precision)


class TrainTarget(abc.ABC):
    """What a run trains, and how its checkpoints are written.

    ``modules``: the trained modules by name; their weights go into --save_state folders and come back with
    --resume. ``param_groups``: the optimizer's groups, named in ``group_names`` (the ``lr/<name>`` logs).
    """

    modules: dict[str, nn.Module]
    param_groups: list[dict[str, Any]]
    group_names: list[str]
    description: str
    # True when the trained modules draw from torch's global RNG (dropout): the loop then seeds it per batch
    uses_global_rng: bool = False

    @abc.abstractmethod
    def prepare(self, accelerator: Accelerator) -> tuple[nn.Module, nn.Module]:
        """The U-Net and text encoder the loop runs (DDP-wrapped where they are trained)."""

    def load_state(self, folder: Path) -> None:
        for name, module in self.modules.items():
            load_module_weights(folder, name, module)

    def reduce_gradients(self, accelerator: Accelerator) -> None:
        """Average the gradients over processes where DDP does not (called after the last backward of a step)."""

    @abc.abstractmethod
    def checkpoint_path(self, output_dir: Path, name: str) -> Path:
        """Where the checkpoint called ``name`` (``last``, ``epoch-000003``, ...) goes."""

    @abc.abstractmethod
    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        """Write the checkpoint (rank 0 only)."""

    def sample_options(self) -> dict[str, Any]:
        """Extra arguments of :func:`sdtune.train.samples.sample_during_training`."""
        return {}


class FineTuneTarget(TrainTarget):
    """Full fine-tuning: the U-Net, and with --train_text_encoder the text encoder; checkpoints are whole models."""

    def __init__(self, opts: TrainOptions, model: StableDiffusion, device: torch.device,
                 weight_dtype: torch.dtype, clip_skip: int = 1) -> None:
        from sdtune.models.text import unused_layers

        self.opts, self.model = opts, model
        place(model.unet, device, weight_dtype).train()
        model.unet.requires_grad_(True)
        model.text_encoder.requires_grad_(opts.train_text_encoder)
        for layer in unused_layers(model.text_encoder, clip_skip):
            layer.requires_grad_(False)  # CLIP skip never reads them: no gradient, and DDP must not wait for one
        te_dtype = weight_dtype if opts.train_text_encoder else frozen_dtype(opts.mixed_precision)
        place(model.text_encoder, device, te_dtype)
        model.text_encoder.train(opts.train_text_encoder)
        self.modules = {"unet": model.unet}
        self.param_groups = [{"params": list(model.unet.parameters()), "lr": opts.learning_rate}]
        self.group_names = ["unet"]
        self.description = "training: the U-Net"
        if opts.train_text_encoder:
            self.modules["text_encoder"] = model.text_encoder
            self.param_groups.append({
                "params": [p for p in model.text_encoder.parameters() if p.requires_grad],
                "lr": opts.learning_rate_te if opts.learning_rate_te is not None else opts.learning_rate})
            self.group_names.append("text_encoder")
            self.description = "training: the U-Net and the text encoder"

    def prepare(self, accelerator: Accelerator) -> tuple[nn.Module, nn.Module]:
        # DDP wrapping under several processes; for one, accelerate only moves the modules to its device (where
        # they already are). The optimizer is not prepared: accumulation and loss scaling are done by the loop.
        if self.opts.train_text_encoder:
            return accelerator.prepare(self.model.unet, self.model.text_encoder)
        return accelerator.prepare(self.model.unet), self.model.text_encoder

    def checkpoint_path(self, output_dir: Path, name: str) -> Path:
        suffix = {"ckpt": ".ckpt", "safetensors": ".safetensors"}.get(save_format(self.opts), "")
        return output_dir / f"{name}{suffix}"

    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        save_model(self.model, path, save_format(self.opts), self.opts.save_precision or "float",
                   epoch=progress.epoch, global_step=progress.global_step)


class HypernetworkTarget(TrainTarget):
    """A hypernetwork (--hypernetwork_module); the U-Net and text encoder are frozen (no gradients) and kept in half
    precision under mixed precision. Checkpoints are AUTOMATIC1111 ``.pt`` files holding only the hypernetwork.

    The hypernetwork is attached to the U-Net for the whole run (training steps and samples), by hooks that leave
    the U-Net's weights alone. Its weights stay in the trained precision (float32 unless --full_fp16/--full_bf16).
    """

    def __init__(self, opts: TrainOptions, model: StableDiffusion, device: torch.device, weight_dtype: torch.dtype,
                 seed: int) -> None:
        from sdtune.models.hypernetwork import Hypernetwork, attention_sizes, describe

        self.opts, self.model = opts, model
        frozen = weight_dtype if weight_dtype != torch.float32 else frozen_dtype(opts.mixed_precision)
        for module in (model.unet, model.text_encoder):
            module.requires_grad_(False)
            place(module, device, frozen).eval()
        source: str | Path = "--hypernetwork_module"
        if opts.hypernetwork_weights:
            source = Path(opts.hypernetwork_weights)
            hypernetwork = Hypernetwork.load(source)
            self._warn_ignored_layout(hypernetwork.config)
        else:
            hypernetwork = Hypernetwork(attention_sizes(model.unet), hypernetwork_config(opts))
            hypernetwork.reset_parameters(derived_seed(seed, 0x4879))  # its own seed: not the data's draws
        hypernetwork.check_model(model.unet, source)
        # A1111 names every file of a run after the run (not "<name>-<step>"): so does the "name" field here, and
        # the "Hypernet:" of the samples.
        hypernetwork.name = opts.output_name or hypernetwork.name or "hypernetwork"
        hypernetwork.to(device, weight_dtype).train()
        hypernetwork.requires_grad_(True)
        self.hypernetwork: Hypernetwork = hypernetwork
        self.hooks = hypernetwork.attach(model.unet)
        self.uses_global_rng = any(p > 0 for p in hypernetwork.config.dropout_structure)
        self.modules = {"hypernetwork": hypernetwork}
        self.param_groups = [{"params": list(hypernetwork.parameters()), "lr": opts.learning_rate}]
        self.group_names = ["hypernetwork"]
        self.description = f"training: {describe(hypernetwork)}, on {self.hooks.count} to_k/to_v projections"

    def _warn_ignored_layout(self, config: HypernetworkConfig) -> None:
        asked = hypernetwork_config(self.opts)

        def layout(c: HypernetworkConfig) -> tuple:
            return c.layer_structure, c.activation, c.layer_norm, c.dropout_structure

        if layout(asked) != layout(HypernetworkConfig.from_options()) and layout(asked) != layout(config):
            logger.warning("%s: the file's layout (layer structure %s, activation %s, layer norm %s, dropout %s) is "
                           "used; the --hypernetwork_* layout options are ignored", self.opts.hypernetwork_weights,
                           ",".join(f"{x:g}" for x in config.layer_structure), config.activation, config.layer_norm,
                           ",".join(f"{x:g}" for x in config.dropout_structure))

    def prepare(self, accelerator: Accelerator) -> tuple[nn.Module, nn.Module]:
        # Nothing to wrap in DDP: the hypernetwork runs inside the U-Net's forward (hooks), never through a
        # forward of its own; its few gradients are averaged by reduce_gradients.
        return self.model.unet, self.model.text_encoder

    def load_state(self, folder: Path) -> None:
        try:
            super().load_state(folder)
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            first = lines[1] if len(lines) > 1 else lines[0] if lines else ""  # lines[0] is torch's header
            raise SdtuneError(
                f"{folder}: its hypernetwork has another layout than this run's ({first}); resume with the "
                "--hypernetwork_* options (or --hypernetwork_weights) of the run that saved it"
            ) from exc

    def reduce_gradients(self, accelerator: Accelerator) -> None:
        if accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.hypernetwork.parameters() if p.grad is not None]
        if grads:
            flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def checkpoint_path(self, output_dir: Path, name: str) -> Path:
        return output_dir / f"{name}.pt"

    @functools.cached_property
    def base_shorthash(self) -> Optional[str]:
        """A1111 stores the base model's short hash; hashing a large file takes seconds: once a run."""
        from sdtune.models.hypernetwork import file_shorthash

        return file_shorthash(self.opts.pretrained_model_name_or_path)

    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        from sdtune.sampling.png import model_display_name

        hn = self.hypernetwork
        hn.step = progress.global_step
        hn.sd_checkpoint = self.base_shorthash
        hn.sd_checkpoint_name = model_display_name(self.opts.pretrained_model_name_or_path)
        hn.optional_info = f"trained with sdtune {__version__}"
        precision = self.opts.save_precision or "float"
        hn.save(path, dtype_of(precision))

    def sample_options(self) -> dict[str, Any]:
        return {"hypernetwork": self.hypernetwork}


def make_target(opts: TrainOptions, model: StableDiffusion, device: torch.device, weight_dtype: torch.dtype,
                seed: int, clip_skip: int = 1) -> TrainTarget:
    """The target ``opts`` ask for: a hypernetwork with --hypernetwork_module, otherwise the fine-tune."""
    if opts.hypernetwork_module:
        return HypernetworkTarget(opts, model, device, weight_dtype, seed)
    return FineTuneTarget(opts, model, device, weight_dtype, clip_skip)
