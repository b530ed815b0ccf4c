"""Core helpers: config validation, checkpoints, atomic writes, CLI error handling."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from lowbit.config import ConfigError, apply_overrides, from_dict, load_config
from lowbit.errors import CheckpointError
from lowbit.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sidecar_path,
)


@dataclasses.dataclass
class Inner:
    bits: int = 4
    method: str = "minmax"


@dataclasses.dataclass
class Outer:
    name: str
    lr: float = 1e-3
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)


def test_config_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.bitz' \(did you mean 'bits'\?\)"):
        from_dict(Outer, {"name": "a", "inner": {"bitz": 3}})


def test_config_types_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  bits: 2\n")
    cfg = load_config(Outer, path, ["lr=0.5", "inner.method=em", "tags=[a, b]"])
    assert cfg == Outer(name="x", lr=0.5, inner=Inner(bits=2, method="em"), tags=["a", "b"])
    with pytest.raises(ConfigError, match="inner.bits: expected an integer"):
        load_config(Outer, path, ["inner.bits=2.5"])
    with pytest.raises(ConfigError, match="missing required key"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["nonsense"])


def test_exponent_numbers_without_a_dot_are_floats(tmp_path):
    """``5e-5`` is a float to a user (and to YAML 1.2), though PyYAML's YAML 1.1 rules read it as a string."""
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nlr: 5e-5\ninner:\n  bits: 2\n")
    assert load_config(Outer, path).lr == 5e-5
    assert load_config(Outer, path, ["lr=-1E+2"]).lr == -100.0
    assert load_config(Outer, path, ["name=1e3x"]).name == "1e3x"
    with pytest.raises(ConfigError, match="inner.bits: expected an integer"):
        load_config(Outer, path, ["inner.bits=2e0"])


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_checkpoint_round_trip_with_optimizer_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 5, "rng": rng_state(),
             "config": {"name": "x", "bits": [1, 2]}}
    path = save_checkpoint(tmp_path / "ck.safetensors", state)
    expected = (torch.rand(3), np.random.rand(2), random.random())
    loaded = load_checkpoint(path)
    assert loaded["step"] == 5 and loaded["config"] == {"name": "x", "bits": [1, 2]}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(loaded["optim"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_checkpoint_detects_tampering_and_missing_sidecar(tmp_path):
    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(3)})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="sidecar must lie beside it"):
        load_checkpoint(path)


def test_checkpoint_rejects_foreign_sidecar(tmp_path):
    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(3)})
    sidecar_path(path).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a lowbit-checkpoint/1 sidecar"):
        load_checkpoint(path)
