"""The table of quantization methods: role, supported bit-widths, options, and module factory."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lowbit.config import unknown_name_error
from lowbit.errors import ConfigError
from lowbit.quant import modules
from lowbit.quant.checks import check_bits, check_options
from lowbit.quant.search import SearchQuantizer, check_search_options


@dataclass(frozen=True)
class Method:
    """One quantization method: where it applies, its bit range, its options and their defaults."""

    name: str
    roles: tuple[str, ...]
    min_bits: int
    max_bits: int
    options: Mapping[str, Any] = field(default_factory=dict)
    build: Callable[..., modules.Quantizer] | None = None
    build_activation: Callable[..., modules.Quantizer] | None = None  # when activations differ


def _closed_form(name: str) -> Callable[..., modules.Quantizer]:
    def build(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
        return modules.ClosedFormQuantizer(name, bits, channel_dim, **opts)
    return build


def _em(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
    return modules.EMQuantizer(bits, channel_dim, rows, **opts)


def _lq(signed: bool) -> Callable[..., modules.Quantizer]:
    def build(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
        return modules.LQQuantizer(bits, channel_dim, rows, signed=signed, **opts)
    return build


def _kmeans(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
    return modules.KMeansQuantizer(bits, channel_dim, rows, **opts)


def _search(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
    return SearchQuantizer(bits, channel_dim, rows, **opts)


def _sign(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
    return modules.SignQuantizer(bits)


def _range(name: str) -> Callable[..., modules.Quantizer]:
    def build(bits: int, channel_dim: int | None, rows: int, **opts: Any) -> modules.Quantizer:
        return modules.RangeQuantizer(name, bits, **opts)
    return build


EM_OPTIONS = {"init": "search", "iters": None, "tol": 1e-6, "starts": 4, "paper": False,
              "refit_every": 1, "steps": 1}
SEARCH_OPTIONS = {"values": None, "scale": "learned", "mode": "rdhs", "mu": 0.0, "tau": 1.0, "tau_min": 1e-4,
                  "tau_decay": 0.97, "form": "kernel", "logits": "full"}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("minmax", ("weight",), 1, 8, {}, _closed_form("minmax")),
    Method("log", ("weight",), 1, 8, {"eps": 1e-8}, _closed_form("log")),
    Method("tanh", ("weight",), 1, 8, {}, _closed_form("tanh")),
    Method("em", ("weight",), 1, 8, EM_OPTIONS, _em),
    Method("dorefa", ("weight", "activation"), 1, 8, {}, _closed_form("dorefa"), _range("dorefa")),
    Method("bwn", ("weight",), 1, 1, {}, _closed_form("bwn")),
    Method("sign", ("activation",), 1, 1, {}, _sign),
    Method("act", ("activation",), 1, 8, {"lo": 0.0, "hi": 1.0, "learn_range": False}, _range("act")),
    Method("lq", ("weight", "activation"), 1, 8, {"momentum": 0.9, "iters": 30, "refit_every": 1},
           _lq(signed=True), _lq(signed=False)),
    Method("kmeans", ("weight",), 1, 8, {"iters": 100, "refit_every": 1}, _kmeans),
    Method("search", ("weight",), 1, 8, SEARCH_OPTIONS, _search),
]}

WEIGHT_METHODS = tuple(name for name, m in METHODS.items() if "weight" in m.roles)
ACT_METHODS = tuple(name for name, m in METHODS.items() if "activation" in m.roles)


def get_method(name: Any, role: str | None = None) -> Method:
    """Look up a method by name (optionally restricted to a role) with a helpful error."""
    valid = METHODS if role is None else {n: m for n, m in METHODS.items() if role in m.roles}
    if not isinstance(name, str) or name not in valid:
        kind = "quantization method" if role is None else f"{role} quantization method"
        raise unknown_name_error(kind, str(name), valid)
    return valid[name]


def validate(name: Any, bits: Any, opts: Mapping[str, Any] | None = None, role: str | None = None
             ) -> tuple[Method, int, dict[str, Any]]:
    """Check method name, bit-width and options; return them with the option defaults filled in."""
    method = get_method(name, role)
    bits = check_bits(name, bits, method.min_bits, method.max_bits)
    merged = check_options(name, dict(opts or {}), method.options)
    _check_option_values(name, merged)
    if name == "search":
        check_search_options(merged, bits)
    return method, bits, merged


def _check_option_values(name: str, opts: Mapping[str, Any]) -> None:
    if "lo" in opts and not float(opts["lo"]) < float(opts["hi"]):
        raise ConfigError(f"{name}: lo={opts['lo']} must be below hi={opts['hi']}; widen the clip range")
    for key in ("refit_every", "steps", "starts"):
        if key in opts and (not isinstance(opts[key], int) or opts[key] < 1):
            raise ConfigError(f"{name}: option {key} must be a positive integer, got {opts[key]!r}")
    if opts.get("init", "search") not in ("search", "minmax"):
        raise ConfigError(f"{name}: init must be 'search' or 'minmax', got {opts['init']!r}")
    if opts.get("iters") is not None and (not isinstance(opts["iters"], int) or opts["iters"] < 0):
        raise ConfigError(f"{name}: iters must be a non-negative integer or None, got {opts['iters']!r}")
    if "momentum" in opts and not 0 <= opts["momentum"] < 1:
        raise ConfigError(f"{name}: momentum must be in [0, 1), got {opts['momentum']!r}")


def make_quantizer(name: str, bits: int, opts: Mapping[str, Any] | None = None,
                   channel_dim: int | None = None, rows: int = 1, role: str | None = None,
                   shape: tuple[int, ...] = (1,)) -> modules.Quantizer:
    """Build the quantizer module for ``name`` (validated). ``rows`` sizes per-channel state and
    ``shape`` (the weight's shape) the per-weight logits of ``search``."""
    method, bits, merged = validate(name, bits, opts, role)
    if name == "search":
        merged["shape"] = tuple(shape)
    build = method.build_activation if role == "activation" and method.build_activation else method.build
    return build(bits, channel_dim, rows, **merged)
