"""Packed files: version-1 files still load, damaged or hostile files end in one clear error (never a bare
exception, a crash or a huge allocation), and the CLI's info / generate --input on exported zoo models."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_zoo import ZOO, calibrated, resigned
from lowbit.cli import main
from lowbit.errors import CheckpointError, LowbitError
from lowbit.export import available_paths, export_packed, load
from lowbit.export.backends import native
from lowbit.nn import QuantSpec, convert

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["w1a1", "w2em-a2"])
def test_version_1_files_keep_loading_and_give_the_same_images(name):
    """Files written by lowbit's format version 1 (a chain of layers), with the outputs recorded then (float
    layers within 1e-6: torch's float kernels sum in a CPU-dependent order, 3e-8 apart on an AMD EPYC)."""
    expected = torch.from_numpy(np.load(DATA / f"v1-dcgan16-{name}.npy"))
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    exact = load(DATA / f"v1-dcgan16-{name}.lowbit", kernel_path="torch")
    assert exact.latent_dim == 100
    torch.testing.assert_close(exact(z), expected, rtol=0, atol=1e-6)
    fastest = load(DATA / f"v1-dcgan16-{name}.lowbit")
    torch.testing.assert_close(fastest(z), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def packed_bytes(tmp_path_factory) -> bytes:
    model = convert(
        calibrated("examples-dcgan"), QuantSpec(weight="minmax", weight_bits=2, act="sign", act_bits=1)
    )
    path = tmp_path_factory.mktemp("packed") / "g.lowbit"
    export_packed(model, path, example_input=torch.randn(1, 16, 1, 1))
    return path.read_bytes()


def _edit_architecture(path: Path, edit) -> None:
    """Change the IR JSON and re-sign it in place, as a hostile writer would (the checksum then passes)."""
    resigned(path, path, edit)


def _first_packed(arch):
    return next(
        node for node in arch["nodes"] if node.get("attrs", {}).get("weight", {}).get("format") == "packed"
    )


def _set_bits(arch, tensors):
    _first_packed(arch)["attrs"]["weight"]["bits"] = 4  # codes no longer fit the declared size


def _huge_channels(arch, tensors):
    _first_packed(arch)["attrs"]["in_channels"] = 2**40


def _missing_input(arch, tensors):
    arch["nodes"][2]["inputs"] = ["nowhere"]


def _nan_weights(arch, tensors):
    name = next(key for key in tensors if key.endswith(".running_var"))
    tensors[name][0] = float("nan")


def _deep_json(arch, tensors):
    nested: dict = {}
    for _ in range(500):
        nested = {"x": nested}
    arch["nodes"][0]["attrs"]["deep"] = nested


def _huge_input(arch, tensors):
    arch["input_shape"] = [2**20, 2**20]


def _too_many_levels(arch, tensors):
    _first_packed(arch)["attrs"]["weight"]["levels"] = 99


def _wrong_output(arch, tensors):
    arch["output"] = "ghost"


def _shape_disagreement(arch, tensors):
    node = next(node for node in arch["nodes"] if node["op"] == "batch_norm")
    for key in [k for k in tensors if k.startswith(node["name"] + ".")]:
        tensors[key] = torch.ones(3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_bits, "packed weight fields are inconsistent|tensor 'codes'"),
        (_huge_channels, "geometry|too large|inconsistent"),
        (_missing_input, "reads \\['nowhere'\\]"),
        (_nan_weights, "non-finite"),
        (_deep_json, "bounded depth|not JSON"),
        (_huge_input, "input_shape must be"),
        (_too_many_levels, "inconsistent"),
        (_wrong_output, "output 'ghost'"),
        (_shape_disagreement, "does not run"),
    ],
)
def test_hostile_fields_are_refused_with_the_field_named(tmp_path, packed_bytes, edit, message):
    path = tmp_path / "g.lowbit"
    path.write_bytes(packed_bytes)
    _edit_architecture(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_header_claiming_more_than_the_file_is_refused_before_reading(tmp_path, packed_bytes):
    path = tmp_path / "g.lowbit"
    path.write_bytes(struct.pack("<Q", 2**42) + packed_bytes[8:])
    with pytest.raises(CheckpointError, match="header claims"):
        load(path)
    path.write_bytes(packed_bytes[: len(packed_bytes) - 100])
    with pytest.raises(CheckpointError, match="outside the file"):
        load(path)


def test_fuzzed_files_load_or_fail_cleanly(tmp_path, packed_bytes):
    """Random byte flips and truncations: every load ends in a model or a LowbitError, nothing else."""
    rng = random.Random(0)
    path = tmp_path / "g.lowbit"
    outcomes = {"ok": 0, "error": 0}
    for trial in range(120):
        data = bytearray(packed_bytes)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(min(len(data), 400)) if trial % 3 == 1 else rng.randrange(len(data))
                data[position] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            load(path, kernel_path="torch")
            outcomes["ok"] += 1
        except LowbitError:
            outcomes["error"] += 1
    assert outcomes["error"] > 60


def test_cli_info_prints_the_plan(tmp_path, capsys):
    model = convert(
        calibrated("cyclegan-resnet"), QuantSpec(weight="bwn", weight_bits=1, act="sign", act_bits=1)
    )
    path = export_packed(model, tmp_path / "r.lowbit", example_input=torch.randn(1, 3, 16, 16))
    capsys.readouterr()
    assert main(["export", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input N x 3 x 16 x 16" in out and "instance_norm" in out and "total:" in out
    kernels = [p for p in available_paths() if p != "torch"]
    if native.available():  # the default backend once runtime/ is built (docs/export.md, "Native runtime")
        assert f"native:{native.available_paths()[0]}" in out
    elif kernels:
        assert f"x86:{kernels[0]}" in out
    assert main(["export", "info", str(path), "--kernel-path", "torch"]) == 0
    assert "x86:" not in capsys.readouterr().out
    assert main(["export", "info"]) == 2
    assert "usage: lowbit export info FILE" in capsys.readouterr().err


def test_cli_generate_translates_input_images(tmp_path, capsys):
    model = convert(calibrated("pix2pix-unet"), QuantSpec(weight="minmax", weight_bits=4))
    path = export_packed(model, tmp_path / "u.lowbit", example_input=torch.randn(1, *ZOO["pix2pix-unet"][1]))
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", images=images)
    out = tmp_path / "grid.png"
    assert main(["generate", str(path), "--input", str(tmp_path / "in.npz"), "-o", str(out)]) == 0
    assert out.is_file() and "translated 3 images" in capsys.readouterr().out
    np.savez(tmp_path / "bad.npz", images=images[:, :, :8])
    assert main(["generate", str(path), "--input", str(tmp_path / "bad.npz"), "-o", str(out)]) == 2
    assert "N x 3 x 16 x 16" in capsys.readouterr().err
    assert main(["generate", str(path), "-n", "4", "-o", str(out)]) == 2  # no latent: says what to do
    assert "--input" in capsys.readouterr().err


def test_cli_generate_on_a_truncated_packed_file_names_the_real_problem(tmp_path, packed_bytes, capsys):
    path = tmp_path / "g.lowbit"
    path.write_bytes(packed_bytes[:500])
    assert main(["generate", str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not a valid lowbit packed model" in err and ".json" not in err


def test_sample_counts_are_bounded(tmp_path, monkeypatch):
    from lowbit.errors import LimitError
    from lowbit.export import sample

    model = load(DATA / "v1-dcgan16-w1a1.lowbit", kernel_path="torch")
    monkeypatch.setenv("LOWBIT_MAX_SAMPLES", "8")
    with pytest.raises(LimitError, match="exceeds the limit of 8.*LOWBIT_MAX_SAMPLES"):
        sample(model, 9)
    with pytest.raises(LimitError, match="must be >= 1"):
        sample(model, 4, batch_size=0)
    assert sample(model, 8).shape == (8, 1, 16, 16)
