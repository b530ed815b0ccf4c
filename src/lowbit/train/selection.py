"""Model selection on a held-out validation score: keep the best generator a noisy GAN run passes through.

A GAN's sample quality moves a lot along one trajectory (D dominates for a while, G drifts back), so
the last step is a poor pick. With ``select.every`` > 0 the shared loop scores the sampled generator
every ``every`` steps from ``after`` on (and at the last step) with a validation FID: ``samples``
images from latents seeded with ``seed`` against the dataset's ``split`` (default ``test``: the
final evaluation of a noise GAN uses ``train`` and latent seed 0, so the selection never sees the
test metric's images or latents). The best generator's whole ``state_dict`` (weights, BatchNorm
statistics, quantizer state, pruning masks) is kept, stored in every checkpoint, and restored before
the model file is written; the last step's generator goes to ``model_last.safetensors`` beside it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.errors import ConfigError
from lowbit.limits import check_count
from lowbit.train.checkpoint import load_weights

#: ``validator(model) -> score`` (lower is better), called with the model in eval mode
Validator = Callable[[nn.Module], float]
#: splits a validation FID may use (the final evaluation's reference split must be the other one)
SPLITS = ("train", "test")
#: fewest validation samples: FID on fewer images is mostly sampling noise
MIN_SAMPLES = 100


@dataclass
class SelectSpec:
    """Model selection (config key ``select``): every ``every`` steps from step ``after`` on and at the
    last step, the FID of ``samples`` images (latent seed ``seed``) against ``split``; 0 = off."""

    every: int = 0
    after: int = 0
    samples: int = 2000
    split: str = "test"
    seed: int = 1

    def __post_init__(self) -> None:
        if self.every < 0 or self.after < 0:
            raise ConfigError(f"select: 'every' (0 = off, e.g. 250) and 'after' must be >= 0, got "
                              f"every={self.every}, after={self.after}")
        if self.samples < MIN_SAMPLES:
            raise ConfigError(f"select.samples: a validation FID needs >= {MIN_SAMPLES} images (e.g. 2000), "
                              f"got {self.samples}")
        check_count("select.samples", self.samples, "samples")
        if self.split not in SPLITS:
            raise ConfigError(f"select.split: unknown split '{self.split}'; use {' or '.join(SPLITS)} (the "
                              "one the final evaluation does not use)")

    @property
    def enabled(self) -> bool:
        return self.every > 0


def fid_validator(dataset: str, spec: SelectSpec) -> Validator:
    """The validation FID of ``spec`` on ``dataset`` (no progress bar; one KID subset, KID is not used)."""

    def score(model: nn.Module) -> float:
        from lowbit.metrics import evaluate

        scores = evaluate(model, dataset, n=spec.samples, batch=min(500, spec.samples), seed=spec.seed,
                          split=spec.split, kid_subsets=1, progress=False)
        return float(scores["fid"])

    return score


class Selector:
    """The best validation score so far, the step it was reached at and a copy of that model's state."""

    def __init__(self, spec: SelectSpec, validator: Validator) -> None:
        self.spec, self.validator = spec, validator
        self.step, self.score = 0, math.inf
        self.best: dict[str, Any] | None = None

    def due(self, step: int, last: int) -> bool:
        """Whether ``step`` is validated: every ``every`` steps from ``after`` on, and the last step."""
        return step >= self.spec.after and (step % self.spec.every == 0 or step == last)

    def offer(self, step: int, model: nn.Module) -> float:
        """Score ``model`` (already in eval mode); keep a copy of its state when it is the best so far."""
        score = self.validator(model)
        if score < self.score:
            self.step, self.score = step, score
            self.best = copy.deepcopy(model.state_dict())
        return score

    def summary(self) -> dict[str, float] | None:
        """``{"step", "val_fid"}`` of the selected model, or None before the first validation."""
        return None if self.best is None else {"step": self.step, "val_fid": self.score}

    def state(self) -> dict[str, Any]:
        """The checkpoint entry (empty before the first validation)."""
        if self.best is None:
            return {}
        return {"selection": {"step": self.step, "score": self.score, "generator": self.best}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` stored in a checkpoint (nothing when it holds no selection)."""
        if "selection" in state:
            entry = state["selection"]
            self.step, self.score, self.best = int(entry["step"]), float(entry["score"]), entry["generator"]

    def restore(self, model: nn.Module) -> None:
        """Load the selected state into ``model``."""
        if self.best is not None:
            load_weights(model, self.best, f"the generator selected at step {self.step}")
