"""``convert`` swaps the layers of any model for quantized ones; ``freeze`` exports their codes.

Weight layers (Conv2d, ConvTranspose2d, Linear) become ``Quant*`` layers that share the original
parameters; hidden activation modules (ReLU, LeakyReLU, ReLU6, Hardtanh; never the output
Tanh/Sigmoid) become ``QuantAct``. ``freeze`` returns, in module order, a ``FrozenLayer`` (uint8
codes + per-row codebook) per weight layer and a ``FrozenAct`` (levels) per ``QuantAct``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.nn.layers import QUANT_LAYERS, QuantAct, QuantLayerMixin
from lowbit.nn.rprelu import RPReLU
from lowbit.nn.spec import QuantSpec

HIDDEN_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)


@dataclass
class FrozenLayer:
    """A weight layer as integers: ``weight == codebook[row, codes]`` with rows along ``channel_dim``.

    ``scale``/``offset`` are set when the codebook is affine (``codebook[r, z] = scale[r]·z + offset[r]``).
    """

    name: str
    kind: str
    method: str
    bits: int
    codes: torch.Tensor
    codebook: torch.Tensor
    channel_dim: int
    bias: torch.Tensor | None
    hyper: dict[str, Any]
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def n_levels(self) -> int:
        return self.codebook.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float weight ``codebook[row, codes]``, times the pruning mask if any (exactly the weight of the
        simulated forward)."""
        codes = self.codes.long()
        if self.codebook.shape[0] == 1:
            weight = self.codebook[0][codes]
        else:
            shape = [1] * codes.dim()
            shape[self.channel_dim] = -1
            rows = torch.arange(self.codebook.shape[0], device=codes.device).reshape(shape)
            weight = self.codebook[rows, codes]
        return weight if self.mask is None else weight * self.mask


@dataclass
class FrozenAct:
    """An activation quantizer: the sorted ``levels`` its output takes.

    ``shift`` (None, or shape [C] along channel dim 1; [1] for a per-layer shift) is subtracted from
    the input first: the output is the nearest level of ``x - shift[c]`` (ties as without a shift:
    to the lower level, or to +1 for the levels {-1, +1} of ``sign``)."""

    name: str
    method: str
    bits: int
    levels: torch.Tensor
    shift: torch.Tensor | None = None


def _as_spec(spec: QuantSpec | dict[str, Any]) -> QuantSpec:
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, dict):
        return from_dict(QuantSpec, spec)
    raise ConfigError(f"convert: spec must be a QuantSpec or a mapping, got {type(spec).__name__}")


def _out_channels(module: nn.Module) -> int | None:
    """The channel count a module's output has (BatchNorm features, conv/linear outputs), looking
    at its last such submodule for a container; None when unknown."""
    for sub in reversed(list(module.modules())):
        for attr in ("num_features", "out_channels", "out_features"):
            value = getattr(sub, attr, None)
            if isinstance(value, int):
                return value
    return None


def _activation(name: str, module: nn.Module, settings: QuantSpec, channels: int | None) -> nn.Module:
    """``QuantAct`` for a hidden activation, behind an ``RPReLU`` when the spec asks for one."""
    try:
        act = QuantAct(settings.act, settings.act_bits, settings.act_opts, replaced=type(module).__name__,
                       channels=channels)
    except ConfigError as exc:
        raise ConfigError(f"activation '{name}': {exc}") from None
    if not settings.rprelu:
        return act
    if channels is None:
        raise ConfigError(f"activation '{name}': rprelu needs the channel count, which no preceding "
                          "BatchNorm/conv/linear layer gives; set rprelu: false for this layer")
    return nn.Sequential(RPReLU(channels), act)


def _quantized(name: str, module: nn.Module, spec: QuantSpec, channels: int | None) -> nn.Module | None:
    """The replacement for ``module`` under ``spec``, or None to leave it as it is. ``channels``:
    the output channels of the module before it (for per-channel activation state)."""
    if isinstance(module, (QuantLayerMixin, QuantAct)):
        return None
    settings = spec.for_module(name)
    if settings is None:
        return None
    quant_cls = QUANT_LAYERS.get(type(module))
    if quant_cls is not None and settings.quantizes_weights:
        try:
            return quant_cls.from_float(module, settings.weight, settings.weight_bits, settings.weight_opts,
                                        settings.per_channel)
        except ConfigError as exc:
            raise ConfigError(f"layer '{name}': {exc}") from None
    if isinstance(module, HIDDEN_ACTIVATIONS) and settings.quantizes_acts:
        return _activation(name, module, settings, channels)
    return None


def convert(model: nn.Module, spec: QuantSpec | dict[str, Any], inplace: bool = False) -> nn.Module:
    """Swap the layers of ``model`` for quantized ones per ``spec``, keeping the trained weights.

    With ``inplace=False`` (default) the model is deep-copied first. Layers and activations applied
    functionally inside ``forward`` (e.g. ``F.relu``) are not modules and stay as they are. An
    activation module learns its channel count from the sibling registered before it.
    """
    spec = _as_spec(spec)
    target = model if inplace else copy.deepcopy(model)
    root = _quantized("", target, spec, None)
    if root is not None:
        return root
    for parent_name, parent in list(target.named_modules()):
        channels = None
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            replacement = _quantized(name, child, spec, channels)
            if replacement is not None:
                setattr(parent, child_name, replacement)
            channels = _out_channels(child) or channels
    return target


@torch.no_grad()
def _frozen_layer(name: str, layer: QuantLayerMixin) -> FrozenLayer:
    encoding = layer.weight_quantizer.encode(layer.weight)
    bias = None if layer.bias is None else layer.bias.detach().clone()
    return FrozenLayer(name, layer.kind, layer.method, layer.bits, encoding.integer_codes(),
                       encoding.codebook.float(), layer.default_channel_dim, bias, layer.hyper(),
                       None if encoding.scale is None else encoding.scale.float(),
                       None if encoding.offset is None else encoding.offset.float(),
                       _mask_of(layer))


def _mask_of(layer: nn.Module) -> torch.Tensor | None:
    mask = getattr(layer, "weight_mask", None)
    return None if mask is None else mask.detach().clone()


def freeze(model: nn.Module) -> dict[str, FrozenLayer | FrozenAct]:
    """Integer form of every quantized layer and activation of ``model``, in module order."""
    frozen: dict[str, FrozenLayer | FrozenAct] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayerMixin):
            frozen[name] = _frozen_layer(name, module)
        elif isinstance(module, QuantAct):
            shift = module.shift()
            frozen[name] = FrozenAct(name, module.method, module.bits, module.levels(),
                                     None if shift is None else shift.clone().float())
    return frozen
