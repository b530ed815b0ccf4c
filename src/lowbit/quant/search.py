"""Quantization through weight search (002 §2): each weight picks one value of a finite value space
``q`` (times a layer or channel scale) by its own logits ``theta = log alpha`` over the m values.

* RDHS (§2.3): ``y = softmax((theta + mu·g)/tau)`` with Gumbel noise ``g``; the forward uses the
  one-hot ``argmax y`` (eq.3), the backward the gradient of ``y`` (eq.4). ``mu = 0`` (default) is
  deterministic; ``tau`` anneals from ``tau`` by ``tau_decay`` per epoch down to ``tau_min``.
* SGT (§2.4): the forward picks ``q_k``, ``k = argmax theta``; the backward sends
  ``dL/dtheta = dL/dq_k · sign(q - q_k)`` to every logit (eq.6).
* ``logits="centered"`` keeps ``m - 1`` coordinates ``phi`` of the zero-sum logits
  ``theta = B phi`` (``B``: an orthonormal basis orthogonal to the all-ones vector). Argmax and
  softmax ignore a shift of ``theta``, so nothing is lost, and under SGD (with momentum and weight
  decay, the paper's optimiser, §3.1) the trajectory of ``theta`` equals the ``P theta`` (mean
  removed) of the full ``m``-logit run exactly; parameter, gradient and optimiser state shrink by
  ``1/m`` (by half at 1 bit). ``logits="full"`` keeps the paper's ``m`` logits.
* ``form="expand"`` (§2.5, Conv2d + RDHS): the input channels are expanded m-fold, copy k scaled by
  ``q_k``, and convolved with the one-hot masks as one (grouped) conv: O(m) extra memory, not
  O(m^(K·K)) kernel templates. The default ``form="kernel"`` forms ``sum_k z_k q_k`` per weight
  instead, which is the same function at the cost of one conv.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import unknown_name_error
from lowbit.errors import ConfigError
from lowbit.quant.checks import reduce_dims, row_shape
from lowbit.quant.encoding import Encoding
from lowbit.quant.grad import straight_through
from lowbit.quant.modules import Quantizer
from lowbit.quant.registry import MAX_BITS, QuantOptions, Site, one_of, register


def powers_of_two(bits: int) -> tuple[float, ...]:
    """``{±1, ±1/2, ..., ±2^-(2^(k-1)-1)}``: the signed power-of-two space with 2^k values."""
    magnitudes = [2.0**-j for j in range(2 ** (bits - 1))]
    return tuple(sorted([-m for m in magnitudes] + magnitudes))


VALUE_SPACES: dict[str, tuple[float, ...]] = {
    "binary": powers_of_two(1),
    "pow2-2": powers_of_two(2),
    "pow2-3": powers_of_two(3),
}
SCALE_CANDIDATES = 64


def value_space(values: str | Sequence[float] | None, bits: int) -> torch.Tensor:
    """The sorted value space: a preset name, a list of numbers, or (None) the signed powers of two
    with 2^k values (binary, pow2-2, pow2-3 at k = 1, 2, 3)."""
    if values is None:
        values = powers_of_two(bits)
    if isinstance(values, str):
        if values not in VALUE_SPACES:
            raise unknown_name_error("search value space", values, VALUE_SPACES)
        values = VALUE_SPACES[values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"search: values must be a preset name or a list of numbers, got {values!r}")
    space = torch.tensor(sorted(float(v) for v in values))
    if len(space) < 2 or not torch.isfinite(space).all() or len(space.unique()) != len(space):
        raise ConfigError(f"search: values {list(values)} must be at least 2 distinct finite numbers")
    if len(space) > 2**bits:
        raise ConfigError(f"search: {len(space)} values need more than {bits} bits; set bits to "
                          f"{(len(space) - 1).bit_length()} or use fewer values")
    return space


def _along_first(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` ([m]) shaped to broadcast along dim 0 of ``like`` ([m, ...])."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def zero_sum_basis(m: int) -> torch.Tensor:
    """Orthonormal basis ``B`` [m, m-1] of the vectors whose entries sum to 0 (Helmert columns:
    column j is ``(-1, ..., -1, j, 0, ...)/sqrt(j(j+1))`` with j entries -1), so ``B^T B = I`` and
    ``B B^T = I - 11^T/m``; at m = 2, ``theta = (-phi, phi)/sqrt 2`` picks the larger value iff phi > 0."""
    basis = torch.zeros(m, m - 1, dtype=torch.float64)
    for j in range(1, m):
        basis[:j, j - 1] = -1.0
        basis[j, j - 1] = float(j)
        basis[:, j - 1] /= (j * (j + 1)) ** 0.5
    return basis.to(torch.get_default_dtype())


def _value_logits(free: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """The m logits per weight: ``free`` itself (full) or ``B @ free`` (centered, free has m-1 rows)."""
    if basis is None:
        return free
    return (basis @ free.reshape(len(basis[0]), -1)).reshape(len(basis), *free.shape[1:])


def first_argmax_value(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``q[argmax_k scores[k]]`` per weight (scores laid out ``[m, *weight.shape]``; ties go to the
    first maximum, as ``torch.max``). Built from ``amax`` and comparisons, 3x faster on a CPU than
    ``max(dim=0).indices`` over the leading dim; ``encode`` gets the same indices from ``max``."""
    m = len(values)
    hits = (scores == scores.amax(dim=0)).to(torch.int8)
    rank = torch.arange(m, 0, -1, dtype=torch.int8, device=scores.device)  # m - k: the first hit wins
    first = (hits * _along_first(rank, hits)).amax(dim=0)
    if not bool(first.all()):  # a weight with no maximum: its scores hold NaN
        raise ConfigError("search: the logits hold NaN, so no value can be picked; training diverged - "
                          "lower the learning rate or resume from the last good checkpoint")
    return values[m - first.long()]


def _to_free(per_value: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """An [m, ...] tensor (logits, or dL/dtheta) in the parameter's layout: itself (full) or
    ``B^T`` times it (centered, m - 1 rows)."""
    if basis is None:
        return per_value
    return (basis.T @ per_value.reshape(len(basis), -1)).reshape(-1, *per_value.shape[1:])


class _StochasticGradientTransfer(torch.autograd.Function):
    """Forward the picked ``q_k``, ``k = argmax theta``; backward
    ``dL/dtheta_r = dL/dq_k · sign(q_r - q_k)`` (002 eq.6), into ``logits`` through ``B^T`` if centered."""

    @staticmethod
    def forward(ctx, free: torch.Tensor, basis: torch.Tensor | None,  # type: ignore[override]
                values: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(basis, values, picked)
        return picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        basis, values, picked = ctx.saved_tensors
        column = _along_first(values, picked[None])
        return _to_free(torch.sign(column - picked[None]).mul_(grad[None]), basis), None, None, None


class _HardSampledSoftmax(torch.autograd.Function):
    """RDHS (002 eq.2-4): forward the picked ``q[argmax s]``, ``s = theta (+ mu·g)``; backward the
    gradient of the relaxation ``sum_j y_j q_j`` with ``y = softmax(s/tau)``:
    ``dL/ds_j = dL/dq · y_j (q_j - sum_i y_i q_i)/tau`` (times ``B^T`` for centered logits).
    ``s`` is recomputed in backward from the parameter, so no [m, N] tensor is kept between
    forward and backward (only the Gumbel noise when mu > 0)."""

    @staticmethod
    def forward(ctx, free: torch.Tensor, basis: torch.Tensor | None,  # type: ignore[override]
                noise: torch.Tensor | None, values: torch.Tensor, tau: torch.Tensor,
                picked: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(free, basis, noise, values, tau)
        return picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        free, basis, noise, values, tau = ctx.saved_tensors
        soft = _noisy_scores(free, basis, noise)
        soft = soft - soft.amax(dim=0)  # never in place: without basis and noise it is the parameter
        soft.div_(tau).exp_()
        soft.div_(soft.sum(dim=0))
        relaxed = torch.tensordot(values, soft, dims=1)  # sum_i y_i q_i, no [m, N] product
        # y_j (q_j - relaxed) = y_j q_j - y_j relaxed, built in two [m, N] buffers
        weighted = soft * _along_first(values, soft)
        weighted.sub_(soft.mul_(relaxed)).mul_(grad / tau)
        return _to_free(weighted, basis), None, None, None, None, None


def _noisy_scores(free: torch.Tensor, basis: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    scores = _value_logits(free, basis)
    return scores if noise is None else scores + noise


def _gumbel_like(t: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(t).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(uniform))


SEARCH_LOGITS = "search_logits"


@dataclass(frozen=True)
class SearchOptions(QuantOptions):
    """Weight search (002 §2): the value space ``values`` (None = signed powers of two, a preset or a
    list), ``scale`` ("learned", "fixed" or a positive number), ``mode`` ("rdhs" or "sgt"), the
    Gumbel randomness ``mu``, the temperature schedule ``tau`` -> ``tau_min`` by ``tau_decay`` per
    epoch, ``form`` ("kernel" or "expand", 002 §2.5) and ``logits`` ("full" or "centered")."""

    values: str | Sequence[float] | None = None
    scale: str | float = "learned"
    mode: str = "rdhs"
    mu: float = 0.0
    tau: float = 1.0
    tau_min: float = 1e-4
    tau_decay: float = 0.97
    form: str = "kernel"
    logits: str = "full"

    def check(self, method: str, bits: int) -> None:
        value_space(self.values, bits)
        one_of(method, "mode", self.mode, ("rdhs", "sgt"))
        one_of(method, "form", self.form, ("kernel", "expand"))
        one_of(method, "logits", self.logits, ("centered", "full"))
        if self.form == "expand" and self.mode != "rdhs":
            raise ConfigError("search: form 'expand' works with mode 'rdhs' only; use form 'kernel' for SGT")
        scale = self.scale
        if not (scale in ("learned", "fixed") or (isinstance(scale, (int, float)) and scale > 0)):
            raise ConfigError(f"search: scale must be 'learned', 'fixed' or a positive number, got {scale!r}")
        if not (self.mu >= 0 and self.tau > 0 and self.tau_min > 0 and 0 < self.tau_decay <= 1):
            raise ConfigError("search: need mu >= 0, tau > 0, tau_min > 0 and 0 < tau_decay <= 1")


@register
class SearchQuantizer(Quantizer):
    """Weight search over ``values`` (002 §2). The trained parameter ``logits`` is value-major,
    ``[m, *weight.shape]`` (full) or ``[m - 1, *weight.shape]`` (centered), so the per-weight
    max/softmax over m runs on contiguous slices; ``scale`` is "learned" (a parameter), "fixed"
    (fitted once) or a number."""

    method = "search"
    roles = ("weight",)
    bit_range = (1, MAX_BITS)
    Options = SearchOptions
    cacheable = False
    trains_weight = False
    refits_from_weight = False

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, shape: Sequence[int] = (1,),
                 **options: Any) -> None:
        super().__init__(bits, channel_dim, **options)
        opts = self.options
        self.mode, self.mu, self.form = opts.mode, float(opts.mu), opts.form
        self.tau_start, self.tau_min = float(opts.tau), float(opts.tau_min)
        self.tau_decay = float(opts.tau_decay)
        self.fit_scale = isinstance(opts.scale, str)
        self.register_buffer("values", value_space(opts.values, bits))
        self.centered = opts.logits == "centered"
        self.register_buffer("basis", zero_sum_basis(len(self.values)) if self.centered else None,
                             persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(self.values) - self.centered, *shape))
        start = torch.ones(rows) if self.fit_scale else torch.full((rows,), float(opts.scale))
        if opts.scale == "learned":
            self.scale = nn.Parameter(start)
        else:
            self.register_buffer("scale", start)
        self.register_buffer("tau", torch.tensor(float(opts.tau)))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        return cls(bits, site.channel_dim, site.rows, site.shape, **options.as_dict())

    @classmethod
    def label(cls, options: Mapping[str, Any]) -> str:
        """``search-rdhs`` or ``search-sgt``."""
        return f"search-{options.get('mode', SearchOptions.mode)}"

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The logits, which seed 002 §3.1 trains with SGD (the trainers' ``search_sgd``)."""
        return {SEARCH_LOGITS: [self.logits]}

    def on_epoch(self, epoch: int) -> None:
        """The RDHS temperature schedule (:meth:`anneal`)."""
        self.anneal(epoch)

    def check_layer(self, layer: nn.Module) -> None:
        """The channel-expanded form needs a zero-padded Conv2d."""
        if self.form == "expand" and not (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"):
            raise ConfigError(
                f"search form 'expand' (002 §2.5) needs a zero-padded Conv2d, not "
                f"{getattr(layer, 'kind', layer)}; use form 'kernel' for this layer"
            )

    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The channel-expanded conv (``form="expand"``), else None (the layer's own forward)."""
        return self.expanded_conv2d(x, layer) if self.form == "expand" else None

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        """The functional form: nearest value of the fitted, scaled space, with the STE."""
        return straight_through(x, self(x))

    def _row_scale(self, like: torch.Tensor) -> torch.Tensor:
        return self.scale.reshape(row_shape(like, self.channel_dim))

    @torch.no_grad()
    def refit(self, x: torch.Tensor) -> None:
        """Fit the scale (least MSE of nearest-value rounding) and start the logits at
        ``-((x/scale - q)/gap)^2``, so each weight starts on its nearest value."""
        data = x.detach()
        if self.fit_scale:
            self.scale.copy_(self._best_scale(data).reshape(-1))
        ratio = data / self._row_scale(data)
        gap = float((self.values[1:] - self.values[:-1]).min())
        nearest_first = -((ratio[None] - _along_first(self.values, ratio[None])) / gap).square()
        self.logits.copy_(_to_free(nearest_first, self.basis))  # B^T theta: the mean drops out
        self.fitted.fill_(True)

    def value_logits(self) -> torch.Tensor:
        """The m logits per weight, ``[m, *weight.shape]`` (with the gradient into ``logits``)."""
        return _value_logits(self.logits, self.basis)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        """Accept logits saved in the other layout (full <-> centered): an exact conversion."""
        stored, m = state_dict.get(prefix + "logits"), len(self.values)
        if stored is not None and self.centered and stored.shape[0] == m:
            state_dict[prefix + "logits"] = _to_free(stored.to(self.basis), self.basis)
        elif stored is not None and not self.centered and stored.shape[0] == m - 1:
            state_dict[prefix + "logits"] = _value_logits(stored, zero_sum_basis(m).to(stored))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _best_scale(self, data: torch.Tensor) -> torch.Tensor:
        dims = reduce_dims(data, self.channel_dim)
        peak = data.abs().amax(dim=dims, keepdim=True).clamp_min(torch.finfo(data.dtype).tiny)
        peak = peak / self.values.abs().max()
        best, best_mse = peak, None
        for factor in torch.linspace(1 / SCALE_CANDIDATES, 1, SCALE_CANDIDATES).tolist():
            scale = peak * factor
            mse = (data - scale * self._nearest_values(data / scale)).square().mean(dim=dims, keepdim=True)
            if best_mse is None:
                best, best_mse = scale, mse
            better = mse < best_mse
            best, best_mse = torch.where(better, scale, best), torch.where(better, mse, best_mse)
        return best

    def _nearest_values(self, ratio: torch.Tensor) -> torch.Tensor:
        mids = (self.values[1:] + self.values[:-1]) / 2
        return self.values[torch.bucketize(ratio, mids)]

    def set_temperature(self, tau: float) -> None:
        """Set the RDHS softmax temperature."""
        self.tau.fill_(float(tau))

    def anneal(self, epoch: int) -> None:
        """``tau = max(tau_start · tau_decay^epoch, tau_min)`` (002 §3.1: 1 -> 1e-4 by x0.97/epoch)."""
        self.set_temperature(max(self.tau_start * self.tau_decay**epoch, self.tau_min))

    def _noise(self) -> torch.Tensor | None:
        """RDHS's ``mu·g`` (Gumbel) while training with mu > 0, else None."""
        if self.training and self.mu > 0:
            shape = (len(self.values), *self.logits.shape[1:])
            return self.mu * _gumbel_like(self.logits.new_empty(shape))
        return None

    def picked_values(self) -> torch.Tensor:
        """Unscaled selected values with the RDHS or SGT gradient into the logits. The pick is
        shared while the logits are unchanged and it is still alive (e.g. D(real) and D(fake) of
        one GAN step), except when RDHS samples Gumbel noise."""
        noise = self._noise()
        if noise is not None:
            picked = first_argmax_value(_noisy_scores(self.logits.detach(), self.basis, noise), self.values)
        else:
            picked = self._shared_pick()
        if self.mode == "sgt":
            return _StochasticGradientTransfer.apply(self.logits, self.basis, self.values, picked)
        return _HardSampledSoftmax.apply(self.logits, self.basis, noise, self.values, self.tau, picked)

    def _shared_pick(self) -> torch.Tensor:
        """The pick of the current logits, reused through a weak reference: it lives exactly as long
        as a graph (or caller) holds it, so sharing costs no memory between uses."""
        logits = self.logits
        key = (logits._version, logits.data_ptr(), logits.device, logits.dtype)
        cached = self.__dict__.get("_pick_cache")
        picked = cached[1]() if cached is not None and cached[0] == key else None
        if picked is None:
            with torch.no_grad():
                picked = first_argmax_value(_value_logits(logits.detach(), self.basis), self.values)
            if not logits.is_inference():  # inference tensors have no version counter
                self.__dict__["_pick_cache"] = (key, weakref.ref(picked))
        return picked

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_pick_cache", None)  # a weak reference does not pickle, and is only a cache
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            self.refit(x)
        return self.picked_values() * self._row_scale(x)

    def encode(self, x: torch.Tensor) -> Encoding:
        if not bool(self.fitted):
            self.refit(x)
        codebook = self.scale.detach()[:, None] * self.values[None, :]
        return Encoding(self.value_logits().detach().max(dim=0).indices, codebook, self.channel_dim)

    def expanded_conv2d(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """002 §2.5: conv of the m-fold channel-expanded input (copy k = q_k·x) with the one-hot
        masks ``z`` as kernels; equals ``conv2d(x, scale·sum_k z_k q_k)``."""
        if not bool(self.fitted):
            self.refit(conv.weight)
        scores = _noisy_scores(self.logits, self.basis, self._noise())
        soft = torch.softmax(scores / self.tau, dim=0)  # RDHS y (eq.2), [m, out, in/groups, kh, kw]
        hard = F.one_hot(scores.max(dim=0).indices, len(self.values)).movedim(-1, 0).to(soft.dtype)
        masks = straight_through(soft, hard)  # one-hot forward (eq.3), gradient of y (eq.4)
        m, out_ch, in_per_group, kh, kw = masks.shape
        kernel = masks.permute(1, 2, 0, 3, 4).reshape(out_ch, in_per_group * m, kh, kw)
        batch, channels, height, width = x.shape
        copies = x[:, :, None] * self.values[None, None, :, None, None]
        expanded = copies.reshape(batch, channels * m, height, width)
        out = F.conv2d(expanded, kernel, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        scale = self.scale.reshape(1, -1, 1, 1)
        out = out * scale
        return out if conv.bias is None else out + conv.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mode={self.mode}, values={self.values.tolist()}, mu={self.mu}, "
                f"form={self.form}, logits={'centered' if self.centered else 'full'}")


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the RDHS temperature of every search quantizer in ``model``; returns how many were set."""
    quantizers = [m for m in model.modules() if isinstance(m, SearchQuantizer)]
    for quantizer in quantizers:
        quantizer.set_temperature(tau)
    return len(quantizers)
