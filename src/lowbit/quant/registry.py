"""The quantizer registry: each method is one ``Quantizer`` subclass, registered with ``@register``.

The class is the method's one home (the pattern of larq's ``quantizers.py`` and torchao's
``FakeQuantizeConfig``): it owns its ``method`` name, ``roles`` ("weight" / "activation"),
``bit_range``, its typed ``Options`` dataclass (whose field defaults are the only defaults and
whose ``check`` validates the values) and its optional hooks (``Quantizer.param_groups``,
``on_epoch``, ``layer_forward``, ...). ``register`` refuses a class that lacks any of these facts.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lowbit.config import closest, unknown_name_error
from lowbit.errors import ConfigError
from lowbit.quant.checks import check_bits

if TYPE_CHECKING:
    from lowbit.quant.modules import Quantizer

ROLES = ("weight", "activation")
MAX_BITS = 8
Q = TypeVar("Q", bound="type[Quantizer]")


@dataclass(frozen=True)
class QuantOptions:
    """Base of every method's options: the dataclass fields are the options and their defaults."""

    def check(self, method: str, bits: int) -> None:
        """Validate the values (some depend on ``bits``); raise ``ConfigError`` naming the fix."""

    @classmethod
    def parse(cls, method: str, bits: int, given: Mapping[str, Any] | None) -> QuantOptions:
        """The options ``given`` over the defaults, validated; an unknown name lists the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in given or {}:
            if key not in valid:
                names = ", ".join(sorted(valid)) or "(none)"
                raise ConfigError(f"{method}: unknown option '{key}'{closest(key, valid)}; "
                                  f"valid options: {names}")
        options = cls(**dict(given or {}))
        options.check(method, bits)
        return options

    def as_dict(self) -> dict[str, Any]:
        """The options as keyword arguments (shallow: lists stay as given)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Site:
    """Where a quantizer is built: its role, the per-channel dim (None = per tensor), the number of
    rows (channels) and the shape of the tensor it will quantize (for per-element state)."""

    role: str = "weight"
    channel_dim: int | None = None
    rows: int = 1
    shape: tuple[int, ...] = (1,)


def positive_int(method: str, name: str, value: Any) -> None:
    """Refuse anything but a positive integer for option ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{method}: option {name} must be a positive integer, got {value!r}")


def one_of(method: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a value outside ``choices`` for option ``name``."""
    if value not in choices:
        listed = " or ".join(repr(c) for c in choices)
        raise ConfigError(f"{method}: {name} must be {listed}, got {value!r}")


def number(method: str, name: str, value: Any) -> float:
    """``value`` as a float, or a ConfigError for option ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{method}: option {name} must be a number, got {value!r}")
    return float(value)


METHODS: dict[str, type[Quantizer]] = {}


def _missing_facts(cls: type) -> list[str]:
    method, roles, bit_range = (getattr(cls, k, None) for k in ("method", "roles", "bit_range"))
    options = getattr(cls, "Options", None)
    missing = []
    if not isinstance(method, str) or not method:
        missing.append("a non-empty `method` name")
    if not roles or not isinstance(roles, tuple) or not set(roles) <= set(ROLES):
        missing.append(f"`roles`, a non-empty tuple of {ROLES}")
    if not (isinstance(bit_range, tuple) and len(bit_range) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) for b in bit_range)
            and 1 <= bit_range[0] <= bit_range[1] <= MAX_BITS):
        missing.append(f"`bit_range`, (low, high) with 1 <= low <= high <= {MAX_BITS}")
    dataclass_options = isinstance(options, type) and dataclasses.is_dataclass(options)
    if not (dataclass_options and issubclass(options, QuantOptions)):
        missing.append("`Options`, a QuantOptions dataclass")
    return missing


def register(cls: Q) -> Q:
    """Class decorator: add a ``Quantizer`` subclass to ``METHODS`` under its ``method`` name.

    Refuses (``ConfigError``) a class without a name, roles, a bit range or an options dataclass,
    and a name that is already taken."""
    missing = _missing_facts(cls)
    if missing:
        raise ConfigError(f"cannot register quantizer {cls.__name__}: it needs {'; '.join(missing)}")
    if cls.method in METHODS and METHODS[cls.method] is not cls:
        raise ConfigError(f"cannot register quantizer {cls.__name__}: the name '{cls.method}' is taken by "
                          f"{METHODS[cls.method].__name__}; choose another `method` name")
    METHODS[cls.method] = cls
    return cls


def methods_for(role: str) -> tuple[str, ...]:
    """The registered method names that apply to ``role``, in registration order."""
    return tuple(name for name, cls in METHODS.items() if role in cls.roles)


def get_method(name: Any, role: str | None = None) -> type[Quantizer]:
    """The quantizer class of ``name`` (optionally restricted to a role), with a helpful error."""
    valid = METHODS if role is None else {n: m for n, m in METHODS.items() if role in m.roles}
    if not isinstance(name, str) or name not in valid:
        kind = "quantization method" if role is None else f"{role} quantization method"
        raise unknown_name_error(kind, str(name), valid)
    return valid[name]


def validate(name: Any, bits: Any, opts: Mapping[str, Any] | None = None, role: str | None = None
             ) -> tuple[type[Quantizer], int, QuantOptions]:
    """Check method name, bit-width and options; return the class, bits and the parsed options."""
    cls = get_method(name, role)
    bits = check_bits(name, bits, *cls.bit_range)
    return cls, bits, cls.Options.parse(name, bits, opts)


def make_quantizer(name: str, bits: int, opts: Mapping[str, Any] | None = None,
                   channel_dim: int | None = None, rows: int = 1, role: str | None = None,
                   shape: tuple[int, ...] = (1,)) -> Quantizer:
    """Build the (validated) quantizer module of ``name``: ``rows`` sizes per-channel state and
    ``shape`` per-element state (the weight's shape, or the activation's channel layout)."""
    cls, bits, options = validate(name, bits, opts, role)
    site = Site(role or cls.roles[0], channel_dim, rows, tuple(shape))
    return cls.build(bits, options, site)
