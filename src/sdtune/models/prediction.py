"""What a single-file checkpoint predicts (epsilon or v), from every signal the tools that write such files leave.

A Stable Diffusion file's weights do not say what the U-Net was trained to predict, and training with the wrong
objective ruins a model, so the type is read from what the writing tool recorded, in this order (the first signal
present decides, and the log names it):

1. ``--v_parameterization`` given by the user: always wins.
2. sdtune's own metadata: ``sdtune.prediction_type``; in files of earlier sdtune versions the scheduler config in
   ``sdtune.configs``, else the default of ``sdtune.family``.
3. Stability AI's model spec: ``modelspec.prediction_type`` (``epsilon`` or ``v``, as sd-scripts'
   library/sai_model_spec.py writes it), else ``modelspec.architecture`` where the architecture id names the
   objective (``stable-diffusion-v2-768-v`` is v, ``stable-diffusion-v2-512`` epsilon; the v1 id covers both).
4. ComfyUI's markers: ``modelspec.predict_key`` (``epsilon`` or ``v``, written by its CheckpointSave node) and the
   empty ``v_pred`` tensor it puts into the state dict of v-prediction models (comfy/model_base.py
   ``state_dict_for_saving``; comfy/supported_models.py reads it back). ``ztsnr`` (zero terminal SNR) only ever
   accompanies ``v_pred``.
5. sd-scripts' LoRA-style metadata ``ss_base_model_version`` (``sd_v1``, ``sd_v1_v``, ``sd_v2``, ``sd_v2_v``: the
   ``_v`` suffix is v-parameterization, library/model_util.py ``get_model_version_str_for_sd1_sd2``).
6. SD 2.x only: a ``.ckpt``'s top-level ``global_step``. The 512-base release was saved at step 875000; like
   diffusers (loaders/single_file_utils.py), any other SD 2.x file is taken as 768-v. SD 1.x defaults to epsilon.

ComfyUI's own fallback for SD 2.x (the spread of one norm bias of the last output block) is not used: it holds
only for fine-tunes close to the released weights.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping

from sdtune.errors import ModelLoadError

logger = logging.getLogger(__name__)

EPSILON = "epsilon"
V = "v_prediction"  # diffusers' name, used inside sdtune
MARKER_KEYS = ("v_pred", "ztsnr")  # ComfyUI's empty marker tensors, not weights
BASE_512_GLOBAL_STEP = 875000  # stabilityai/stable-diffusion-2-base 512-base-ema.ckpt

META_PREDICTION = "sdtune.prediction_type"
META_FAMILY = "sdtune.family"
META_CONFIGS = "sdtune.configs"

# modelspec.prediction_type / modelspec.predict_key values. The spec's values are "epsilon" and "v"; "v_prediction"
# is what earlier sdtune versions wrote (the spec asks readers to be lenient).
_SPEC_VALUES = {"epsilon": EPSILON, "eps": EPSILON, "v": V, "v_prediction": V, "v-prediction": V}
_SS_VERSION = re.compile(r"^sd_v([12])(_v)?$")


@dataclass(frozen=True)
class Decision:
    """What ``detect_prediction_type`` decided, and on which signal."""

    prediction_type: str  # "epsilon" or "v_prediction"
    signal: str  # which signal decided, for the log
    ztsnr: bool = False  # ComfyUI's zero-terminal-SNR marker was present


def spec_prediction_type(prediction_type: str) -> str:
    """The model spec's spelling (``epsilon`` / ``v``) of a diffusers prediction type."""
    return {EPSILON: "epsilon", V: "v"}[prediction_type]


def _spec_value(path: Path, key: str, value: str) -> str:
    try:
        return _SPEC_VALUES[value.strip().lower()]
    except KeyError:
        raise ModelLoadError(
            f"{path}: its metadata {key}={value!r} is neither 'epsilon' nor 'v'; pass --v_parameterization true or "
            "false to say what the model predicts"
        ) from None


def _sdtune_signal(path: Path, metadata: Mapping[str, str]) -> Decision | None:
    if META_PREDICTION in metadata:
        value = metadata[META_PREDICTION]
        if value not in (EPSILON, V):
            raise ModelLoadError(f"{path}: its metadata {META_PREDICTION}={value!r} is not 'epsilon' or "
                                 "'v_prediction'; pass --v_parameterization true or false")
        return Decision(value, f"sdtune metadata ({META_PREDICTION}={value})")
    if META_CONFIGS in metadata:
        from sdtune.models.config_check import parse_configs

        scheduler = parse_configs(metadata[META_CONFIGS], Path(path), META_CONFIGS).get("scheduler", {})
        value = scheduler.get("prediction_type") if isinstance(scheduler, dict) else None
        if value in (EPSILON, V):
            return Decision(value, f"sdtune metadata ({META_CONFIGS} scheduler prediction_type={value})")
    if META_FAMILY in metadata:
        from sdtune.models.families import get_family

        try:
            family = get_family(metadata[META_FAMILY])
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        return Decision(family.prediction_type, f"sdtune metadata ({META_FAMILY}={family.name})")
    return None


def detect_prediction_type(path: Path, *, is_v2: bool, metadata: Mapping[str, str], keys: Collection[str],
                           ckpt_global_step: int | None, override: bool | None) -> Decision:
    """The prediction type of a single file (see the module docstring for the order), logged with its signal.
    Later signals that disagree with the deciding one are named in a warning."""
    decision: Decision | None = None
    disagree = []
    for signal in _signals(path, metadata, keys, override):
        if decision is None:
            decision = signal()  # an unreadable deciding signal raises, naming the file and the fix
            continue
        try:
            later = signal()
        except ModelLoadError as exc:  # an unreadable later signal cannot change the decision; say so
            logger.warning("%s (ignored: %s decided)", exc, decision.signal)
            continue
        if later is not None and later.prediction_type != decision.prediction_type:
            disagree.append(f"{later.signal} says {later.prediction_type}")
    decision = dataclasses.replace(decision or _default(is_v2, ckpt_global_step), ztsnr="ztsnr" in keys)
    logger.info("%s: %s prediction, decided by %s", path, decision.prediction_type, decision.signal)
    if disagree:
        logger.warning("%s: %s decided %s, but %s", path, decision.signal, decision.prediction_type,
                       "; ".join(disagree))
    if decision.ztsnr:
        logger.warning("%s: ComfyUI marks this model as trained with zero terminal SNR (ztsnr); sdtune trains and "
                       "samples with SD's standard noise schedule", path)
    return decision


def _signals(path: Path, metadata: Mapping[str, str], keys: Collection[str], override: bool | None
             ) -> list[Callable[[], Decision | None]]:
    """Every explicit signal present, in the order of the module docstring, each read when called."""
    out: list[Callable[[], Decision | None]] = []
    if override is not None:
        out.append(lambda: Decision(V if override else EPSILON, f"--v_parameterization {str(override).lower()}"))
    if any(k in metadata for k in (META_PREDICTION, META_CONFIGS, META_FAMILY)):
        out.append(lambda: _sdtune_signal(path, metadata))
    for key, tool in (("modelspec.prediction_type", "SAI model spec"), ("modelspec.predict_key", "ComfyUI metadata")):
        value = metadata.get(key, "")
        if value:
            out.append(lambda key=key, tool=tool, value=value: Decision(
                _spec_value(path, key, value), f"{tool} ({key}={value})"))
        if key == "modelspec.prediction_type":  # the architecture id comes right after the spec's own key
            architecture = metadata.get("modelspec.architecture", "").strip().lower()
            for prefix, kind in (("stable-diffusion-v2-768-v", V), ("stable-diffusion-v2-512", EPSILON)):
                if architecture.startswith(prefix):
                    out.append(lambda kind=kind, architecture=architecture: Decision(
                        kind, f"SAI model spec (modelspec.architecture={architecture})"))
    if "v_pred" in keys:
        out.append(lambda: Decision(V, "ComfyUI's v_pred marker key"))
    version = metadata.get("ss_base_model_version", "").strip()
    match = _SS_VERSION.match(version)
    if match:
        out.append(lambda: Decision(V if match.group(2) else EPSILON,
                                    f"sd-scripts metadata (ss_base_model_version={version})"))
    return out


def _default(is_v2: bool, ckpt_global_step: int | None) -> Decision:
    """No explicit signal: SD 1.x is epsilon; SD 2.x by the .ckpt's step, as diffusers decides."""
    if not is_v2:
        return Decision(EPSILON, "no signal in the file: SD 1.x defaults to epsilon")
    if ckpt_global_step == BASE_512_GLOBAL_STEP:
        return Decision(EPSILON, f".ckpt global_step {BASE_512_GLOBAL_STEP} (the SD 2.x 512-base release)")
    found = f".ckpt global_step {ckpt_global_step}" if ckpt_global_step is not None else "no signal in the file"
    return Decision(V, f"{found}: SD 2.x defaults to v-prediction (768-v), as diffusers does; pass "
                       "--v_parameterization false for a 512-base model")
