"""``QuantSpec.input_act`` (Bi-Real / XNOR-Net placement): an activation quantizer in front of every quantized
layer whose input is float, found from the data flow; the layers then run on the kernels after export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gan_zoo import ResnetGenerator, UnetGenerator, calibrated
from lowbit.errors import ConfigError
from lowbit.export import ExportWarning, available_paths, export_packed, load
from lowbit.export.backends import native
from lowbit.nn import QuantAct, QuantSpec, convert
from lowbit.nn.layers import QuantLayerMixin

W8_FLOAT_INPUT = {"weight": "minmax", "weight_bits": 8, "act": None, "act_bits": 32}
#: the first and last layer of each zoo model (8-bit weights, float input in the ResNet spec of issue 13)
EDGES = {"cyclegan-resnet": ["model.1", "model.19"], "pix2pix-unet": ["model.model.0", "model.model.3"]}


def _spec(name: str | None = None, **extra) -> QuantSpec:
    overrides = {layer: W8_FLOAT_INPUT for layer in EDGES.get(name, [])}
    return QuantSpec(weight="bwn", weight_bits=1, act="sign", act_bits=1, overrides=overrides, **extra)


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Quantized layer name -> number of distinct values its input takes on ``x`` (2 for a binary input)."""
    seen: dict[str, int] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, a, name=name: seen.update({name: a[0].unique().numel()}))
        for name, module in model.named_modules()
        if isinstance(module, QuantLayerMixin)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def _acts(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, QuantAct)]


@pytest.mark.parametrize(
    ("name", "edges", "inserted"),
    [
        # stem (reads the image), block 2's first conv and the first up-conv (read the residual stream)
        ("cyclegan-resnet", False, ["model.1.0", "model.11.conv_block.1.0", "model.12.0"]),
        ("cyclegan-resnet", True, ["model.11.conv_block.1.0", "model.12.0"]),  # 8-bit stem: float input
        ("pix2pix-unet", False, ["model.model.0.0"]),  # the outermost down-conv reads the image
        ("pix2pix-unet", True, []),  # every other layer reads a (Leaky)ReLU, now a QuantAct
    ],
)
def test_input_act_inserts_exactly_the_missing_quantizers(name, edges, inserted):
    fp32 = calibrated(name)
    plain = convert(fp32, _spec(name if edges else None))
    placed = convert(fp32, _spec(name if edges else None, input_act=True))
    new = [act for act in _acts(placed) if act not in _acts(plain)]
    assert sorted(new) == sorted(inserted)
    assert len(_acts(placed)) == len(_acts(plain)) + len(inserted)
    x = torch.randn(2, 3, 16, 16)
    float_inputs = {layer for layer, levels in _layer_inputs(placed.eval(), x).items() if levels > 2}
    assert float_inputs == (set(EDGES[name][:1]) if edges else set())
    plain_float = {layer for layer, levels in _layer_inputs(plain.eval(), x).items() if levels > 2}
    assert len(plain_float) == len(inserted) + (1 if edges else 0)  # exactly the layers that got one
    again = convert(placed, _spec(name if edges else None, input_act=True))
    assert _acts(again) == _acts(placed)  # converting twice adds nothing


def test_input_act_respects_keep_full_precision_and_act_overrides():
    fp32 = calibrated("cyclegan-resnet")
    kept = convert(fp32, _spec(input_act=True, keep_full_precision=["model.12"]))
    assert type(kept.model[12]) is nn.ConvTranspose2d  # not quantized, not wrapped
    own_act = {"act": "act", "act_bits": 2}
    spec = QuantSpec(weight="bwn", weight_bits=1, act="sign", act_bits=1, input_act=True,
                     overrides={"model.11.conv_block.1": own_act})
    mixed = convert(fp32, spec)
    inserted = mixed.model[11].conv_block[1][0]
    assert isinstance(inserted, QuantAct) and (inserted.method, inserted.bits) == ("act", 2)
    assert inserted.replaced == "input of QuantConv2d"


def test_converted_model_trains_a_step():
    torch.manual_seed(0)
    model = convert(calibrated("cyclegan-resnet"), _spec("cyclegan-resnet", input_act=True)).train()
    conv = model.model[11].conv_block[1][1]
    before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = (model(torch.randn(2, 3, 16, 16)) - torch.rand(2, 3, 16, 16)).square().mean()
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # STE through the new sign
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(conv.weight.detach(), before)


def _tie_free(name: str) -> nn.Module:
    """A zoo model with learned shifts in its InstanceNorms and a bias in every conv (as after training),
    so no binary activation input sits exactly on its threshold: the kernels must match the model."""
    model = calibrated(name)
    generator = torch.Generator().manual_seed(3)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.InstanceNorm2d):
                norm = nn.InstanceNorm2d(child.num_features, affine=True)
                norm.bias.data = 0.3 * torch.randn(child.num_features, generator=generator)
                setattr(parent, child_name, norm)
            elif isinstance(child, nn.Conv2d) and child.bias is None:
                child.bias = nn.Parameter(0.3 * torch.randn(child.out_channels, generator=generator))
    return model


@pytest.mark.parametrize("name", ["cyclegan-resnet", "pix2pix-unet"])
def test_export_runs_every_layer_but_the_first_on_the_kernels_with_parity(tmp_path, name):
    """Torch backend bit for bit; the Python kernels and native liblowbit within tolerance, no tie warning."""
    model = convert(_tie_free(name), _spec(name, input_act=True)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        path = export_packed(model, tmp_path / "m.lowbit", example_input=x[:1])
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(load(path, kernel_path="torch")(x), expected)
    tolerance = 1e-3 * max(1.0, expected.abs().max().item())
    kernels = [p for p in available_paths() if p != "torch"]
    for kernel in kernels[:1] + kernels[-1:]:
        packed = load(path, kernel_path=kernel, backend="python")
        rows = [row for row in packed.plan_table() if row["act_bits"] is not None]
        off_kernels = {row["module"] for row in rows if not row["backend"].startswith("x86")}
        assert off_kernels == {EDGES[name][0]}, kernel  # only the 8-bit first layer, reading the float image
        assert (packed(x) - expected).abs().max().item() <= tolerance, kernel
    if native.available():
        out = native.NativeModel(path.read_bytes(), str(path)).run(x.numpy())
        assert np.abs(out - expected.numpy()).max() <= tolerance


def test_bad_input_act_values_get_a_clear_error():
    with pytest.raises(ConfigError, match="input_act"):
        QuantSpec.from_dict({"weight_bits": 1, "act": "sign", "act_bits": 1, "input_act": "yes"})
    with pytest.raises(ConfigError, match="input_act must be true or false, got 'yes'"):
        QuantSpec(weight_bits=1, act="sign", act_bits=1, input_act="yes")
    with pytest.raises(ConfigError, match="input_act: true .* act is null"):
        QuantSpec(weight_bits=1, input_act=True)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ConfigError, match="input_act: cannot follow the data flow of Branchy"):
        convert(Branchy(), _spec(input_act=True))
    assert isinstance(convert(UnetGenerator(), _spec(input_act=True)), UnetGenerator)
    assert isinstance(convert(ResnetGenerator(), _spec(input_act=True)).model[1], nn.Sequential)
