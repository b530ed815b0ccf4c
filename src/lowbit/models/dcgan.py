"""DCGAN generators and discriminators (Radford et al. 2015) for 16/28/32/64/128-pixel images.

Both networks are flat ``nn.Sequential`` chains so ``lowbit.convert`` and the exporter can walk
them layer by layer. The generator views its latent ``z`` (N x latent_dim) as N x latent_dim x 1 x 1,
maps it to a 4x4 feature map with a ConvTranspose2d, then doubles the resolution with
ConvTranspose2d -> BatchNorm2d -> ReLU blocks (28 pixels: 4 -> 7 -> 14 -> 28) and ends in Tanh.
The discriminator mirrors it with strided Conv2d -> [BatchNorm2d] -> LeakyReLU(0.2) blocks and
returns one raw score per image (a logit for BCE losses, a critic value for Wasserstein losses).
Registered names: ``dcgan-g-{size}``, ``dcgan-d-{size}`` and ``dcgan-d-{size}-nobn`` (no batch
norm, as WGAN-GP's gradient penalty requires, Gulrajani et al. 2017 §4).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.registry import register_model

#: default (channels, width) per resolution: the small 28/16-pixel nets train on a CPU.
RESOLUTIONS = {16: (1, 32), 28: (1, 32), 32: (3, 64), 64: (3, 64), 128: (3, 64)}
START = 4


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"DCGAN {name} must be a positive integer, got {value!r}")


def _stage_kernels(size: int) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of each x2 up/down-sampling stage between 4x4 and ``size``.

    A 28-pixel net starts with kernel 3 (4 -> 7) and then doubles (7 -> 14 -> 28).
    """
    if size == 28:
        return [(3, 2, 1), (4, 2, 1), (4, 2, 1)]
    return [(4, 2, 1)] * int(math.log2(size // START))


def _stage_channels(size: int, width: int) -> list[int]:
    """Feature channels from the 4x4 map outwards: width * 2^(n-1), ..., width * 2, width."""
    n = len(_stage_kernels(size))
    return [width * 2 ** (n - 1 - i) for i in range(n)]


def _init_dcgan_weights(model: nn.Module) -> None:
    """DCGAN initialisation (paper §4): conv weights ~ N(0, 0.02), BN gains ~ N(1, 0.02), zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Sequential):
    """z (N x latent_dim) -> images (N x channels x size x size) in [-1, 1]."""

    def __init__(
        self, size: int, latent_dim: int = 100, width: int | None = None, channels: int | None = None
    ) -> None:
        default_channels, default_width = RESOLUTIONS[size]
        width = default_width if width is None else width
        channels = default_channels if channels is None else channels
        for name, value in (("latent_dim", latent_dim), ("width", width), ("channels", channels)):
            _check_positive(name, value)
        feats = _stage_channels(size, width)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, feats[0], START, 1, 0, bias=False),
            nn.BatchNorm2d(feats[0]),
            nn.ReLU(),
        ]
        outs = feats[1:] + [channels]
        for i, ((k, s, p), cin, cout) in enumerate(zip(_stage_kernels(size), feats, outs, strict=True)):
            last = i == len(outs) - 1
            layers.append(nn.ConvTranspose2d(cin, cout, k, s, p, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(cout), nn.ReLU()]
        super().__init__(*layers)
        self.latent_dim = latent_dim
        self.image_shape = (channels, size, size)
        _init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images for latents ``z`` (N x latent_dim, or N x latent_dim x 1 x 1)."""
        return super().forward(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class DCGANDiscriminator(nn.Sequential):
    """images (N x channels x size x size) -> one raw score per image, shape (N,)."""

    def __init__(
        self, size: int, width: int | None = None, channels: int | None = None, batch_norm: bool = True
    ) -> None:
        default_channels, default_width = RESOLUTIONS[size]
        width = default_width if width is None else width
        channels = default_channels if channels is None else channels
        for name, value in (("width", width), ("channels", channels)):
            _check_positive(name, value)
        feats = _stage_channels(size, width)[::-1]
        layers: list[nn.Module] = []
        for i, ((k, s, p), cin, cout) in enumerate(
            zip(_stage_kernels(size)[::-1], [channels] + feats[:-1], feats, strict=True)
        ):
            layers.append(nn.Conv2d(cin, cout, k, s, p, bias=not batch_norm or i == 0))
            if batch_norm and i > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(nn.Conv2d(feats[-1], 1, START, 1, 0))
        super().__init__(*layers)
        self.image_shape = (channels, size, size)
        _init_dcgan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One raw score per image."""
        return super().forward(x).reshape(x.shape[0])


def _register(size: int) -> None:
    @register_model(f"dcgan-g-{size}")
    def generator(latent_dim: int = 100, width: int | None = None, channels: int | None = None) -> nn.Module:
        """DCGAN generator for ``size`` x ``size`` images."""
        return DCGANGenerator(size, latent_dim=latent_dim, width=width, channels=channels)

    @register_model(f"dcgan-d-{size}")
    def discriminator(width: int | None = None, channels: int | None = None) -> nn.Module:
        """DCGAN discriminator with batch norm (DCGAN, LSGAN, WGAN)."""
        return DCGANDiscriminator(size, width=width, channels=channels, batch_norm=True)

    @register_model(f"dcgan-d-{size}-nobn")
    def discriminator_nobn(width: int | None = None, channels: int | None = None) -> nn.Module:
        """DCGAN discriminator without batch norm (the WGAN-GP critic)."""
        return DCGANDiscriminator(size, width=width, channels=channels, batch_norm=False)


for _size in RESOLUTIONS:
    _register(_size)
