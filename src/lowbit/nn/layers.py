"""Quantized layers: torch Conv2d / ConvTranspose2d / Linear whose weight passes a quantizer, and
``QuantAct``, which replaces a hidden activation module by an activation quantizer.

Quantized layers quantize only their weights (activation quantization is done by ``QuantAct``,
see SPEC §3). Each keeps the float ``weight`` as the trained latent parameter and exposes
``quantized_weight()``, the exact tensor the forward uses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.quant import make_quantizer
from lowbit.quant.checks import check_tensor
from lowbit.quant.grad import through
from lowbit.quant.modules import Quantizer, Stateful


class QuantLayerMixin:
    """Shared parts of the quantized weight layers: quantizer construction and introspection."""

    kind = ""
    default_channel_dim = 0
    #: False: the forward uses the float weight (``lowbit.nn.quantize_weights``, a staged schedule)
    weights_quantized = True
    weight: nn.Parameter
    weight_quantizer: Quantizer

    def __init__(self, *args: Any, method: str = "minmax", bits: int = 8, opts: dict[str, Any] | None = None,
                 per_channel: bool = True, **kwargs: Any) -> None:
        """The torch layer's own arguments, then its weight quantizer: ``method`` at ``bits``, per output
        channel unless ``per_channel`` is False."""
        super().__init__(*args, **kwargs)
        self._init_quantizer(method, bits, opts, per_channel)

    def _init_quantizer(self, method: str, bits: int, opts: dict[str, Any] | None, per_channel: bool) -> None:
        channel_dim = self.default_channel_dim if per_channel else None
        rows = self.weight.shape[self.default_channel_dim] if per_channel else 1
        self.weight_quantizer = make_quantizer(method, bits, opts, channel_dim, rows, role="weight",
                                               shape=tuple(self.weight.shape))
        self.weight_quantizer.to(self.weight.device)
        self.weight_quantizer.check_layer(self)
        self._freeze_unused_weight()

    def _freeze_unused_weight(self) -> None:
        """A quantizer that trains its own state (e.g. search logits) leaves the float weight as its
        initialisation only."""
        if not self.weight_quantizer.trains_weight:
            self.weight.requires_grad_(False)

    def _custom_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The quantizer's own forward of this layer (e.g. search's channel-expanded conv), or None."""
        return self.weight_quantizer.layer_forward(self, x) if self.weights_quantized else None

    @property
    def method(self) -> str:
        return self.weight_quantizer.method

    @property
    def bits(self) -> int:
        return self.weight_quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        """The quantized weight used by the forward (with its gradient rule).

        For a ``cacheable`` quantizer the value and gradient factor are reused while the weight is
        unchanged (same tensor version, storage and train/eval mode), e.g. across the D(real) and
        D(fake) passes of one GAN step; the gradient rule is the same either way.
        """
        weight = self._unmasked_quantized_weight()
        mask = getattr(self, "weight_mask", None)  # pruned weights stay exactly 0 (lowbit.nn.prune)
        return weight if mask is None else weight * mask

    def _unmasked_quantized_weight(self) -> torch.Tensor:
        if not self.weights_quantized:
            return self.weight
        quantizer = self.weight_quantizer
        if not quantizer.cacheable or self.weight.is_inference():  # inference tensors have no version
            return quantizer(self.weight)
        key = (self.weight._version, self.weight.data_ptr(), self.training)
        cached = self.__dict__.get("_quantized_cache")
        if cached is None or cached[0] != key:
            cached = (key, *quantizer.detached_forward(self.weight))
            self.__dict__["_quantized_cache"] = cached
        return through(self.weight, cached[1], cached[2])

    def hyper(self) -> dict[str, Any]:
        """Layer hyper-parameters an exporter needs to rebuild the op."""
        return {}

    @classmethod
    def from_float(cls, layer: nn.Module, method: str, bits: int, opts: dict[str, Any] | None = None,
                   per_channel: bool = True) -> nn.Module:
        """A quantized copy of ``layer`` that shares its weight and bias parameters (no copy).

        Raises ``ConfigError`` if the weight is empty, non-finite or constant (nothing to fit).
        """
        check_tensor(layer.weight, method)
        quant = cls(**cls.float_args(layer), bias=layer.bias is not None, method=method, bits=bits, opts=opts,
                    per_channel=per_channel, device=layer.weight.device, dtype=layer.weight.dtype)
        quant.weight, quant.bias = layer.weight, layer.bias
        if getattr(layer, "weight_mask", None) is not None:  # a pruned layer keeps its mask
            quant.register_buffer("weight_mask", layer.weight_mask)
        quant._freeze_unused_weight()
        quant.train(layer.training)
        quant.weight_quantizer.refit(quant.weight.detach())
        return quant

    @staticmethod
    def float_args(layer: nn.Module) -> dict[str, Any]:
        """Constructor arguments that rebuild ``layer``'s shape and hyper-parameters."""
        raise NotImplementedError


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with a quantized weight; per-channel rows are output channels (dim 0)."""

    kind = "conv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        custom = self._custom_forward(x)
        if custom is not None:
            return custom
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @staticmethod
    def float_args(layer: nn.Module) -> dict[str, Any]:
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode")
        return {name: getattr(layer, name) for name in names}

    def hyper(self) -> dict[str, Any]:
        return {"stride": tuple(self.stride), "padding": self.padding if isinstance(self.padding, str)
                else tuple(self.padding), "dilation": tuple(self.dilation), "groups": self.groups,
                "padding_mode": self.padding_mode}


class QuantConvTranspose2d(QuantLayerMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a quantized weight. Its weight is (in, out/groups, kh, kw), so
    per-output-channel rows run along dim 1."""

    kind = "conv_transpose2d"
    default_channel_dim = 1

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        custom = self._custom_forward(x)
        if custom is not None:
            return custom
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return F.conv_transpose2d(x, self.quantized_weight(), self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)

    @staticmethod
    def float_args(layer: nn.Module) -> dict[str, Any]:
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding",
                 "groups", "dilation")
        return {name: getattr(layer, name) for name in names}

    def hyper(self) -> dict[str, Any]:
        return {"stride": tuple(self.stride), "padding": tuple(self.padding),
                "output_padding": tuple(self.output_padding), "dilation": tuple(self.dilation),
                "groups": self.groups}


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with a quantized weight; per-channel rows are output features (dim 0)."""

    kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        custom = self._custom_forward(x)
        if custom is not None:
            return custom
        return F.linear(x, self.quantized_weight(), self.bias)

    @staticmethod
    def float_args(layer: nn.Module) -> dict[str, Any]:
        return {"in_features": layer.in_features, "out_features": layer.out_features}


class QuantAct(nn.Module):
    """Activation quantizer that replaces a hidden activation module (ReLU, LeakyReLU, ...).

    ``replaced`` names the module it stands in for (for reports); ``channels`` is the number of
    channels (dim 1) of its input when known, which per-channel state (``rsign``'s shift) needs.
    The output takes only the quantizer's levels, e.g. {-1, +1} for ``sign`` (BNN practice, 000 §3.3).
    """

    def __init__(self, method: str = "sign", bits: int = 1, opts: dict[str, Any] | None = None,
                 replaced: str = "", channels: int | None = None) -> None:
        super().__init__()
        shape = (1,) if channels is None else (1, channels)
        self.quantizer = make_quantizer(method, bits, opts, role="activation", shape=shape)
        self.replaced = replaced

    @property
    def method(self) -> str:
        return self.quantizer.method

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)

    def levels(self) -> torch.Tensor:
        """The sorted values this activation quantizer can emit."""
        if isinstance(self.quantizer, Stateful) and not bool(self.quantizer.fitted):
            raise ConfigError(f"{self.method} activation quantizer has not seen any data yet, so it has no "
                              "levels; run the model on a batch (e.g. calibration) before freezing it")
        return self.quantizer.levels(torch.zeros(1))[0].detach()

    def shift(self) -> torch.Tensor | None:
        """The learned per-channel shift subtracted before the level rule (None when there is none)."""
        return self.quantizer.input_shift()

    def extra_repr(self) -> str:
        return f"replaced={self.replaced!r}" if self.replaced else ""


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.ConvTranspose2d: QuantConvTranspose2d, nn.Linear: QuantLinear}
