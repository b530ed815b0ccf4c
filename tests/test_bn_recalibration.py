"""BatchNorm re-estimation (lowbit.train.recalibrate): the running statistics become the plain average of
the batch statistics, every other module stays in eval mode, and modes and momenta come back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.train.recalibrate import recalibrate_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Dropout(0.5), nn.ReLU(),
                         nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_running_statistics_are_the_average_of_the_batch_statistics():
    net = _net()
    batches = [torch.randn(8, 5) * (i + 1) + i for i in range(4)]
    with torch.no_grad():
        hidden = [net[0](x) for x in batches]  # BN 1's inputs
        second = [net[4](torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
                                    * net[1].weight + net[1].bias)) for h in hidden]  # BN 5's, Dropout off
    net.train()
    assert recalibrate_batchnorm(net, lambda i: batches[i], len(batches)) == 2
    for bn, inputs in ((net[1], hidden), (net[5], second)):
        torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in inputs]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in inputs]).mean(0))
    assert net.training and all(m.training for m in net.modules())
    assert (net[1].momentum, net[5].momentum) == (0.3, 0.1)


def test_eval_mode_is_restored_and_zero_batches_are_refused():
    net = _net().eval()
    recalibrate_batchnorm(net, lambda _: torch.randn(8, 5), 2)
    assert not any(m.training for m in net.modules())
    with pytest.raises(ValueError, match="batches must be >= 1"):
        recalibrate_batchnorm(net, lambda _: torch.randn(8, 5), 0)
