"""Public API of the packed format: export any converted model, load it back, sample from a generator."""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import CheckpointError, ConfigError
from lowbit.export.backends import native, x86
from lowbit.export.backends.x86 import build
from lowbit.export.format import read_graph, write_graph
from lowbit.export.ir import Graph, capture
from lowbit.export.runtime import PackedModel, plan_graph, run_steps
from lowbit.limits import check_count

#: a pre-activation this close (relative) to a two-level activation's threshold counts as a tie.
TIE_TOLERANCE = 1e-6
#: warn when at least this fraction of an activation's inputs tie: a systematic cause, not the few ties that
#: integer sums normalised per sample (InstanceNorm) always produce.
TIE_FRACTION = 0.01
#: kernels may differ from the simulated model on at most this fraction of outputs (beyond 1e-3 relative).
KERNEL_MISMATCH = 0.02
#: samples used at export to check the torch backend against the simulated model and to count ties.
CHECK_SAMPLES = 16


class ExportWarning(UserWarning):
    """Export succeeded, but the kernel backend may not reproduce the simulated model (reason in the text)."""


def _check_input(graph: Graph) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(CHECK_SAMPLES, *graph.input_shape, generator=generator)


def _tied_activations(graph: Graph, values: dict[str, torch.Tensor]) -> list[tuple[str, float]]:
    """(module, fraction) of coded activations feeding kernel layers whose inputs sit on a threshold.

    There the simulated float32 model's outcome is decided by rounding noise of its accumulation order, while
    the kernels count exactly, so each tie may flip a bit and flips cascade (e.g. a freshly converted binary
    generator: BatchNorm at its initial statistics passes exact zeros of +-1 sums to sign)."""
    producers = {node.name: node for node in graph.nodes}
    claimed = [node for node in graph.nodes if x86.claims(node, producers)]
    acts = {x86.activation_source(node, producers)[0].name for node in claimed}
    tied = []
    for node in graph.nodes:
        if node.name not in acts:
            continue
        pre = values[node.inputs[0]]
        if "shift" in node.tensors:
            pre = pre - node.tensors["shift"].reshape(1, -1, *([1] * (pre.dim() - 2)))
        gap = (pre.unsqueeze(-1) - x86.act_thresholds(node)).abs().amin(dim=-1)
        fraction = float((gap <= TIE_TOLERANCE * max(1.0, float(pre.abs().max()))).float().mean())
        if fraction > 0:
            tied.append((node.module or node.name, fraction))
    return tied


def kernel_mismatch(graph: Graph, expected: torch.Tensor, x: torch.Tensor) -> tuple[str, float, float] | None:
    """(path, fraction of outputs off by > 1e-3 relative, max |diff|) of the fastest kernel path, or None."""
    paths = x86.available()
    producers = {node.name: node for node in graph.nodes}
    if not paths or not any(x86.claims(node, producers) for node in graph.nodes):
        return None
    output = run_steps(plan_graph(graph, paths[0]), x)[graph.output]
    diff = (output.reshape(expected.shape) - expected).abs()
    scale = max(1.0, float(expected.abs().max()))
    return paths[0], float((diff > 1e-3 * scale).float().mean()), float(diff.max())


def _export_checks(graph: Graph, work: nn.Module) -> None:
    """Warn when the torch backend differs from the simulated model, or the kernels differ beyond
    ``KERNEL_MISMATCH`` (docs/export.md), naming the activations whose ties cause it."""
    x = _check_input(graph)
    values = run_steps(plan_graph(graph, build.TORCH_PATH), x)
    with torch.no_grad():
        expected = work(x.reshape(x.shape[0], *graph.input_shape))
    got = values[graph.output].reshape(expected.shape)
    if not torch.equal(got, expected):
        warnings.warn(
            f"the exported graph differs from the model by up to {float((got - expected).abs().max()):.3g} "
            "on the torch backend; please report this model to lowbit",
            ExportWarning,
            stacklevel=3,
        )
    tied = _tied_activations(graph, values)
    measured = kernel_mismatch(graph, expected, x)
    if measured is not None and measured[1] <= KERNEL_MISMATCH:
        return
    if measured is None and not any(fraction >= TIE_FRACTION for _, fraction in tied):
        return
    listing = ", ".join(f"{name} ({100 * fraction:.2f}%)" for name, fraction in tied) or "none found"
    effect = (
        ""
        if measured is None
        else f"on the {measured[0]} kernels {100 * measured[1]:.1f}% of outputs differ "
        f"from the simulated model (max {measured[2]:.3g}). "
    )
    warnings.warn(
        f"{effect}Inputs of binary activations sit exactly on their thresholds: {listing}. The kernels count "
        "these exactly while the simulated float32 model rounds, so tied bits flip and flips cascade. "
        "Typical causes: BatchNorm at its initial statistics (train or calibrate the model before export), "
        "or a layer without bias or norm shift right before the activation (InstanceNorm / GroupNorm "
        "without affine, a bare conv). Load with kernel_path='torch' for bit-exact outputs",
        ExportWarning,
        stacklevel=3,
    )


def export_packed(
    model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor | None = None
) -> Path:
    """Capture ``model`` (any nn.Module, converted by ``lowbit.convert`` or not), write it as a packed file.

    ``example_input`` (batch first) fixes the input layout; without it the model's ``latent_dim``,
    ``input_shape`` or ``image_shape`` does. Quantized layers are stored as bit-packed codes + codebooks, the
    rest as float32. The model itself is not touched (capture runs on a copy).
    """
    graph, work = capture(model, example_input)
    _export_checks(graph, work)
    return write_graph(graph, path)


def _dry_run(model: PackedModel, path: str | os.PathLike) -> None:
    """Run the plan once on one zero sample so that a file whose shapes disagree fails at load, clearly."""
    try:
        model(torch.zeros(1, *model.input_shape))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: the graph does not run ({first[:200]}); the file is damaged, re-export it"
        ) from None


def load(path: str | os.PathLike, kernel_path: str | None = None, backend: str | None = None) -> PackedModel:
    """A packed model ready for inference (no training code, no pickle), in eval mode.

    ``kernel_path`` picks the implementation of binary-input layers: "auto" (default, or
    ``$LOWBIT_KERNEL_PATH``), "avx512", "avx2", "scalar" or "torch" (bit-exact fallback, always available).
    ``backend``: "native" runs the whole graph in liblowbit (``runtime/``, no JIT build), "python" on the
    torch / x86 backends. The default is native when liblowbit is built and ``kernel_path`` is None or
    "auto"; an explicit x86 kernel path keeps the Python x86 backend, "torch" the bit-exact torch one.
    """
    if backend not in (None, "native", "python"):
        raise ConfigError(f"unknown backend '{backend}'; choose native or python")
    model = PackedModel(read_graph(path), build.TORCH_PATH)
    _dry_run(model, path)
    if backend == "native" or (backend is None and kernel_path in (None, "auto") and native.available()):
        model.native = _native_model(path)
    model.set_kernel_path(kernel_path)
    return model


def _native_model(path: str | os.PathLike) -> native.NativeModel | None:
    """liblowbit's model of a file the Python reader accepted; None for files it leaves to Python (v1)."""
    try:
        return native.NativeModel(Path(path).read_bytes(), str(path))
    except native.NativeLoadError as exc:
        if exc.code == native.ERROR_UNSUPPORTED:
            return None
        raise


def set_kernel_path(model: PackedModel, path: str | None = None) -> str:
    """Re-plan ``model`` for ``path``; returns the concrete path."""
    return model.set_kernel_path(path)


def latent_shape(model: nn.Module) -> list[int]:
    """The per-sample latent layout a noise generator takes: [d] or [d, 1, 1]."""
    shape = getattr(model, "input_shape", None)
    latent = getattr(model, "latent_dim", None)
    if shape and (len(shape) == 1 or (len(shape) == 3 and list(shape[1:]) == [1, 1])):
        return list(shape)
    if latent:
        return [int(latent)]
    raise ConfigError(
        f"sampling needs a noise generator (a latent_dim, or an input_shape of [d] or [d, 1, 1]); "
        f"{type(model).__name__} has input_shape {shape}: for an image-to-image generator use "
        "`lowbit generate FILE --input IMAGE` or call the model on images"
    )


def sample(model: nn.Module, n: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """``n`` images from a noise generator (packed or not) for latents z ~ N(0, I) drawn with ``seed``."""
    shape = latent_shape(model)
    check_count("sample count n", n, "samples")
    check_count("batch_size", batch_size, "batch")
    z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))  # on the CPU: same z everywhere
    device = next(itertools.chain(model.parameters(), model.buffers()), z).device
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(chunk.to(device)).cpu() for chunk in z.split(batch_size)])
    finally:
        for module, mode in was_training.items():
            module.train(mode)


def run_images(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """An image-to-image model (packed or not) applied to ``images`` (N x C x H x W) in batches."""
    if images.dim() != 4 or images.shape[0] < 1:
        raise ConfigError(f"expected images as N x C x H x W, got shape {list(images.shape)}")
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in images.split(batch_size)])
