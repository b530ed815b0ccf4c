"""CNN classifiers and their trainer: shapes, augmentation, first/last-layer rule, the
multiplication-free flag, real tiny runs on sklearn digits, resume equivalence, CLI and bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowbit import cli
from lowbit.config import from_dict, load_config
from lowbit.errors import CheckpointError, ConfigError
from lowbit.models import create_model
from lowbit.nn import QuantLinear, QuantSpec, convert, freeze
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.classifier import (
    ClassifierConfig,
    build_classifier,
    evaluate,
    multiplication_free,
    pad_images,
    random_crop_flip,
    rebuild_classifier,
    recalibrate_batchnorm,
    train_classifier,
)

SEARCH_W1 = {"weight": "search", "weight_bits": 1, "weight_opts": {"scale": 1.0}}


def tiny_config(**changes) -> ClassifierConfig:
    """The 8x8 extractor on sklearn digits with Adam: a few seconds per epoch on one core."""
    data = {"name": "tiny", "model": "extractor-8", "kwargs": {"feature_dim": 32},
            "data": {"dataset": "digits"}, "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
            "epochs": 3, "batch_size": 64, "seed": 1}
    data.update(changes)
    return from_dict(ClassifierConfig, data)


@pytest.mark.parametrize(("name", "kwargs", "shape", "feature_dim"), [
    ("lenet", {}, (2, 1, 28, 28), 84),
    ("lenet", {"image_size": 32, "in_channels": 3}, (2, 3, 32, 32), 84),
    ("vgg-small", {"width": 4}, (2, 3, 32, 32), 16 * 4 * 4),
    ("resnet20", {"in_channels": 1}, (2, 1, 32, 32), 64),
    ("extractor-28", {}, (2, 1, 28, 28), 128),
    ("extractor-8", {}, (2, 1, 8, 8), 128),
])
def test_models_give_logits_and_penultimate_features(name, kwargs, shape, feature_dim):
    model = create_model(name, **kwargs).eval()
    x = torch.randn(shape)
    features = model.features(x)
    assert features.shape == (2, feature_dim)
    torch.testing.assert_close(model(x), model.head(features))
    assert model(x).shape == (2, 10)


def test_resnet20_has_the_cifar_layout():
    model = create_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 1
    assert [c.out_channels for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    # He et al. 2016 Table 6: ResNet-20 has 0.27M parameters.
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 19


@pytest.mark.parametrize(("name", "kwargs"), [
    ("resnet20", {"depth": 21}), ("vgg-small", {"width": 0}), ("lenet", {"image_size": 30}),
    ("extractor-8", {"in_channels": 1.5}),
])
def test_bad_model_arguments_are_config_errors(name, kwargs):
    with pytest.raises(ConfigError):
        create_model(name, **kwargs)


def test_pad_and_random_crop_flip_move_pixels_as_specified():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    padded = pad_images(images, 8)
    assert padded.shape == (2, 1, 8, 8) and torch.equal(padded[:, :, 2:6, 2:6], images)
    assert (padded[:, :, :2] == -1).all() and (padded[:, :, :, 6:] == -1).all()
    generator = torch.Generator().manual_seed(3)
    out = random_crop_flip(images, generator)
    reference = nn.functional.pad(images, (4, 4, 4, 4), value=-1.0)
    for i in range(2):
        windows = [reference[i, :, y:y + 4, x:x + 4] for y in range(9) for x in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_evaluate_matches_hand_counted_top1_and_top5():
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 4])
    result = evaluate(Fixed(), logits, labels)
    assert result["top1"] == pytest.approx(100 / 3) and result["top5"] == pytest.approx(200 / 3)
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert result["test_loss"] == pytest.approx(expected_loss)


def test_first_and_last_layers_stay_full_precision_by_default():
    model = build_classifier(tiny_config(quant=SEARCH_W1))
    kinds = [type(m).__name__ for m in (model.body[0], model.body[3], model.body[8], model.head)]
    assert kinds == ["Conv2d", "QuantConv2d", "QuantLinear", "Linear"]
    everything = build_classifier(tiny_config(quant=SEARCH_W1, keep_first_last=False))
    assert type(everything.body[0]).__name__ == "QuantConv2d" and isinstance(everything.head, QuantLinear)
    extra = build_classifier(tiny_config(quant={**SEARCH_W1, "keep_full_precision": ["body.8"]}))
    assert type(extra.body[8]) is nn.Linear and type(extra.body[3]).__name__ == "QuantConv2d"


@pytest.mark.parametrize(("quant", "expected"), [
    (None, False),
    (SEARCH_W1, True),
    ({"weight": "search", "weight_bits": 3, "weight_opts": {"scale": 0.25, "mode": "sgt"}}, True),
    ({"weight": "search", "weight_bits": 2, "weight_opts": {"scale": 0.3}}, False),
    ({"weight": "bwn", "weight_bits": 1}, False),
    ({"weight": "dorefa", "weight_bits": 1}, True),
    ({"weight": "dorefa", "weight_bits": 2}, False),
])
def test_multiplication_free_flag_follows_the_weight_values(quant, expected):
    model = build_classifier(tiny_config(quant=quant))
    assert multiplication_free(model) is expected
    for layer in freeze(model).values():  # independent check on the exported values
        magnitudes = layer.codebook.abs().flatten().double()
        powers = all(float(v) == 2.0 ** round(float(torch.log2(v))) for v in magnitudes if v > 0)
        assert powers is expected


def test_tiny_digits_runs_learn_full_precision_and_binary_search(tmp_path):
    fp = train_classifier(tiny_config(), tmp_path / "fp", progress=False)
    assert fp["top1"] > 85.0 and fp["top5"] > 97.0 and fp["method"] == "fp"  # chance is 10%
    binary = train_classifier(tiny_config(quant=SEARCH_W1, epochs=4, init_from=str(tmp_path / "fp" /
                                                                                   "model.safetensors")),
                              tmp_path / "w1", progress=False)
    assert binary["top1"] > 75.0 and binary["multiplication_free"] and binary["method"] == "search-rdhs w1"
    model, metrics = rebuild_classifier(tmp_path / "w1" / "model.safetensors")
    from lowbit import data

    images, labels = data.load("digits", "test")
    assert evaluate(model, images, labels)["top1"] == pytest.approx(metrics["top1"])
    weights = model.body[3].quantized_weight().detach()
    assert set(weights.unique().tolist()) <= {-1.0, 1.0}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    stochastic = {"weight": "search", "weight_bits": 1, "weight_opts": {"scale": 1.0, "mu": 0.01}}
    changes = {"quant": stochastic, "data": {"dataset": "digits", "augment": True, "limit": 400},
               "optim": {"name": "sgd", "lr": 0.05, "milestones": [1]}, "recalibrate_bn": 2}
    straight = train_classifier(tiny_config(epochs=2, **changes), tmp_path / "a", progress=False)
    train_classifier(tiny_config(epochs=1, **changes), tmp_path / "b", progress=False)
    resumed = train_classifier(tiny_config(epochs=2, **changes), tmp_path / "b", resume=True, progress=False)
    assert resumed["top1"] == straight["top1"] and resumed["train_loss"] == straight["train_loss"]
    a = load_checkpoint(tmp_path / "a" / "model.safetensors")["state"]
    b = load_checkpoint(tmp_path / "b" / "model.safetensors")["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="another config"):
        train_classifier(tiny_config(epochs=2, seed=9, **changes), tmp_path / "b", resume=True,
                         progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train_classifier(tiny_config(epochs=2, **changes), tmp_path / "b", progress=False)
    checkpoint = tmp_path / "b" / "checkpoints" / "last.safetensors"
    assert checkpoint.is_file()
    with pytest.raises(CheckpointError, match="a training checkpoint, not a finished run's model file"):
        build_classifier(tiny_config(init_from=str(checkpoint)))


@pytest.mark.parametrize(("changes", "message"), [
    ({"epoch": 3}, "did you mean 'epochs'"),
    ({"optim": {"name": "sgdd"}}, "sgdd"),
    ({"optim": {"milestones": [5, 2]}}, "increasing"),
    ({"optim": {"milestones": [9]}}, "beyond epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"quant": {"weight": "search", "weight_bits": 1}, "ship_extractor": "x"}, "full-precision"),
    ({"quant": {"weight": "bwn", "weight_bits": 2}}, "bwn"),
])
def test_bad_configs_name_the_problem(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


def test_bad_model_and_init_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'resnet20'"):
        build_classifier(tiny_config(model="resnet21"))
    with pytest.raises(CheckpointError, match="missing"):
        build_classifier(tiny_config(init_from=str(tmp_path / "nope.safetensors")))


def test_cli_trains_writes_files_and_reports_config_errors(tmp_path, capsys):
    config = tmp_path / "digits.yaml"
    config.write_text("name: cli\nmodel: extractor-8\ndata: {dataset: digits, limit: 600}\n"
                      "optim: {name: adam, lr: 0.003, weight_decay: 0.0}\nepochs: 2\nbatch_size: 64\n")
    out = tmp_path / "run"
    code = cli.main(["train-classifier", str(config), "--out", str(out), "--quiet",
                     "--set", "kwargs.feature_dim=16"])
    assert code == 0 and "top-1" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["top1"] > 40.0 and metrics["n_train"] == 600
    assert (out / "log.csv").read_text().count("\n") == 3
    assert load_config(ClassifierConfig, config).model == "extractor-8"
    code = cli.main(["train-classifier", str(config), "--out", str(out), "--set", "optim.lr=-1"])
    assert code == 2 and "error: optim" in capsys.readouterr().err


def test_batchnorm_recalibration_sets_the_statistics_of_the_quantized_layer_outputs():
    noisy = {"weight": "search", "weight_bits": 1, "weight_opts": {"scale": 1.0, "mu": 1.0}}  # RDHS sampling
    model = convert(create_model("extractor-8"), QuantSpec(**noisy)).eval()
    images = torch.randn(64, 1, 8, 8)
    recalibrate_batchnorm(model, images, batch_size=64)
    conv_out = model.body[0](images)  # the input of the first BatchNorm at evaluation (no noise)
    norm = model.body[1]
    torch.testing.assert_close(norm.running_mean, conv_out.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(norm.running_var, conv_out.var(dim=(0, 2, 3), unbiased=True))
    assert norm.momentum == 0.1 and not model.training


def test_converted_search_model_trains_only_logits_and_bn():
    model = convert(create_model("extractor-8"), QuantSpec(**SEARCH_W1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "body.3.weight_quantizer.logits" in trainable and "body.3.weight" not in trainable
