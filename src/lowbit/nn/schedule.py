"""Training hooks for the stateful quantizers of a converted model (call them from a trainer).

* ``anneal(model, epoch)``: at the start of each epoch; sets the RDHS temperature of every
  ``search`` quantizer to ``max(tau · tau_decay^epoch, tau_min)`` (002 §3.1).
* ``set_temperature(model, tau)``: set that temperature directly.
* ``refit(model)``: a full refit of every em / lq / kmeans quantizer from the current weights
  (e.g. after loading new float weights into a converted model). Between refits these quantizers
  update themselves in training mode every ``refit_every`` forward passes (warm-started).
"""

from __future__ import annotations

from torch import nn

from lowbit.nn.layers import QuantLayerMixin
from lowbit.quant.search import SearchQuantizer


def _search_quantizers(model: nn.Module) -> list[SearchQuantizer]:
    return [m for m in model.modules() if isinstance(m, SearchQuantizer)]


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the RDHS temperature of every search quantizer; returns how many were set."""
    quantizers = _search_quantizers(model)
    for quantizer in quantizers:
        quantizer.set_temperature(tau)
    return len(quantizers)


def anneal(model: nn.Module, epoch: int) -> int:
    """Apply the per-epoch temperature schedule for ``epoch`` (0-based); returns how many were set."""
    quantizers = _search_quantizers(model)
    for quantizer in quantizers:
        quantizer.anneal(epoch)
    return len(quantizers)


def refit(model: nn.Module) -> int:
    """Fully refit the em / lq / kmeans weight quantizers from the current weights; returns how many.
    (Search logits are trained, not fitted, so they are left alone.)"""
    count = 0
    for layer in model.modules():
        if isinstance(layer, QuantLayerMixin) and not isinstance(layer.weight_quantizer, SearchQuantizer):
            layer.weight_quantizer.refit(layer.weight.detach())
            count += 1
    return count
