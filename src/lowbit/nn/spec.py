"""``QuantSpec``: which layers to quantize, how, and at which bit-widths (YAML-loadable)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from lowbit.config import closest, from_dict
from lowbit.errors import ConfigError
from lowbit.quant import validate

FULL_PRECISION = 32
LAYER_KEYS = ("weight", "weight_bits", "weight_opts", "act", "act_bits", "act_opts", "per_channel", "rprelu")


@dataclass
class QuantSpec:
    """Quantization plan for ``lowbit.convert``.

    ``weight``/``weight_bits``/``weight_opts``: weight method for Conv2d, ConvTranspose2d, Linear
    (bits 32 = left full precision). ``act``/``act_bits``/``act_opts``: activation method for the
    ``QuantAct`` modules that replace hidden ReLU/LeakyReLU/ReLU6/Hardtanh (None = unchanged).
    ``per_channel``: one codebook per output channel. ``rprelu``: put a learned ``RPReLU`` (per-channel
    shifts and slope, ReActNet) before each quantized activation. ``input_act``: also put the layer's
    activation quantizer in front of every quantized weight layer whose input is not already a quantized
    activation (Bi-Real Net / XNOR-Net placement: e.g. the convs reading a ResNet's float residual stream),
    so the layer runs on binary kernels; a layer whose settings have ``act: null`` keeps its float input.
    ``keep_full_precision``: fnmatch patterns of module names left as they are. ``overrides``: pattern ->
    partial spec for matching modules, applied in order, e.g. ``{"main.0": {"weight_bits": 8}}``; an
    override that names another method starts from that method's default options.
    """

    weight: str = "minmax"
    weight_bits: int = FULL_PRECISION
    weight_opts: dict[str, Any] = field(default_factory=dict)
    act: str | None = None
    act_bits: int = FULL_PRECISION
    act_opts: dict[str, Any] = field(default_factory=dict)
    per_channel: bool = True
    rprelu: bool = False
    input_act: bool = False
    keep_full_precision: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_layer_settings("spec")
        self._check_input_act()
        for pattern, partial in self.overrides.items():
            self._check_override(pattern, partial)

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits != FULL_PRECISION

    @property
    def quantizes_acts(self) -> bool:
        return self.act is not None

    def _check_layer_settings(self, where: str) -> None:
        if self.weight_bits != FULL_PRECISION:
            _validated(where, self.weight, self.weight_bits, self.weight_opts, "weight")
        elif not isinstance(self.weight, str) or isinstance(self.weight_bits, bool):
            raise ConfigError(f"{where}: weight must be a method name and weight_bits an integer")
        if self.act is not None:
            if self.act_bits == FULL_PRECISION:
                raise ConfigError(f"{where}: act '{self.act}' needs act_bits (1..8); act_bits 32 means full "
                                  "precision, for which set act to null")
            _validated(where, self.act, self.act_bits, self.act_opts, "activation")
        elif self.rprelu:
            raise ConfigError(f"{where}: rprelu goes before a quantized activation, but act is null; "
                              "name an activation method (e.g. act: rsign) or set rprelu: false")
        elif self.act_bits != FULL_PRECISION:
            raise ConfigError(f"{where}: act_bits={self.act_bits} is set but act is null; name an activation "
                              "method (e.g. act: sign) or leave act_bits at 32")

    def _check_input_act(self) -> None:
        if not isinstance(self.input_act, bool):
            raise ConfigError(f"input_act must be true or false, got {self.input_act!r}")
        if self.input_act and self.act is None:
            raise ConfigError("input_act: true puts the activation quantizer in front of each quantized "
                              "layer, but act is null; name an activation method (e.g. act: sign, "
                              "act_bits: 1) or set input_act: false")

    def _check_override(self, pattern: str, partial: dict[str, Any]) -> None:
        for key in partial:
            if key not in LAYER_KEYS:
                raise ConfigError(f"overrides['{pattern}']: unknown key '{key}'{closest(key, LAYER_KEYS)}; "
                                  f"valid keys: {', '.join(LAYER_KEYS)}")
        self.with_override(pattern, partial)

    def with_override(self, pattern: str, partial: dict[str, Any]) -> QuantSpec:
        """This spec with ``partial`` layer settings applied (validated), without patterns."""
        base = {k: getattr(self, k) for k in LAYER_KEYS}
        for method, opts in (("weight", "weight_opts"), ("act", "act_opts")):
            if partial.get(method, base[method]) != base[method]:
                base[opts] = {}  # another method: the base's options do not apply to it
        try:
            return from_dict(QuantSpec, {**base, **partial}, where=f"overrides['{pattern}']")
        except ConfigError as exc:
            raise ConfigError(f"overrides['{pattern}']: {exc}") from None

    def for_module(self, name: str) -> QuantSpec | None:
        """The settings for module ``name``: None when kept full precision, else the spec with every
        matching override applied."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep_full_precision):
            return None
        spec = self
        for pattern, partial in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                spec = spec.with_override(pattern, partial)
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Build and validate from plain data (as read from YAML)."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validated(where: str, method: Any, bits: Any, opts: Any, role: str) -> None:
    if not isinstance(opts, dict):
        raise ConfigError(f"{where}: {role} options must be a mapping, got {opts!r}")
    try:
        validate(method, bits, opts, role)
    except ConfigError as exc:
        hint = f"; or {role}_bits: 32 for full precision" if "out of range" in str(exc) else ""
        raise ConfigError(f"{where}: {exc}{hint}") from None
