"""Evaluation (SPEC §5): FID / IS / KID with domain feature extractors, weight analysis, compression metrics.

``evaluate(generator, dataset, n=...)`` scores a generator; ``compression_report(model, x)`` gives
params, FLOPs, BOPs, size and compression ratio; ``weight_stats`` / ``plot_weight_histograms``
analyse quantized weights. Names resolve lazily so importing lowbit.metrics stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "lowbit.metrics.evaluation",
    "evaluate_pairs": "lowbit.metrics.paired",
    "psnr": "lowbit.metrics.paired",
    "ssim": "lowbit.metrics.paired",
    "Extractor": "lowbit.metrics.extractors",
    "extractor_from_module": "lowbit.metrics.extractors",
    "domain_extractor": "lowbit.metrics.extractors",
    "resolve_extractor": "lowbit.metrics.extractors",
    "reference_features": "lowbit.metrics.reference",
    "features_of": "lowbit.metrics.reference",
    "GenerativeScores": "lowbit.metrics.scores",
    "EvaluationError": "lowbit.metrics.scores",
    "score_images": "lowbit.metrics.scores",
    "compression_report": "lowbit.metrics.compression",
    "conv_flops": "lowbit.metrics.compression",
    "linear_flops": "lowbit.metrics.compression",
    "weight_stats": "lowbit.metrics.weights",
    "plot_weight_histograms": "lowbit.metrics.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowbit.metrics' has no attribute '{name}'")
