"""Weight distribution analysis of a quantized model (seed 001 §3.1, Fig. 1 and 3).

Per quantized layer: state utilisation (distinct quantization levels actually used / 2^k, averaged
over codebook rows) and the Shannon entropy of its codes in bits (at most k; low entropy means a
few states carry most weights), plus one PNG per model with the histogram of the full-precision
(latent) weights against the quantized ones for every layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowbit.io import atomic_path  # noqa: E402
from lowbit.nn import FrozenLayer, freeze  # noqa: E402

HISTOGRAM_BINS = 100


def _rows_of_codes(layer: FrozenLayer) -> torch.Tensor:
    """Codes as (codebook rows) x (weights per row)."""
    codes = layer.codes.long()
    if layer.codebook.shape[0] == 1:
        return codes.reshape(1, -1)
    return codes.movedim(layer.channel_dim, 0).reshape(codes.shape[layer.channel_dim], -1)


def state_utilisation(layer: FrozenLayer) -> float:
    """Mean over codebook rows of (distinct codes used in the row) / 2^bits."""
    rows = _rows_of_codes(layer)
    used = [torch.unique(row).numel() for row in rows]
    return sum(used) / (len(used) * 2**layer.bits)


def code_entropy(layer: FrozenLayer) -> float:
    """Shannon entropy (bits) of the histogram of all codes of the layer."""
    counts = torch.bincount(layer.codes.long().reshape(-1)).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log2()).sum())


def _quantized_layers(model: nn.Module) -> list[FrozenLayer]:
    return [item for item in freeze(model).values() if isinstance(item, FrozenLayer)]


def weight_stats(model: nn.Module) -> list[dict[str, float | int | str]]:
    """One row per quantized layer: method, bits, levels, levels used, utilisation, code entropy."""
    rows = []
    for layer in _quantized_layers(model):
        distinct = int(torch.unique(layer.dequantize()).numel())
        rows.append(
            {
                "layer": layer.name,
                "method": layer.method,
                "bits": layer.bits,
                "n_levels": layer.n_levels,
                "distinct_values": distinct,
                "utilisation": state_utilisation(layer),
                "entropy_bits": code_entropy(layer),
            }
        )
    return rows


def plot_weight_histograms(model: nn.Module, path: str | Path, title: str = "") -> Path | None:
    """One PNG: per quantized layer, histogram of latent FP weights vs quantized weights (None if none)."""
    layers = _quantized_layers(model)
    if not layers:
        return None
    modules = dict(model.named_modules())
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        full = modules[layer.name].weight.detach().float().reshape(-1).cpu()
        quant = layer.dequantize().reshape(-1).cpu()
        low, high = float(min(full.min(), quant.min())), float(max(full.max(), quant.max()))
        ax.hist(full.numpy(), bins=HISTOGRAM_BINS, range=(low, high), alpha=0.6, label="full precision")
        ax.hist(
            quant.numpy(),
            bins=HISTOGRAM_BINS,
            range=(low, high),
            alpha=0.6,
            label=f"{layer.method} {layer.bits}-bit",
        )
        ax.set_yscale("log")
        ax.set_title(
            f"{layer.name}: utilisation {state_utilisation(layer):.2f}, "
            f"entropy {code_entropy(layer):.2f}/{layer.bits} bits",
            fontsize=8,
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle(title or "weights: full precision vs quantized")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
