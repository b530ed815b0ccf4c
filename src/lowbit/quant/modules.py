"""Quantizer modules: what a quantized layer holds. Stateful methods keep their fit in buffers.

Every quantizer module has ``forward(x)`` (value with the gradient rule; in training mode the
stateful ones update their fit first), ``encode(x)`` (codes + codebook from the current state,
no update) and ``refit(x)`` (a full fit from scratch). Quantizers whose gradient into ``x`` is
``upstream · factor(x)`` are ``cacheable``: ``detached_forward`` returns the value and the factor,
so a layer can reuse both while its weight is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.quant import kmeans, lq, uniform
from lowbit.quant.checks import as_rows, row_shape
from lowbit.quant.em import fit_em, paper_iterations, warm_em
from lowbit.quant.encoding import Encoding, affine_encoding, table_encoding
from lowbit.quant.grad import through
from lowbit.quant.registry import MAX_BITS, QuantOptions, Site, number, one_of, positive_int, register
from lowbit.quant.versions import track_fused_optimizer_steps


class Quantizer(nn.Module):
    """Base class of every method. A registered subclass (``lowbit.quant.registry.register``) sets
    the class facts ``method``, ``roles``, ``bit_range`` and ``Options``; instances hold ``bits``,
    ``channel_dim`` (None = per tensor) and ``options`` (an ``Options`` instance).

    Optional hooks, overridden where a method needs them: ``build`` (construction from options and
    a ``Site``), ``param_groups`` (parameters a trainer may give their own optimiser),
    ``on_epoch`` (a per-epoch schedule), ``layer_forward`` / ``check_layer`` (a custom forward of
    the layer that holds the quantizer), ``one_shot`` (the functional ``quantize`` value) and
    ``label`` (a short name for tables)."""

    method: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()
    bit_range: ClassVar[tuple[int, int]] = (0, 0)
    Options: ClassVar[type[QuantOptions]] = QuantOptions
    #: the gradient into ``x`` is ``upstream · factor(x)``: a layer may reuse value and factor
    cacheable: ClassVar[bool] = True
    #: a constant tensor is valid input (activations); weight methods need a range to fit
    accepts_constant: ClassVar[bool] = False
    #: the float weight is the trained parameter (False: it only initialises the quantizer's state)
    trains_weight: ClassVar[bool] = True
    #: ``refit`` from the float weight is meaningful (False for state that is trained, not fitted)
    refits_from_weight: ClassVar[bool] = True

    def __init__(self, bits: int, channel_dim: int | None = None, **options: Any) -> None:
        super().__init__()
        self.bits = bits
        self.channel_dim = channel_dim
        self.options = self.Options.parse(self.method, bits, options)
        track_fused_optimizer_steps()  # the caches keyed on parameter versions stay right

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        """The module for ``site`` (the default ignores the role, rows and shape)."""
        return cls(bits, site.channel_dim, **options.as_dict())

    @classmethod
    def label(cls, options: Mapping[str, Any]) -> str:
        """A short name for tables, e.g. ``bwn`` or ``search-sgt``."""
        return cls.method

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups of this quantizer's parameters that a trainer may optimise separately."""
        return {}

    def on_epoch(self, epoch: int) -> None:
        """The per-epoch schedule, called at the start of each (0-based) epoch."""

    def check_layer(self, layer: nn.Module) -> None:
        """Refuse (ConfigError) a layer this quantizer cannot serve."""

    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The holding layer's output computed by the quantizer, or None for the layer's own forward
        with ``quantized_weight()``."""
        return None

    def input_shift(self) -> torch.Tensor | None:
        """A learned shift subtracted from the input (per channel, dim 1) before the level rule, or
        None (what ``lowbit.nn.freeze`` exports as ``FrozenAct.shift``)."""
        return None

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        """The value of the functional ``lowbit.quant.quantize`` (with its gradient rule)."""
        return self(x)

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


@dataclass(frozen=True)
class NoOptions(QuantOptions):
    """A method without options."""


@dataclass(frozen=True)
class LogOptions(QuantOptions):
    """``eps``: added to ``|x|`` before the log."""

    eps: float = 1e-8

    def check(self, method: str, bits: int) -> None:
        if not number(method, "eps", self.eps) > 0:
            raise ConfigError(f"{method}: eps must be > 0, got {self.eps!r}")


class ClosedFormQuantizer(Quantizer):
    """Base of minmax / log / tanh / dorefa / bwn: no state, computed from the tensor at every call
    by the method's ``encoder`` (``uniform.encode_*``)."""

    Options = NoOptions
    roles = ("weight",)
    bit_range = (1, MAX_BITS)

    @staticmethod
    def encoder(x: torch.Tensor, bits: int, channel_dim: int | None, **options: Any) -> Encoding:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Encoding:
        return self.encoder(x, self.bits, self.channel_dim, **self.options.as_dict())


@register
class MinmaxQuantizer(ClosedFormQuantizer):
    """Minmax-Q (001 §2.2 eq.3): ``Q = f^-1(round f(x))``, ``f(x) = (x - min X)/(max X - min X)·(2^k-1)``."""

    method = "minmax"
    encoder = staticmethod(uniform.encode_minmax)


@register
class LogQuantizer(ClosedFormQuantizer):
    """Log-Q (001 §2.2 eq.4): minmax on ``log(|x| + eps)`` with the sign kept."""

    method = "log"
    Options = LogOptions
    encoder = staticmethod(uniform.encode_log)


@register
class TanhQuantizer(ClosedFormQuantizer):
    """Tanh-Q (001 §2.2 eq.5): ``f(x) = (tanh x + 1)/2·(2^k-1)``, ``Q = atanh(2·round(f)/(2^k-1) - 1)``."""

    method = "tanh"
    encoder = staticmethod(uniform.encode_tanh)


@register
class DorefaQuantizer(ClosedFormQuantizer):
    """DoReFa (000 §3.2 eq.3): weights ``2·quantize_k(tanh w/(2 max|tanh w|) + 1/2) - 1``, with
    the gradient through tanh; as an activation method it is ``act`` on [0, 1]."""

    method = "dorefa"
    roles = ("weight", "activation")
    encoder = staticmethod(uniform.encode_dorefa)

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        if site.role == "activation":
            return DorefaActivation(bits)
        return super().build(bits, options, site)

    def detached_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return uniform.dorefa_value_and_factor(x, self.bits, self.channel_dim)


class Stateful(Quantizer):
    """A fitted quantizer: full fit on first use (or :meth:`refit`), then in training mode a cheap
    warm-started :meth:`warm_update` every ``options.refit_every`` forwards."""

    roles = ("weight",)
    bit_range = (1, MAX_BITS)

    def __init__(self, bits: int, channel_dim: int | None = None, **options: Any) -> None:
        super().__init__(bits, channel_dim, **options)
        self.refit_every = self.options.refit_every
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        return cls(bits, site.channel_dim, site.rows, **options.as_dict())

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


@dataclass(frozen=True)
class EMOptions(QuantOptions):
    """EM fit (001 §4.1): ``init`` "search" (scan of starts) or "minmax"; ``iters`` None = until the
    relative gain is below ``tol``; ``starts`` EM runs; ``paper`` the paper's fixed schedule;
    in training ``steps`` warm EM iterations every ``refit_every`` forwards."""

    init: str = "search"
    iters: int | None = None
    tol: float = 1e-6
    starts: int = 4
    paper: bool = False
    refit_every: int = 1
    steps: int = 1

    def check(self, method: str, bits: int) -> None:
        one_of(method, "init", self.init, ("search", "minmax"))
        for name in ("refit_every", "steps", "starts"):
            positive_int(method, name, getattr(self, name))
        _check_iters(method, self.iters)


def _check_iters(method: str, iters: Any) -> None:
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise ConfigError(f"{method}: iters must be a non-negative integer or None, got {iters!r}")


@register
class EMQuantizer(Stateful):
    """QGAN EM quantizer (001 §4.1) with ``alpha``/``beta`` buffers; the warm update runs
    ``steps`` EM iterations on the raw weights from the stored fit."""

    method = "em"
    Options = EMOptions

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, **options: Any) -> None:
        super().__init__(bits, channel_dim, **options)
        opts = self.options
        self.fit_opts = {"init": opts.init, "iters": opts.iters, "tol": opts.tol, "starts": opts.starts,
                         "paper": opts.paper}
        self.steps = opts.steps
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


@dataclass(frozen=True)
class LQOptions(QuantOptions):
    """LQ-Nets: moving-average ``momentum`` of the basis, ``iters`` QEM steps of the first fit,
    one QEM step every ``refit_every`` training forwards."""

    momentum: float = 0.9
    iters: int = 30
    refit_every: int = 1

    def check(self, method: str, bits: int) -> None:
        if not 0 <= number(method, "momentum", self.momentum) < 1:
            raise ConfigError(f"{method}: momentum must be in [0, 1), got {self.momentum!r}")
        _check_iters(method, self.iters)
        positive_int(method, "refit_every", self.refit_every)


@register
class LQQuantizer(TableQuantizer):
    """LQ-Nets (003, SPEC §2): basis ``v`` per row ({-1,+1} codes, weights) or per layer ({0,1}
    codes, activations, gradient masked to [0, top level]). In training, every ``refit_every``
    forwards one QEM step gives ``v_new`` and ``v <- momentum·v + (1 - momentum)·v_new``."""

    method = "lq"
    roles = ("weight", "activation")
    Options = LQOptions

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, signed: bool = True,
                 **options: Any) -> None:
        super().__init__(bits, channel_dim, **options)
        self.signed, self.momentum, self.iters = signed, self.options.momentum, self.options.iters
        self.register_buffer("basis", torch.zeros(rows, bits))
        self.register_buffer("patterns", lq.code_patterns(bits, signed), persistent=False)

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        return cls(bits, site.channel_dim, site.rows, signed=site.role == "weight", **options.as_dict())

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


@dataclass(frozen=True)
class KMeansOptions(QuantOptions):
    """k-means: ``iters`` Lloyd steps of the first fit, one warm step every ``refit_every`` forwards."""

    iters: int = 100
    refit_every: int = 1

    def check(self, method: str, bits: int) -> None:
        _check_iters(method, self.iters)
        positive_int(method, "refit_every", self.refit_every)


@register
class KMeansQuantizer(TableQuantizer):
    """Weight sharing by k-means (004 §1.2): 2^k centroids per row, STE to the float weights; in
    training one warm Lloyd step every ``refit_every`` forwards tracks the moving weights."""

    method = "kmeans"
    Options = KMeansOptions

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, **options: Any) -> None:
        super().__init__(bits, channel_dim, **options)
        self.iters = self.options.iters
        self.register_buffer("centroids", torch.zeros(rows, 2**bits))

    @torch.no_grad()
    def refit(self, x: torch.Tensor) -> None:
        self.centroids.copy_(kmeans.fit_kmeans(x, self.bits, self.channel_dim, self.iters))
        self.fitted.fill_(True)

    def warm_update(self, x: torch.Tensor) -> None:
        self.centroids.copy_(kmeans.lloyd_step(as_rows(x.detach(), self.channel_dim), self.centroids))

    def table(self) -> torch.Tensor:
        return self.centroids


@register
class SignQuantizer(Quantizer):
    """Binary activation ``sign(x)`` with the ``|x| <= 1`` gradient mask (000 §3.3)."""

    method = "sign"
    roles = ("activation",)
    bit_range = (1, 1)
    Options = NoOptions
    accepts_constant = True

    def encode(self, x: torch.Tensor) -> Encoding:
        return uniform.encode_sign(x)

    def detached_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode(x).decode().detach(), uniform.sign_factor(x)


@dataclass(frozen=True)
class ActOptions(QuantOptions):
    """k-bit activation: clip range ``[lo, hi]``; ``learn_range`` trains ``hi`` (PACT)."""

    lo: float = 0.0
    hi: float = 1.0
    learn_range: bool = False

    def check(self, method: str, bits: int) -> None:
        if not number(method, "lo", self.lo) < number(method, "hi", self.hi):
            raise ConfigError(f"{method}: lo={self.lo} must be below hi={self.hi}; widen the clip range")


@register
class ActQuantizer(Quantizer):
    """k-bit activation: clip to ``[lo, hi]`` then ``quantize_k`` (DoReFa, 000 §3.2); with
    ``learn_range`` the upper end ``hi`` is a parameter trained by the PACT gradient."""

    method = "act"
    roles = ("activation",)
    bit_range = (1, MAX_BITS)
    Options = ActOptions
    cacheable = False
    accepts_constant = True

    def __init__(self, bits: int, channel_dim: int | None = None, **options: Any) -> None:
        super().__init__(bits, None, **options)
        self.lo = float(self.options.lo)
        hi = torch.tensor(float(self.options.hi))
        if self.options.learn_range:
            self.hi = nn.Parameter(hi)
        else:
            self.register_buffer("hi", hi)

    def encode(self, x: torch.Tensor) -> Encoding:
        return uniform.encode_act(x, self.bits, self.lo, self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uniform.quantize_act(x, self.bits, self.lo, self.hi)


class DorefaActivation(ActQuantizer):
    """DoReFa's activation quantizer: ``act`` on the fixed range [0, 1] (built by ``dorefa``)."""

    method = "dorefa"
