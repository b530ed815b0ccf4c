"""``convert`` swaps the layers of any model for quantized ones; ``freeze`` exports their codes.

Weight layers (Conv2d, ConvTranspose2d, Linear) become ``Quant*`` layers that share the original
parameters; hidden activation modules (ReLU, LeakyReLU, ReLU6, Hardtanh; never the output
Tanh/Sigmoid) become ``QuantAct``; with ``input_act`` a quantized layer that does not read one becomes
``Sequential(QuantAct, layer)``. ``freeze`` returns, in module order, a ``FrozenLayer`` (uint8
codes + per-row codebook) per weight layer and a ``FrozenAct`` (levels) per ``QuantAct``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.nn.layers import QUANT_LAYERS, QuantAct, QuantLayerMixin
from lowbit.nn.rprelu import RPReLU
from lowbit.nn.spec import QuantSpec

HIDDEN_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)
#: modules and calls between an activation and a layer that keep its values (an element-wise quantizer
#: commutes with them; the export kernels look through the same ones)
SHAPE_MODULES = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
                 nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten)
SHAPE_CALLS = ("view", "reshape", "flatten", "contiguous", torch.flatten, torch.reshape)


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


def _activation(name: str, replaced: str, settings: QuantSpec, channels: int | None) -> nn.Module:
    """``QuantAct`` standing for the module named ``replaced``, behind an ``RPReLU`` when the spec asks."""
    try:
        act = QuantAct(settings.act, settings.act_bits, settings.act_opts, replaced=replaced,
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
        return _activation(name, type(module).__name__, settings, channels)
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
        return _with_input_act("", root, spec) if spec.input_act else root
    for parent_name, parent in list(target.named_modules()):
        channels = None
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            replacement = _quantized(name, child, spec, channels)
            if replacement is not None:
                setattr(parent, child_name, replacement)
            channels = _out_channels(child) or channels
    if spec.input_act:
        _quantize_inputs(target, spec)
    return target


class _LayerTracer(fx.Tracer):
    """Keeps quantized layers and activations (and built-in torch modules) as data-flow graph leaves."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        quantized = isinstance(module, (QuantLayerMixin, QuantAct))
        return quantized or super().is_leaf_module(module, qualified_name)


def _reads_quantized(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the first input of ``node`` is a ``QuantAct`` output, possibly through value-keeping steps
    (pads, reshapes, dropout, nearest up-sampling)."""
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node):
        if current.op == "call_module":
            module = modules[current.target]
            if isinstance(module, QuantAct):
                return True
            nearest = isinstance(module, nn.Upsample) and module.mode == "nearest"
            if not (nearest or isinstance(module, SHAPE_MODULES)):
                return False
        elif current.op not in ("call_method", "call_function") or current.target not in SHAPE_CALLS:
            return False
        current = current.args[0] if current.args else None
    return False


def _float_input_layers(model: nn.Module) -> list[str]:
    """Names of the quantized layers that some call in ``model.forward`` feeds a non-quantized input."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; all become one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"input_act: cannot follow the data flow of {type(model).__name__}.forward with torch.fx "
            f"({first}); "
            "set input_act: false, or make forward free of Python control flow on tensor values"
        ) from None
    modules = dict(model.named_modules())
    names: list[str] = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        fresh = isinstance(layer, QuantLayerMixin) and node.target not in names
        if fresh and not _reads_quantized(node, modules):
            names.append(node.target)
    return names


def _with_input_act(name: str, layer: nn.Module, spec: QuantSpec) -> nn.Module:
    """``Sequential(QuantAct, layer)`` with the layer's own activation settings, or ``layer`` unchanged when
    those have no activation quantizer (``act: null`` override, or kept full precision)."""
    settings = spec.for_module(name)
    if settings is None or not settings.quantizes_acts or not isinstance(layer, QuantLayerMixin):
        return layer
    channels = getattr(layer, "in_channels", getattr(layer, "in_features", None))
    return nn.Sequential(_activation(name, f"input of {type(layer).__name__}", settings, channels), layer)


def _quantize_inputs(model: nn.Module, spec: QuantSpec) -> None:
    """Put the activation quantizer in front of every quantized layer of ``model`` with a float input."""
    for name in _float_input_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, _with_input_act(name, getattr(parent, child_name), spec))


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
