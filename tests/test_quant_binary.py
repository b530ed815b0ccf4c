"""Binary methods (issue 16): rsign, learned BWN scales, RPReLU, the registry's facts, staged weights
and feature distillation, each against formulas written out here."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn import QuantAct, QuantSpec, RPReLU, convert, freeze, quantize_weights
from lowbit.nn.convert import FrozenAct, FrozenLayer
from lowbit.quant import METHODS, Quantizer, QuantOptions, levels, quantize, register
from lowbit.quant.binary import RSignQuantizer
from lowbit.train.distill import FeatureTaps


def _rsign(channels: int = 3, **opts) -> RSignQuantizer:
    act = QuantAct("rsign", 1, opts, channels=channels)
    return act.quantizer


def _set(quantizer: RSignQuantizer, shift: list[float], lo: float, hi: float) -> None:
    with torch.no_grad():
        quantizer.shift.copy_(torch.tensor(shift))
        quantizer.level_values.copy_(torch.tensor([lo, hi]))


# ----------------------------------------------------------------------------- the registry


def test_registry_refuses_a_quantizer_without_its_facts() -> None:
    class Nameless(Quantizer):
        roles = ("weight",)
        bit_range = (1, 2)

    class BadRole(Quantizer):
        method = "bad-role"
        roles = ("bias",)
        bit_range = (1, 2)

    class BadBits(Quantizer):
        method = "bad-bits"
        roles = ("weight",)
        bit_range = (0, 9)

    class PlainOptions:
        pass

    class NoDataclass(Quantizer):
        method = "no-dataclass"
        roles = ("weight",)
        bit_range = (1, 1)
        Options = PlainOptions  # type: ignore[assignment]

    for cls, missing in ((Nameless, "method"), (BadRole, "roles"), (BadBits, "bit_range"),
                         (NoDataclass, "Options")):
        expected = f"cannot register quantizer {cls.__name__}: it needs .*{missing}"
        with pytest.raises(ConfigError, match=expected):
            register(cls)
        assert cls not in METHODS.values()


def test_registry_refuses_a_taken_name_and_accepts_a_complete_class() -> None:
    @dataclass(frozen=True)
    class HalfOptions(QuantOptions):
        factor: float = 0.5

    class Clash(Quantizer):
        method = "bwn"
        roles = ("weight",)
        bit_range = (1, 1)
        Options = HalfOptions

    with pytest.raises(ConfigError, match="'bwn' is taken by BWNQuantizer"):
        register(Clash)
    Clash.method = "test-half"
    try:
        assert register(Clash) is Clash and METHODS["test-half"] is Clash
        assert Clash(1, factor=0.25).options.factor == 0.25
        with pytest.raises(ConfigError, match="unknown option 'factr' \\(did you mean 'factor'\\?\\)"):
            Clash(1, factr=0.25)
    finally:
        del METHODS["test-half"]


@pytest.mark.parametrize(("method", "opts", "message"), [
    ("rsign", {"lo": 1.0, "hi": 0.0}, "lo=1.0 must be below hi=0.0"),
    ("rsign", {"grad": "tanh"}, "grad must be 'ste' or 'approx', got 'tanh'"),
    ("rsign", {"shift": "pixel"}, "shift must be 'channel' or 'layer'"),
    ("rsign", {"treshold": 0}, "unknown option 'treshold'.*valid options: grad, hi, learn_levels, lo, shift"),
    ("bwn", {"scale": "max"}, "scale must be 'mean' or 'learned', got 'max'"),
    ("em", {"init": "kmeans"}, "init must be 'search' or 'minmax'"),
])
def test_bad_options_name_the_fix(method: str, opts: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quantize(torch.randn(2, 3, 4), method, 1, **opts)
    with pytest.raises(ConfigError, match=message):
        QuantSpec(act=method, act_bits=1, act_opts=opts) if method == "rsign" else \
            QuantSpec(weight=method, weight_bits=1, weight_opts=opts)


# ----------------------------------------------------------------------------- rsign


def test_rsign_forward_is_the_nearest_level_of_the_shifted_input() -> None:
    quantizer = _rsign(3)
    _set(quantizer, [0.5, -1.0, 0.0], lo=-0.25, hi=2.0)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2
    x[0, 2, 0, 0] = 0.875  # exactly at the midpoint of channel 2: ties go to the lower level
    shift = torch.tensor([0.5, -1.0, 0.0]).reshape(1, 3, 1, 1)
    expected = torch.where(x - shift > (-0.25 + 2.0) / 2, torch.tensor(2.0), torch.tensor(-0.25))
    y = quantizer(x)
    assert torch.equal(y, expected)
    assert float(y.detach()[0, 2, 0, 0]) == -0.25
    assert torch.equal(quantizer.encode(x).decode(), y)
    assert levels(x, "rsign", 1).tolist() == [0.0, 1.0]  # the starting levels of the functional form


@pytest.mark.parametrize("grad", ["ste", "approx"])
def test_rsign_gradients_follow_the_surrogate(grad: str) -> None:
    quantizer = _rsign(2, grad=grad)
    _set(quantizer, [0.0, 1.0], lo=0.0, hi=2.0)  # threshold u = 1, half-gap 1: t = u - 1
    x = torch.linspace(-1.5, 3.5, 41).reshape(1, 1, 41).repeat(3, 2, 1).requires_grad_(True)
    upstream = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    quantizer(x).backward(upstream)
    t = x.detach() - torch.tensor([0.0, 1.0]).reshape(1, 2, 1) - 1
    slope = (2 - 2 * t.abs()).clamp_min(0) if grad == "approx" else (t.abs() <= 1).float()
    assert torch.allclose(x.grad, upstream * slope)
    assert torch.allclose(quantizer.shift.grad, -(upstream * slope).sum(dim=(0, 2)))
    high = (t > 0).float()
    lo_grad, hi_grad = quantizer.level_values.grad
    assert torch.allclose(hi_grad, (upstream * high).sum())
    assert torch.allclose(lo_grad, (upstream * (1 - high)).sum())


def test_approx_gradient_peaks_at_the_threshold_and_integrates_to_the_level_gap() -> None:
    quantizer = _rsign(1, grad="approx", shift="layer")
    _set(quantizer, [0.0], lo=-1.0, hi=3.0)
    u = torch.linspace(-3, 5, 80001).reshape(1, 1, -1).requires_grad_(True)
    quantizer(u).sum().backward()
    step = float(u.detach()[0, 0, 1] - u.detach()[0, 0, 0])
    assert float(u.grad.max()) == pytest.approx(2.0, abs=1e-3)
    assert float(u.detach()[0, 0, int(u.grad.argmax())]) == pytest.approx(1.0, abs=1e-3)
    assert float(u.grad.sum()) * step == pytest.approx(4.0, rel=5e-3)  # hi - lo


def test_rsign_needs_its_channel_count() -> None:
    with pytest.raises(ConfigError, match="per-channel shift needs the channel count.*shift: layer"):
        QuantAct("rsign", 1)
    assert QuantAct("rsign", 1, {"shift": "layer"}).quantizer.shift.shape == (1,)


def _generator() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.ConvTranspose2d(8, 6, 4, 1, 0), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.ConvTranspose2d(6, 4, 4, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Tanh())


W1A1 = {"weight": "bwn", "weight_bits": 1, "weight_opts": {"scale": "learned"}, "act": "rsign", "act_bits": 1,
        "act_opts": {"grad": "approx"}, "overrides": {"0": {"weight": "minmax", "weight_bits": 8}}}


def test_convert_gives_rsign_its_channels_and_rprelu_its_place() -> None:
    q = convert(_generator(), {**W1A1, "rprelu": True})
    assert isinstance(q[2], nn.Sequential) and isinstance(q[2][0], RPReLU) and isinstance(q[2][1], QuantAct)
    assert q[2][1].quantizer.shift.shape == (6,) and q[5][1].quantizer.shift.shape == (4,)
    assert q[2][0].slope.shape == (6,)
    with pytest.raises(ConfigError, match="rprelu goes before a quantized activation"):
        QuantSpec(rprelu=True)


def _contract_forward(model: nn.Sequential, frozen: dict, z: torch.Tensor) -> torch.Tensor:
    """The export contract, written out: dequantized weights, then for each FrozenAct the nearest
    level of ``x - shift[c]`` (torch.bucketize on the midpoints: ties to the lower level)."""
    x = z
    for name, module in model.named_children():
        entry = frozen.get(name) or frozen.get(f"{name}.1")
        if isinstance(entry, FrozenLayer):
            x = nn.functional.conv_transpose2d(x, entry.dequantize(), entry.bias, **{
                k: entry.hyper[k] for k in ("stride", "padding", "output_padding", "dilation", "groups")})
        elif isinstance(entry, FrozenAct):
            if isinstance(module, nn.Sequential):
                x = module[0](x)  # the RPReLU, as its own node
            mids = (entry.levels[1:] + entry.levels[:-1]) / 2
            shifted = x - entry.shift.reshape(1, -1, 1, 1)
            x = entry.levels[torch.bucketize(shifted, mids)]
        else:
            x = module(x)
    return x


@pytest.mark.parametrize("rprelu", [False, True])
def test_frozen_rsign_shift_reproduces_the_simulated_generator_exactly(rprelu: bool) -> None:
    q = convert(_generator(), {**W1A1, "rprelu": rprelu})
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    z = torch.randn(16, 8, 1, 1, generator=torch.Generator().manual_seed(3))
    for _ in range(3):  # move the shifts, levels, scales and RPReLU away from their starts
        q(z).square().mean().backward()
        opt.step()
        opt.zero_grad()
    q.eval()
    frozen = freeze(q)
    act = frozen["2.1" if rprelu else "2"]
    assert isinstance(act, FrozenAct) and act.method == "rsign" and act.shift.shape == (6,)
    assert not torch.equal(act.shift, torch.zeros(6)) and act.levels.tolist() == sorted(act.levels.tolist())
    with torch.no_grad():
        assert torch.equal(_contract_forward(q, frozen, z), q(z))


# ----------------------------------------------------------------------------- learned BWN scales


def test_learned_bwn_scale_starts_at_the_mean_and_gets_its_gradient() -> None:
    layer = convert(nn.Sequential(nn.Conv2d(3, 4, 3)), {**W1A1, "overrides": {}})[0]
    w = layer.weight.detach()
    alpha = layer.weight_quantizer.alpha
    assert torch.allclose(alpha, w.abs().mean(dim=(1, 2, 3)))
    sign = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(layer.quantized_weight(), alpha.detach().reshape(-1, 1, 1, 1) * sign)
    upstream = torch.randn(w.shape)
    layer.quantized_weight().backward(upstream)
    assert torch.allclose(alpha.grad, (upstream * sign).sum(dim=(1, 2, 3)))
    assert torch.equal(layer.weight.grad, upstream)  # STE into the latent weight
    frozen = freeze(nn.Sequential(layer))["0"]
    assert torch.equal(frozen.dequantize(), layer.quantized_weight().detach())
    assert torch.equal(frozen.scale, 2 * alpha.detach()) and torch.equal(frozen.offset, -alpha.detach())


# ----------------------------------------------------------------------------- RPReLU, staging, distillation


def test_rprelu_formula() -> None:
    module = RPReLU(2)
    with torch.no_grad():
        module.shift_in.copy_(torch.tensor([0.5, -1.0]))
        module.slope.copy_(torch.tensor([0.25, 2.0]))
        module.shift_out.copy_(torch.tensor([1.0, 0.0]))
    x = torch.randn(3, 2, 4)
    u = x - torch.tensor([0.5, -1.0]).reshape(1, 2, 1)
    expected = torch.where(u >= 0, u, torch.tensor([0.25, 2.0]).reshape(1, 2, 1) * u) + \
        torch.tensor([1.0, 0.0]).reshape(1, 2, 1)
    assert torch.allclose(module(x), expected)
    assert torch.equal(RPReLU(2)(x), x)  # starts as the identity


def test_staged_schedule_switches_the_weights_only() -> None:
    model = _generator().eval()
    q = convert(model, {**W1A1, "act": None, "act_bits": 32, "act_opts": {}}).eval()
    z = torch.randn(4, 8, 1, 1)
    assert quantize_weights(q, False) == 3
    assert torch.equal(q(z), model(z))
    quantize_weights(q, True)
    assert not torch.allclose(q(z), model(z))


def test_feature_distillation_is_the_mean_squared_gap_of_the_pre_activations() -> None:
    teacher = _generator().eval()
    student = convert(teacher, W1A1)
    z = torch.randn(4, 8, 1, 1)
    taps = FeatureTaps(student, teacher, z)
    assert taps.names == ["2", "5"] and not taps.adapters  # equal channel counts: compared directly
    with taps.recording():
        student(z)
        teacher(z)
    loss = taps.loss()
    s1, t1 = student[:2](z), teacher[:2](z)
    s2, t2 = student[:5](z), teacher[:5](z)
    expected = ((s1 - t1).square().mean() + (s2 - t2).square().mean()) / 2
    assert torch.allclose(loss, expected)
    with taps.recording():
        teacher(z)
        teacher(z)
    taps.features["student"] = dict(taps.features["teacher"])
    assert float(taps.loss().detach()) == 0.0
    student(z)  # outside recording: nothing is kept
    assert taps.features == {"student": {}, "teacher": {}}


def test_packed_rsign_generator_equals_the_simulated_one(tmp_path) -> None:
    """Threshold folding end to end: the packed file (torch backend) reproduces the simulated W1A1
    generator with learned per-channel shifts bit for bit."""
    from lowbit.export import export_packed, load

    q = convert(_generator(), W1A1)
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    z = torch.randn(16, 8, 1, 1, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        q(z).square().mean().backward()
        opt.step()
        opt.zero_grad()
    q.eval()
    packed = load(export_packed(q, tmp_path / "g.lowbit", example_input=z), kernel_path="torch")
    with torch.no_grad():
        expected = q(z)
        assert torch.equal(packed(z).reshape(expected.shape), expected)
