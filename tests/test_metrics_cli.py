"""``lowbit eval CHECKPOINT`` end to end, and the Inception-v3 weights path (local file, clear errors)."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.config import to_dict
from lowbit.errors import CheckpointError, ConfigError
from lowbit.io import cache_dir
from lowbit.metrics.extractors import resolve_extractor
from lowbit.metrics.inception import FIDInceptionV3, load_inception
from lowbit.models import create_model
from lowbit.nn import QuantSpec, convert
from lowbit.train.checkpoint import save_checkpoint
from lowbit.train.gan import GanConfig
from lowbit.train.networks import CHECKPOINT_KIND, NetSpec
from test_metrics import require_shipped_extractor


def write_gan_checkpoint(path, quant: dict | None) -> None:
    """A GAN checkpoint as `lowbit train` writes it: an untrained 4-bit/1-bit DCGAN on MNIST."""
    generator_spec = NetSpec("dcgan-g-28", {"width": 8}, quant=None if quant is None else QuantSpec(**quant))
    cfg = GanConfig(generator=generator_spec, discriminator=NetSpec("dcgan-d-28", {"width": 8}))
    torch.manual_seed(0)
    generator = create_model("dcgan-g-28", width=8)
    if quant is not None:
        generator = convert(generator, generator_spec.quant)
    discriminator = create_model("dcgan-d-28", width=8)
    save_checkpoint(
        path,
        {
            "kind": CHECKPOINT_KIND,
            "config": to_dict(cfg),
            "step": 0,
            "generator": generator.state_dict(),
            "discriminator": discriminator.state_dict(),
        },
    )


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    """A fresh cache for reference statistics that still sees the already prepared datasets."""
    datasets = cache_dir() / "datasets"
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    if datasets.is_dir():
        (tmp_path / "cache" / "datasets").symlink_to(datasets)
    return tmp_path / "cache"


def test_eval_cli_prints_table_and_writes_json_and_histograms(tmp_path, isolated_cache, capsys):
    require_shipped_extractor("mnist")
    checkpoint = tmp_path / "g.safetensors"
    write_gan_checkpoint(checkpoint, {"weight": "minmax", "weight_bits": 4, "act": "sign", "act_bits": 1})
    out = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--n", "200", "--batch", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    scores = result["scores"]
    assert scores["n"] == 200 and scores["extractor"].startswith("extractor-28/mnist@")
    assert result["dataset"] == "mnist" and result["extractor_card"]["dataset"] == "mnist"
    assert scores["fid"] > 0 and f"FID {scores['fid']:.3f}" in printed and scores["extractor"] in printed
    layers = result["compression"]["layers"]
    assert [(row["weight_bits"], row["act_bits"]) for row in layers] == [(4, 32), (4, 1), (4, 1), (4, 1)]
    assert result["compression"]["compression_ratio"] > 5
    assert [row["bits"] for row in result["weights"]] == [4, 4, 4, 4]
    assert (tmp_path / "eval.weights.png").is_file() and result["histogram_png"].endswith("eval.weights.png")
    assert list((isolated_cache / "fid-reference").glob("mnist-train-n200-*.safetensors"))


def test_eval_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.safetensors")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    checkpoint = tmp_path / "fp.safetensors"
    write_gan_checkpoint(checkpoint, None)
    assert main(["eval", str(checkpoint), "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    assert "Inception weights file not found" in capsys.readouterr().err


def test_inception_weights_are_loaded_from_a_local_file_only(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    weights = tmp_path / "pt_inception.pth"
    torch.save(model.state_dict(), weights)
    extractor = resolve_extractor("mnist", inception_weights=weights)
    assert extractor.label.startswith("inception-v3-fid@") and extractor.num_features == 2048
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        features = extractor.module.features(images)
        assert features.shape == (2, 2048)
        expected = features @ model.fc.weight.t()  # unbiased logits of the original IS code
        assert torch.allclose(extractor.module(images), expected, atol=1e-5)
        assert torch.allclose(features, model.eval().features(images), atol=1e-5)


def test_wrong_or_missing_inception_weights_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found.*--inception-weights"):
        load_inception(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_inception(garbage)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not the FID Inception-v3 weights"):
        load_inception(other)
    pickled = tmp_path / "object.pth"
    torch.save({"model": ConfigError("arbitrary object")}, pickled)
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        load_inception(pickled)
