"""``evaluate``: FID / IS / KID of any generator against a real dataset, with a progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lowbit.errors import ConfigError
from lowbit.limits import check_count
from lowbit.metrics.extractors import Extractor, module_device, resolve_extractor
from lowbit.metrics.reference import reference_features
from lowbit.metrics.scores import KID_SUBSETS, EvaluationError, GenerativeScores

Generator = Callable[[torch.Tensor], torch.Tensor]


def _latent_shapes(
    generator: Generator, latent_dim: int | None, latent_shape: tuple[int, ...] | None
) -> list[tuple[int, ...]]:
    """Latent layouts to try, in order: the one given, the model's recorded one, N x d, N x d x 1 x 1."""
    if latent_shape is not None:
        return [tuple(int(v) for v in latent_shape)]
    recorded = getattr(generator, "input_shape", None)
    if recorded and (len(recorded) == 1 or (len(recorded) == 3 and list(recorded[1:]) == [1, 1])):
        return [tuple(recorded)]
    size = getattr(generator, "latent_dim", None) or latent_dim
    if not isinstance(size, int) or size < 1:
        raise ConfigError(
            "the generator has no latent_dim attribute; pass latent_dim=<size of z> (and "
            "latent_shape=(d, 1, 1) if it wants z as N x d x 1 x 1)"
        )
    return [(size,), (size, 1, 1)]


def _first_batch(generator: Generator, shapes: list[tuple[int, ...]], z: torch.Tensor) -> tuple[int, ...]:
    """The first latent layout the generator accepts (tried on one real batch), or a clear error."""
    errors = []
    for shape in shapes:
        try:
            generator(z.reshape(z.shape[0], *shape))
            return shape
        except RuntimeError as exc:
            errors.append(f"N x {' x '.join(map(str, shape))}: {str(exc).splitlines()[0][:120]}")
    raise EvaluationError(
        f"the generator rejects every latent layout tried ({'; '.join(errors)}); pass "
        "latent_shape=<the per-sample shape of z it expects>"
    )


def _generator_device(generator: Generator) -> torch.device:
    if isinstance(generator, nn.Module):
        return module_device(generator)
    return torch.device("cpu")


def _checked_batch(images: torch.Tensor, expected: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != expected:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EvaluationError(
            f"the generator returned {shape} for {expected} latents; it must return "
            f"{expected} x C x H x W images in [-1, 1]"
        )
    return images


@torch.no_grad()
def evaluate(
    generator: Generator,
    dataset: str,
    n: int = 10_000,
    batch: int = 250,
    latent_dim: int | None = None,
    seed: int = 0,
    latent_shape: tuple[int, ...] | None = None,
    split: str | None = None,
    extractor: Extractor | None = None,
    inception_weights: str | Path | None = None,
    kid_subsets: int = KID_SUBSETS,
    progress: bool = True,
) -> dict[str, float | int | str]:
    """FID, IS, KID of ``n`` images of ``generator`` against ``dataset``/``split`` (default train).

    A paired dataset (``lowbit.data.PAIRED_DATASETS``) makes ``generator`` an image-to-image model: it
    runs on the inputs of ``split`` (default test) and PSNR / SSIM join the scores (``evaluate_pairs``).

    Returns ``{"fid", "is", "is_std", "kid", "kid_std", "n", "n_real", "extractor"}``. Latents are
    standard normal from a generator seeded with ``seed``; the feature network is ``extractor``,
    Inception-v3 from ``inception_weights``, or the dataset's shipped classifier. KID averages
    ``kid_subsets`` subsets of min(1000, n) samples. ``progress=False`` hides the progress bar.
    ``latent_shape`` is z's per-sample shape (default: the model's input_shape, else N x d or N x d x 1 x 1).
    """
    from lowbit.data.paired import PAIRED_DATASETS

    if dataset in PAIRED_DATASETS:
        from lowbit.metrics.paired import evaluate_pairs

        return evaluate_pairs(generator, dataset, n, batch, split or "test", seed=seed, extractor=extractor,
                              inception_weights=inception_weights, kid_subsets=kid_subsets, progress=progress)
    split = split or "train"
    if n < 10 or batch < 1 or kid_subsets < 1:
        raise ConfigError(f"need n >= 10, batch >= 1 and kid_subsets >= 1, got {n}, {batch}, {kid_subsets}")
    for what, value, bound in (("n", n, "samples"), ("batch", batch, "batch"), ("kid_subsets", kid_subsets,
                                                                                   "kid_subsets")):
        check_count(what, value, bound)
    feature_net = resolve_extractor(dataset, extractor, inception_weights)
    shapes = _latent_shapes(generator, latent_dim, latent_shape)
    size = math.prod(shapes[0])
    reference = reference_features(dataset, feature_net, split, n, batch)
    scores = GenerativeScores(feature_net, reference, seed, kid_subsets)
    rng = torch.Generator().manual_seed(seed)
    gen_device, feat_device = _generator_device(generator), module_device(feature_net.module)
    modes = {m: m.training for m in generator.modules()} if isinstance(generator, nn.Module) else {}
    if isinstance(generator, nn.Module):
        generator.eval()
    try:
        with tqdm(total=n, desc=f"evaluate ({feature_net.label})", unit="img", disable=not progress) as bar:
            shape = None
            for start in range(0, n, batch):
                count = min(batch, n - start)
                z = torch.randn(count, size, generator=rng).to(gen_device)
                shape = shape or _first_batch(generator, shapes, z)
                scores.update(_checked_batch(generator(z.reshape(count, *shape)), count).to(feat_device))
                bar.update(count)
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return scores.compute()
