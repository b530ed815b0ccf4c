"""Compression metrics (seed 004 §2) against hand-computed numbers, and the weight analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowbit.metrics import compression_report, plot_weight_histograms, weight_stats
from lowbit.models import create_model
from lowbit.nn import QuantSpec, convert


def test_conv_flops_match_the_formula_by_hand():
    # 2*H*W*(Cin*K^2+1)*Cout with the 10x12 output: 2*120*(3*9+1)*8 = 53,760
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    layer = compression_report(model, torch.zeros(1, 3, 10, 12)).layers[0]
    assert (layer.kind, layer.output_shape, layer.flops) == ("conv2d", [8, 10, 12], 53_760)
    assert layer.params == 3 * 8 * 9 + 8 and layer.bops == 53_760 * 32 * 32


def test_strided_conv_uses_its_output_size():
    # 16x16 -> 8x8 with stride 2: 2*64*(4*25+1)*6 = 77,568
    model = nn.Sequential(nn.Conv2d(4, 6, 5, stride=2, padding=2))
    assert compression_report(model, torch.zeros(1, 4, 16, 16)).layers[0].flops == 77_568


def test_transposed_conv_flops_use_its_own_output_size():
    # 5x5 -> 10x10 (k4 s2 p1): 2*100*(4*16+1)*2 = 26,000; the DCGAN first layer 1x1 -> 4x4:
    # 2*16*(100*16+1)*64 = 3,278,848
    model = nn.Sequential(nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1))
    layer = compression_report(model, torch.zeros(1, 4, 5, 5)).layers[0]
    assert (layer.kind, layer.output_shape, layer.flops) == ("conv_transpose2d", [2, 10, 10], 26_000)
    first = nn.Sequential(nn.ConvTranspose2d(100, 64, 4, bias=False))
    assert compression_report(first, torch.zeros(1, 100, 1, 1)).layers[0].flops == 3_278_848


def test_linear_flops_and_per_sample_counting():
    # (2I-1)*O = 39*7 = 273 per sample, whatever the batch size
    model = nn.Sequential(nn.Linear(20, 7))
    assert compression_report(model, torch.zeros(5, 20)).flops == 273


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


def test_fp32_model_has_ratio_1_and_counts_every_parameter_and_bn_statistic():
    model = tiny_net()
    report = compression_report(model, torch.zeros(1, 1, 8, 8))
    params = 4 * 9 + 4 + 4 + 4 + 144 * 10 + 10
    assert report.params == params == sum(p.numel() for p in model.parameters())
    assert report.fp32_bytes == report.size_bytes == (params + 8) * 4  # + BN running mean and var
    assert report.compression_ratio == 1.0


def test_1bit_model_size_and_compression_ratio_by_hand():
    model = convert(
        tiny_net(), QuantSpec(weight="bwn", weight_bits=1, act="sign", act_bits=1, per_channel=False)
    )
    report = compression_report(model, torch.zeros(1, 1, 8, 8))
    # conv: 36 one-bit codes + 2 fp32 codebook numbers + 4 fp32 biases = 228 bits -> 29 bytes
    # linear: 1440 one-bit codes + 2 fp32 + 10 fp32 biases = 1824 bits -> 228 bytes
    # BN: weight, bias, running mean, running var = 16 fp32 -> 64 bytes; sign levels {-1, +1}: 8 bytes
    assert [layer.size_bytes for layer in report.layers] == [29, 228]
    assert report.other_bytes == 64 + 8
    assert report.size_bytes == 29 + 228 + 72
    fp32 = (40 + 1450 + 16) * 4
    assert report.fp32_bytes == fp32
    assert report.compression_ratio == pytest.approx(fp32 / (29 + 228 + 72))
    conv, linear = report.layers
    assert (conv.weight_bits, conv.act_bits) == (1, 32)  # the image input is full precision
    assert (linear.weight_bits, linear.act_bits) == (1, 32)  # Flatten sits between QuantAct and Linear
    assert conv.bops == conv.flops * 1 * 32


def test_bops_use_the_bits_of_the_quantact_feeding_the_layer():
    generator = convert(
        create_model("dcgan-g-28", width=8), QuantSpec(weight="minmax", weight_bits=4, act="sign", act_bits=1)
    )
    report = compression_report(generator, torch.randn(1, 100))
    bits = [(layer.weight_bits, layer.act_bits) for layer in report.layers]
    assert bits == [(4, 32), (4, 1), (4, 1), (4, 1)]
    assert all(layer.bops == layer.flops * layer.weight_bits * layer.act_bits for layer in report.layers)
    assert report.bops == sum(layer.bops for layer in report.layers)
    # 4-bit weights of a DCGAN generator approach 8x smaller than FP32 (BN and codebooks stay 32-bit)
    assert 6.0 < report.compression_ratio < 8.0
    data = report.to_dict()
    assert data["compression_ratio"] == report.compression_ratio and "bops" in data["conventions"]


def test_weight_stats_utilisation_and_entropy_match_the_codes():
    model = convert(tiny_net(), QuantSpec(weight="minmax", weight_bits=3, per_channel=False))
    rows = weight_stats(model)
    assert [row["layer"] for row in rows] == ["0", "4"]
    linear = model[4]
    values = linear.quantized_weight().detach().numpy().reshape(-1)
    _, counts = np.unique(values, return_counts=True)
    probs = counts / counts.sum()
    assert rows[1]["utilisation"] == pytest.approx(len(counts) / 8)
    assert rows[1]["entropy_bits"] == pytest.approx(float(-(probs * np.log2(probs)).sum()), rel=1e-6)
    assert rows[1]["entropy_bits"] <= 3.0
    assert (rows[1]["method"], rows[1]["bits"], rows[1]["n_levels"]) == ("minmax", 3, 8)


def test_utilisation_sees_unused_states():
    model = convert(
        nn.Sequential(nn.Linear(4, 2, bias=False)),
        QuantSpec(weight="minmax", weight_bits=3, per_channel=False),
    )
    with torch.no_grad():  # only the two extreme values: 2 of 8 states are used
        model[0].weight.copy_(torch.tensor([[-1.0, 1.0, -1.0, 1.0], [1.0, -1.0, 1.0, -1.0]]))
        model[0].weight_quantizer.refit(model[0].weight)
    row = weight_stats(model)[0]
    assert row["utilisation"] == pytest.approx(2 / 8)
    assert row["entropy_bits"] == pytest.approx(1.0)


def test_histogram_png_has_one_panel_per_quantized_layer(tmp_path):
    model = convert(tiny_net(), QuantSpec(weight="minmax", weight_bits=2))
    path = plot_weight_histograms(model, tmp_path / "weights.png", title="tiny")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert plot_weight_histograms(tiny_net(), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert math.isfinite(weight_stats(model)[0]["entropy_bits"])


class Branchy(nn.Module):
    """A net with a layer the forward never runs: stored (size) but without FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_layer_not_run_by_the_input_is_stored_but_has_no_flops():
    model = convert(Branchy(), QuantSpec(weight="minmax", weight_bits=2, per_channel=False))
    report = compression_report(model, torch.zeros(1, 4))
    assert [layer.name for layer in report.layers] == ["used"]
    assert report.flops == 7 * 3 and report.params == 15 + 25
    # unused: 20 two-bit codes + scale/offset (2 fp32) + 5 fp32 biases = 40 + 64 + 160 bits = 33 bytes
    assert report.other_bytes == 33
    assert report.fp32_bytes == (15 + 25) * 4
