"""`lowbit train` end to end and every bad input: clear one-line error, exit code 2, nothing overwritten."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from lowbit.cli import main
from tiny_gan import tiny_gan

TINY = tiny_gan(steps=10, checkpoint_every=5)


def write_config(path: Path, **changes) -> Path:
    data = {**TINY, **changes}
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``: proves a failed command wrote nothing."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (its directory) shared by the tests below."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.yaml")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def test_train_command_writes_the_run(trained):
    for name in (
        "model.safetensors",
        "model.json",
        "log.csv",
        "config.json",
        "checkpoints/last.safetensors",
        "samples/step_000010.png",
    ):
        assert (trained / name).is_file(), name


def test_train_refuses_to_overwrite_a_run_without_force(trained, tmp_path, capsys):
    before = snapshot(trained)
    config = write_config(tmp_path / "tiny.yaml")
    assert main(["train", str(config), "--out", str(trained), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(trained) == before


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"generator": {"model": "dcgan-g-61"}}, "unknown model 'dcgan-g-61' (did you mean 'dcgan-g-"),
        ({"loss": "wgan_gp"}, "unknown GAN loss 'wgan_gp' (did you mean 'wgan-gp'?)"),
        ({"stpes": 5}, "unknown config key 'stpes' (did you mean 'steps'?)"),
        (
            {"data": {"dataset": "digits", "option": {"size": 16}}},
            "unknown config key 'data.option' (did you mean 'options'?)",
        ),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        (
            {"generator": {"model": "dcgan-g-28", "kwargs": {"width": 8}}},
            "gives (1, 16, 16) images but generator 'dcgan-g-28' makes (1, 28, 28)",
        ),
    ],
)
def test_bad_config_is_one_clear_error_and_writes_nothing(trained, tmp_path, capsys, changes, message):
    before = snapshot(trained)
    config = write_config(tmp_path / "bad.yaml", **changes)
    assert main(["train", str(config), "--out", str(trained), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert snapshot(trained) == before


def test_init_from_a_checkpoint_of_another_architecture(trained, tmp_path, capsys):
    config = write_config(
        tmp_path / "wide.yaml",
        init_from=str(trained / "model.safetensors"),
        generator={"model": "dcgan-g-16", "kwargs": {"width": 16, "latent_dim": 16}},
    )
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds generator 'dcgan-g-16'" in err and "'width': 8" in err and "'width': 16" in err
    assert not (tmp_path / "out").exists()


def test_corrupted_checkpoint_is_detected(trained, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    data = bytearray((trained / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    (tmp_path / "broken.json").write_bytes((trained / "model.json").read_bytes())
    config = write_config(tmp_path / "qat.yaml", init_from=str(broken))
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_of_a_missing_run(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    assert main(["train", str(config), "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
