"""Hypernetworks in the file format of AUTOMATIC1111's web UI (and of NovelAI's original files).

A hypernetwork (NovelAI, 2022; popularised by AUTOMATIC1111's ``modules/hypernetworks/hypernetwork.py``) is, for
each attention width ``d`` of the U-Net, a pair of small residual MLPs that transform the attention *context*
before the key and the value projections::

    k = to_k(context + mlp_k(context) * multiplier)
    v = to_v(context + mlp_v(context) * multiplier)

"context" is the text conditioning in cross-attention and the image features in self-attention, so the width ``d``
is 768 (SD 1.x) or 1024 (SD 2.x) for cross-attention and 320/640/1280 for self-attention. The U-Net itself is not
changed: :meth:`Hypernetwork.attach` adds forward pre-hooks to every attention's ``to_k`` and ``to_v``, which see
the context whatever attention backend (SDPA, xformers, sliced) the processor uses, and can be removed again.

**The layout** follows AUTOMATIC1111's ``HypernetworkModule`` exactly, because its module numbering *is* the file
format: for each step ``i`` of the layer structure (e.g. ``1, 2, 1``: ``d -> 2d -> d``) the ``Sequential`` gets

    Linear(d * s[i], d * s[i+1])
    activation        unless "linear", and not after the last Linear unless activate_output
    LayerNorm         with is_layer_norm
    Dropout(p)        when dropout_structure[i+1] > 0 (A1111 keeps the last entry 0: no dropout after the output)

and the state-dict keys are ``linear.<index in that Sequential>.weight/bias``, counting activations and dropouts
too (``1, 2, 1`` + relu + layer norm + dropout: ``linear.0``, ``linear.2`` (LayerNorm), ``linear.4``, ``linear.5``).
New weights use A1111's "Normal" initialisation: every Linear and LayerNorm weight from N(0, 0.01), biases 0, so
a new hypernetwork starts close to the identity.

**The file** is a ``torch.save`` dict: ``{d: (key_module_state, value_module_state), ...}`` with int keys, plus
``layer_structure``, ``activation_func``, ``is_layer_norm``, ``weight_initialization``, ``use_dropout``,
``dropout_structure``, ``last_layer_dropout``, ``activate_output``, ``step``, ``name``, ``sd_checkpoint``,
``sd_checkpoint_name``, ``optional_info``. It holds only tensors and plain values, so it is read with
``torch.load(weights_only=True)`` here, by A1111 and by ComfyUI (``comfy/hypernetwork.py``). NovelAI's original
files (``{d: [k, v]}`` with ``linear1``/``linear2`` keys and no metadata) load too: missing metadata takes A1111's
load defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sdtune.atomic import atomic_path
from sdtune.errors import SdtuneError
from sdtune.models.hypernetwork_layout import (
    NORMAL_INIT_STD,
    HypernetworkConfig,
    a1111_dropout_structure,
    activation_class,
    fmt,
)

logger = logging.getLogger(__name__)

FAMILY_CROSS_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}  # text-encoder widths: the cross-attention context


# ------------------------------------------------------------------------------------------------ the modules
class HypernetworkModule(nn.Module):
    """One residual MLP: ``x + linear(x) * multiplier``, with A1111's ``Sequential`` named ``linear``."""

    def __init__(self, dim: int, config: HypernetworkConfig) -> None:
        super().__init__()
        structure, steps = config.layer_structure, len(config.layer_structure) - 1
        layers: list[nn.Module] = []
        for i in range(steps):
            width = int(dim * structure[i + 1])  # int(), as A1111: 1.5 * 321 rounds down there too
            layers.append(nn.Linear(int(dim * structure[i]), width))
            if config.activation != "linear" and (i < steps - 1 or config.activate_output):
                layers.append(activation_class(config.activation)())
            if config.layer_norm:
                layers.append(nn.LayerNorm(width))
            if config.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=config.dropout_structure[i + 1]))
        self.dim = dim
        self.linear = nn.Sequential(*layers)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A1111's "Normal" initialisation: Linear and LayerNorm weights from N(0, 0.01), biases 0."""
        with torch.no_grad():
            for layer in self.linear:
                if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                    layer.weight.normal_(0.0, NORMAL_INIT_STD, generator=generator)
                    layer.bias.zero_()

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * multiplier


class Hypernetwork(nn.Module):
    """A pair of :class:`HypernetworkModule` (key, value) per attention width, plus A1111's metadata.

    ``multiplier`` scales every module's output (A1111's "strength"); training uses 1.
    """

    def __init__(self, sizes: Iterable[int], config: HypernetworkConfig = HypernetworkConfig(), *, name: str = "",
                 step: int = 0, sd_checkpoint: Optional[str] = None, sd_checkpoint_name: Optional[str] = None,
                 optional_info: Optional[str] = None) -> None:
        super().__init__()
        sizes = sorted({int(s) for s in sizes})
        if not sizes:
            raise SdtuneError("a hypernetwork needs at least one attention width")
        self.config = config
        self.layers = nn.ModuleDict(
            {str(d): nn.ModuleList([HypernetworkModule(d, config), HypernetworkModule(d, config)]) for d in sizes})
        self.name = name
        self.step = step
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.multiplier = 1.0
        self._hooks: dict[int, HypernetworkHooks] = {}  # id(unet) -> the hooks attached to it

    @property
    def sizes(self) -> list[int]:
        """The attention widths it has modules for, ascending."""
        return [int(d) for d in self.layers]

    def pair(self, size: int) -> tuple[HypernetworkModule, HypernetworkModule]:
        """The (key, value) modules of attention width ``size``."""
        key, value = self.layers[str(size)]
        return key, value  # type: ignore[return-value]

    def reset_parameters(self, seed: int) -> None:
        """New weights (A1111 "Normal"), drawn from a generator seeded with ``seed``: the same seed, the same
        hypernetwork."""
        generator = torch.Generator().manual_seed(seed)
        for d in self.sizes:
            for module in self.pair(d):
                module.reset_parameters(generator)

    def parameter_count(self) -> int:
        """How many weights its modules hold (for the log)."""
        return sum(p.numel() for p in self.parameters())

    # -------------------------------------------------------------------------------------------- the file
    def a1111_state(self, dtype: torch.dtype = torch.float32) -> dict[Any, Any]:
        """The contents of the ``.pt`` file (see the module docstring); tensors on the CPU in ``dtype``."""
        c = self.config
        state: dict[Any, Any] = {}
        for d in self.sizes:
            state[d] = tuple({k: v.detach().to("cpu", dtype).contiguous().clone()
                              for k, v in module.state_dict().items()} for module in self.pair(d))
        state.update({
            "step": int(self.step),
            "name": self.name,
            "layer_structure": [float(x) for x in c.layer_structure],
            "activation_func": c.activation,
            "is_layer_norm": bool(c.layer_norm),
            "weight_initialization": c.weight_init,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "activate_output": bool(c.activate_output),
            "use_dropout": c.use_dropout,
            "dropout_structure": [float(p) for p in c.dropout_structure],
            "last_layer_dropout": c.last_layer_dropout,
            "optional_info": self.optional_info,
        })
        return state

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write the A1111 ``.pt`` file atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.a1111_state(dtype), tmp)
        return path

    @classmethod
    def from_a1111_state(cls, state: Mapping[Any, Any], source: str | Path = "hypernetwork") -> Hypernetwork:
        """A hypernetwork from a loaded file (A1111 or NovelAI); ``source`` names it in errors."""
        if not isinstance(state, Mapping):
            raise SdtuneError(f"{source}: not a hypernetwork file (it holds a {type(state).__name__}, not a dict)")
        sizes = [k for k in state if isinstance(k, int) and not isinstance(k, bool)]
        if not sizes:
            hint = " (it looks like a Stable Diffusion checkpoint)" if "state_dict" in state else ""
            raise SdtuneError(f"{source}: not a hypernetwork file{hint}: it has no attention widths such as 320 or "
                              "768 as keys; pass a hypernetwork .pt from sdtune train or AUTOMATIC1111")
        config = _config_from_metadata(state, source)
        hypernetwork = cls(sizes, config, name=str(state.get("name") or Path(str(source)).stem),
                           step=int(state.get("step") or 0), sd_checkpoint=state.get("sd_checkpoint"),
                           sd_checkpoint_name=state.get("sd_checkpoint_name"),
                           optional_info=state.get("optional_info"))
        for d in sizes:
            pair = state[d]
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, Mapping) for x in pair):
                raise SdtuneError(f"{source}: the entry for width {d} is not a (key, value) pair of state dicts")
            for which, module, weights in zip(("key", "value"), hypernetwork.pair(d), pair):
                weights = _renamed_nai_keys(dict(weights))
                try:
                    module.load_state_dict(weights, strict=True)
                except RuntimeError as exc:
                    raise SdtuneError(
                        f"{source}: the {which} module of width {d} does not match the layout the file describes "
                        f"(layer structure {fmt(config.layer_structure)}, activation {config.activation}, "
                        f"layer norm {config.layer_norm}, dropout {fmt(config.dropout_structure)}): {exc}. "
                        "The file is damaged or its metadata was edited."
                    ) from exc
        return hypernetwork

    @classmethod
    def load(cls, path: str | Path) -> Hypernetwork:
        """Read a hypernetwork ``.pt`` (A1111 or NovelAI format) with ``torch.load(weights_only=True)``."""
        path = Path(path)
        if not path.is_file():
            raise SdtuneError(f"{path}: hypernetwork file does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # A damaged or foreign file makes the unpickler fail in many ways (UnpicklingError, RuntimeError from the
        # zip reader, EOFError, even KeyError on garbage): all mean "not a readable hypernetwork", reported
        # with the cause attached.
        except Exception as exc:
            raise SdtuneError(
                f"{path}: cannot be read as a hypernetwork with torch.load(weights_only=True) ({exc}). A "
                "hypernetwork .pt holds only tensors and plain values; this file is damaged, is not a hypernetwork, "
                "or holds Python objects that are not loaded for safety"
            ) from exc
        return cls.from_a1111_state(state, path)

    # -------------------------------------------------------------------------------------------- applying
    def check_model(self, unet: nn.Module, source: str | Path = "hypernetwork") -> None:
        """Raise if the hypernetwork was made for another model family; log widths it leaves alone."""
        model_sizes = attention_sizes(unet)
        cross = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        cross = cross if isinstance(cross, int) else None
        mine = set(self.sizes)
        if not mine & set(model_sizes) or (cross is not None and cross not in mine):
            made_for = ", ".join(f"{FAMILY_CROSS_WIDTHS[d]} ({d})" for d in self.sizes if d in FAMILY_CROSS_WIDTHS)
            model_family = FAMILY_CROSS_WIDTHS.get(cross or 0, "this model")
            raise SdtuneError(
                f"{source}: the hypernetwork has modules for attention widths {_ints(self.sizes)}"
                f"{' (made for ' + made_for + ')' if made_for else ''}, but the model's attention widths are "
                f"{_ints(model_sizes)} (text conditioning {cross}, {model_family}). Use a hypernetwork trained for "
                "this model family (SD 1.x: 320, 640, 768, 1280; SD 2.x: 320, 640, 1024, 1280)"
            )
        missing = [d for d in model_sizes if d not in mine]
        unused = [d for d in self.sizes if d not in model_sizes]
        if missing:
            logger.warning("%s: no module for attention width(s) %s: those attentions stay unchanged", source,
                           _ints(missing))
        if unused:
            logger.info("%s: width(s) %s are not in this model and stay unused", source, _ints(unused))

    def attach(self, unet: nn.Module) -> HypernetworkHooks:
        """Apply the hypernetwork to every attention of ``unet`` whose context width it has a module for.

        Adds forward pre-hooks to the attentions' ``to_k``/``to_v``; ``unet``'s own weights and state dict stay as
        they are. Returns the hooks (``.remove()``, or use them as a context manager). Attaching twice to the same
        U-Net is an error.
        """
        if id(unet) in self._hooks:
            raise SdtuneError("this hypernetwork is already attached to that U-Net")
        handles: list[RemovableHandle] = []
        for module in unet.modules():
            if not _is_attention(module):
                continue
            for index, projection in enumerate((module.to_k, module.to_v)):
                if str(projection.in_features) in self.layers:
                    handles.append(projection.register_forward_pre_hook(
                        _ContextHook(self, projection.in_features, index)))
        hooks = HypernetworkHooks(self, unet, handles)
        self._hooks[id(unet)] = hooks
        return hooks

    def _detached(self, unet_id: int) -> None:
        self._hooks.pop(unet_id, None)

    @contextlib.contextmanager
    def applied(self, unet: nn.Module, multiplier: float = 1.0) -> Iterator[Hypernetwork]:
        """Within the block ``unet`` runs with this hypernetwork at ``multiplier``; afterwards as before (a
        hypernetwork already attached by the caller, as during training, stays attached)."""
        previous = self.multiplier
        hooks = None if id(unet) in self._hooks else self.attach(unet)
        self.multiplier = multiplier
        try:
            yield self
        finally:
            self.multiplier = previous
            if hooks is not None:
                hooks.remove()


class HypernetworkHooks:
    """The hooks of one :meth:`Hypernetwork.attach`: ``remove()`` them, or leave the ``with`` block."""

    def __init__(self, hypernetwork: Hypernetwork, unet: nn.Module, handles: list[RemovableHandle]) -> None:
        self.hypernetwork = hypernetwork
        self.unet_id = id(unet)
        self.handles = handles

    @property
    def count(self) -> int:
        """How many projections (``to_k`` and ``to_v``) the hypernetwork changes."""
        return len(self.handles)

    def remove(self) -> None:
        """Detach the hooks from the U-Net (leaving the ``with`` block does the same)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.hypernetwork._detached(self.unet_id)

    def __enter__(self) -> HypernetworkHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _ContextHook:
    """Forward pre-hook of ``to_k`` (index 0) or ``to_v`` (index 1): replaces the context it projects.

    The hypernetwork runs in its own dtype (A1111 runs it in float32 too, ``devices.cond_cast_float``) and the
    result goes back to the context's dtype, so an fp16 U-Net can use a float32 hypernetwork.
    """

    def __init__(self, hypernetwork: Hypernetwork, size: int, index: int) -> None:
        self.hypernetwork = hypernetwork
        self.size = size
        self.index = index

    def __call__(self, projection: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hn = self.hypernetwork
        if hn.multiplier == 0:
            return None  # exactly the base model (x + 0 * mlp(x) is x too, unless mlp(x) overflows)
        context = args[0]
        module = hn.pair(self.size)[self.index]
        dtype = module.linear[0].weight.dtype
        out = module(context.to(dtype), hn.multiplier).to(context.dtype)
        return (out, *args[1:])


def _is_attention(module: nn.Module) -> bool:
    to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
    return isinstance(to_k, nn.Linear) and isinstance(to_v, nn.Linear)


def attention_sizes(unet: nn.Module) -> list[int]:
    """The context widths of the U-Net's attentions (the inputs of every ``to_k``/``to_v``, self- and
    cross-attention): SD 1.x 320, 640, 768, 1280; SD 2.x 320, 640, 1024, 1280."""
    sizes = {p.in_features for m in unet.modules() if _is_attention(m) for p in (m.to_k, m.to_v)}
    if not sizes:
        raise SdtuneError("the U-Net has no attention layers with to_k/to_v projections: a hypernetwork has "
                          "nothing to change in it")
    return sorted(sizes)


def _ints(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values)


def expected_parameter_count(sizes: Iterable[int], config: HypernetworkConfig = HypernetworkConfig()) -> int:
    """Parameters of a hypernetwork: per width, two modules of Linear (+ LayerNorm) layers."""
    total = 0
    s = config.layer_structure
    for d in sizes:
        per_module = 0
        for i in range(len(s) - 1):
            n_in, n_out = int(d * s[i]), int(d * s[i + 1])
            per_module += n_in * n_out + n_out + (2 * n_out if config.layer_norm else 0)
        total += 2 * per_module
    return total


# ------------------------------------------------------------------------------------------------ reading files
def _renamed_nai_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NovelAI's files name the two Linears ``linear1``/``linear2``; A1111 (``fix_old_state_dict``) reads them as
    ``linear.0``/``linear.1`` of the default layout."""
    renames = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
    return {renames.get(k, k): v for k, v in weights.items()}


def _config_from_metadata(state: Mapping[Any, Any], source: str | Path) -> HypernetworkConfig:
    """The layout a file describes; what it leaves out takes A1111's defaults (``Hypernetwork.load``)."""
    layer_structure = state.get("layer_structure") or [1, 2, 1]
    activation = state.get("activation_func") or "linear"  # A1111: None = no activation
    layer_norm = bool(state.get("is_layer_norm", False))
    dropout = state.get("dropout_structure")
    use_dropout = any(dropout) if dropout else bool(state.get("use_dropout", False))
    if not dropout:
        dropout = a1111_dropout_structure(list(layer_structure), use_dropout,
                                          bool(state.get("last_layer_dropout", False)))
    try:
        return HypernetworkConfig(
            layer_structure=tuple(float(x) for x in layer_structure),
            activation=str(activation).lower(),
            layer_norm=layer_norm,
            dropout_structure=tuple(float(p) for p in dropout),
            activate_output=bool(state.get("activate_output", True)),  # A1111's default when the key is missing
            weight_init=str(state.get("weight_initialization") or "Normal"),
        )
    except (SdtuneError, TypeError, ValueError) as exc:
        raise SdtuneError(f"{source}: unreadable hypernetwork metadata: {exc}") from exc


def file_shorthash(path: str | Path) -> Optional[str]:
    """A1111's short hash of a model file (the first 10 hex digits of its sha256), which it stores as
    ``sd_checkpoint``; None for folders (diffusers models) and hub ids."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def describe(hypernetwork: Hypernetwork) -> str:
    """One line for the log: widths, layout and size."""
    c = hypernetwork.config
    return (f"hypernetwork: widths {_ints(hypernetwork.sizes)}; layer structure {fmt(c.layer_structure)}, "
            f"activation {c.activation}, layer norm {'on' if c.layer_norm else 'off'}, dropout "
            f"{fmt(c.dropout_structure)}; {hypernetwork.parameter_count() / 1e6:.2f} M parameters")


__all__ = ["FAMILY_CROSS_WIDTHS", "Hypernetwork", "HypernetworkHooks", "HypernetworkModule", "attention_sizes",
           "describe", "expected_parameter_count", "file_shorthash"]
