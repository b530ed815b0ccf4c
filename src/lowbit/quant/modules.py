"""Quantizer modules: what a quantized layer holds. Stateful methods keep their fit in buffers.

Every quantizer module has ``forward(x)`` (value with the gradient rule; in training mode the
stateful ones update their fit first), ``encode(x)`` (codes + codebook from the current state,
no update) and ``refit(x)`` (a full fit from scratch). Quantizers whose gradient into ``x`` is
``upstream · factor(x)`` are ``cacheable``: ``detached_forward`` returns the value and the factor,
so a layer can reuse both while its weight is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.quant import kmeans, lq, uniform
from lowbit.quant.checks import as_rows, row_shape
from lowbit.quant.em import fit_em, paper_iterations, warm_em
from lowbit.quant.encoding import Encoding, affine_encoding, table_encoding
from lowbit.quant.grad import through
from lowbit.quant.versions import track_fused_optimizer_steps


class Quantizer(nn.Module):
    """Base class: ``method``, ``bits`` and ``channel_dim`` (None = per tensor)."""

    method = ""
    cacheable = True

    def __init__(self, bits: int, channel_dim: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.channel_dim = channel_dim
        track_fused_optimizer_steps()  # the caches keyed on parameter versions stay right

    def encode(self, x: torch.Tensor) -> Encoding:
        """Codes and codebook of ``x`` under the current state."""
        raise NotImplementedError

    def refit(self, x: torch.Tensor) -> None:
        """Fit the state from scratch on ``x`` (a no-op for closed-form methods)."""

    def detached_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The quantized value (no graph) and the gradient factor (None = plain STE)."""
        return self.encode(x).decode().detach(), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return through(x, *self.detached_forward(x))

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted codebook rows ([rows, n_levels]) the quantizer applies to ``x``."""
        return self.encode(x).codebook.sort(dim=1).values

    def extra_repr(self) -> str:
        return f"method={self.method}, bits={self.bits}, channel_dim={self.channel_dim}"


class ClosedFormQuantizer(Quantizer):
    """minmax / log / tanh / dorefa / bwn: no state, computed from the tensor at every call."""

    ENCODERS = {"minmax": uniform.encode_minmax, "log": uniform.encode_log, "tanh": uniform.encode_tanh,
                "dorefa": uniform.encode_dorefa, "bwn": uniform.encode_bwn}

    def __init__(self, method: str, bits: int, channel_dim: int | None = None, **opts: Any) -> None:
        super().__init__(bits, channel_dim)
        self.method = method
        self.opts = opts

    def encode(self, x: torch.Tensor) -> Encoding:
        return self.ENCODERS[self.method](x, self.bits, self.channel_dim, **self.opts)

    def detached_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.method == "dorefa":
            return uniform.dorefa_value_and_factor(x, self.bits, self.channel_dim)
        return super().detached_forward(x)


class Stateful(Quantizer):
    """A fitted quantizer: full fit on first use (or :meth:`refit`), then in training mode a cheap
    warm-started :meth:`warm_update` every ``refit_every`` forwards."""

    def __init__(self, bits: int, channel_dim: int | None, refit_every: int) -> None:
        super().__init__(bits, channel_dim)
        self.refit_every = refit_every
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def warm_update(self, x: torch.Tensor) -> None:
        """One warm-started step of the fit on ``x``."""
        raise NotImplementedError

    def gradient_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gradient mask (None = plain STE)."""
        return None

    def detached_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.training and bool(self.fitted):
            if int(self.calls) % self.refit_every == 0:
                with torch.no_grad():
                    self.warm_update(x)
            self.calls += 1
        return self.encode(x).decode().detach(), self.gradient_factor(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, refit_every={self.refit_every}"


class EMQuantizer(Stateful):
    """QGAN EM quantizer (001 §4.1) with ``alpha``/``beta`` buffers; the warm update runs
    ``steps`` EM iterations on the raw weights from the stored fit."""

    method = "em"

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, init: str = "search",
                 iters: int | None = None, tol: float = 1e-6, starts: int = 4, paper: bool = False,
                 refit_every: int = 1, steps: int = 1) -> None:
        super().__init__(bits, channel_dim, refit_every)
        self.fit_opts = {"init": init, "iters": iters, "tol": tol, "starts": starts, "paper": paper}
        self.steps = steps
        self.register_buffer("alpha", torch.zeros(rows))
        self.register_buffer("beta", torch.zeros(rows))

    def _store(self, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        self.alpha.copy_(alpha.reshape(-1))
        self.beta.copy_(beta.reshape(-1))
        self.fitted.fill_(True)

    @torch.no_grad()
    def refit(self, x: torch.Tensor) -> None:
        fit = fit_em(x, self.bits, self.channel_dim, **self.fit_opts)
        self._store(fit.alpha, fit.beta)

    def warm_update(self, x: torch.Tensor) -> None:
        shape = row_shape(x, self.channel_dim)
        alpha, beta = warm_em(x, self.bits, self.alpha.reshape(shape), self.beta.reshape(shape),
                              self.channel_dim, self.steps)
        self._store(alpha, beta)

    def encode(self, x: torch.Tensor) -> Encoding:
        if not bool(self.fitted):
            self.refit(x)
        shape = row_shape(x, self.channel_dim)
        alpha, beta = self.alpha.reshape(shape), self.beta.reshape(shape)
        z = uniform.uniform_codes(x.detach(), beta, alpha, 2**self.bits - 1)
        return affine_encoding(z, alpha, beta, 2**self.bits, self.channel_dim)

    def extra_repr(self) -> str:
        iters = paper_iterations(self.bits) if self.fit_opts["paper"] else self.fit_opts["iters"]
        return f"{super().extra_repr()}, iters={iters}"


class TableQuantizer(Stateful):
    """Base of lq and kmeans: each value goes to the nearest entry of a per-row sorted table."""

    def table(self) -> torch.Tensor:
        """Sorted per-row levels ``[rows, 2^k]`` of the current state."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Encoding:
        if not bool(self.fitted):
            self.refit(x)
        return table_encoding(x, self.table(), self.channel_dim)


class LQQuantizer(TableQuantizer):
    """LQ-Nets (003, SPEC §2): basis ``v`` per row ({-1,+1} codes, weights) or per layer ({0,1}
    codes, activations, gradient masked to [0, top level]). In training, every ``refit_every``
    forwards one QEM step gives ``v_new`` and ``v <- momentum·v + (1 - momentum)·v_new``."""

    method = "lq"

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, signed: bool = True,
                 momentum: float = 0.9, iters: int = 30, refit_every: int = 1) -> None:
        super().__init__(bits, channel_dim, refit_every)
        self.signed, self.momentum, self.iters = signed, momentum, iters
        self.register_buffer("basis", torch.zeros(rows, bits))
        self.register_buffer("patterns", lq.code_patterns(bits, signed), persistent=False)

    @torch.no_grad()
    def refit(self, x: torch.Tensor) -> None:
        self.basis.copy_(lq.fit_lq(x, self.bits, self.channel_dim, self.signed, self.iters).basis)
        self.fitted.fill_(True)

    def warm_update(self, x: torch.Tensor) -> None:
        new = lq.qem_step(as_rows(x.detach(), self.channel_dim), self.basis, self.patterns)
        self.basis.mul_(self.momentum).add_((1 - self.momentum) * new)

    def table(self) -> torch.Tensor:
        return lq.sorted_levels(self.basis, self.patterns).values

    def gradient_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.signed:
            return None
        data = x.detach()
        return (data >= 0) & (data <= self.table()[:, -1].max())


class KMeansQuantizer(TableQuantizer):
    """Weight sharing by k-means (004 §1.2): 2^k centroids per row, STE to the float weights; in
    training one warm Lloyd step every ``refit_every`` forwards tracks the moving weights."""

    method = "kmeans"

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, iters: int = 100,
                 refit_every: int = 1) -> None:
        super().__init__(bits, channel_dim, refit_every)
        self.iters = iters
        self.register_buffer("centroids", torch.zeros(rows, 2**bits))

    @torch.no_grad()
    def refit(self, x: torch.Tensor) -> None:
        self.centroids.copy_(kmeans.fit_kmeans(x, self.bits, self.channel_dim, self.iters))
        self.fitted.fill_(True)

    def warm_update(self, x: torch.Tensor) -> None:
        self.centroids.copy_(kmeans.lloyd_step(as_rows(x.detach(), self.channel_dim), self.centroids))

    def table(self) -> torch.Tensor:
        return self.centroids


class SignQuantizer(Quantizer):
    """Binary activation ``sign(x)`` with the ``|x| <= 1`` gradient mask (000 §3.3)."""

    method = "sign"

    def encode(self, x: torch.Tensor) -> Encoding:
        return uniform.encode_sign(x)

    def detached_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode(x).decode().detach(), uniform.sign_factor(x)


class RangeQuantizer(Quantizer):
    """k-bit activation: clip to ``[lo, hi]`` then ``quantize_k`` (DoReFa, 000 §3.2); with
    ``learn_range`` the upper end ``hi`` is a parameter trained by the PACT gradient."""

    cacheable = False

    def __init__(self, method: str, bits: int, lo: float = 0.0, hi: float = 1.0,
                 learn_range: bool = False) -> None:
        super().__init__(bits, None)
        self.method = method
        self.lo = lo
        if learn_range:
            self.hi = nn.Parameter(torch.tensor(float(hi)))
        else:
            self.register_buffer("hi", torch.tensor(float(hi)))

    def encode(self, x: torch.Tensor) -> Encoding:
        return uniform.encode_act(x, self.bits, self.lo, self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uniform.quantize_act(x, self.bits, self.lo, self.hi)

