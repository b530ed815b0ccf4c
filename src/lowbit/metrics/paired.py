"""Image-to-image scores: PSNR and SSIM against the ground truth, FID / KID / IS of the outputs.

``evaluate_pairs(generator, dataset)`` runs a generator on the inputs of a paired dataset
(``lowbit.data.load_pairs``) and scores every output against its target: PSNR and SSIM through
torchmetrics (per image, on the [-1, 1] range, so ``data_range`` = 2, then averaged), and FID / KID /
IS of all outputs against the real targets with the target domain's shipped extractor (or the one
given). The same inputs give the same numbers, so FP and quantized generators compare directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from lowbit.errors import ConfigError
from lowbit.metrics.extractors import Extractor, module_device, resolve_extractor
from lowbit.metrics.reference import features_of, reference_features
from lowbit.metrics.scores import KID_SUBSETS, EvaluationError, GenerativeScores

#: the value range of lowbit images ([-1, 1])
DATA_RANGE = 2.0


def psnr(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images: 10 log10(range^2 / MSE)."""
    return peak_signal_noise_ratio(outputs, targets, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))


def ssim(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, Wang et al. 2004) of [-1, 1] images."""
    return structural_similarity_index_measure(outputs, targets, data_range=DATA_RANGE, reduction="none")


def _reference(dataset: str, domain: str | None, targets: torch.Tensor, extractor: Extractor, split: str,
               n: int, batch: int) -> torch.Tensor:
    """Features of the real targets: the cached domain reference when the targets are that dataset."""
    if domain is not None:
        return reference_features(domain, extractor, split, n, batch)
    return features_of(targets, extractor, batch, desc=f"reference {dataset}/{split}")


def _checked(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor) or outputs.shape != targets.shape:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise EvaluationError(f"the generator returned {shape} for targets of {tuple(targets.shape)}; it "
                              "must map each input to one image of the target's shape")
    return outputs


@torch.no_grad()
def evaluate_pairs(
    generator: nn.Module,
    dataset: str,
    n: int = 10_000,
    batch: int = 250,
    split: str = "test",
    root: str | Path | None = None,
    seed: int = 0,
    extractor: Extractor | None = None,
    inception_weights: str | Path | None = None,
    kid_subsets: int = KID_SUBSETS,
    progress: bool = True,
) -> dict[str, float | int | str]:
    """PSNR, SSIM (means and standard deviations over images), FID, KID and IS of ``generator`` on the
    first ``n`` pairs (the dataset's fixed subset) of ``dataset``/``split``."""
    from lowbit.data.paired import load_pairs, target_domain

    if n < 10 or batch < 1:
        raise ConfigError(f"need n >= 10 and batch >= 1, got {n}, {batch}")
    inputs, targets = load_pairs(dataset, split, root, limit=n)
    domain = target_domain(dataset)
    if domain is None and extractor is None and inception_weights is None:
        raise ConfigError(f"dataset '{dataset}' has no shipped feature extractor for FID; pass extractor= "
                          "or inception_weights=")
    feature_net = resolve_extractor(domain or dataset, extractor, inception_weights)
    reference = _reference(dataset, domain, targets, feature_net, split, n, batch)
    scores = GenerativeScores(feature_net, reference, seed, kid_subsets)
    psnrs, ssims = [], []
    device, feat_device = module_device(generator), module_device(feature_net.module)
    was_training = generator.training
    generator.eval()
    try:
        for start in tqdm(range(0, len(inputs), batch), desc=f"evaluate {dataset}", unit="batch",
                          disable=not progress):
            target = targets[start:start + batch]
            output = _checked(generator(inputs[start:start + batch].to(device)), target).cpu()
            psnrs.append(psnr(output, target))
            ssims.append(ssim(output, target))
            scores.update(output.to(feat_device))
    finally:
        generator.train(was_training)
    psnr_all, ssim_all = torch.cat(psnrs), torch.cat(ssims)
    return {"psnr": float(psnr_all.mean()), "psnr_std": float(psnr_all.std()),
            "ssim": float(ssim_all.mean()), "ssim_std": float(ssim_all.std()), **scores.compute()}
