"""Divergence guard: stop a run whose loss, weights or BatchNorm statistics blow up, keeping the last good
checkpoint.

A trainer makes one ``DivergenceGuard`` and calls ``check_losses`` after each update, ``check_models``
after each optimiser step and ``check_state`` just before it writes a checkpoint (then ``saved``).
A non-finite value, a loss beyond ``max_loss`` or a weight / buffer beyond ``max_weight`` raises
TrainingDivergedError (CLI: exit 2) naming the value, where it happened and the kept checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError, TrainingDivergedError


@dataclass
class GuardSpec:
    """Bounds of the divergence guard (config key ``guard``): |loss| <= max_loss, every |weight| and
    BatchNorm statistic <= max_weight (0 = no magnitude bound, non-finite values always stop the run);
    weights are checked every ``every`` steps."""

    max_loss: float = 1e6
    max_weight: float = 1e6
    every: int = 1

    def __post_init__(self) -> None:
        if not (self.max_loss >= 0 and self.max_weight >= 0 and self.every >= 1):
            raise ConfigError(f"guard: need max_loss >= 0, max_weight >= 0 (0 = unbounded) and every >= 1, "
                              f"got {self.max_loss}, {self.max_weight}, {self.every}")


def _beyond(value: float, bound: float) -> bool:
    """Whether ``value`` is non-finite or its magnitude exceeds ``bound`` (0 = unbounded)."""
    return not math.isfinite(value) or (bound > 0 and abs(value) > bound)


def _floating(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _model_tensors(models: Iterable[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Every floating parameter and buffer (BatchNorm statistics, quantizer state) of ``models``, named."""
    named: list[tuple[str, torch.Tensor]] = []
    for index, model in enumerate(models):
        tag = getattr(model, "lowbit_name", f"model {index}")
        named += [(f"{tag}.{n}", t) for n, t in (*model.named_parameters(), *model.named_buffers())]
    return _floating(named)


def _unnamed_model_tensors(models: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The tensors of ``_model_tensors`` without building names (the per-step fast path)."""
    return [t for m in models for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf of a nested checkpoint state."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{index}]")
    else:
        yield prefix, node


def _max_abs(tensors: list[torch.Tensor]) -> float:
    """The largest |value| over ``tensors`` (NaN if any value is NaN), in one host sync."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return 0.0
    device = tensors[0].device
    return float(torch.stack([t.detach().abs().max().float().to(device) for t in tensors]).max())


class DivergenceGuard:
    """Checks losses, weights and checkpoint states against a GuardSpec; remembers the last good one."""

    def __init__(self, spec: GuardSpec | None = None, fix: str = "lower the learning rate") -> None:
        self.spec = spec or GuardSpec()
        self.fix = fix
        self.last_good: Path | None = None

    def _diverged(self, what: str, value: float, when: str, bound: float, key: str) -> TrainingDivergedError:
        limit = f" (bound guard.{key} = {bound:g})" if math.isfinite(value) else ""
        kept = f"the last good checkpoint {self.last_good} is kept" if self.last_good else \
            "no checkpoint was written yet"
        return TrainingDivergedError(
            f"{what} became {value:g} at {when}{limit}; {kept}; training diverged: {self.fix} (or raise "
            f"the bits) and resume or restart; if such values are legitimate, raise guard.{key}")

    def check_losses(self, when: str, losses: dict[str, float]) -> None:
        """Stop on a non-finite loss or one beyond ``max_loss``."""
        for name, value in losses.items():
            if _beyond(value, self.spec.max_loss):
                raise self._diverged(name, value, when, self.spec.max_loss, "max_loss")

    def check_models(self, when: str, step: int, models: Iterable[nn.Module]) -> None:
        """Every ``every`` steps: stop on a non-finite weight / buffer or one beyond ``max_weight``."""
        if step % self.spec.every:
            return
        models = list(models)
        if _beyond(_max_abs(_unnamed_model_tensors(models)), self.spec.max_weight):
            self._raise_first(when, _model_tensors(models), self.spec.max_weight)

    def check_state(self, when: str, state: dict[str, Any]) -> None:
        """Before a checkpoint is written: every floating tensor in ``state`` (weights, buffers, optimiser
        state) must be finite. Magnitudes are ``check_models``' job: optimiser state (second moments,
        step counts) may legitimately exceed ``max_weight``."""
        named = _floating(_walk(state, ""))
        if _beyond(_max_abs([t for _, t in named]), 0):
            self._raise_first(when, named, 0)

    def _raise_first(self, when: str, named: list[tuple[str, torch.Tensor]], bound: float) -> None:
        """Raise for the first tensor beyond ``bound`` (only run once the run has diverged)."""
        for name, tensor in named:
            peak = _max_abs([tensor])
            if _beyond(peak, bound):
                raise self._diverged(f"'{name}' (max |value|)", peak, when, bound, "max_weight")

    def saved(self, path: Path) -> Path:
        """Record ``path`` as the last good checkpoint (after ``check_state`` passed and it was written)."""
        self.last_good = path
        return path
