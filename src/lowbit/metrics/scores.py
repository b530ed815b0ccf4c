"""FID, Inception Score and KID through torchmetrics, with a lowbit Extractor as the feature network.

The extractor's ``features`` feed ``FrechetInceptionDistance`` and ``KernelInceptionDistance``
(float64 statistics) and its logits feed ``InceptionScore``; both heads share one forward pass per
batch. The real side comes from cached reference features (``lowbit.metrics.reference``), so a
score costs only the generated images' forward passes. IS splits and KID subsets are drawn from
a seeded RNG, so the same inputs give the same numbers.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from lowbit.errors import LowbitError
from lowbit.metrics.extractors import Extractor, module_device

IS_SPLITS = 10
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class EvaluationError(LowbitError):
    """Generated images or features cannot be scored (wrong shape, NaN, too few samples)."""


class _SharedForward:
    """Runs the extractor once per batch and hands features and logits to both heads."""

    def __init__(self, extractor: Extractor) -> None:
        self.module = extractor.module
        head = getattr(extractor.module, "head", None)  # logits = head(features): one forward for both
        self.head = head if callable(head) else None
        self._last_input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images is not self._last_input:
            features = self.module.features(images)
            logits = self.head(features) if self.head is not None else self.module(images)
            features, logits = features.double(), logits.double()
            _check_finite(features, "features")
            _check_finite(logits, "logits")
            self._last_input, self._outputs = images, (features, logits)
        return self._outputs

    def clear(self) -> None:
        """Forget the last batch (so a buffer refilled in place is never served stale outputs)."""
        self._last_input = self._outputs = None


class FeatureHead(nn.Module):
    """The ``feature=`` module of FID/KID: penultimate features as float64, with ``num_features``."""

    def __init__(self, shared: _SharedForward, num_features: int) -> None:
        super().__init__()
        self.shared = shared
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.shared.outputs(images)[0]


class LogitHead(nn.Module):
    """The ``feature=`` module of InceptionScore: class logits as float64."""

    def __init__(self, shared: _SharedForward) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.shared.outputs(images)[1]


def _check_finite(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise EvaluationError(
            f"the extractor produced non-finite {what}; check that the images are finite and in [-1, 1]"
        )


@torch.no_grad()
def extract_features(extractor: Extractor, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features of ``images`` as float64 (N x D)."""
    features = extractor.module.features(images).double()
    _check_finite(features, "features")
    return features


class GenerativeScores:
    """Accumulates generated images batch by batch and scores them against real reference features."""

    def __init__(
        self, extractor: Extractor, reference: torch.Tensor, seed: int = 0, kid_subsets: int = KID_SUBSETS
    ) -> None:
        if reference.dim() != 2 or reference.shape[1] != extractor.num_features or reference.shape[0] < 2:
            raise EvaluationError(
                f"reference features of shape {tuple(reference.shape)} do not fit extractor "
                f"{extractor.label} ({extractor.num_features} features, need >= 2 rows)"
            )
        self._shared = shared = _SharedForward(extractor)
        features = FeatureHead(shared, extractor.num_features)
        self.extractor = extractor
        self.seed = seed
        self.n_real = int(reference.shape[0])
        self.n_fake = 0
        with warnings.catch_warnings():  # torchmetrics warns that KID/IS keep features in memory
            warnings.simplefilter("ignore", UserWarning)
            self.fid = FrechetInceptionDistance(feature=features)
            self.kid = KernelInceptionDistance(
                feature=features, subsets=kid_subsets, subset_size=KID_SUBSET_SIZE
            )
            self.inception = InceptionScore(feature=LogitHead(shared), splits=IS_SPLITS)
        self._load_reference(reference.double())

    def _load_reference(self, reference: torch.Tensor) -> None:
        """Put the real features into the metrics' real-side states (what ``update(real=True)`` would sum)."""
        self.fid.real_features_sum = reference.sum(dim=0)
        self.fid.real_features_cov_sum = reference.t().mm(reference)
        self.fid.real_features_num_samples = torch.tensor(reference.shape[0], dtype=torch.long)
        self.kid.real_features.append(reference)

    def update(self, images: torch.Tensor) -> None:
        """Add a batch of generated images (N x C x H x W in [-1, 1])."""
        if not torch.isfinite(images).all():
            raise EvaluationError(
                "generated images contain NaN or inf; the generator diverged or its "
                "output is not a Tanh image in [-1, 1]"
            )
        self._check_shape(images)
        self.fid.update(images, real=False)
        self.kid.update(images, real=False)
        self.inception.update(images)
        self._shared.clear()
        self.n_fake += images.shape[0]

    def _check_shape(self, images: torch.Tensor) -> None:
        expected = self.extractor.image_shape
        if expected is not None and tuple(images.shape[1:]) != expected:
            raise EvaluationError(
                f"images of shape {tuple(images.shape[1:])} do not fit extractor "
                f"{self.extractor.label}, which takes {expected}; evaluate against the "
                "dataset the generator was trained on"
            )

    def _seeded(self, metric: KernelInceptionDistance | InceptionScore) -> tuple[float, float]:
        """(mean, std) of a metric that permutes with the global RNG, seeded by ``seed``, RNG restored."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mean, std = metric.compute()
        return float(mean), float(std)

    def compute(self) -> dict[str, float | int | str]:
        """FID, IS (mean, std over 10 splits), KID (mean, std over subsets), with n and the extractor name."""
        if self.n_fake < max(2, IS_SPLITS):
            raise EvaluationError(f"only {self.n_fake} generated images; score at least {IS_SPLITS}")
        self.kid.subset_size = min(KID_SUBSET_SIZE, self.n_real, self.n_fake)
        fid = float(self.fid.compute())
        kid, kid_std = self._seeded(self.kid)
        inception, inception_std = self._seeded(self.inception)
        scores = {"fid": fid, "is": inception, "is_std": inception_std, "kid": kid, "kid_std": kid_std}
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise EvaluationError(
                f"{', '.join(bad)} came out non-finite for {self.n_fake} images; use more "
                "samples (n) or check the generator output"
            )
        return {**scores, "n": self.n_fake, "n_real": self.n_real, "extractor": self.extractor.label}


def score_images(
    images: torch.Tensor,
    extractor: Extractor,
    reference: torch.Tensor,
    seed: int = 0,
    batch: int = 500,
    kid_subsets: int = KID_SUBSETS,
) -> dict[str, float | int | str]:
    """Scores of a fixed image tensor (e.g. a real split, noised images) against reference features."""
    scores = GenerativeScores(extractor, reference, seed, kid_subsets)
    device = module_device(extractor.module)
    for start in range(0, images.shape[0], batch):
        scores.update(images[start : start + batch].to(device))
    return scores.compute()
