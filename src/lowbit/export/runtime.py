"""Running an IR graph: the graph is planned once (each node given to a backend), then executed in order.

Backends: ``torch`` runs every op exactly as the captured model does; a kernel path ("avx512", "avx2",
"scalar", all from the ``x86`` backend) runs the weight layers fed by two-level activations on the bit-serial
kernels. Nodes whose output nothing reads after planning are dropped, e.g. an activation folded into packing.
A model given a ``native`` handle (liblowbit, ``backends/native.py``) runs the whole graph there instead, on
every path but "torch"; its plan table shows the same claims, as ``native:<path>`` / ``native:float``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.backends import native as native_backend
from lowbit.export.backends import torch as torch_backend
from lowbit.export.backends import x86
from lowbit.export.backends.x86 import build, int8
from lowbit.export.ir import INPUT, Graph, Node, tensor_bytes


@dataclass
class Step:
    """One planned node: the callable, the names it reads, the backend that runs it."""

    node: Node
    run: Callable[..., torch.Tensor]
    inputs: list[str]
    backend: str


def _producers(nodes: list[Node]) -> dict[str, Node]:
    return {node.name: node for node in nodes}


def plan_graph(graph: Graph, kernel_path: str, fuse_norm: bool = True) -> list[Step]:
    """Assign every node to a backend for ``kernel_path`` ("torch" or an x86 kernel path), drop dead nodes;
    ``fuse_norm`` folds a BatchNorm before a kernel layer's activation into its thresholds."""
    producers = _producers(graph.nodes)
    steps = []
    for node in graph.nodes:
        if kernel_path != build.TORCH_PATH and x86.claims(node, producers):
            run, inputs = x86.plan(node, producers, kernel_path, fuse_norm)
            steps.append(Step(node, run, inputs, f"{x86.NAME}:{kernel_path}"))
        elif kernel_path != build.TORCH_PATH and int8.claims_int8(node, producers):
            run, inputs = int8.plan_int8(node, producers, kernel_path)
            steps.append(Step(node, run, inputs, f"{int8.NAME}:{kernel_path}"))
        elif kernel_path != build.TORCH_PATH and x86.claims_latent(node):
            steps.append(Step(node, x86.plan_latent(node), list(node.inputs), f"{x86.NAME}:gemm"))
        else:
            steps.append(Step(node, torch_backend.build(node), list(node.inputs), torch_backend.NAME))
    needed, kept = {graph.output}, []
    for step in reversed(steps):
        if step.node.name in needed:
            kept.append(step)
            needed.update(step.inputs)
    return kept[::-1]


def run_steps(steps: list[Step], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every planned node's output for the graph input ``x`` (the graph's output is among them)."""
    values: dict[str, torch.Tensor] = {INPUT: x}
    with torch.no_grad():
        for step in steps:
            values[step.node.name] = step.run(*(values[name] for name in step.inputs))
    return values


class PackedModel(nn.Module):
    """A model rebuilt from its IR: ``forward`` takes the captured input layout (any shape with the same
    number of values per sample, e.g. z as N x d or N x d x 1 x 1) and returns the captured output."""

    def __init__(
        self, graph: Graph, kernel_path: str | None = None, native: native_backend.NativeModel | None = None
    ) -> None:
        super().__init__()
        self.native = native
        self.graph = graph
        self.architecture: dict[str, Any] = graph.to_json()
        self.latent_dim = graph.latent_dim
        self.input_shape = list(graph.input_shape)
        self.output_shape = list(graph.output_shape)
        self.image_shape = graph.meta.get("image_shape")
        self.kernel_path = build.TORCH_PATH
        self.steps: list[Step] = []
        self.set_kernel_path(kernel_path)
        self.eval()

    def set_kernel_path(self, path: str | None = None) -> str:
        """Re-plan the graph for ``path`` ("auto", "avx512", "avx2", "scalar", "torch"; with a native handle
        also "neon" and "float"); returns the path."""
        path = path or os.environ.get(build.PATH_ENV, "auto")
        if self.native is not None and path != build.TORCH_PATH:
            self.kernel_path = self.native.set_kernel_path(path)
            planned = plan_graph(self.graph, self.kernel_path)
            self.steps = [_native_step(step, self.kernel_path) for step in planned]
            return self.kernel_path
        self.kernel_path = build.resolve_path(path)
        self.steps = plan_graph(self.graph, self.kernel_path)
        return self.kernel_path

    @property
    def runs_native(self) -> bool:
        return self.native is not None and self.kernel_path != build.TORCH_PATH

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        per_sample = math.prod(self.input_shape)
        if x.dim() < 1 or x[0].numel() != per_sample:
            raise ConfigError(
                f"this packed model takes inputs of shape N x {' x '.join(map(str, self.input_shape))} "
                f"({per_sample} values per sample), got {list(x.shape)}"
            )
        return x.reshape(x.shape[0], *self.input_shape).to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_native:
            return torch.from_numpy(self.native.run(self._input(x).detach().numpy()))
        return run_steps(self.steps, self._input(x))[self.graph.output].contiguous()

    def plan_table(self) -> list[dict[str, Any]]:
        """One row per planned node: name, op, module, weight / activation bits, backend, stored bytes."""
        producers = _producers(self.graph.nodes)
        rows = []
        for step in self.steps:
            node = step.node
            weight = node.attrs.get("weight", {})
            source = producers.get(node.inputs[0]) if node.inputs else None
            act_bits = _input_bits(source, producers)
            rows.append(
                {
                    "name": node.name,
                    "op": node.op,
                    "module": node.module,
                    "weight_bits": weight.get("bits", 32) if weight else None,
                    "act_bits": act_bits if node.op in x86.WEIGHT_OPS else None,
                    "backend": step.backend,
                    "bytes": tensor_bytes(node),
                }
            )
        return rows


def _native_step(step: Step, path: str) -> Step:
    """The Python plan's step relabelled with where liblowbit runs it (same claim rule as the x86 backend)."""
    kernels = {
        f"{x86.NAME}:{path}": f"{native_backend.NAME}:{path}",
        f"{int8.NAME}:{path}": f"{native_backend.NAME}-int8:{path}",
    }
    backend = kernels.get(step.backend, "native:float")
    return Step(step.node, step.run, step.inputs, backend)


def _input_bits(source: Node | None, producers: dict[str, Node]) -> int:
    """Bits of the activation feeding a layer: the quantizer's bits through commuting ops, else 32."""
    while source is not None and source.op in ("reshape", "pad"):
        source = producers.get(source.inputs[0])
    return int(source.attrs["bits"]) if source is not None and source.op == "quant_act" else 32
