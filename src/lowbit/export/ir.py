"""The lowbit IR: a converted model's ``forward`` captured with torch.fx as nodes plus named tensors.

A node is ``{"name", "op", "inputs", "attrs", "module"}``: ``inputs`` name the graph input or earlier nodes,
``attrs`` is JSON, and the node's tensors are stored as ``"{name}.{field}"``. Shapes are per sample (the
batch dimension is free), recorded by running the captured graph on the example input at two batch sizes.
``capture`` never changes the user's model: it works on a deep copy. docs/export.md lists the ops.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import CheckpointError, ConfigError
from lowbit.export.pack import pack_codes
from lowbit.nn.inputs import default_example

IR_VERSION = 2
INPUT = "input"
#: codes wider than this would not be smaller than float32; quantizers stop at 8 bits anyway.
MAX_PACKED_BITS = 8


class ExportError(CheckpointError):
    """A model cannot be captured or exported; the message names the op, node, module and the fix."""


@dataclass
class Node:
    """One IR operation: ``op`` applied to ``inputs`` (node names) with JSON ``attrs`` and named tensors."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    module: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": self.inputs,
            "attrs": _jsonable(self.attrs),
            "module": self.module,
        }


@dataclass
class Graph:
    """A captured model: nodes in execution order, the input's and output's per-sample shapes, metadata."""

    nodes: list[Node]
    output: str
    input_shape: list[int]
    output_shape: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_dim(self) -> int | None:
        """The latent size of a noise generator: an input of shape [d] or [d, 1, 1]."""
        shape = self.input_shape
        return shape[0] if len(shape) == 1 or (len(shape) == 3 and shape[1:] == [1, 1]) else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{node.name}.{key}": value.detach().cpu().contiguous()
            for node in self.nodes
            for key, value in node.tensors.items()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "ir_version": IR_VERSION,
            "nodes": [node.to_json() for node in self.nodes],
            "output": self.output,
            "input_shape": self.input_shape,
            "output_shape": self.output_shape,
            "latent_dim": self.latent_dim,
            **_jsonable(self.meta),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list, torch.Size)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return value


def _pair(value: Any) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


# ----- weight layers -----


def _conv_padding(module: nn.Module) -> dict[str, Any]:
    """Explicit padding: symmetric zero padding stays in the conv; 'same', reflect, replicate and circular
    become a pad [left, right, top, bottom] with its mode, applied before a conv with padding 0."""
    kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
    if module.padding == "valid":
        sides = [0, 0, 0, 0]
    elif module.padding == "same":
        total_h, total_w = (d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
        sides = [total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2]
    else:
        ph, pw = _pair(module.padding)
        sides = [pw, pw, ph, ph]
    mode = getattr(module, "padding_mode", "zeros")
    if mode == "zeros" and sides[0] == sides[1] and sides[2] == sides[3] and module.padding != "same":
        return {"padding": [sides[2], sides[0]]}
    if mode == "circular":
        raise ExportError(
            f"{type(module).__name__} with padding_mode='circular' is not supported; "
            "use zeros, reflect or replicate padding"
        )
    return {"padding": [0, 0], "pad": sides, "pad_mode": "constant" if mode == "zeros" else mode}


def _weight_attrs(module: nn.Module, kind: str) -> dict[str, Any]:
    if kind == "linear":
        return {"in_features": module.in_features, "out_features": module.out_features}
    attrs = {
        "stride": _pair(module.stride),
        "dilation": _pair(module.dilation),
        "groups": module.groups,
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": _pair(module.kernel_size),
    }
    if kind == "conv_transpose2d":
        return {**attrs, "padding": _pair(module.padding), "output_padding": _pair(module.output_padding)}
    return {**attrs, **_conv_padding(module)}


def _affine_codebook(scale: torch.Tensor, offset: torch.Tensor, levels: int) -> torch.Tensor:
    """``scale[r] * z + offset[r]`` for z in 0..levels-1, one row per channel."""
    return scale[:, None] * torch.arange(levels, dtype=torch.float32) + offset[:, None]


def _affine_parts(frozen: Any) -> torch.Tensor | None:
    """(2, rows) scale/offset when they rebuild the codebook bit for bit, else None (stored as a table)."""
    if frozen.scale is None or frozen.offset is None:
        return None
    scale = frozen.scale.detach().to(torch.float32).reshape(-1)
    offset = frozen.offset.detach().to(torch.float32).reshape(-1)
    rebuilt = _affine_codebook(scale, offset, frozen.codebook.shape[1])
    return torch.stack([scale, offset]) if torch.equal(rebuilt, frozen.codebook.to(torch.float32)) else None


def _packed_weight(frozen: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``weight`` attrs and tensors of a quantized layer: bit-packed codes + affine rows or a table."""
    attrs = {
        "format": "packed",
        "method": frozen.method,
        "bits": int(frozen.bits),
        "shape": list(frozen.codes.shape),
        "channel_dim": int(frozen.channel_dim),
        "levels": int(frozen.codebook.shape[1]),
    }
    if frozen.mask is None or bool(frozen.mask.all()):
        tensors = {"codes": pack_codes(frozen.codes, int(frozen.bits))}
    else:  # pruned: a 1-bit keep map plus the kept codes only, so the file shrinks with the sparsity
        keep = frozen.mask.reshape(-1) != 0
        attrs["sparse"] = True
        tensors = {
            "mask": pack_codes(keep.to(torch.uint8), 1),
            "codes": pack_codes(frozen.codes.reshape(-1)[keep], int(frozen.bits)),
        }
    affine = _affine_parts(frozen)
    if affine is None:
        attrs["codebook"] = "table"
        tensors["codebook"] = frozen.codebook.detach().to(torch.float32)
    else:
        attrs["codebook"] = "affine"
        tensors["affine"] = affine
    return attrs, tensors


def _weight_layer(kind: str) -> Callable[[nn.Module, Any], tuple[str, dict, dict]]:
    def translate(module: nn.Module, frozen: Any) -> tuple[str, dict, dict]:
        attrs = _weight_attrs(module, kind)
        if frozen is None:
            weight_attrs, tensors = {"format": "float"}, {"weight": module.weight.detach()}
        else:
            weight_attrs, tensors = _packed_weight(frozen)
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return kind, {**attrs, "weight": weight_attrs, "bias": module.bias is not None}, tensors

    return translate


# ----- normalisation, activations, shape ops given as modules -----


def _norm_tensors(module: nn.Module, stats: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    if getattr(module, "weight", None) is not None:
        tensors["weight"] = module.weight.detach()
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = module.bias.detach()
    if stats:
        tensors["running_mean"], tensors["running_var"] = module.running_mean, module.running_var
    return tensors


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, frozen: Any) -> tuple[str, dict, dict]:
    if not module.track_running_stats or module.running_mean is None:
        raise ExportError(
            f"{type(module).__name__} without running statistics normalises with the batch's own "
            "statistics, so its output depends on the batch; train it with track_running_stats=True"
        )
    return "batch_norm", {"eps": module.eps}, _norm_tensors(module, stats=True)


def _instance_norm(module: nn.modules.instancenorm._InstanceNorm, frozen: Any) -> tuple[str, dict, dict]:
    stats = bool(module.track_running_stats and module.running_mean is not None)
    return "instance_norm", {"eps": module.eps, "running_stats": stats}, _norm_tensors(module, stats)


def _quant_act(module: nn.Module, frozen: Any) -> tuple[str, dict, dict]:
    tensors = {"levels": frozen.levels.detach().to(torch.float32).reshape(-1)}
    shift = getattr(frozen, "shift", None)
    if shift is not None:
        tensors["shift"] = shift.detach().to(torch.float32).reshape(-1)
    return "quant_act", {"method": frozen.method, "bits": int(frozen.bits)}, tensors


def _simple(
    op: str, **attrs: Callable[[nn.Module], Any]
) -> Callable[[nn.Module, Any], tuple[str, dict, dict]]:
    return lambda module, frozen: (op, {key: get(module) for key, get in attrs.items()}, {})


def _pad_module(mode: str) -> Callable[[nn.Module, Any], tuple[str, dict, dict]]:
    def translate(module: nn.Module, frozen: Any) -> tuple[str, dict, dict]:
        pad = [int(p) for p in module.padding]
        return "pad", {"pad": pad, "mode": mode, "value": float(getattr(module, "value", 0.0))}, {}

    return translate


def _upsample(module: nn.Upsample, frozen: Any) -> tuple[str, dict, dict]:
    return (
        "interpolate",
        _interp_attrs(
            module.size, module.scale_factor, module.mode, module.align_corners, module.recompute_scale_factor
        ),
        {},
    )


def _interp_attrs(size: Any, scale: Any, mode: str, align_corners: Any, recompute: Any) -> dict[str, Any]:
    if mode not in ("nearest", "bilinear"):
        raise ExportError(f"interpolation mode '{mode}' is not supported; use 'nearest' or 'bilinear'")
    return {
        "size": size,
        "scale_factor": scale,
        "mode": mode,
        "align_corners": align_corners,
        "recompute_scale_factor": recompute,
    }


def _identity(module: nn.Module, frozen: Any) -> tuple[str, dict, dict]:
    return "identity", {}, {}


def _register_module_translators() -> dict[type, Callable[[nn.Module, Any], tuple[str, dict, dict]]]:
    from lowbit.nn.layers import QuantAct, QuantConv2d, QuantConvTranspose2d, QuantLinear
    from lowbit.nn.rprelu import RPReLU

    weight = {
        nn.Conv2d: "conv2d",
        nn.ConvTranspose2d: "conv_transpose2d",
        nn.Linear: "linear",
        QuantConv2d: "conv2d",
        QuantConvTranspose2d: "conv_transpose2d",
        QuantLinear: "linear",
    }
    table: dict[type, Callable[[nn.Module, Any], tuple[str, dict, dict]]] = {
        cls: _weight_layer(kind) for cls, kind in weight.items()
    }
    table.update(
        {
            nn.BatchNorm1d: _batch_norm,
            nn.BatchNorm2d: _batch_norm,
            nn.InstanceNorm1d: _instance_norm,
            nn.InstanceNorm2d: _instance_norm,
            nn.LayerNorm: lambda m, f: (
                "layer_norm",
                {"shape": list(m.normalized_shape), "eps": m.eps},
                _norm_tensors(m, stats=False),
            ),
            nn.GroupNorm: lambda m, f: (
                "group_norm",
                {"groups": m.num_groups, "eps": m.eps},
                _norm_tensors(m, stats=False),
            ),
            QuantAct: _quant_act,
            RPReLU: lambda m, f: (
                "rprelu",
                {},
                {
                    "shift_in": m.shift_in.detach(),
                    "slope": m.slope.detach(),
                    "shift_out": m.shift_out.detach(),
                },
            ),
            nn.ReLU: _simple("relu"),
            nn.Tanh: _simple("tanh"),
            nn.Sigmoid: _simple("sigmoid"),
            nn.SiLU: _simple("silu"),
            nn.LeakyReLU: _simple("leaky_relu", negative_slope=lambda m: m.negative_slope),
            nn.ELU: _simple("elu", alpha=lambda m: m.alpha),
            nn.GELU: _simple("gelu", approximate=lambda m: m.approximate),
            nn.Hardtanh: _simple("hardtanh", min_val=lambda m: m.min_val, max_val=lambda m: m.max_val),
            nn.PReLU: lambda m, f: ("prelu", {}, {"weight": m.weight.detach()}),
            nn.Identity: _identity,
            nn.Dropout: _identity,
            nn.Dropout1d: _identity,
            nn.Dropout2d: _identity,
            nn.AlphaDropout: _identity,
            nn.ZeroPad2d: _pad_module("constant"),
            nn.ConstantPad2d: _pad_module("constant"),
            nn.ReflectionPad2d: _pad_module("reflect"),
            nn.ReplicationPad2d: _pad_module("replicate"),
            nn.Upsample: _upsample,
            nn.PixelShuffle: _simple("pixel_shuffle", factor=lambda m: m.upscale_factor),
            nn.Flatten: _simple("reshape"),
            nn.Unflatten: _simple("reshape"),
        }
    )
    table[nn.ReLU6] = _simple("hardtanh", min_val=lambda m: 0.0, max_val=lambda m: 6.0)
    return table


_MODULE_TRANSLATORS: dict[type, Callable[[nn.Module, Any], tuple[str, dict, dict]]] = {}


def module_translators() -> dict[type, Callable[[nn.Module, Any], tuple[str, dict, dict]]]:
    """Module type -> translator(module, frozen entry or None) -> (op, attrs, tensors); built on first use."""
    if not _MODULE_TRANSLATORS:
        _MODULE_TRANSLATORS.update(_register_module_translators())
    return _MODULE_TRANSLATORS


# ----- functions and tensor methods seen in forward -----

ELEMENTWISE = {
    operator.add: "add",
    torch.add: "add",
    "add": "add",
    operator.iadd: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    "sub": "sub",
    operator.isub: "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    "mul": "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    "div": "div",
}
ACTIVATIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    "relu": "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    "tanh": "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    "sigmoid": "sigmoid",
    F.silu: "silu",
    F.gelu: "gelu",
    F.elu: "elu",
    F.leaky_relu: "leaky_relu",
    F.hardtanh: "hardtanh",
    F.relu6: "relu6",
}
RESHAPES = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
}
IDENTITIES = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, "contiguous", "clone", "detach"}
SHAPE_QUERIES = {"size", "dim"}
SUPPORTED_FUNCTIONS = (
    "torch.cat / concat, + - * / (tensors or constants), mean, F.pad, F.interpolate, "
    "F.pixel_shuffle, view / reshape / flatten / unflatten / squeeze / unsqueeze / permute / "
    "transpose, relu / leaky_relu / elu / silu / gelu / tanh / sigmoid / hardtanh / relu6, "
    "dropout (no-op)"
)


def _act_attrs(target: Any, args: tuple, kwargs: dict) -> tuple[str, dict[str, Any]]:
    op = ACTIVATIONS[target]
    if op == "leaky_relu":
        return op, {"negative_slope": float(_arg(args, kwargs, 1, "negative_slope", 0.01))}
    if op == "elu":
        return op, {"alpha": float(_arg(args, kwargs, 1, "alpha", 1.0))}
    if op == "gelu":
        return op, {"approximate": _arg(args, kwargs, 1, "approximate", "none")}
    if op == "hardtanh":
        return op, {
            "min_val": float(_arg(args, kwargs, 1, "min_val", -1.0)),
            "max_val": float(_arg(args, kwargs, 2, "max_val", 1.0)),
        }
    if op == "relu6":
        return "hardtanh", {"min_val": 0.0, "max_val": 6.0}
    return op, {}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class _Tracer(fx.Tracer):
    """Keeps every module lowbit can translate (and every other built-in torch module) as one leaf, traces
    through user modules, and remembers the module path being traced for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if type(module) in module_translators():
            return True
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return type(module).__module__.startswith("torch.nn") and not list(module.children())

    def call_module(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self.path.append(self.path_of_module(module))
        try:
            return super().call_module(module, forward, args, kwargs)
        finally:
            self.path.pop()


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps every node's value (shapes, constants, shape queries)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        self.values[node.name] = value
        return value


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; all become one clear error
        where = tracer.path[-1] if tracer.path and tracer.path[-1] else "the top-level model"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"cannot capture {type(model).__name__}.forward with torch.fx (in {where}: {first}); "
            "make forward "
            "free of Python control flow on tensor values (if/for on tensors, .item(), numpy) or export the "
            "sub-module that has a static graph"
        ) from None
    return fx.GraphModule(model, graph)


def _per_sample(value: Any, batch: int, node: fx.Node) -> list[int]:
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        raise ExportError(
            f"node '{node.name}' ({node.format_node()}) does not keep the batch as its first "
            "dimension, so it cannot run at another batch size; reshape with x.size(0) or -1 in "
            "the batch position only"
        )
    return list(value.shape[1:])


class _Capture:
    """Translates one traced graph into IR nodes, with the values recorded at two batch sizes."""

    def __init__(self, gm: fx.GraphModule, frozen: dict[str, Any], values: dict, batch: int) -> None:
        self.gm, self.frozen, self.values, self.batch = gm, frozen, values, batch
        self.modules = dict(gm.named_modules())
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.shape_only: set[str] = set()

    def run(self) -> str:
        output = INPUT
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                output = self._ref(node.args[0], node)
            elif node.op == "get_attr":
                self._constant(node)
            elif node.op == "call_module":
                self._module(node)
            else:
                self._function(node)
        return output

    # ----- helpers -----
    def _placeholder(self, node: fx.Node) -> None:
        if self.alias:
            raise ExportError(
                f"forward takes more than one input ('{node.name}'); export captures models with "
                "one tensor input (the latent or the image)"
            )
        self.alias[node.name] = INPUT

    def _ref(self, arg: Any, user: fx.Node) -> str:
        if not isinstance(arg, fx.Node):
            raise ExportError(
                f"node '{user.name}' ({user.format_node()}) returns or uses {type(arg).__name__}, "
                "not one tensor; forward must return a single tensor"
            )
        if arg.name in self.shape_only:
            raise ExportError(
                f"node '{user.name}' ({user.format_node()}) computes with a tensor's shape; only "
                "reshapes may use x.size()/x.shape"
            )
        return self.alias[arg.name]

    def _add(
        self,
        node: fx.Node,
        op: str,
        inputs: list[str],
        attrs: dict | None = None,
        tensors: dict | None = None,
        module: str = "",
    ) -> None:
        if op == "identity":
            self.alias[node.name] = inputs[0]
            return
        self.nodes.append(Node(node.name, op, inputs, attrs or {}, tensors or {}, module))
        self.alias[node.name] = node.name

    def _unsupported(self, node: fx.Node, what: str, module: str = "") -> ExportError:
        where = f" in module '{module}'" if module else ""
        return ExportError(
            f"{what} (node '{node.name}'{where}) cannot be exported; supported: "
            f"{supported_summary()}. Replace it with a supported op, or keep it outside the "
            "exported model"
        )

    def _constant(self, node: fx.Node) -> None:
        value = self.values[node.name]
        if not isinstance(value, torch.Tensor):
            raise self._unsupported(node, f"attribute '{node.target}' of type {type(value).__name__}")
        self._add(node, "constant", [], {"shape": list(value.shape)}, {"value": value.detach()})

    def _module(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        translate = module_translators().get(type(module))
        if translate is None:
            raise self._unsupported(node, f"module {type(module).__name__}", node.target)
        x = self._ref(node.args[0], node)
        try:
            op, attrs, tensors = translate(module, self.frozen.get(node.target))
        except ExportError as exc:
            raise ExportError(f"module '{node.target}': {exc}") from None
        if op == "reshape":
            attrs = {"shape": _per_sample(self.values[node.name], self.batch, node)}
        self._add(node, op, [x], attrs, tensors, node.target)

    def _function(self, node: fx.Node) -> None:
        target, args, kwargs = node.target, node.args, node.kwargs
        value = self.values[node.name]
        if not isinstance(value, torch.Tensor) and (
            target in SHAPE_QUERIES or target == "shape" or target in (operator.getitem, getattr)
        ):
            self.shape_only.add(node.name)
            return
        if target in IDENTITIES:
            self._add(node, "identity", [self._ref(args[0], node)])
        elif target in RESHAPES:
            self._add(
                node, "reshape", [self._ref(args[0], node)], {"shape": _per_sample(value, self.batch, node)}
            )
        elif target in ("permute", torch.permute, "transpose", torch.transpose):
            self._permute(node)
        elif target in ELEMENTWISE:
            self._elementwise(node, ELEMENTWISE[target])
        elif target in ACTIVATIONS:
            op, attrs = _act_attrs(target, args, kwargs)
            self._add(node, op, [self._ref(args[0], node)], attrs)
        elif target in (torch.cat, torch.concat, torch.concatenate):
            self._cat(node)
        elif target in (torch.mean, "mean"):
            self._mean(node)
        elif target is F.pad:
            pad = [int(p) for p in _arg(args, kwargs, 1, "pad", ())]
            mode = _arg(args, kwargs, 2, "mode", "constant")
            value_attr = _arg(args, kwargs, 3, "value", None)
            self._add(
                node,
                "pad",
                [self._ref(args[0], node)],
                {"pad": pad, "mode": mode, "value": 0.0 if value_attr is None else float(value_attr)},
            )
        elif target is F.interpolate:
            attrs = _interp_attrs(
                _arg(args, kwargs, 1, "size", None),
                _arg(args, kwargs, 2, "scale_factor", None),
                _arg(args, kwargs, 3, "mode", "nearest"),
                _arg(args, kwargs, 4, "align_corners", None),
                _arg(args, kwargs, 5, "recompute_scale_factor", None),
            )
            self._add(node, "interpolate", [self._ref(args[0], node)], attrs)
        elif target in (F.pixel_shuffle, torch.pixel_shuffle):
            self._add(
                node,
                "pixel_shuffle",
                [self._ref(args[0], node)],
                {"factor": int(_arg(args, kwargs, 1, "upscale_factor", 1))},
            )
        else:
            name = getattr(target, "__name__", str(target))
            raise self._unsupported(node, f"function or method '{name}'")

    def _permute(self, node: fx.Node) -> None:
        rank = self.values[node.name].dim()
        if node.target in ("transpose", torch.transpose):
            a, b = (int(d) % rank for d in node.args[1:3])
            dims = list(range(rank))
            dims[a], dims[b] = dims[b], dims[a]
        else:
            raw = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
            dims = [int(d) % rank for d in raw]
        if dims[0] != 0:
            raise self._unsupported(node, "a permute that moves the batch dimension")
        self._add(node, "permute", [self._ref(node.args[0], node)], {"dims": dims})

    def _elementwise(self, node: fx.Node, op: str) -> None:
        a, b = node.args[0], node.args[1]
        if "alpha" in node.kwargs:
            raise self._unsupported(node, f"{op} with alpha")
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            self._add(node, op, [self._ref(a, node), self._ref(b, node)])
            return
        tensor, scalar = (a, b) if isinstance(a, fx.Node) else (b, a)
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            raise self._unsupported(node, f"{op} with a {type(scalar).__name__} operand")
        self._add(
            node,
            op,
            [self._ref(tensor, node)],
            {"scalar": float(scalar), "scalar_first": not isinstance(a, fx.Node)},
        )

    def _cat(self, node: fx.Node) -> None:
        parts = node.args[0]
        rank = self.values[node.name].dim()
        dim = int(_arg(node.args, node.kwargs, 1, "dim", 0)) % rank
        if dim == 0:
            raise self._unsupported(node, "concatenation along the batch dimension")
        self._add(node, "cat", [self._ref(part, node) for part in parts], {"dim": dim})

    def _mean(self, node: fx.Node) -> None:
        rank = node.args[0] and self.values[node.args[0].name].dim()
        dims = _arg(node.args, node.kwargs, 1, "dim", None)
        if dims is None:
            raise self._unsupported(node, "a mean over every dimension (the batch included)")
        dims = [int(d) % rank for d in ([dims] if isinstance(dims, int) else dims)]
        if 0 in dims:
            raise self._unsupported(node, "a mean over the batch dimension")
        keepdim = bool(_arg(node.args, node.kwargs, 2, "keepdim", False))
        self._add(node, "mean", [self._ref(node.args[0], node)], {"dims": dims, "keepdim": keepdim})


def _record(gm: fx.GraphModule, example: torch.Tensor) -> tuple[dict[str, Any], Any]:
    recorder = _Recorder(gm)
    with torch.no_grad():
        out = recorder.run(example)
    return recorder.values, out


def prepared_copy(model: nn.Module) -> nn.Module:
    """A CPU deep copy in eval mode: capture runs forwards, and the user's model must not change."""
    return copy.deepcopy(model).cpu().eval()


def capture(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[Graph, nn.Module]:
    """The IR of ``model`` (a converted or plain nn.Module) for inputs shaped like ``example_input``, and the
    eval-mode copy it was captured from (the simulated reference for parity checks)."""
    from lowbit.nn import freeze

    example = (
        default_example(model) if example_input is None else example_input.detach().to(torch.float32).cpu()
    )
    if example.dim() < 2:
        raise ConfigError(
            f"example_input must have a batch dimension first, got shape {list(example.shape)}; "
            "add one with example_input[None]"
        )
    work = prepared_copy(model)
    frozen = freeze(work)
    gm = _trace(work)
    try:
        values, out = _record(gm, example)
        values2, _ = _record(gm, torch.cat([example, example]))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ExportError(
            f"the captured graph cannot run on an input of shape {list(example.shape)} ({exc}); "
            "pass an example_input the model accepts"
        ) from None
    capture_ = _Capture(gm, frozen, values, example.shape[0])
    output = capture_.run()
    for node in gm.graph.nodes:
        value2 = values2.get(node.name)
        if (
            isinstance(value2, torch.Tensor)
            and node.name not in capture_.shape_only
            and node.op != "get_attr"
        ):
            _per_sample(value2, 2 * example.shape[0], node)
    meta = {
        "model": getattr(model, "lowbit_name", None),
        "model_kwargs": _jsonable(getattr(model, "lowbit_kwargs", {})),
        "image_shape": _jsonable(getattr(model, "image_shape", None)),
        "class_name": type(model).__name__,
    }
    graph = Graph(_live(capture_.nodes, output), output, list(example.shape[1:]), list(out.shape[1:]), meta)
    return graph, work


def _live(nodes: list[Node], output: str) -> list[Node]:
    """Drop nodes whose results nothing uses (e.g. a constant only read for its shape)."""
    needed, kept = {output}, []
    for node in reversed(nodes):
        if node.name in needed:
            kept.append(node)
            needed.update(node.inputs)
    return kept[::-1]


def tensor_bytes(node: Node) -> int:
    """Bytes of a node's stored tensors."""
    return sum(t.numel() * t.element_size() for t in node.tensors.values())


def supported_summary() -> str:
    """The coverage list named in unsupported-op errors (docs/export.md has the same list)."""
    modules = sorted({cls.__name__ for cls in module_translators()})
    return f"modules {', '.join(modules)}; functions {SUPPORTED_FUNCTIONS}"
