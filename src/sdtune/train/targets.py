"""What a training run trains, and how its checkpoints are written.

:class:`FineTuneTarget`: the U-Net (and with ``--train_text_encoder`` the text encoder); checkpoints are whole
models in any save format. :class:`HypernetworkTarget`: a hypernetwork with the model frozen; checkpoints are
AUTOMATIC1111 ``.pt`` files. :class:`LoraTarget`: a LoRA / LoCon with the model frozen; checkpoints are
sd-scripts' LoRA ``.safetensors``. The loop in :mod:`sdtune.train.loop` is the same for all three.
"""

from __future__ import annotations

import abc
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.models.hypernetwork_layout import HypernetworkConfig
from sdtune.models.save import save_model
from sdtune.models.sd import place
from sdtune.precision_names import dtype_of
from sdtune.seeds import derived_seed
from sdtune.train.network_options import parse_network_args
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
    # True when gradients flow through the text encoder (its weights or a LoRA on them are trained)
    trains_text_encoder: bool = False

    @abc.abstractmethod
    def prepare(self, accelerator: Accelerator) -> tuple[nn.Module, nn.Module]:
        """The U-Net and text encoder the loop runs (DDP-wrapped where they are trained)."""

    def load_state(self, folder: Path) -> None:
        """Restore the trained modules' weights from a --save_state folder (``--resume``)."""
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

    def after_update(self) -> dict[str, torch.Tensor]:
        """Called after each optimizer update; what it returns (device tensors) is logged with the step."""
        return {}


def freeze(model: StableDiffusion, device: torch.device, weight_dtype: torch.dtype, mixed_precision: str) -> None:
    """The U-Net and text encoder frozen (no gradients, eval mode) on ``device``: in ``weight_dtype`` under
    --full_fp16/--full_bf16, else in the autocast dtype (autocast computes in it anyway: half the memory)."""
    frozen = weight_dtype if weight_dtype != torch.float32 else frozen_dtype(mixed_precision)
    for module in (model.unet, model.text_encoder):
        module.requires_grad_(False)
        place(module, device, frozen).eval()


def average_gradients(accelerator: Accelerator, parameters: list[nn.Parameter]) -> None:
    """Average the gradients over processes in one all-reduce, for modules DDP does not wrap (they run inside the
    frozen model's forward, through hooks, never through a forward of their own).

    Every rank sends the same tensor: a parameter without a gradient here (a LoRA module that module dropout left
    out of this rank's batches) counts as zero, and a flag per parameter says which ranks had one. Such a parameter
    gets the mean where any rank had a gradient and stays without one where none had (as in one process with
    accumulation); only a rank that lacks a gradient reads the flags (one host-device wait)."""
    if accelerator.num_processes == 1 or not parameters:
        return
    dtype = functools.reduce(torch.promote_types, {p.dtype for p in parameters})
    device = parameters[0].device
    parts = [p.grad.flatten().to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
             for p in parameters]
    parts.append(torch.tensor([float(p.grad is not None) for p in parameters], dtype=dtype, device=device))
    flat = accelerator.reduce(torch.cat(parts), reduction="mean")
    missing = [i for i, p in enumerate(parameters) if p.grad is None]
    anywhere: set[int] = set()
    if missing:
        flags = flat[-len(parameters):]
        anywhere = {i for i, has in zip(missing, flags[missing].tolist()) if has > 0}
    offset = 0
    for i, p in enumerate(parameters):
        mean = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(mean)
        elif i in anywhere:
            p.grad = mean.to(p.dtype).clone()


class FineTuneTarget(TrainTarget):
    """Full fine-tuning: the U-Net, and with --train_text_encoder the text encoder; checkpoints are whole models."""

    def __init__(self, opts: TrainOptions, model: StableDiffusion, device: torch.device,
                 weight_dtype: torch.dtype, clip_skip: int = 1) -> None:
        from sdtune.models.text import unused_layers

        self.opts, self.model = opts, model
        self.trains_text_encoder = opts.train_text_encoder
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
        """``<name>.safetensors`` / ``<name>.ckpt``, or the folder ``<name>`` for the diffusers formats."""
        suffix = {"ckpt": ".ckpt", "safetensors": ".safetensors"}.get(save_format(self.opts), "")
        return output_dir / f"{name}{suffix}"

    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        """The whole model in --save_model_as's format and --save_precision."""
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
        freeze(model, device, weight_dtype, opts.mixed_precision)
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
        """Average the hypernetwork's gradients over processes (DDP does not wrap it)."""
        average_gradients(accelerator, list(self.hypernetwork.parameters()))

    def checkpoint_path(self, output_dir: Path, name: str) -> Path:
        """``<name>.pt``, AUTOMATIC1111's hypernetwork file."""
        return output_dir / f"{name}.pt"

    @functools.cached_property
    def base_shorthash(self) -> Optional[str]:
        """A1111 stores the base model's short hash; hashing a large file takes seconds: once a run."""
        from sdtune.models.hypernetwork import file_shorthash

        return file_shorthash(self.opts.pretrained_model_name_or_path)

    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        """The hypernetwork file, with the base model's hash and the step, as AUTOMATIC1111 writes them."""
        from sdtune.sampling.png import model_display_name

        hn = self.hypernetwork
        hn.step = progress.global_step
        hn.sd_checkpoint = self.base_shorthash
        hn.sd_checkpoint_name = model_display_name(self.opts.pretrained_model_name_or_path)
        hn.optional_info = f"trained with sdtune {__version__}"
        precision = self.opts.save_precision or "float"
        hn.save(path, dtype_of(precision))

    def sample_options(self) -> dict[str, Any]:
        """Samples run with the hypernetwork (at multiplier 1, named in their metadata)."""
        return {"hypernetwork": self.hypernetwork}


class NetworkTarget(TrainTarget):
    """What a network hooked into the frozen model (a LoRA, a LyCORIS network) trains like: only the network's
    parameters, averaged over processes by hand (no DDP wrapper: the network has no forward of its own), saved as
    one file with sd-scripts' ``ss_*`` metadata, and applied while sampling. Subclasses build ``self.network``."""

    network: nn.Module
    run_metadata: dict[str, str]

    def _train_only(self, groups: list[dict[str, Any]]) -> None:
        """Train just the parameters of ``groups`` (``params``, ``lr``): the others get no gradient."""
        self.param_groups = [{"params": list(g["params"]), "lr": g["lr"]} for g in groups]
        trained = {id(p) for g in self.param_groups for p in g["params"]}
        for p in self.network.parameters():
            p.requires_grad_(id(p) in trained)

    def prepare(self, accelerator: Accelerator) -> tuple[nn.Module, nn.Module]:
        """Nothing to wrap in DDP: the network runs inside the frozen model's forward (:func:`average_gradients`)."""
        return self.model.unet, self.model.text_encoder

    def reduce_gradients(self, accelerator: Accelerator) -> None:
        """Average the network's gradients over processes (:meth:`_averaged_parameters`)."""
        average_gradients(accelerator, self._averaged_parameters)

    @functools.cached_property
    def _averaged_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are averaged: all trained ones unless a subclass knows better."""
        return [p for g in self.param_groups for p in g["params"]]

    def checkpoint_path(self, output_dir: Path, name: str) -> Path:
        """``<name>.safetensors`` (or ``.ckpt`` with --save_model_as ckpt, as sd-scripts)."""
        return output_dir / f"{name}.{'ckpt' if self.opts.save_model_as == 'ckpt' else 'safetensors'}"

    def _file_metadata(self, meta: dict[str, str], progress: Progress) -> dict[str, str]:
        """``meta`` (the network's own keys) with the run's ``ss_*`` training metadata and where it ended."""
        meta.update(self.run_metadata)
        meta.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(progress.global_step),
                     "ss_epoch": str(progress.epoch)})
        return meta

    def sample_options(self) -> dict[str, Any]:
        """Samples run with the network as it is now (its modules in eval mode: no dropout)."""
        return {"networks": (self.network,)}


class LoraTarget(NetworkTarget):
    """A LoRA (LoCon with ``conv_dim``) on the frozen model (:func:`freeze`); checkpoints are sd-scripts' LoRA
    files (:mod:`sdtune.models.lora`) with its ``ss_*`` training metadata, AUTOMATIC1111's hashes and the SAI
    model spec.

    The LoRA modules hook the layers they adapt for the whole run (training steps and samples). They are drawn
    from their own seed, the same on every rank, and stay in the trained precision (float32 unless
    --full_fp16/--full_bf16). ``--text_encoder_lr 0`` leaves the text encoder's modules out of the optimizer (and
    no gradient flows through the text encoder).
    """

    def __init__(self, opts: TrainOptions, model: StableDiffusion, device: torch.device, weight_dtype: torch.dtype,
                 seed: int, clip_skip: int, run_metadata: dict[str, str]) -> None:
        from sdtune.models.lora import LoraNetwork

        self.opts, self.model, self.clip_skip = opts, model, clip_skip
        freeze(model, device, weight_dtype, opts.mixed_precision)
        self.args = parse_network_args(opts)
        self.dim = opts.network_dim or 4  # sd-scripts' create_network default
        with torch.random.fork_rng(devices=[]):  # its own seed: not the data's draws; built on the CPU
            torch.manual_seed(derived_seed(seed, 0x4C6F5241))
            network = LoraNetwork(
                model, dim=self.dim, alpha=opts.network_alpha, conv_dim=self.args.get("conv_dim"),
                conv_alpha=self.args.get("conv_alpha"), dropout=opts.network_dropout,
                rank_dropout=self.args.get("rank_dropout"), module_dropout=self.args.get("module_dropout"),
                train_unet=not opts.network_train_text_encoder_only,
                train_text_encoder=not opts.network_train_unet_only)
        if opts.network_weights:
            network.load_weights(opts.network_weights)
        network.to(device, weight_dtype).train()
        network.apply_to(model)
        self.network = network
        self.run_metadata = run_metadata
        groups = network.parameter_groups(opts.unet_lr, opts.text_encoder_lr, opts.learning_rate)
        if not groups:
            raise SdtuneError("nothing to train: every LoRA part has learning rate 0 (--unet_lr / --text_encoder_lr)")
        self._train_only(groups)
        self.group_names = [g["name"] for g in groups]
        self.trains_text_encoder = "textencoder" in self.group_names
        self.uses_global_rng = any(p for p in (opts.network_dropout, self.args.get("rank_dropout"),
                                                self.args.get("module_dropout")))
        self.modules = {"lora": network}
        conv = f", conv dim {self.args['conv_dim']}" if "conv_dim" in self.args else ""
        self.description = (f"training: LoRA, dim {self.dim}, alpha {opts.network_alpha:g}{conv}, on "
                            f"{len(network.unet_loras)} U-Net and {len(network.text_encoder_loras)} text-encoder "
                            f"layers ({sum(p.numel() for p in network.parameters()):,} parameters; "
                            f"trained: {', '.join(self.group_names)})")

    @functools.cached_property
    def _averaged_parameters(self) -> list[nn.Parameter]:
        """The trained parameters less those of the layers clip skip never reads: they never get a gradient, and
        checking for one would make every step wait for the device."""
        from sdtune.models.text import unused_layers

        never_read = {id(m) for layer in unused_layers(self.model.text_encoder, self.clip_skip)
                      for m in layer.modules()}
        skipped = {id(p) for lora in self.network.text_encoder_loras if id(lora.org_module) in never_read
                   for p in lora.parameters()}
        return [p for g in self.param_groups for p in g["params"] if id(p) not in skipped]

    def after_update(self) -> dict[str, torch.Tensor]:
        """``--scale_weight_norms``: sd-scripts' max-norm regularisation after each update (its figures logged)."""
        if self.opts.scale_weight_norms is None:
            return {}
        return self.network.apply_max_norm(self.opts.scale_weight_norms)

    def save_checkpoint(self, path: Path, progress: Progress) -> None:
        """The LoRA file in --save_precision (alpha too, as sd-scripts), with its metadata."""
        from sdtune.models.lora import network_metadata

        # ss_network_args as sd-scripts writes it: the --network_args strings as given ("2", not the parsed 2.0)
        given = {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in self.opts.network_args)}
        meta = network_metadata(self.model.family, self.dim, self.opts.network_alpha, given,
                                title=self.opts.output_name or path.stem, resolution=self.run_metadata.get(
                                    "ss_resolution"), clip_skip=self.clip_skip)
        self.network.save(path, self._file_metadata(meta, progress), dtype_of(self.opts.save_precision or "float"))


def make_target(opts: TrainOptions, model: StableDiffusion, device: torch.device, weight_dtype: torch.dtype,
                seed: int, clip_skip: int = 1, run_metadata: Optional[dict[str, str]] = None) -> TrainTarget:
    """The target ``opts`` ask for: a hypernetwork with --hypernetwork_module, a LoRA with --network_module,
    otherwise the fine-tune. ``run_metadata``: the LoRA file's ``ss_*`` training metadata."""
    if opts.network_module == "lycoris.kohya":
        from sdtune.train.lycoris_target import LycorisTarget  # imports targets: here, not at the top
        return LycorisTarget(opts, model, device, weight_dtype, seed, clip_skip, dict(run_metadata or {}))
    if opts.network_module:
        return LoraTarget(opts, model, device, weight_dtype, seed, clip_skip, dict(run_metadata or {}))
    if opts.hypernetwork_module:
        return HypernetworkTarget(opts, model, device, weight_dtype, seed)
    return FineTuneTarget(opts, model, device, weight_dtype, clip_skip)
