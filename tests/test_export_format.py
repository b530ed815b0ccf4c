"""Packed export -> load round trips, size targets, bad files, ONNX QDQ parity and the export/generate CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gan_zoo import trained_like_dcgan
from lowbit.cli import main
from lowbit.errors import CheckpointError, ChecksumError, ConfigError
from lowbit.export import available_paths, export_onnx, export_packed, load, sample
from lowbit.export.backends import x86
from lowbit.export.format import META_ARCH, META_CHECKSUM, META_VERSION, checksum
from lowbit.export.weights import codes, dequantized_weight
from lowbit.models import create_model
from lowbit.nn import QuantSpec, convert, freeze

KERNEL_PATHS = [p for p in available_paths() if p != "torch"]


def _packed_nodes(packed):
    return [n for n in packed.graph.nodes if n.attrs.get("weight", {}).get("format") == "packed"]


def _kernel_layers(packed):
    """The bit-serial layers of a planned packed model, in order."""
    return [step for step in packed.steps if step.backend == f"x86:{packed.kernel_path}"]


def _generator(width: int, seed: int = 0) -> nn.Module:
    """A DCGAN-28 generator with non-trivial batch-norm statistics (as after training)."""
    return trained_like_dcgan(width, seed)


def _quantized(
    width: int, bits: int, act: str | None = "sign", act_bits: int = 1, seed: int = 0
) -> nn.Module:
    spec = QuantSpec(weight="minmax", weight_bits=bits, act=act, act_bits=act_bits)
    return convert(_generator(width, seed), spec).eval()


def _fp32_size(model: nn.Module, path) -> int:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return os.path.getsize(path)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_export_load_same_codes_and_images(tmp_path, bits):
    model = _quantized(width=8, bits=bits)
    path = export_packed(model, tmp_path / "g.lowbit")
    packed = load(path, kernel_path="torch")
    frozen = [f for f in freeze(model).values() if hasattr(f, "codes")]
    loaded = _packed_nodes(packed)
    assert len(loaded) == len(frozen) == 4
    for f, node in zip(frozen, loaded, strict=True):
        assert torch.equal(codes(node), f.codes.to(torch.uint8))  # codes bit-exact
        assert torch.equal(dequantized_weight(node), f.dequantize())  # codebook rebuilt exactly
    expected = sample(model, 32, seed=3)
    torch.testing.assert_close(sample(packed, 32, seed=3), expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_paths_reproduce_the_simulated_generator(tmp_path, path):
    model = _quantized(width=16, bits=2)
    packed = load(export_packed(model, tmp_path / "g.lowbit"), kernel_path=path)
    assert packed.kernel_path == path
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # layer by layer, each packed layer fed the simulated model's own input: float tolerance
        sim_acts, h = [], z.reshape(16, 100, 1, 1)
        for module in model:
            h = module(h)
            sim_acts.append(h)
        kernel_steps = _kernel_layers(packed)
        # each kernel layer reads the input of the BatchNorm before its sign (folded into its thresholds)
        conv_inputs = [sim_acts[i - 3] for i in (3, 6, 9)]
        assert [step.node.module for step in kernel_steps] == ["3", "6", "9"]
        for step, x, target in zip(kernel_steps, conv_inputs, [sim_acts[i] for i in (3, 6, 9)], strict=True):
            torch.testing.assert_close(step.run(x), target, rtol=0, atol=1e-4 * target.abs().max().item())
        # whole network: a pre-activation within rounding of 0 may flip a sign; allow a tiny fraction
        diff = (packed(z) - model(z)).abs()
    assert (diff > 1e-3).float().mean().item() < 0.01


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_two_level_act_generator_runs_on_the_kernels(tmp_path, path):
    """The main job's W4A1 recipe (1-bit `act`, levels {0, a}): each act is fused into the next weight
    layer, which runs on the bit-serial kernels, and the packed generator reproduces the simulated one."""
    spec = QuantSpec(weight="dorefa", weight_bits=4, act="act", act_bits=1, act_opts={"learn_range": True})
    model = convert(_generator(16), spec).eval()
    packed = load(export_packed(model, tmp_path / "g.lowbit"), kernel_path=path)
    producers = {n.name: n for n in packed.graph.nodes}
    assert [step.node.module for step in _kernel_layers(packed)] == ["3", "6", "9"]
    assert not any(step.node.op == "quant_act" for step in packed.steps)  # every act fused into packing
    for step in _kernel_layers(packed):
        binary = x86.binary_input(x86.activation_source(step.node, producers)[0])
        assert binary.low == 0.0 < binary.high
    z = torch.randn(32, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (packed(z) - model(z)).abs()
    assert (diff > 1e-3).float().mean().item() < 0.01  # a pre-activation within rounding of a tie may flip


@pytest.mark.parametrize(("method", "bits"), [("log", 2), ("bwn", 1), ("kmeans", 3)])
def test_every_weight_method_round_trips_on_the_fastest_path(tmp_path, method, bits):
    torch.manual_seed(0)
    spec = QuantSpec(weight=method, weight_bits=bits, act="sign", act_bits=1)
    model = convert(_generator(width=8), spec).eval()
    packed = load(export_packed(model, tmp_path / "g.lowbit"))  # auto: the fastest available path
    diff = (sample(packed, 16, seed=1) - sample(model, 16, seed=1)).abs()
    assert (diff > 1e-3).float().mean().item() < 0.01


def test_discriminator_keeps_its_output_shape(tmp_path):
    torch.manual_seed(0)
    critic = create_model("dcgan-d-28", width=8)
    for module in critic.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_(0, 0.1)
    model = convert(critic.eval(), QuantSpec(weight="minmax", weight_bits=2, act="sign", act_bits=1)).eval()
    packed = load(export_packed(model, tmp_path / "d.lowbit"))
    images = torch.rand(6, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        expected, got = model(images), packed(images)
    assert got.shape == expected.shape == (6,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    w8 = convert(critic, QuantSpec(weight="minmax", weight_bits=8)).eval()
    onnx_out = _onnx_run(export_onnx(w8, tmp_path / "d.onnx"), images)  # input shape from image_shape
    with torch.no_grad():
        torch.testing.assert_close(onnx_out, w8(images), rtol=1e-4, atol=1e-5)


def test_size_targets_of_the_dcgan_generator(tmp_path):
    fp32 = _fp32_size(_generator(width=32), tmp_path / "fp32.safetensors")
    n_weights = sum(
        m.weight.numel()
        for m in _generator(width=32).modules()
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))
    )
    for bits, target in ((1, 25), (2, 14), (4, 7.5)):
        size = os.path.getsize(export_packed(_quantized(width=32, bits=bits), tmp_path / f"w{bits}.lowbit"))
        assert size >= n_weights * bits / 8  # honest: at least the packed codes themselves
        assert fp32 / size >= target, f"{bits}-bit: {fp32}/{size} = {fp32 / size:.1f}x < {target}x"


def test_layers_kept_full_precision_are_stored_as_float(tmp_path):
    spec = QuantSpec(weight="minmax", weight_bits=1, act="sign", act_bits=1, keep_full_precision=["0", "9"])
    model = convert(_generator(width=8), spec).eval()
    packed = load(export_packed(model, tmp_path / "g.lowbit"), kernel_path="torch")
    first = next(n for n in packed.graph.nodes if n.op != "reshape")
    assert first.op == "conv_transpose2d" and first.attrs["weight"]["format"] == "float"
    assert torch.equal(first.tensors["weight"], model[0].weight)
    torch.testing.assert_close(sample(packed, 8, seed=0), sample(model, 8, seed=0), rtol=0, atol=1e-6)


# ----- bad input -----


@pytest.fixture
def packed_file(tmp_path):
    return export_packed(_quantized(width=8, bits=1), tmp_path / "g.lowbit")


def _rewrite(path, change_metadata):
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    change_metadata(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_truncated_file_is_a_clear_error(packed_file):
    data = packed_file.read_bytes()
    packed_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(packed_file)


def test_tampered_file_fails_its_checksum(packed_file):
    data = bytearray(packed_file.read_bytes())
    data[-10] ^= 0x01  # one bit of packed codes
    packed_file.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="checksum"):
        load(packed_file)


def test_unknown_format_version_is_a_clear_error(packed_file):
    _rewrite(packed_file, lambda meta, tensors: meta.update({META_VERSION: "99"}))
    with pytest.raises(CheckpointError, match="version '99'.*reads versions 1, 2"):
        load(packed_file)


def test_unknown_layer_type_in_file_is_a_clear_error(packed_file):
    def add_layer(meta, tensors):
        arch = json.loads(meta[META_ARCH])
        arch["nodes"].append({"name": "x", "op": "warp_drive", "inputs": [arch["output"]]})
        meta[META_ARCH] = json.dumps(arch)
        meta[META_CHECKSUM] = checksum(tensors, meta[META_ARCH])

    _rewrite(packed_file, add_layer)
    with pytest.raises(CheckpointError, match="unknown op 'warp_drive'"):
        load(packed_file)


def test_model_with_unknown_layer_type_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Softmax(dim=1), nn.Flatten())
    with pytest.raises(
        CheckpointError, match=r"module Softmax \(node '_1' in module '1'\).*supported:.*Conv2d"
    ):
        export_packed(
            convert(model, QuantSpec(weight="minmax", weight_bits=2)),
            tmp_path / "m.lowbit",
            example_input=torch.zeros(1, 1, 8, 8),
        )
    assert not (tmp_path / "m.lowbit").exists()


def test_not_a_packed_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a lowbit packed model"):
        load(plain)


# ----- ONNX -----


def _onnx_run(path, z):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": z.numpy()})[0])


@pytest.mark.parametrize(
    ("bits", "act", "act_bits"), [(8, None, 32), (4, None, 32), (8, "act", 8), (4, "act", 4)]
)
def test_onnx_qdq_parity_with_onnxruntime(tmp_path, bits, act, act_bits):
    import onnx

    model = _quantized(width=8, bits=bits, act=act, act_bits=act_bits)
    path = export_onnx(model, tmp_path / "g.onnx")
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("DequantizeLinear") >= 4 + (3 if act else 0)
    if act:
        assert ops.count("QuantizeLinear") == 3
    code_types = {init.data_type for init in graph.initializer if init.name.startswith("codes")}
    assert code_types == {onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8}
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(z)
    diff = (_onnx_run(path, z) - expected).abs()
    assert (diff > 1e-4).float().mean().item() < 0.01  # a value on a rounding boundary may change level
    assert diff.median().item() < 1e-6


def test_onnx_sign_activations_match(tmp_path):
    model = _quantized(width=8, bits=4)
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(z)
    diff = (_onnx_run(export_onnx(model, tmp_path / "g.onnx"), z) - expected).abs()
    assert (diff > 1e-3).float().mean().item() < 0.01


def test_onnx_stores_weights_qdq_cannot_express_as_float(tmp_path):
    import onnx

    model = _quantized(width=8, bits=2)
    path = export_onnx(model, tmp_path / "g.onnx")
    assert "DequantizeLinear" not in [node.op_type for node in onnx.load(str(path)).graph.node]
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (_onnx_run(path, z) - model(z)).abs()
    assert (diff > 1e-3).float().mean().item() < 0.01


def test_onnx_refuses_bad_opsets_and_non_uniform_activation_grids(tmp_path):
    with pytest.raises(ConfigError, match="opset must be an integer"):
        export_onnx(_quantized(width=8, bits=4), tmp_path / "g.onnx", opset=0)
    lq = convert(_generator(width=8), QuantSpec(weight="minmax", weight_bits=4, act="lq", act_bits=2))
    with torch.no_grad():
        lq.train()(torch.randn(16, 100))
    with pytest.raises(ConfigError, match="not a uniform grid.*packed format"):
        export_onnx(lq.eval(), tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()


# ----- CLI -----


def _gan_checkpoint(path):
    from lowbit.config import to_dict
    from lowbit.train.checkpoint import save_checkpoint
    from lowbit.train.gan import GanConfig
    from lowbit.train.networks import CHECKPOINT_KIND, NetSpec

    cfg = GanConfig(
        generator=NetSpec("dcgan-g-28", {"width": 8}), discriminator=NetSpec("dcgan-d-28", {"width": 8})
    )
    state = {
        "kind": CHECKPOINT_KIND,
        "config": to_dict(cfg),
        "step": 0,
        "generator": _generator(width=8).state_dict(),
        "discriminator": create_model("dcgan-d-28", width=8).state_dict(),
    }
    return save_checkpoint(path, state)


def test_cli_export_then_generate(tmp_path, capsys):
    checkpoint = _gan_checkpoint(tmp_path / "gan.safetensors")
    config = tmp_path / "export.yaml"
    out = tmp_path / "g.lowbit"
    config.write_text(
        f"checkpoint: {checkpoint}\noutput: {out}\n"
        "quant: {weight: minmax, weight_bits: 1, act: sign, act_bits: 1}\n"
    )
    assert main(["export", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "smaller than the FP32" in printed and "max |diff|" in printed
    png = tmp_path / "grid.png"
    assert main(["generate", str(out), "-n", "4", "-o", str(png), "--kernel-path", "torch"]) == 0
    grid = np.asarray(Image.open(png))
    assert grid.shape[:2] == (28 + 4, 4 * (28 + 2) + 2)
    assert grid.std() > 0
    assert main(["export", str(config), "--set", "format=onnx", "--set", "opset=0"]) == 2
    assert "opset must be" in capsys.readouterr().err
