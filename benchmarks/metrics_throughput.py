"""Throughput of the FID/IS/KID pipeline on CPU.

Measures (1) images/s of feature extraction (features + logits, one forward) for the domain
extractors and, with --inception, the FID Inception-v3 (random weights: speed does not depend on
them), and (2) the wall time of ``lowbit.metrics.evaluate`` for --n samples of a DCGAN generator
on MNIST, with the real reference features computed (cold) and read from the cache (warm).
Uses the shipped extractors when present, else the same architectures untrained (say so).
``--sanity`` instead prints the issue-4 sanity table on real MNIST (test split, noise, noised,
single class) against n train images.

    .venv/bin/python benchmarks/metrics_throughput.py --n 10000 --threads 2 --inception
    .venv/bin/python benchmarks/metrics_throughput.py --sanity --n 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from lowbit.data import load
from lowbit.metrics import evaluate, extractor_from_module, reference_features, score_images
from lowbit.metrics.extractors import Extractor, domain_extractor
from lowbit.metrics.inception import FIDInceptionV3
from lowbit.models import create_model
from lowbit.models.extractor import available_extractors

SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}
ARCHITECTURES = {"mnist": "extractor-28", "digits": "extractor-8"}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extractor_for(dataset: str) -> tuple[Extractor, bool]:
    """The shipped extractor of ``dataset`` (True) or its untrained architecture (False)."""
    if dataset in available_extractors():
        return domain_extractor(dataset), True
    torch.manual_seed(0)
    module = create_model(ARCHITECTURES[dataset])
    return extractor_from_module(module, f"{ARCHITECTURES[dataset]}-untrained", SHAPES[dataset]), False


@torch.no_grad()
def images_per_second(
    module: torch.nn.Module, shape: tuple[int, ...], count: int, batch: int, repeats: int = 3
) -> float:
    """Best of ``repeats`` rates, in images/s, of features + logits (the per-image work of FID/KID/IS)."""
    images = torch.rand(batch, *shape) * 2 - 1
    module.eval()
    module.features(images[:2])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(0, count, batch):
            module.head(module.features(images))
        rates.append(-(-count // batch) * batch / (time.perf_counter() - start))
    return max(rates)


def time_evaluate(n: int, batch: int, extractor: Extractor) -> dict[str, float]:
    """Seconds for evaluate() of n DCGAN samples on MNIST, cold (reference computed) and warm (cached)."""
    generator = create_model("dcgan-g-28")
    timings = {}
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("LOWBIT_CACHE")
        datasets = os.path.join(previous or os.path.expanduser("~/.cache/lowbit"), "datasets")
        os.environ["LOWBIT_CACHE"] = cache
        os.symlink(datasets, os.path.join(cache, "datasets"))
        try:
            for label in ("cold", "warm"):
                start = time.perf_counter()
                scores = evaluate(generator, "mnist", n=n, batch=batch, extractor=extractor)
                timings[f"evaluate_{label}_s"] = time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("LOWBIT_CACHE")
            else:
                os.environ["LOWBIT_CACHE"] = previous
    timings["fid_of_untrained_generator"] = scores["fid"]
    return timings


def sanity_table(n: int, batch: int) -> list[dict[str, object]]:
    """FID/IS/KID of real MNIST test images, noise, noised and single-class images vs n train images."""
    extractor = domain_extractor("mnist")
    reference = reference_features("mnist", extractor, "train", n=n, batch=batch)
    test, labels = load("mnist", "test", limit=n)
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0))
    cases = {"test split": test, "uniform noise": torch.rand(test.shape) * 2 - 1}
    cases.update({f"test + N(0, {sigma}^2)": test + sigma * noise for sigma in (0.1, 0.2, 0.4, 0.8)})
    cases["single class (digit 1)"] = test[labels == 1]
    rows = []
    for name, images in cases.items():
        scores = score_images(images, extractor, reference, batch=batch)
        rows.append({"images": name, **scores})
        print(
            f"{name:<26}FID {scores['fid']:>9.3f}  IS {scores['is']:.3f} ± {scores['is_std']:.3f}  "
            f"KID {scores['kid']:.4g}  n={scores['n']}  ({scores['extractor']})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples for the evaluate() timing")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inception", action="store_true", help="also time Inception-v3 (slow on CPU)")
    parser.add_argument(
        "--sanity", action="store_true", help="only print the MNIST sanity table (needs the extractor)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}, torch threads: {args.threads}, torch {torch.__version__}")
    results: dict[str, object] = {"cpu": cpu_model(), "threads": args.threads}
    if args.sanity:
        print(json.dumps(sanity_table(args.n, args.batch), indent=1))
        return
    rates = {}
    for dataset in ("mnist", "digits"):
        extractor, shipped = extractor_for(dataset)
        rates[extractor.label] = images_per_second(
            extractor.module, SHAPES[dataset], 4 * args.batch, args.batch
        )
        results[f"card_{dataset}"] = (
            extractor.card if shipped else "not shipped: untrained architecture timed"
        )
    if args.inception:
        rates["inception-v3-fid (random weights)"] = images_per_second(
            FIDInceptionV3(), SHAPES["mnist"], 32, 16, repeats=1
        )
    baseline = next(iter(rates.values()))
    print(f"{'extractor':<42}{'images/s':>12}{'vs first':>10}")
    for name, rate in rates.items():
        print(f"{name:<42}{rate:>12.0f}{rate / baseline:>9.2f}x")
    mnist_extractor, _ = extractor_for("mnist")
    timings = time_evaluate(args.n, args.batch, mnist_extractor)
    print(
        f"evaluate(dcgan-g-28, mnist, n={args.n}): cold {timings['evaluate_cold_s']:.1f} s "
        f"(reference computed), warm {timings['evaluate_warm_s']:.1f} s (reference cached), "
        f"ratio {timings['evaluate_cold_s'] / timings['evaluate_warm_s']:.2f}x"
    )
    results.update(images_per_second=rates, n=args.n, **timings)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
