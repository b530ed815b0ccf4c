"""The shipped domain feature extractors: cards, accuracy floors re-measured on the real test
splits, features/logits API, checksum and missing-dataset errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lowbit import data
from lowbit.errors import ChecksumError, ConfigError
from lowbit.models.extractor import EXTRACTOR_DIR, available_extractors, load_extractor

FLOORS = {"mnist": 99.0, "fashion-mnist": 91.0, "digits": 97.0}
TEST_SIZES = {"mnist": 10_000, "fashion-mnist": 10_000, "digits": 359}


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = torch.cat([model(images[i:i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return 100.0 * int((predicted == labels).sum()) / len(labels)


def test_every_dataset_with_a_floor_ships_an_extractor():
    assert set(FLOORS) <= set(available_extractors())


@pytest.mark.parametrize("dataset", sorted(FLOORS))
def test_card_describes_the_weights_and_meets_the_floor(dataset):
    model, card = load_extractor(dataset)
    assert card["test_accuracy"] >= FLOORS[dataset] and card["feature_dim"] == 128
    assert card["command"].startswith("lowbit train-classifier configs/classifier/extractor-")
    assert (EXTRACTOR_DIR / card["weights"]).stat().st_size < 2_000_000
    assert not model.training and card["architecture"]["name"] == model.lowbit_name
    assert card["test_split_size"] == TEST_SIZES[dataset]  # the whole test split


def test_digits_extractor_reproduces_its_card_accuracy_on_the_full_test_split():
    model, card = load_extractor("digits")
    images, labels = data.load("digits", "test")
    assert accuracy(model, images, labels) == pytest.approx(card["test_accuracy"], abs=1e-6)
    features = model.features(images)
    assert features.shape == (len(images), 128) and (features >= 0).all()
    torch.testing.assert_close(model(images), model.head(features))


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_28px_extractors_clear_their_floor_on_a_test_subset(dataset):
    model, _ = load_extractor(dataset)
    images, labels = data.load(dataset, "test", limit=2000)
    assert accuracy(model, images, labels) >= FLOORS[dataset] - 1.5  # 2,000 images: +-0.7 pt std error


def test_damaged_weights_and_unknown_datasets_are_clear_errors(tmp_path):
    for name in ("digits.json", "digits.safetensors"):
        shutil.copy(EXTRACTOR_DIR / name, tmp_path / name)
    card = json.loads((tmp_path / "digits.json").read_text())
    card["sha256"] = "0" * 64
    (tmp_path / "digits.json").write_text(json.dumps(card))
    with pytest.raises(ChecksumError, match="SHA-256 differs"):
        load_extractor("digits", tmp_path)
    with pytest.raises(ConfigError, match="no feature extractor for dataset 'cifar10'.*available: digits"):
        load_extractor("cifar10", tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'mnist'"):
        load_extractor("mnst")
