"""Quantizers: ``quantize(x, method, bits, **opts)`` and ``levels(...)`` plus the quantizer modules.

Methods: minmax, log, tanh (001 §2.2), em (001 §4.1), dorefa, bwn, sign (000 §3), act, lq
(LQ-Nets), kmeans (004 §1.2), search (002 §2), rsign (ReActNet / Bi-Real). Each is one
``Quantizer`` subclass registered in ``lowbit.quant.registry``. See docs/quantizers.md.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.quant import binary, modules, search  # noqa: F401  (each module registers its methods)
from lowbit.quant.checks import check_channel_dim, check_tensor
from lowbit.quant.em import EMFit, fit_em
from lowbit.quant.encoding import Encoding
from lowbit.quant.modules import Quantizer
from lowbit.quant.registry import METHODS, QuantOptions, Site, make_quantizer, methods_for, register, validate

WEIGHT_METHODS = methods_for("weight")
ACT_METHODS = methods_for("activation")


def _fitted(x: torch.Tensor, method: str, bits: int, opts: dict[str, Any]) -> Quantizer:
    """A quantizer for ``method`` fitted on ``x`` (the one-shot functional form). Methods that also
    quantize weights are built for weights; activation-only methods see ``x`` as N x C x ..."""
    per_channel = opts.pop("per_channel", False)
    channel_dim = opts.pop("channel_dim", 0)
    cls, bits, _ = validate(method, bits, opts)
    check_tensor(x, method, allow_constant=cls.accepts_constant)
    dim = check_channel_dim(x, method, channel_dim) if per_channel else None
    rows = 1 if dim is None else x.shape[dim]
    role = "weight" if "weight" in cls.roles else "activation"
    quantizer = make_quantizer(method, bits, opts, dim, rows, role, tuple(x.shape)).eval()
    quantizer.refit(x)
    return quantizer


def quantize(x: torch.Tensor, method: str, bits: int, **opts: Any) -> torch.Tensor:
    """Quantize ``x`` with ``method`` at ``bits``; the result carries the method's gradient rule.

    ``per_channel=True`` fits one codebook per slice along ``channel_dim`` (default 0); other
    options are per method (docs/quantizers.md). ``search`` here is the one-shot nearest-value
    rounding with the STE (its logits train inside ``lowbit.nn`` layers). Bad input raises
    ``ConfigError`` (a ValueError).
    """
    return _fitted(x, method, bits, dict(opts)).one_shot(x)


def levels(x: torch.Tensor, method: str, bits: int, **opts: Any) -> torch.Tensor:
    """The sorted values the quantizer fitted on ``x`` can emit: a 1-D tensor per tensor, or a
    ``[channels, n_levels]`` tensor of sorted rows with ``per_channel=True``."""
    quantizer = _fitted(x, method, bits, dict(opts))
    table = quantizer.levels(x)
    return torch.unique(table) if quantizer.channel_dim is None else table


def encode(x: torch.Tensor, method: str, bits: int, **opts: Any) -> Encoding:
    """Codes + codebook of ``x`` (what ``lowbit.freeze`` exports for a layer)."""
    return _fitted(x, method, bits, dict(opts)).encode(x)


__all__ = ["ACT_METHODS", "EMFit", "Encoding", "METHODS", "QuantOptions", "Quantizer", "Site",
           "WEIGHT_METHODS", "encode", "fit_em", "levels", "make_quantizer", "quantize", "register",
           "validate"]
