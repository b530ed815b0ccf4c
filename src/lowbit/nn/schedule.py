"""Training hooks for the quantizers of a converted model (call them from a trainer).

* ``anneal(model, epoch)``: at the start of each epoch; runs every quantizer's per-epoch schedule
  (``Quantizer.on_epoch``: e.g. the RDHS temperature of ``search``, 002 §3.1).
* ``set_temperature(model, tau)``: set the RDHS temperature of every ``search`` quantizer directly.
* ``refit(model)``: a full refit of every weight quantizer fitted from the weights (em / lq / kmeans
  and the learned bwn scale; e.g. after loading new float weights into a converted model).
  Between refits the stateful ones update themselves in training mode every ``refit_every``
  forward passes (warm-started).
* ``quantize_weights(model, enabled, patterns)``: switch weight quantization off (float weights) or on,
  in every quantized layer or the named ones, for a staged schedule (binarize activations first, then
  weights; or the hidden layers first, then the first and last).
"""

from __future__ import annotations

import fnmatch

from torch import nn

from lowbit.nn.layers import QuantLayerMixin
from lowbit.quant.modules import Quantizer
from lowbit.quant.search import set_temperature

__all__ = ["anneal", "param_group", "quant_layers", "quantize_weights", "refit", "set_temperature"]


def anneal(model: nn.Module, epoch: int) -> int:
    """Run every quantizer's per-epoch schedule for ``epoch`` (0-based); returns how many quantizers
    have one (override ``on_epoch``)."""
    count = 0
    for quantizer in model.modules():
        if isinstance(quantizer, Quantizer) and type(quantizer).on_epoch is not Quantizer.on_epoch:
            quantizer.on_epoch(epoch)
            count += 1
    return count


def refit(model: nn.Module) -> int:
    """Fully refit the weight quantizers whose state is fitted from the weights; returns how many.
    (Trained state, such as search logits, is left alone.)"""
    count = 0
    for layer in model.modules():
        if isinstance(layer, QuantLayerMixin) and layer.weight_quantizer.refits_from_weight:
            layer.weight_quantizer.refit(layer.weight.detach())
            count += 1
    return count


def quant_layers(model: nn.Module, patterns: list[str] | None = None) -> dict[str, QuantLayerMixin]:
    """The quantized layers of ``model`` by module name; with ``patterns``, those whose names match one
    of these fnmatch patterns (e.g. ``["0", "9"]``) only."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayerMixin)
            and (patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns))}


def quantize_weights(model: nn.Module, enabled: bool, patterns: list[str] | None = None) -> int:
    """Use quantized (True) or float (False) weights in every quantized layer, or in those that match
    ``patterns`` (``quant_layers``); returns how many."""
    layers = quant_layers(model, patterns).values()
    for layer in layers:
        layer.weights_quantized = enabled
    return len(layers)


def param_group(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters every quantizer of ``model`` puts in its group ``name``
    (``Quantizer.param_groups``, e.g. the search logits), for a separate optimiser."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.param_groups().get(name, [])]
