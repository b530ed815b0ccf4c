"""Post-training BatchNorm re-estimation (BN recalibration of binary networks), for a generator (on fresh
latent codes) and a classifier (on its training images) alike.

During QAT the eval-mode running statistics of each BatchNorm are an exponential average over the last
~1/momentum steps, so with binary weights that flip to the end they lag the final generator. Here they
are recomputed as the plain average over ``batches`` train-mode forwards of the inputs
(``momentum=None``), with every other module (quantizers included) left in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: the BatchNorm layers whose running statistics are re-estimated
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Callable[[int], torch.Tensor], batches: int) -> int:
    """Replace the running mean / variance of every BatchNorm of ``model`` by their average over
    ``batches`` forwards of ``inputs(i)`` (batch statistics in train mode, momentum None); returns
    how many layers were recalibrated. The model's train / eval modes and momenta are restored."""
    if batches < 1:
        raise ValueError(f"recalibrate_batchnorm: batches must be >= 1, got {batches}")
    layers = batch_norms(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for i in range(batches):
            model(inputs(i))
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, mode in modes.items():
            module.train(mode)
    return len(layers)
