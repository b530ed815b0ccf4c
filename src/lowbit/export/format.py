"""The packed model format: bit-packed codes + per-channel codebooks in safetensors, JSON metadata.

A file holds one tensor group per layer of a sequential model, named ``{index}.{field}``, and four
metadata strings: ``lowbit.format`` ("lowbit-packed"), ``lowbit.format_version``, ``lowbit.architecture``
(JSON: model name/kwargs, latent size, the layer list) and ``lowbit.checksum`` (SHA-256 over every
tensor and the architecture). Loading rebuilds the model from torch layers and ``lowbit.export.layers``
only: no training code, no pickle. The full specification is docs/export.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import CheckpointError, ChecksumError
from lowbit.export import kernels
from lowbit.export.layers import SIGN_INPUT, BinaryInput, LevelsAct, QuantWeightLayer, SignAct
from lowbit.export.pack import pack_codes, unpack_codes
from lowbit.io import atomic_path

FORMAT_NAME = "lowbit-packed"
FORMAT_VERSION = 1
META_FORMAT = "lowbit.format"
META_VERSION = "lowbit.format_version"
META_ARCH = "lowbit.architecture"
META_CHECKSUM = "lowbit.checksum"
#: codes wider than this are kept as float weights (a "32-bit" layer is full precision).
MAX_PACKED_BITS = 8


class PackedModel(nn.Module):
    """A model rebuilt from a packed file: optional input view, a chain of inference layers, output view."""

    def __init__(self, layers: list[nn.Module], architecture: dict[str, Any]) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.architecture = architecture
        self.latent_dim: int | None = architecture.get("latent_dim")
        self.input_view = tuple(architecture["input_view"]) if architecture.get("input_view") else None
        output_shape = architecture.get("output_shape")
        self.output_shape = None if output_shape is None else tuple(output_shape)
        self.kernel_path = kernels.TORCH_PATH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_view is not None:
            x = x.reshape(x.shape[0], *self.input_view)
        out = self.body(x).contiguous()  # binary layers hand on channels-last tensors
        return out if self.output_shape is None else out.reshape(out.shape[0], *self.output_shape)


def set_kernel_path(model: PackedModel, path: str | None = None) -> str:
    """Run ``model``'s binary-input layers on ``path`` ("auto", "avx512", "avx2", "scalar", "torch")."""
    resolved = kernels.resolve_path(path)
    for module in model.modules():
        if isinstance(module, QuantWeightLayer):
            module.kernel_path = resolved
    model.kernel_path = resolved
    return resolved


# ----- encoding: model (+ frozen quantized layers) -> layer descriptions and tensors -----


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return value


def _conv_hyper(module: nn.Module) -> dict[str, Any]:
    if getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(module.padding, str):
        raise CheckpointError(
            f"{type(module).__name__} with padding={module.padding!r}, padding_mode="
            f"{module.padding_mode!r} cannot be exported; use integer zero padding"
        )
    hyper = {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "bias": module.bias is not None,
    }
    if isinstance(module, nn.ConvTranspose2d):
        hyper["output_padding"] = module.output_padding
    return hyper


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {"weight": module.weight.detach()}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach()
    return tensors


def _encode_conv(module: nn.Module) -> tuple[dict, dict]:
    kind = "conv_transpose2d" if isinstance(module, nn.ConvTranspose2d) else "conv2d"
    return {"type": kind, "hyper": _conv_hyper(module)}, _weights(module)


def _encode_linear(module: nn.Linear) -> tuple[dict, dict]:
    hyper = {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }
    return {"type": "linear", "hyper": hyper}, _weights(module)


def _encode_batch_norm(module: nn.modules.batchnorm._BatchNorm) -> tuple[dict, dict]:
    if not module.track_running_stats:
        raise CheckpointError(
            f"{type(module).__name__} without running statistics cannot be exported "
            "(its output depends on the batch); train it with track_running_stats=True"
        )
    ones, zeros = torch.ones(module.num_features), torch.zeros(module.num_features)
    weight = module.weight.detach() if module.affine else ones
    bias = module.bias.detach() if module.affine else zeros
    stats = torch.stack([weight, bias, module.running_mean, module.running_var]).to(torch.float32)
    kind = "batch_norm2d" if isinstance(module, nn.BatchNorm2d) else "batch_norm1d"
    return {"type": kind, "hyper": {"num_features": module.num_features, "eps": module.eps}}, {"bn": stats}


ENCODERS: dict[type, Callable[[Any], tuple[dict, dict]]] = {
    nn.Conv2d: _encode_conv,
    nn.ConvTranspose2d: _encode_conv,
    nn.Linear: _encode_linear,
    nn.BatchNorm1d: _encode_batch_norm,
    nn.BatchNorm2d: _encode_batch_norm,
    nn.ReLU: lambda m: ({"type": "relu"}, {}),
    nn.Tanh: lambda m: ({"type": "tanh"}, {}),
    nn.Sigmoid: lambda m: ({"type": "sigmoid"}, {}),
    nn.Identity: lambda m: ({"type": "identity"}, {}),
    nn.LeakyReLU: lambda m: ({"type": "leaky_relu", "hyper": {"negative_slope": m.negative_slope}}, {}),
    nn.Flatten: lambda m: (
        {"type": "flatten", "hyper": {"start_dim": m.start_dim, "end_dim": m.end_dim}},
        {},
    ),
}


def _affine_parts(frozen: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, offset) when they rebuild the codebook bit for bit as scale*z + offset, else None."""
    if frozen.scale is None or frozen.offset is None:
        return None
    scale = frozen.scale.detach().to(torch.float32).reshape(-1)
    offset = frozen.offset.detach().to(torch.float32).reshape(-1)
    rebuilt = _affine_codebook(scale, offset, frozen.codebook.shape[1])
    return (scale, offset) if torch.equal(rebuilt, frozen.codebook.to(torch.float32)) else None


def _affine_codebook(scale: torch.Tensor, offset: torch.Tensor, levels: int) -> torch.Tensor:
    return scale[:, None] * torch.arange(levels, dtype=torch.float32) + offset[:, None]


def _encode_frozen_layer(frozen: Any) -> tuple[dict, dict]:
    """A quantized weight layer: packed codes + affine (scale, offset) rows or the codebook table."""
    bias = {} if frozen.bias is None else {"bias": frozen.bias.detach().to(torch.float32)}
    hyper = {key: value for key, value in frozen.hyper.items() if value is not None}
    if frozen.bits > MAX_PACKED_BITS:
        weight_hyper = {**hyper, "bias": frozen.bias is not None}
        return {"type": f"dense_{frozen.kind}", "hyper": weight_hyper}, {
            "weight": frozen.dequantize(),
            **bias,
        }
    layer = {
        "type": f"quant_{frozen.kind}",
        "method": frozen.method,
        "bits": int(frozen.bits),
        "shape": list(frozen.codes.shape),
        "channel_dim": int(frozen.channel_dim),
        "levels": int(frozen.codebook.shape[1]),
        "hyper": hyper,
    }
    tensors = {"codes": pack_codes(frozen.codes, int(frozen.bits)), **bias}
    affine = _affine_parts(frozen)
    if affine is None:
        layer["codebook"] = "table"
        tensors["codebook"] = frozen.codebook.detach().to(torch.float32)
    else:
        layer["codebook"] = "affine"
        tensors["affine"] = torch.stack(affine)
    return layer, tensors


def _encode_frozen_act(frozen: Any) -> tuple[dict, dict]:
    levels = frozen.levels.detach().to(torch.float32).reshape(-1)
    if torch.equal(levels, torch.tensor([-1.0, 1.0])):
        return {"type": "sign", "method": frozen.method}, {}
    return {"type": "quant_act", "method": frozen.method, "bits": int(frozen.bits)}, {"levels": levels}


def _chain(module: nn.Module, frozen: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, frozen entry or torch module) for every layer of a (nested) nn.Sequential, in order."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if name in frozen:
            yield name, frozen[name]
        elif type(child) is nn.Sequential:
            yield from _chain(child, frozen, f"{name}.")
        else:
            yield name, child


def _encode_entry(name: str, entry: Any) -> tuple[dict, dict]:
    if hasattr(entry, "codes"):
        layer, tensors = _encode_frozen_layer(entry)
    elif hasattr(entry, "levels"):
        layer, tensors = _encode_frozen_act(entry)
    elif type(entry) in ENCODERS:
        layer, tensors = ENCODERS[type(entry)](entry)
    else:
        known = ", ".join(sorted(cls.__name__ for cls in ENCODERS))
        raise CheckpointError(
            f"layer '{name}' is a {type(entry).__name__}, which the packed format cannot store; "
            f"supported: quantized layers from lowbit.convert and {known}"
        )
    return {"name": name, **layer}, tensors


def _example_input(model: nn.Module) -> torch.Tensor | None:
    """A one-sample input for ``model``: a latent for generators, an image for models with image_shape."""
    latent, image_shape = getattr(model, "latent_dim", None), getattr(model, "image_shape", None)
    if latent:
        return torch.zeros(1, latent)
    return torch.zeros(1, *image_shape) if image_shape else None


def traced_output_shape(model: nn.Module, example: torch.Tensor | None) -> list[int] | None:
    """Per-sample output shape of one forward on ``example`` (None without one), so a model whose forward
    reshapes its output (the DCGAN discriminator returns (N,)) keeps that shape when exported."""
    if example is None:
        return None
    device = next((param.device for param in model.parameters()), example.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shape = list(model(example.to(device)).shape[1:])
    model.train(was_training)
    return shape


def encode_model(model: nn.Module, frozen: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Architecture description and named tensors of ``model``; ``frozen`` = lowbit.nn.freeze(model)."""
    if not isinstance(model, nn.Sequential):
        raise CheckpointError(
            f"only nn.Sequential chains can be exported, got {type(model).__name__}; "
            "wrap the layers in an nn.Sequential (generators may add latent_dim)"
        )
    layers, tensors = [], {}
    for index, (name, entry) in enumerate(_chain(model, frozen)):
        layer, named = _encode_entry(name, entry)
        layers.append(_jsonable(layer))
        tensors.update(
            {f"{index}.{field}": value.detach().cpu().contiguous() for field, value in named.items()}
        )
    latent = getattr(model, "latent_dim", None)
    output_shape = traced_output_shape(model, _example_input(model))
    architecture = {
        "model": getattr(model, "lowbit_name", None),
        "model_kwargs": _jsonable(getattr(model, "lowbit_kwargs", {})),
        "latent_dim": latent,
        "input_view": [latent, 1, 1] if latent else None,
        "output_shape": output_shape,
        "image_shape": _jsonable(getattr(model, "image_shape", None)),
        "layers": layers,
    }
    return architecture, tensors


def checksum(tensors: dict[str, torch.Tensor], architecture_json: str) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes; sorted by name) and the architecture JSON."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(architecture_json.encode())
    return digest.hexdigest()


def write_packed(
    architecture: dict[str, Any], tensors: dict[str, torch.Tensor], path: str | os.PathLike
) -> Path:
    """Write a packed file atomically (compact JSON keeps the metadata small)."""
    arch_json = json.dumps(architecture, separators=(",", ":"), sort_keys=True)
    metadata = {
        META_FORMAT: FORMAT_NAME,
        META_VERSION: str(FORMAT_VERSION),
        META_ARCH: arch_json,
        META_CHECKSUM: checksum(tensors, arch_json),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# ----- decoding: layer descriptions and tensors -> inference modules -----


def _tuple_hyper(hyper: dict[str, Any]) -> dict[str, Any]:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in hyper.items()}


def _load_weights(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(tensors["weight"])
        if module.bias is not None:
            module.bias.copy_(tensors["bias"])
    return module


def _decode_conv(layer: dict, tensors: dict) -> nn.Module:
    hyper = _tuple_hyper(layer["hyper"])
    cls = nn.ConvTranspose2d if layer["type"].endswith("conv_transpose2d") else nn.Conv2d
    if "in_channels" not in hyper:
        weight = tensors["weight"]
        transposed = cls is nn.ConvTranspose2d
        in_ch = weight.shape[0] if transposed else weight.shape[1] * hyper.get("groups", 1)
        out_ch = weight.shape[1] * hyper.get("groups", 1) if transposed else weight.shape[0]
        hyper = {
            **hyper,
            "in_channels": in_ch,
            "out_channels": out_ch,
            "kernel_size": tuple(weight.shape[2:]),
        }
    return _load_weights(cls(**hyper), tensors)


def _decode_linear(layer: dict, tensors: dict) -> nn.Module:
    weight = tensors["weight"]
    return _load_weights(nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors), tensors)


def _decode_batch_norm(layer: dict, tensors: dict) -> nn.Module:
    hyper = layer["hyper"]
    cls = nn.BatchNorm2d if layer["type"] == "batch_norm2d" else nn.BatchNorm1d
    module = cls(hyper["num_features"], eps=hyper["eps"])
    weight, bias, mean, var = tensors["bn"]
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
    return module


def _codebook(layer: dict, tensors: dict) -> torch.Tensor:
    if layer["codebook"] == "affine":
        scale, offset = tensors["affine"]
        return _affine_codebook(scale, offset, layer["levels"])
    return tensors["codebook"]


def _decode_quant(layer: dict, tensors: dict, binary_input: BinaryInput | None) -> nn.Module:
    codes = unpack_codes(tensors["codes"], layer["bits"], layer["shape"])
    if int(codes.max()) >= layer["levels"]:
        raise CheckpointError(
            f"layer '{layer['name']}' has codes beyond its {layer['levels']} levels; "
            "the file is damaged, re-export it"
        )
    return QuantWeightLayer(
        layer["type"].removeprefix("quant_"),
        codes,
        _codebook(layer, tensors),
        layer["channel_dim"],
        tensors.get("bias"),
        _tuple_hyper(layer["hyper"]),
        binary_input,
        affine=layer["codebook"] == "affine",
    )


DECODERS: dict[str, Callable[[dict, dict], nn.Module]] = {
    "conv2d": _decode_conv,
    "conv_transpose2d": _decode_conv,
    "dense_conv2d": _decode_conv,
    "dense_conv_transpose2d": _decode_conv,
    "linear": _decode_linear,
    "dense_linear": _decode_linear,
    "batch_norm1d": _decode_batch_norm,
    "batch_norm2d": _decode_batch_norm,
    "relu": lambda layer, t: nn.ReLU(),
    "tanh": lambda layer, t: nn.Tanh(),
    "sigmoid": lambda layer, t: nn.Sigmoid(),
    "identity": lambda layer, t: nn.Identity(),
    "leaky_relu": lambda layer, t: nn.LeakyReLU(layer["hyper"]["negative_slope"]),
    "flatten": lambda layer, t: nn.Flatten(layer["hyper"]["start_dim"], layer["hyper"]["end_dim"]),
    "sign": lambda layer, t: SignAct(),
    "quant_act": lambda layer, t: LevelsAct(t["levels"]),
}
QUANT_WEIGHT_TYPES = ("quant_conv2d", "quant_conv_transpose2d", "quant_linear")


def layer_tensors(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The tensors of layer ``index`` keyed by field ("codes", "affine", "bias", ...)."""
    prefix = f"{index}."
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def build_model(architecture: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PackedModel:
    """Inference modules for a decoded file; a binary activation feeding a quantized layer is fused in."""
    layers: list[nn.Module] = []
    descriptions = architecture["layers"]
    pending: BinaryInput | None = None  # the fused activation the next (quantized) layer receives
    for index, layer in enumerate(descriptions):
        kind = layer.get("type")
        if kind not in DECODERS and kind not in QUANT_WEIGHT_TYPES:
            known = ", ".join(sorted([*DECODERS, *QUANT_WEIGHT_TYPES]))
            raise CheckpointError(
                f"layer {index} has unknown type '{kind}'; this file needs a newer lowbit (known: {known})"
            )
        named = layer_tensors(tensors, index)
        next_kind = descriptions[index + 1].get("type") if index + 1 < len(descriptions) else None
        binary = _binary_activation(layer, named) if next_kind in QUANT_WEIGHT_TYPES else None
        if binary is not None:
            pending = binary  # fused into the weight layer that follows
            continue
        if kind in QUANT_WEIGHT_TYPES:
            layers.append(_decode_quant(layer, named, binary_input=pending))
            pending = None
        else:
            layers.append(DECODERS[kind](layer, named))
    return PackedModel(layers, architecture).eval()


def _binary_activation(layer: dict, tensors: dict[str, torch.Tensor]) -> BinaryInput | None:
    """The binary input a weight layer gets from ``layer``: sign, a two-level activation quantizer
    (e.g. 1-bit ``act`` with levels {0, a}: nearest level, ties down as ``LevelsAct``), or None."""
    if layer.get("type") == "sign":
        return SIGN_INPUT
    if layer.get("type") == "quant_act" and tensors["levels"].numel() == 2:
        low, high = sorted(float(v) for v in tensors["levels"])
        return BinaryInput(low, high, ties_up=False) if high > low else None
    return None


# ----- reading -----


def _check_header(metadata: dict[str, str], path: Path) -> None:
    if metadata.get(META_FORMAT) != FORMAT_NAME or META_ARCH not in metadata or META_CHECKSUM not in metadata:
        raise CheckpointError(
            f"{path} is not a lowbit packed model (no '{FORMAT_NAME}' metadata); "
            "create one with `lowbit export` or lowbit.export.export_packed"
        )
    version = metadata.get(META_VERSION, "")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} uses packed format version {version!r} but this lowbit reads version "
            f"{FORMAT_VERSION}; re-export the model with this lowbit (or install the lowbit "
            "release that wrote it)"
        )


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Architecture and tensors of a packed file, after checking its format version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"packed model not found: {path}; create it with `lowbit export`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} cannot be read as a packed model ({exc}); the file is truncated or "
            "not a lowbit export: re-export it"
        ) from exc
    _check_header(metadata, path)
    arch_json = metadata[META_ARCH]
    if checksum(tensors, arch_json) != metadata[META_CHECKSUM]:
        raise ChecksumError(
            f"{path} does not match its checksum: the file was modified or damaged after "
            "export; re-export it from the checkpoint"
        )
    return json.loads(arch_json), tensors


def is_packed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file carrying the packed-format metadata (cheap: reads the header only)."""
    if not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(META_FORMAT) == FORMAT_NAME
    except (SafetensorError, OSError, ValueError):
        return False
