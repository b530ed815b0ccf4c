"""Image-to-image networks: the pix2pix U-Net, the CycleGAN ResNet generator and the PatchGAN.

All three take any square size from 28 to 256 and follow the public pix2pix / CycleGAN code
(Isola et al. 2017, Zhu et al. 2017) with a ``width`` knob so small nets train on a CPU.
``scale`` > 1 makes a network accept inputs ``scale`` times smaller than its output (super-
resolution): the input is first enlarged by nearest-neighbour up-sampling, a plain op every
exporter supports. Generators carry ``input_shape`` and ``image_shape`` (C x H x W of input and
output); the PatchGAN is conditioned on the input: ``D(condition, image)`` scores the pair.
Registered names: ``unet-g``, ``resnet-g`` and ``patchgan-d``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.registry import register_model

MIN_SIZE, MAX_SIZE = 28, 256
NORMS = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}


def _check(name: str, size: int, scale: int, **positive: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"{name}: size must be {MIN_SIZE}..{MAX_SIZE}, got {size}")
    if scale < 1 or size % scale:
        raise ConfigError(f"{name}: scale {scale} must be >= 1 and divide size {size}")
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")


def _norm(kind: str, channels: int) -> nn.Module:
    """Batch norm, or instance norm with affine parameters (as pix2pix/CycleGAN's 'instance')."""
    if kind not in NORMS:
        raise ConfigError(f"unknown norm '{kind}'; valid: {', '.join(NORMS)}")
    return NORMS[kind](channels, affine=True) if kind == "instance" else NORMS[kind](channels)


def _enlarge(scale: int) -> list[nn.Module]:
    """Nearest up-sampling by ``scale`` (nothing when 1): super-resolution inputs reach output size."""
    return [nn.Upsample(scale_factor=scale, mode="nearest")] if scale > 1 else []


def _init_weights(model: nn.Module) -> None:
    """pix2pix initialisation: conv weights ~ N(0, 0.02), norm gains ~ N(1, 0.02), zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.weight is not None:
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- U-Net (pix2pix)


class UNetBlock(nn.Module):
    """One U-Net level: down (LeakyReLU, stride-2 conv, norm) -> inner levels -> up (ReLU, transposed
    conv, norm, dropout); the output concatenates the level's input with the up path (the skip).
    The outermost level has no activation before its conv and ends in Tanh, the innermost no norm
    on its way down (a 1x1 map has no statistics)."""

    def __init__(self, in_ch: int, inner: int, out_ch: int, in_size: int, inner_block: nn.Module | None,
                 norm: str, dropout: float, outermost: bool) -> None:
        super().__init__()
        down_size = (in_size - 2) // 2 + 1
        pad = in_size - 2 * down_size  # output_padding that restores odd sizes (7 -> 3 -> 7)
        innermost = inner_block is None
        down: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2)]
        down.append(nn.Conv2d(in_ch, inner, 4, 2, 1, bias=outermost or innermost))
        if not (outermost or innermost):
            down.append(_norm(norm, inner))
        up_in = inner if innermost else 2 * inner
        up: list[nn.Module] = [nn.ReLU(), nn.ConvTranspose2d(up_in, out_ch, 4, 2, 1, output_padding=pad,
                                                             bias=outermost)]
        up += [nn.Tanh()] if outermost else [_norm(norm, out_ch)]
        if dropout:
            up.append(nn.Dropout(dropout))
        self.outermost = outermost
        self.model = nn.Sequential(*down, *([] if innermost else [inner_block]), *up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The level's output (outermost) or [input, output] concatenated along channels (skip)."""
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], dim=1)


def default_depth(size: int) -> int:
    """Levels that halve ``size`` down to 1 pixel (28 -> 14 -> 7 -> 3 -> 1: 4), at most 8 (pix2pix 256)."""
    return min(8, int(math.log2(size)))


def _halvings(size: int, depth: int) -> list[int]:
    """Spatial size at every level of a stride-2, kernel-4, padding-1 encoder."""
    sizes = [size]
    for _ in range(depth):
        sizes.append((sizes[-1] - 2) // 2 + 1)
    return sizes


class UNetGenerator(nn.Module):
    """pix2pix U-Net: ``depth`` stride-2 levels with skip concatenations, channels width x 1, 2, 4, 8, 8...;
    dropout on the up paths of the (up to) 3 levels above the innermost, as ``unet_256`` has."""

    def __init__(self, size: int = 28, in_channels: int = 1, out_channels: int = 1, width: int = 64,
                 depth: int | None = None, norm: str = "batch", dropout: float = 0.5, scale: int = 1) -> None:
        super().__init__()
        depth = default_depth(size) if depth is None else depth
        _check("unet-g", size, scale, in_channels=in_channels, out_channels=out_channels, width=width,
               depth=depth)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"unet-g: dropout must be in [0, 1), got {dropout}")
        if depth > default_depth(size):
            raise ConfigError(f"unet-g: depth {depth} halves {size} below 1 pixel; use depth <= "
                              f"{default_depth(size)}")
        sizes = _halvings(size, depth)
        channels = [width * min(2 ** i, 8) for i in range(depth)]
        block: UNetBlock | None = None
        for level in range(depth - 1, -1, -1):
            outer = channels[level - 1] if level else in_channels
            drop = dropout if 0 < level < depth - 1 and level >= depth - 4 else 0.0
            block = UNetBlock(outer, channels[level], out_channels if level == 0 else outer, sizes[level],
                              block, norm, drop, outermost=level == 0)
        self.model = nn.Sequential(*_enlarge(scale), block)
        self.input_shape = (in_channels, size // scale, size // scale)
        self.image_shape = (out_channels, size, size)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output images in [-1, 1] for input images ``x`` (N x C x size/scale x size/scale)."""
        return self.model(x)


# ----------------------------------------------------------------------------- ResNet (CycleGAN)


class ResnetBlock(nn.Module):
    """x + (reflect-pad, 3x3 conv, norm, ReLU, [dropout], reflect-pad, 3x3 conv, norm)(x)."""

    def __init__(self, channels: int, norm: str, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False),
                                   _norm(norm, channels), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), _norm(norm, channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum."""
        return x + self.block(x)


UPSAMPLING = ("transposed", "upsample")


def _up_stage(cin: int, cout: int, out_size: int, in_size: int, mode: str) -> list[nn.Module]:
    """x2 up-sampling to exactly ``out_size``: a transposed conv (output_padding fixes odd sizes) or
    nearest up-sampling + reflect-padded 3x3 conv (no checkerboard artefacts)."""
    if mode == "transposed":
        pad = out_size - (2 * in_size - 1)
        return [nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=pad, bias=False)]
    return [nn.Upsample(size=(out_size, out_size), mode="nearest"), nn.ReflectionPad2d(1),
            nn.Conv2d(cin, cout, 3, bias=False)]


class ResnetGenerator(nn.Module):
    """CycleGAN generator: reflect-pad 7x7 conv, ``n_down`` stride-2 convs, ``blocks`` residual blocks,
    ``n_down`` x2 up-samplings (``upsampling``: transposed or upsample), reflect-pad 7x7 conv, Tanh."""

    def __init__(self, size: int = 28, in_channels: int = 1, out_channels: int = 1, width: int = 64,
                 blocks: int = 6, n_down: int = 2, norm: str = "instance", dropout: float = 0.0,
                 upsampling: str = "transposed", scale: int = 1) -> None:
        super().__init__()
        _check("resnet-g", size, scale, in_channels=in_channels, out_channels=out_channels, width=width,
               blocks=blocks, n_down=n_down)
        if upsampling not in UPSAMPLING:
            raise ConfigError(f"resnet-g: unknown upsampling '{upsampling}'; valid: {', '.join(UPSAMPLING)}")
        sizes = [size]
        for _ in range(n_down):
            sizes.append((sizes[-1] - 1) // 2 + 1)
        if sizes[-1] < 3:
            raise ConfigError(f"resnet-g: {n_down} down-samplings shrink {size} to {sizes[-1]} pixels; "
                              "lower n_down")
        layers: list[nn.Module] = [*_enlarge(scale), nn.ReflectionPad2d(3),
                                   nn.Conv2d(in_channels, width, 7, bias=False),
                                   _norm(norm, width), nn.ReLU()]
        for i in range(n_down):
            cin = width * 2 ** i
            layers += [nn.Conv2d(cin, 2 * cin, 3, 2, 1, bias=False), _norm(norm, 2 * cin), nn.ReLU()]
        layers += [ResnetBlock(width * 2 ** n_down, norm, dropout) for _ in range(blocks)]
        for i in range(n_down, 0, -1):
            cin = width * 2 ** i
            layers += [*_up_stage(cin, cin // 2, sizes[i - 1], sizes[i], upsampling), _norm(norm, cin // 2),
                       nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.input_shape = (in_channels, size // scale, size // scale)
        self.image_shape = (out_channels, size, size)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output images in [-1, 1] for input images ``x``."""
        return self.model(x)


# ----------------------------------------------------------------------------- PatchGAN


def default_layers(size: int) -> int:
    """Stride-2 layers of the PatchGAN: 3 (70x70 patches) from 64 pixels, 2 below (28 -> 5x5 patches)."""
    return 3 if size >= 64 else 2


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN on the pair [condition, image] (channels concatenated): ``n_layers`` stride-2
    4x4 convs (no norm on the first), one stride-1 conv with norm, a 1-channel stride-1 conv. Returns
    N x 1 x P x P raw scores, one per overlapping patch."""

    def __init__(self, size: int = 28, in_channels: int = 1, out_channels: int = 1, width: int = 64,
                 n_layers: int | None = None, norm: str = "batch", scale: int = 1) -> None:
        super().__init__()
        n_layers = default_layers(size) if n_layers is None else n_layers
        _check("patchgan-d", size, scale, in_channels=in_channels, out_channels=out_channels, width=width,
               n_layers=n_layers)
        if _halvings(size, n_layers)[-1] < 3:
            raise ConfigError(f"patchgan-d: {n_layers} stride-2 layers shrink {size} below 3 pixels; "
                              "lower n_layers")
        layers: list[nn.Module] = [nn.Conv2d(in_channels + out_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, n_layers + 1):
            cout = width * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(channels, cout, 4, stride, 1, bias=False), _norm(norm, cout),
                       nn.LeakyReLU(0.2)]
            channels = cout
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.enlarge = nn.Sequential(*_enlarge(scale))
        self.model = nn.Sequential(*layers)
        self.input_shape = (in_channels, size // scale, size // scale)
        self.image_shape = (out_channels, size, size)
        _init_weights(self)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Patch scores for ``image`` given the generator's input ``condition``."""
        return self.model(torch.cat([self.enlarge(condition), image], dim=1))


register_model("unet-g")(UNetGenerator)
register_model("resnet-g")(ResnetGenerator)
register_model("patchgan-d")(PatchDiscriminator)
