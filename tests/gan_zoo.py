"""Generators and discriminators in the styles of widely used public GAN code (not lowbit's own models):
the PyTorch-examples DCGAN (``self.main``), a Keras-style DCGAN with Unflatten and Dropout2d, the PyTorch-GAN
MLP WGAN-GP generator (reshape in forward), the CycleGAN ResNet generator (ReflectionPad2d, InstanceNorm2d,
residual adds), the pix2pix U-Net (recursive skip blocks, torch.cat, Dropout), a PatchGAN discriminator,
an Upsample + Conv2d generator (reflect / 'same' padding, F.interpolate) and a PixelShuffle generator."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ExamplesDCGAN(nn.Module):
    """pytorch/examples dcgan: ``self.main`` on z as N x nz x 1 x 1, no latent_dim attribute."""

    def __init__(self, nz: int = 16, ngf: int = 8) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)


class UnflattenDCGAN(nn.Module):
    """Linear -> Unflatten -> BN -> ReLU -> ConvT stack with Dropout2d, z as N x nz."""

    def __init__(self, nz: int = 16, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(nz, width * 7 * 7),
            nn.Unflatten(1, (width, 7, 7)),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Dropout2d(0.3),
            nn.ConvTranspose2d(width // 2, 1, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPGenerator(nn.Module):
    """PyTorch-GAN wgan_gp: Linear / BatchNorm1d / LeakyReLU blocks, then ``img.view(N, *shape)``."""

    def __init__(self, latent_dim: int = 16, img_shape: tuple[int, int, int] = (1, 12, 12)) -> None:
        super().__init__()
        self.img_shape = img_shape

        def block(in_feat: int, out_feat: int, normalize: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(in_feat, out_feat)]
            if normalize:
                layers.append(nn.BatchNorm1d(out_feat, 0.8))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(
            *block(latent_dim, 32, normalize=False),
            *block(32, 64),
            *block(64, 64),
            nn.Linear(64, 144),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        img = self.model(z)
        return img.view(img.shape[0], *self.img_shape)


class ResnetBlock(nn.Module):
    """CycleGAN residual block: reflect pad, conv, InstanceNorm, ReLU, reflect pad, conv, IN; x + f(x)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN ResnetGenerator: 7x7 stem, two stride-2 downs, n blocks, two transposed-conv ups, Tanh."""

    def __init__(self, channels: int = 3, ngf: int = 8, n_blocks: int = 2) -> None:
        super().__init__()
        model: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        model += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


class UnetSkipConnectionBlock(nn.Module):
    """pix2pix U-Net block: down, submodule, up; ``torch.cat([x, self.model(x)], 1)`` unless outermost."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=False)
        downrelu, downnorm = nn.LeakyReLU(0.2, True), nn.BatchNorm2d(inner_nc)
        uprelu, upnorm = nn.ReLU(True), nn.BatchNorm2d(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=False)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(
                inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=False
            )
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix UnetGenerator with ``num_downs`` levels (input size divisible by 2**num_downs)."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, num_downs: int = 4, ngf: int = 8) -> None:
        super().__init__()
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 4, innermost=True)
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 4, submodule=block, use_dropout=True)
        for _ in range(num_downs - 4):
            block = UnetSkipConnectionBlock(ngf * 4, ngf * 4, submodule=block, use_dropout=True)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block)
        self.model = UnetSkipConnectionBlock(
            output_nc, ngf * 2, input_nc=input_nc, submodule=block, outermost=True
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: stride-2 convs with LeakyReLU and BatchNorm to a 1-channel patch map."""

    def __init__(self, input_nc: int = 3, ndf: int = 8, n_layers: int = 2) -> None:
        super().__init__()
        sequence: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        sequence += [
            nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult * 2, 1, 4, 1, 1),
        ]
        self.model = nn.Sequential(*sequence)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


class UpsampleConvGenerator(nn.Module):
    """Upsample + Conv2d instead of transposed convs (checkerboard-free style), 'same' and reflect padding,
    GroupNorm / LayerNorm, functional activations and interpolation, a constant affine at the output."""

    def __init__(self, nz: int = 16, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(nz, width * 4 * 4)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv1 = nn.Conv2d(width, width, 3, padding="same", padding_mode="reflect")
        self.norm1 = nn.GroupNorm(4, width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1, padding_mode="replicate")
        self.norm2 = nn.LayerNorm([width // 2, 16, 16])
        self.act2 = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(width // 2, 3, 4, padding="same")
        self.prelu = nn.PReLU(width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.fc(z).view(-1, self.width, 4, 4))
        x = self.act1(self.norm1(self.conv1(self.up1(x))))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.act2(self.norm2(self.conv2(x)))
        return torch.tanh(self.conv3(x)) * 0.5 + 0.5


class PixelShuffleGenerator(nn.Module):
    """Sub-pixel up-sampling (ESPCN / SRGAN style): conv -> PixelShuffle, SiLU / ELU / GELU, skip add."""

    def __init__(self, nz: int = 16, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(nz, width * 7 * 7)
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(width, width * 4, 3, padding=1), nn.PixelShuffle(2), nn.SiLU())
        self.tail = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ELU(), nn.Conv2d(width, 1, 3, padding=1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc(z)).reshape(z.size(0), self.width, 7, 7)
        x = x + self.body(x)
        y = self.up(x)
        return torch.sigmoid(self.tail(y) - y.mean(dim=(1, 2, 3), keepdim=True))


#: name -> (builder, example input shape per sample)
ZOO: dict[str, tuple] = {
    "examples-dcgan": (ExamplesDCGAN, (16, 1, 1)),
    "unflatten-dcgan": (UnflattenDCGAN, (16,)),
    "mlp-wgangp": (MLPGenerator, (16,)),
    "cyclegan-resnet": (ResnetGenerator, (3, 16, 16)),
    "pix2pix-unet": (UnetGenerator, (3, 16, 16)),
    "patchgan": (NLayerDiscriminator, (3, 16, 16)),
    "upsample-conv": (UpsampleConvGenerator, (16,)),
    "pixelshuffle": (PixelShuffleGenerator, (16,)),
}


def calibrated(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with random weights and BatchNorm statistics from a few train-mode batches, in eval mode
    (like a trained model: no BatchNorm at its initial statistics)."""
    torch.manual_seed(seed)
    builder, shape = ZOO[name]
    model = builder()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape))
    return model.eval()


def trained_like_dcgan(width: int, seed: int = 0) -> nn.Module:
    """lowbit's dcgan-g-28 with non-trivial BatchNorm statistics and shifts (as after training), eval mode."""
    from lowbit.models import create_model

    torch.manual_seed(seed)
    model = create_model("dcgan-g-28", width=width)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.02)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def zoo_specs() -> dict:
    """The quantization specs every export test runs the zoo at."""
    from lowbit.nn import QuantSpec

    return {
        "w4": QuantSpec(weight="minmax", weight_bits=4),
        "w2-em": QuantSpec(weight="em", weight_bits=2),
        "w1a1-sign": QuantSpec(weight="bwn", weight_bits=1, act="sign", act_bits=1),
        "w1a1-act": QuantSpec(weight="bwn", weight_bits=1, act="act", act_bits=1),
        "w1a1-inputs": QuantSpec(weight="bwn", weight_bits=1, act="sign", act_bits=1, input_act=True),
    }


def resigned(source: Path, target: Path, edit) -> Path:
    """``source`` with its IR JSON / tensors changed by ``edit(arch, tensors)`` and re-signed into ``target``,
    as a hostile writer would (the checksum then passes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.export.format import META_ARCH, META_CHECKSUM, checksum

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    arch = json.loads(metadata[META_ARCH])
    edit(arch, tensors)
    metadata[META_ARCH] = json.dumps(arch)
    metadata[META_CHECKSUM] = checksum(tensors, metadata[META_ARCH])
    save_file(tensors, str(target), metadata=metadata)
    return target
