"""The layout of a hypernetwork's modules: :class:`HypernetworkConfig` (layer structure, activation, layer norm,
dropout), as AUTOMATIC1111's metadata keys describe it, and the activation table. No model: the options layer and
the file reader both use it (see :mod:`sdtune.models.hypernetwork` for the modules and the file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from sdtune.errors import SdtuneError
from sdtune.models.choices import A1111_ACTIVATION_NAMES, ACTIVATION_CHOICES

# The names (and why they are these) live in models.choices, which --help reads without torch.
# AUTOMATIC1111's activation table. A1111 also accepts the lower-cased name of any class in
# torch.nn.modules.activation (see _activation_class).
_A1111_ACTIVATIONS: dict[str, type[nn.Module]] = dict(zip(
    A1111_ACTIVATION_NAMES,
    (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid),
    strict=True,
))

NORMAL_INIT_STD = 0.01  # A1111's "Normal" weight initialisation
A1111_DEFAULT_DROPOUT = 0.3  # what A1111 uses for files that say use_dropout but carry no dropout_structure


def activation_class(name: str) -> type[nn.Module]:
    """The torch module class of an A1111 activation name (its table, or any torch.nn activation's lower-case name)."""
    if name in _A1111_ACTIVATIONS:
        return _A1111_ACTIVATIONS[name]
    import torch.nn.modules.activation as activations

    for cls_name, cls in vars(activations).items():
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == activations.__name__ \
                and cls_name.lower() == name:
            return cls
    raise SdtuneError(f"unknown hypernetwork activation {name!r}; choose one of {', '.join(ACTIVATION_CHOICES)} "
                      "(or another torch.nn activation's lower-case class name, as AUTOMATIC1111 accepts)")


# ------------------------------------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class HypernetworkConfig:
    """The layout of every module of a hypernetwork (A1111's metadata keys in brackets).

    ``layer_structure`` [layer_structure]: widths as multiples of ``d``, from 1 to 1 (``1, 2, 1`` = d -> 2d -> d).
    ``activation`` [activation_func], ``layer_norm`` [is_layer_norm], ``activate_output`` [activate_output].
    ``dropout_structure`` [dropout_structure]: one probability per layer-structure entry; entry ``i + 1`` is the
    dropout after Linear ``i``; the first and the last are 0.
    ``weight_init`` [weight_initialization] only says how new weights were drawn.
    """

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = False
    weight_init: str = "Normal"

    def __post_init__(self) -> None:
        s = self.layer_structure
        if len(s) < 2 or s[0] != 1 or s[-1] != 1 or any(not x > 0 for x in s):
            raise SdtuneError(f"hypernetwork layer structure {fmt(s)}: it must start and end with 1 and have "
                              "positive entries, e.g. 1,2,1 (d -> 2d -> d) or 1,1.5,1.5,1")
        d = self.dropout_structure
        if len(d) != len(s):
            raise SdtuneError(f"hypernetwork dropout structure {fmt(d)} has {len(d)} values; it needs one per "
                              f"layer-structure entry ({len(s)} for {fmt(s)})")
        if d[0] != 0 or d[-1] != 0 or any(not 0 <= p < 1 for p in d):
            raise SdtuneError(f"hypernetwork dropout structure {fmt(d)}: values must be in [0, 1), the first and "
                              "the last 0 (no dropout on the input, none after the output layer)")
        activation_class(self.activation)

    @classmethod
    def from_options(cls, layer_structure: str = "1,2,1", activation: str = "linear", layer_norm: bool = False,
                     dropout: Optional[str] = None) -> HypernetworkConfig:
        """The layout the ``--hypernetwork_*`` options describe.

        ``dropout``: None/"" for none; one probability (applied after every hidden layer: ``0.3`` with ``1,2,1``
        gives ``0, 0.3, 0``); or A1111's dropout structure, one value per layer-structure entry.
        """
        structure = parse_floats(layer_structure, "--hypernetwork_layer_structure")
        if not dropout or not dropout.strip():
            drops = (0.0,) * len(structure)
        else:
            values = parse_floats(dropout, "--hypernetwork_dropout")
            if len(values) == 1:
                drops = (0.0,) + (values[0],) * (len(structure) - 2) + (0.0,)
            else:
                drops = values
        return cls(structure, activation.strip().lower(), layer_norm, drops)

    @property
    def use_dropout(self) -> bool:
        """A1111's ``use_dropout`` flag: some layer has dropout."""
        return any(p > 0 for p in self.dropout_structure)

    @property
    def last_layer_dropout(self) -> bool:
        """A1111's ``last_layer_dropout`` flag (its Hypernetwork.save): is there dropout after the last hidden layer?"""
        return self.dropout_structure[-2] != 0


def fmt(values: Iterable[float]) -> str:
    """Numbers as the options spell them: ``1,2,1``."""
    return ",".join(f"{v:g}" for v in values)


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated numbers of ``option``, or a clear error naming it."""
    # "[1, 2, 1]" too: what a TOML list or A1111's metadata look like once a config file turned them into text
    try:
        return tuple(float(x) for x in text.replace(" ", "").strip("[]()").split(","))
    except ValueError:
        raise SdtuneError(f"{option} {text!r}: expected comma-separated numbers, e.g. 1,2,1") from None


def a1111_dropout_structure(layer_structure: list[float], use_dropout: bool,
                            last_layer_dropout: bool) -> tuple[float, ...]:
    """What A1111 (``parse_dropout_structure``) assumes for a file without ``dropout_structure``."""
    if not use_dropout:
        return (0.0,) * len(layer_structure)
    middle = [A1111_DEFAULT_DROPOUT] * (len(layer_structure) - 3)
    return (0.0, *middle, A1111_DEFAULT_DROPOUT if last_layer_dropout else 0.0, 0.0)


__all__ = ["A1111_DEFAULT_DROPOUT", "HypernetworkConfig", "NORMAL_INIT_STD", "a1111_dropout_structure",
           "activation_class", "fmt", "parse_floats"]
