"""CNN classifiers for the weight-search and LQ-Nets studies: ``lenet``, ``vgg-small``, ``resnet20``.

Every classifier is a ``FeatureClassifier``: ``body`` maps images to the penultimate feature vector
(``features(x)``) and ``head`` (one Linear layer) maps features to class logits (``forward(x)``).
All activations are ``nn.ReLU`` modules (never ``F.relu``) so that ``lowbit.convert`` can replace
them by activation quantizers, and each use has its own module (stateful quantizers such as LQ
keep per-module statistics).

* ``lenet``: LeNet-5 (conv5-6, pool, conv5-16, pool, fc120, fc84) with batch norm, for 28x28 (or 32x32).
* ``vgg-small``: the CIFAR-10 VGG-Small of LQ-Nets (Zhang et al. 2018): 2x(w), 2x(2w), 2x(4w) 3x3
  conv-BN-ReLU with a max pool after each pair, then one FC layer; w = 128 in the paper.
* ``resnet20``: the CIFAR-10 ResNet of He et al. 2016 §4.2 used by HWGQ/LQ-Nets: a 3x3 conv, three
  stages of n = (depth-2)/6 basic blocks with 16, 32, 64 channels (option A shortcuts: stride-2
  subsampling plus zero channel padding, no weights), global average pooling and one FC layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.registry import register_model


def check_positive(model: str, **values: int) -> None:
    """Raise a ConfigError naming the first constructor argument that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{model}: {name} must be a positive integer, got {value!r}")


class FeatureClassifier(nn.Module):
    """``forward(x) = head(features(x))``: a feature extractor ``body`` and a linear ``head``."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of the classification layer), N x feature_dim."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, padding: int = 1) -> list[nn.Module]:
    """The conv (no bias: BN follows) -> BatchNorm -> ReLU triple used by every net here."""
    return [nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@register_model("lenet")
def lenet(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> FeatureClassifier:
    """LeNet-5 with batch norm for ``image_size`` 28 (padded first conv) or 32 pixels."""
    check_positive("lenet", in_channels=in_channels, num_classes=num_classes)
    if image_size not in (28, 32):
        raise ConfigError(f"lenet: image_size must be 28 or 32, got {image_size!r}")
    first_padding = 2 if image_size == 28 else 0
    body = nn.Sequential(
        *conv_bn_relu(in_channels, 6, kernel=5, padding=first_padding), nn.MaxPool2d(2),
        *conv_bn_relu(6, 16, kernel=5, padding=0), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
    )
    return FeatureClassifier(body, 84, num_classes)


@register_model("vgg-small")
def vgg_small(in_channels: int = 3, num_classes: int = 10, width: int = 128, image_size: int = 32
              ) -> FeatureClassifier:
    """LQ-Nets VGG-Small: conv widths (w, w, 2w, 2w, 4w, 4w), a max pool after each pair, one FC."""
    check_positive("vgg-small", in_channels=in_channels, num_classes=num_classes, width=width)
    if image_size % 8:
        raise ConfigError(f"vgg-small: image_size must be a multiple of 8 (three 2x pools), "
                          f"got {image_size!r}")
    widths = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    layers: list[nn.Module] = []
    cin = in_channels
    for index, cout in enumerate(widths):
        layers += conv_bn_relu(cin, cout)
        if index % 2:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    layers.append(nn.Flatten())
    return FeatureClassifier(nn.Sequential(*layers), 4 * width * (image_size // 8) ** 2, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the identity; option A shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.stride = stride
        self.extra_channels = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """He et al. option A: subsample by the stride and zero-pad the new channels (no weights)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                           for i in range(blocks)])


def _init_resnet(model: nn.Module) -> None:
    """Kaiming-normal conv weights (He et al. 2015), as the CIFAR ResNet reference does."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@register_model("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16, depth: int = 20
             ) -> FeatureClassifier:
    """CIFAR ResNet-``depth`` (20 by default: 3 stages x 3 blocks) with base width 16."""
    check_positive("resnet20", in_channels=in_channels, num_classes=num_classes, width=width, depth=depth)
    if (depth - 2) % 6:
        raise ConfigError(f"resnet20: depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
    blocks = (depth - 2) // 6
    body = nn.Sequential(
        *conv_bn_relu(in_channels, width),
        _resnet_stage(width, width, blocks, 1),
        _resnet_stage(width, 2 * width, blocks, 2),
        _resnet_stage(2 * width, 4 * width, blocks, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    model = FeatureClassifier(body, 4 * width, num_classes)
    _init_resnet(model)
    return model
