"""Quantized layers and model conversion: ``QuantSpec``, ``convert``, ``freeze`` (SPEC §3).

See docs/quantizers.md for usage and the training hooks.
"""

from lowbit.nn.convert import HIDDEN_ACTIVATIONS, FrozenAct, FrozenLayer, convert, freeze
from lowbit.nn.layers import QuantAct, QuantConv2d, QuantConvTranspose2d, QuantLinear
from lowbit.nn.prune import PruneSpec, slimming_penalty, sparsity_of
from lowbit.nn.rprelu import RPReLU
from lowbit.nn.schedule import anneal, param_group, quant_layers, quantize_weights, refit, set_temperature
from lowbit.nn.spec import QuantSpec
from lowbit.nn.transforms import compress, register_transform, transform_hooks

__all__ = ["HIDDEN_ACTIVATIONS", "FrozenAct", "FrozenLayer", "QuantAct", "QuantConv2d",
           "QuantConvTranspose2d", "QuantLinear", "QuantSpec", "PruneSpec", "RPReLU", "anneal", "compress",
           "convert", "freeze", "param_group", "quant_layers", "quantize_weights", "refit",
           "register_transform", "set_temperature", "slimming_penalty", "sparsity_of", "transform_hooks"]
