"""Training-step overhead of each lowbit weight quantizer vs FP32, with Brevitas as the peer column.

One DCGAN G + D training step (28x28, batch 64, BCE, the GAN trainer's fused Adam 2e-4) on CPU:
the classic step (one G forward feeds both updates; default) or, with ``--step trainer``, lowbit's
own ``GanTrainer`` step (D's batch generated without a graph, G's update on fresh latents). Weights
of G and D quantized (weight-only QAT, the same setting for Brevitas's QuantConv2d /
QuantConvTranspose2d).
Time is the CPU time of the stepping thread (``time.thread_time``; run with one torch thread),
which other jobs on a shared machine disturb far less than wall time; steps of all variants
are interleaved round by round and the median is reported. Memory is the allocator peak: the
most bytes live in torch's CPU allocator at any moment of one training step, from the profiler's
allocation events, with every tensor tracked from model construction on (what
``torch.cuda.max_memory_allocated`` reports on a GPU). Also reports the full EM fit time per
million weights.
Not a test; run:

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/quantizer_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import lowbit
from lowbit.models import create_model
from lowbit.quant import fit_em
from lowbit.train.gan import GanConfig, GanTrainer, SearchSGD, frozen, network_optimizer, seeded_generator
from lowbit.train.gan_losses import get_loss
from lowbit.train.optim import Optimizers

BATCH = 64
TARGETS = {"minmax": 1.15, "log": 1.15, "tanh": 1.15, "dorefa": 1.15, "bwn": 1.15, "em": 1.2, "lq": 1.4,
           "search-sgt": 1.4, "search-rdhs": 1.8, "search-sgt-centered": 1.4, "search-rdhs-centered": 1.8,
           "search-sgt-centered-sgd": 1.4, "search-rdhs-centered-sgd": 1.8}


@dataclass
class Variant:
    name: str
    bits: int
    build: Callable[[nn.Module], nn.Module]
    generator: nn.Module | None = None
    discriminator: nn.Module | None = None
    g_opt: torch.optim.Optimizer | None = None
    d_opt: torch.optim.Optimizer | None = None
    step: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    search_sgd: SearchSGD | None = None


def lowbit_variant(name: str, method: str, bits: int, opts: dict | None = None,
                   search_sgd: SearchSGD | None = None) -> Variant:
    spec = lowbit.QuantSpec(weight=method, weight_bits=bits, weight_opts=opts or {})
    return Variant(name, bits, lambda model: lowbit.convert(model, spec), search_sgd=search_sgd)


def brevitas_variant(bits: int) -> Variant:
    import brevitas.nn as qnn

    def build(model: nn.Module) -> nn.Module:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                replacement = _brevitas_layer(qnn, child, bits)
                if replacement is not None:
                    setattr(parent, child_name, replacement)
        return model
    return Variant("brevitas", bits, build)


def _brevitas_layer(qnn, layer: nn.Module, bits: int) -> nn.Module | None:
    if type(layer) is nn.Conv2d:
        quant = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                layer.padding, bias=layer.bias is not None, weight_bit_width=bits)
    elif type(layer) is nn.ConvTranspose2d:
        quant = qnn.QuantConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                         layer.stride, layer.padding, layer.output_padding,
                                         bias=layer.bias is not None, weight_bit_width=bits)
    else:
        return None
    quant.load_state_dict(layer.state_dict(), strict=False)
    return quant


def variants(bits: int) -> list[Variant]:
    return [
        Variant("fp32", 32, lambda model: model),
        lowbit_variant("minmax", "minmax", bits),
        lowbit_variant("log", "log", bits),
        lowbit_variant("tanh", "tanh", bits),
        lowbit_variant("dorefa", "dorefa", bits),
        lowbit_variant("bwn", "bwn", 1),
        lowbit_variant("em", "em", bits),
        lowbit_variant("lq", "lq", bits),
        lowbit_variant("kmeans", "kmeans", bits),
        lowbit_variant("search-sgt", "search", bits, {"mode": "sgt"}),
        lowbit_variant("search-rdhs", "search", bits, {"mode": "rdhs"}),
        lowbit_variant("search-sgt-centered", "search", bits, {"mode": "sgt", "logits": "centered"}),
        lowbit_variant("search-rdhs-centered", "search", bits, {"mode": "rdhs", "logits": "centered"}),
        lowbit_variant("search-sgt", "search", 1, {"mode": "sgt"}),
        lowbit_variant("search-rdhs", "search", 1, {"mode": "rdhs"}),
        lowbit_variant("search-sgt-centered", "search", 1, {"mode": "sgt", "logits": "centered"}),
        lowbit_variant("search-sgt-centered-sgd", "search", bits, {"mode": "sgt", "logits": "centered"},
                       SearchSGD()),
        lowbit_variant("search-rdhs-centered-sgd", "search", bits, {"mode": "rdhs", "logits": "centered"},
                       SearchSGD()),
        lowbit_variant("search-sgt-centered-sgd", "search", 1, {"mode": "sgt", "logits": "centered"},
                       SearchSGD()),
        lowbit_variant("search-rdhs-centered-sgd", "search", 1, {"mode": "rdhs", "logits": "centered"},
                       SearchSGD()),
        lowbit_variant("search-rdhs-expand", "search", bits, {"mode": "rdhs", "form": "expand"}),
        brevitas_variant(bits),
    ]


def prepare(variant: Variant, seed: int, kind: str = "classic") -> None:
    """Build the variant's G and D and its step: ``classic`` (:func:`classic_step`) or ``trainer``
    (lowbit's own ``GanTrainer.d_step`` + ``g_step``)."""
    torch.manual_seed(seed)
    generator = create_model("dcgan-g-28")
    discriminator = create_model("dcgan-d-28")
    if variant.name == "search-rdhs-expand":  # the expanded conv exists for Conv2d only: G keeps form kernel
        spec = lowbit.QuantSpec(weight="search", weight_bits=variant.bits)
        variant.generator = lowbit.convert(generator, spec)
    else:
        variant.generator = variant.build(generator)
    variant.discriminator = variant.build(discriminator)
    if kind == "trainer":
        trainer = GanTrainer(GanConfig(search_sgd=variant.search_sgd), variant.generator,
                             variant.discriminator, torch.device("cpu"))
        variant.step = lambda real, noise: trainer_step(trainer, real)
    else:
        variant.g_opt = gan_optimizer(variant.generator, variant.search_sgd)
        variant.d_opt = gan_optimizer(variant.discriminator, variant.search_sgd)
        variant.step = lambda real, noise: classic_step(variant, real, noise)


def gan_optimizer(model: nn.Module, search_sgd: SearchSGD | None) -> torch.optim.Optimizer | Optimizers:
    """The GAN trainer's optimiser (Adam 2e-4, betas 0.5/0.999, fused; search logits on SGD with
    ``search_sgd``)."""
    return network_optimizer(get_loss("dcgan"), model, 2e-4, (0.5, 0.999), search_sgd)


def trainer_step(trainer: GanTrainer, real: torch.Tensor) -> None:
    """lowbit's GAN trainer step: D on real + a batch generated without a graph, then G on fresh
    latents through a frozen D (two G forwards per step)."""
    trainer.d_step(real, seeded_generator(1))
    trainer.g_step(len(real), seeded_generator(2))


def classic_step(variant: Variant, real: torch.Tensor, noise: torch.Tensor) -> None:
    """The classic DCGAN step (the PyTorch DCGAN example's order): one G forward feeds D's update
    (detached) and G's update, so G's graph stays alive through D's step; G's update runs through a
    frozen D and gradients are freed after each optimiser step, as in the trainer."""
    generator, discriminator = variant.generator, variant.discriminator
    ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
    fake = generator(noise)
    d_loss = (F.binary_cross_entropy_with_logits(discriminator(real).reshape(-1), ones)
              + F.binary_cross_entropy_with_logits(discriminator(fake.detach()).reshape(-1), zeros))
    d_loss.backward()
    variant.d_opt.step()
    variant.d_opt.zero_grad(set_to_none=True)
    with frozen(discriminator):
        F.binary_cross_entropy_with_logits(discriminator(fake).reshape(-1), ones).backward()
    variant.g_opt.step()
    variant.g_opt.zero_grad(set_to_none=True)


def allocator_peak(variant: Variant, real: torch.Tensor, noise: torch.Tensor, kind: str,
                   warmup: int = 2) -> int:
    """The most bytes live in the CPU allocator during one training step, counting every tensor
    allocated since the models were built (the variant is re-prepared under the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prepare(variant, seed=0, kind=kind)
        for _ in range(warmup):  # Adam's moments exist from the first step on
            variant.step(real, noise)
        with record_function("measured_step"):
            variant.step(real, noise)
    events = prof.profiler.kineto_results.events()
    step = next(e for e in events if e.name() == "measured_step")
    allocations = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"),
                         key=lambda event: event[0])  # stable: same-time events keep their order
    if not allocations:
        raise RuntimeError("the profiler recorded no allocation events: this torch cannot measure the peak")
    live = peak = 0
    for start_ns, nbytes in allocations:
        live += nbytes
        if step.start_ns() <= start_ns <= step.end_ns():
            peak = max(peak, live)
    return peak


def em_fit_seconds_per_million(bits: int, per_channel: bool) -> float:
    weights = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0)) * 0.02
    start = time.thread_time()
    fit_em(weights, bits, channel_dim=0 if per_channel else None)
    return (time.thread_time() - start) / (weights.numel() / 1e6)


def run(bits: int, rounds: int, warmup: int, kind: str) -> dict:
    real = torch.rand(BATCH, 1, 28, 28) * 2 - 1
    noise = torch.randn(BATCH, create_model("dcgan-g-28").latent_dim)
    chosen = variants(bits)
    for variant in chosen:
        prepare(variant, seed=0, kind=kind)
        for _ in range(warmup):
            variant.step(real, noise)
    times: list[list[float]] = [[] for _ in chosen]
    for _ in range(rounds):
        for variant, spent in zip(chosen, times, strict=True):
            start = time.thread_time()
            variant.step(real, noise)
            spent.append(time.thread_time() - start)
    step = [statistics.median(spent) for spent in times]
    peak = [allocator_peak(v, real, noise, kind) for v in chosen]
    rows = [{"method": v.name, "bits": v.bits, "step_ms": 1e3 * step[i], "time_ratio": step[i] / step[0],
             "peak_mb": peak[i] / 2**20, "peak_ratio": peak[i] / peak[0],
             "target_time": TARGETS.get(v.name)} for i, v in enumerate(chosen)]
    em_fit = {f"{'per-channel' if pc else 'per-tensor'} {k}-bit": em_fit_seconds_per_million(k, pc)
              for pc in (False, True) for k in (2, 4)}
    return {"rows": rows, "em_fit_s_per_million": em_fit, "threads": torch.get_num_threads(),
            "rounds": rounds, "step": kind}


def markdown(result: dict) -> str:
    lines = ["| method | weight bits | step (ms) | time / FP32 | target | peak memory (MB) | memory / FP32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        target = f"<= {row['target_time']}x" if row["target_time"] else ""
        lines.append(f"| {row['method']} | {row['bits']} | {row['step_ms']:.1f} | {row['time_ratio']:.3f} | "
                     f"{target} | {row['peak_mb']:.2f} | {row['peak_ratio']:.3f} |")
    lines += ["", "| EM full fit | seconds per million weights |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in result["em_fit_s_per_million"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2, help="weight bits (bwn is always 1)")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step", choices=("classic", "trainer"), default="classic",
                        help="classic DCGAN step (one G forward for both updates) or lowbit's trainer step")
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.bits, args.rounds, args.warmup, args.step)
    print(markdown(result))
    print(f"\nthreads={result['threads']} rounds={result['rounds']} batch={BATCH} step={result['step']}")
    if args.json:
        lowbit.io.atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
