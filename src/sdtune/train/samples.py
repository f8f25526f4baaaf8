"""Sample images during training: the prompts of a prompt file, generated with the model being trained.

The prompt file is the one ``sdtune generate --from_file`` reads (one prompt a line, ``#`` comments, inline
``--n --w --h --d --l --s`` options); it is read again at every sampling, so it may be edited during a run. Prompt
``i`` without its own ``--d`` uses seed ``seed + i``, the same at every sampling, so successive samples show how one
image changes as training goes on.

Files: ``<out_dir>/<output_name or "sample">_<step:06d>_<index:02d>.png`` with the usual PNG metadata plus ``step``
and ``epoch`` in the ``sdtune`` JSON chunk; with a TensorBoard writer each image is also logged as ``sample/<index>``.

A hypernetwork being trained is sampled with the model it is attached to, in eval mode (no dropout) and at
multiplier 1, and named in the images' metadata; a LoRA being trained likewise (hooked in, its dropout off).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch

from sdtune.devices import same_device
from sdtune.sampling.pipeline import generate_images
from sdtune.sampling.png import model_display_name, save_png
from sdtune.sampling.prompts import read_prompt_file

if TYPE_CHECKING:
    from sdtune.models.hypernetwork import Hypernetwork
    from sdtune.models.sd import StableDiffusion

logger = logging.getLogger(__name__)


def sample_path(out_dir: Path, output_name: Optional[str], step: int, index: int) -> Path:
    """The file of prompt ``index``'s sample at ``step``."""
    return Path(out_dir) / f"{output_name or 'sample'}_{step:06d}_{index:02d}.png"


@dataclass(frozen=True)
class SamplePolicy:
    """When a run samples (``--sample_prompts`` with ``--sample_every_n_steps`` / ``--sample_every_n_epochs``)."""

    prompts: Optional[str] = None
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None

    @classmethod
    def from_options(cls, opts: Any) -> SamplePolicy:
        """The policy of ``sdtune train``'s options."""
        return cls(opts.sample_prompts, opts.sample_every_n_steps, opts.sample_every_n_epochs)

    def after_step(self, step: int) -> bool:
        """Sample after optimizer step ``step``?"""
        return bool(self.prompts and self.every_n_steps and step % self.every_n_steps == 0)

    def after_epoch(self, epoch: int) -> bool:
        """Sample after epoch ``epoch`` (counting from 1)?"""
        return bool(self.prompts and self.every_n_epochs and epoch % self.every_n_epochs == 0)

    def due_at(self, step: int, epoch: int, batch_in_epoch: int) -> bool:
        """Were samples due at the step boundary a state was saved at (``--resume`` makes any that are missing)?"""
        return bool(step) and (self.after_step(step) or (batch_in_epoch == 0 and bool(epoch)
                                                         and self.after_epoch(epoch)))


@contextlib.contextmanager
def inference_state(model: StableDiffusion, device: torch.device | str | None,
                    *extra: torch.nn.Module) -> Iterator[None]:
    """Eval mode (and ``device``) for the U-Net, VAE and text encoder (and ``extra`` modules, e.g. a hypernetwork);
    afterwards each module gets back its own train/eval mode and device. Training may keep the VAE on the CPU; it
    visits ``device`` only for the decode."""
    modules = [model.unet, model.vae, model.text_encoder, *extra]
    modes = [m.training for m in modules]
    devices = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.eval()
        if device is not None:
            target = torch.device(device)
            for m, current in zip(modules, devices):
                if not same_device(current, target):
                    m.to(target)
        yield
    finally:
        for m, mode, current in zip(modules, modes, devices):
            m.train(mode)
            if next(m.parameters()).device != current:
                m.to(current)


def sample_during_training(
    model: StableDiffusion,
    prompts_file: str | Path,
    out_dir: str | Path,
    step: int,
    epoch: int,
    sampler: str = "ddim",
    *,
    clip_skip: Optional[int] = None,
    max_token_length: int = 75,
    device: torch.device | str | None = None,
    seed: int = 0,
    writer: Any = None,
    output_name: Optional[str] = None,
    steps: int = 30,
    scale: float = 7.5,
    width: Optional[int] = None,
    height: Optional[int] = None,
    batch_size: int = 1,
    hypernetwork: Optional[Hypernetwork] = None,
    networks: tuple[torch.nn.Module, ...] = (),
) -> list[Path]:
    """Generate every prompt of ``prompts_file`` with ``model`` and save them under ``out_dir``; returns the files.

    Runs without gradients, with the modules in eval mode, and restores each module's mode and device after (also
    on error). ``steps``/``scale``/``width``/``height`` are the defaults for lines without ``--s``/``--l``/``--w``/
    ``--h`` (size: the family's resolution; the trainer passes its most used bucket). The log says what is being
    sampled before it starts, and a progress bar counts the images. ``writer`` is a TensorBoard ``SummaryWriter``
    (or None). ``hypernetwork``: sample with it at multiplier 1 (attached to the U-Net for the call unless it
    already is). ``networks``: modules already hooked into the model (a LoRA being trained), put in eval mode for
    the call like the model.
    """
    prompts = read_prompt_file(prompts_file)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    size = f", {width}x{height} unless a line says otherwise" if width and height else ""
    logger.info("step %d: sampling %d image(s) (%s, %d steps%s)...", step, len(prompts), sampler, steps, size)
    extra = ((hypernetwork,) if hypernetwork is not None else ()) + tuple(networks)
    with inference_state(model, device, *extra), torch.no_grad():
        generated = generate_images(
            model, prompts, sampler=sampler, steps=steps, scale=scale, width=width, height=height, seed=seed,
            clip_skip=clip_skip, max_token_length=max_token_length, batch_size=batch_size,
            model_name=output_name or model_display_name(out_dir.parent), progress=True,
            hypernetwork=hypernetwork,
        )
    paths = []
    for index, item in enumerate(generated):
        path = save_png(item.image, sample_path(out_dir, output_name, step, index), item.settings,
                        extra={"step": step, "epoch": epoch})
        paths.append(path)
        if writer is not None:
            writer.add_image(f"sample/{index}", np.array(item.image), step, dataformats="HWC")
    logger.info("step %d: %d sample image(s) in %s (%.1f s)", step, len(paths), out_dir,
                time.perf_counter() - started)
    return paths
