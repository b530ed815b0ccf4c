"""Quantized layers, convert, freeze, QuantSpec and the training hooks (SPEC §3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import load_config
from lowbit.errors import ConfigError
from lowbit.nn import (
    FrozenAct,
    FrozenLayer,
    QuantAct,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    QuantSpec,
    anneal,
    convert,
    freeze,
    refit,
    set_temperature,
)

WEIGHT_METHODS = ["minmax", "log", "tanh", "em", "dorefa", "bwn", "lq", "kmeans", "search"]


def _bits(method: str) -> int:
    return 1 if method == "bwn" else 2


def tiny_generator() -> nn.Sequential:
    """A 28x28 DCGAN-shaped generator: ConvT / BN / ReLU chain with a Tanh output (one grouped)."""
    return nn.Sequential(
        nn.ConvTranspose2d(8, 16, 7, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(True),
        nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False, groups=2), nn.BatchNorm2d(8), nn.ReLU(True),
        nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh())


def tiny_discriminator() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 8, 4, 2, 1, groups=2), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(8 * 49, 1), nn.Sigmoid())


NETS = {"G": (tiny_generator, (3, 8, 1, 1)), "D": (tiny_discriminator, (3, 1, 28, 28))}


def _inputs(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def test_convert_swaps_layers_keeps_weights_and_leaves_original() -> None:
    torch.manual_seed(0)
    model = tiny_generator()
    q = convert(model, QuantSpec(weight="em", weight_bits=2, act="sign", act_bits=1))
    assert [type(m) for m in q] == [QuantConvTranspose2d, nn.BatchNorm2d, QuantAct, QuantConvTranspose2d,
                                    nn.BatchNorm2d, QuantAct, QuantConvTranspose2d, nn.Tanh]
    assert type(model[0]) is nn.ConvTranspose2d  # inplace=False leaves the original alone
    for original, converted in zip(model, q, strict=True):
        if isinstance(original, nn.ConvTranspose2d):
            assert torch.equal(original.weight, converted.weight)
    assert q[2].replaced == "ReLU"
    same = convert(model, {"weight": "minmax", "weight_bits": 4}, inplace=True)
    assert same is model and isinstance(model[0], QuantConvTranspose2d)


def test_keep_full_precision_and_overrides() -> None:
    spec = QuantSpec(weight="minmax", weight_bits=2, act="act", act_bits=2, keep_full_precision=["5"],
                     overrides={"0": {"weight_bits": 8, "per_channel": False},
                                "2": {"weight": "bwn", "weight_bits": 1}})
    q = convert(tiny_discriminator(), spec)
    assert type(q[5]) is nn.Linear
    assert q[0].bits == 8 and q[0].weight_quantizer.channel_dim is None
    assert q[2].method == "bwn" and q[2].weight_quantizer.channel_dim == 0
    assert isinstance(q[1], QuantAct) and q[1].method == "act" and type(q[6]) is nn.Sigmoid
    w = q[0].weight.detach()
    half_step = (w.max() - w.min()) / 255 / 2
    assert (q[0].quantized_weight() - w).abs().max() <= half_step * 1.001


@pytest.mark.parametrize("logits", ["full", "centered"])
def test_frozen_search_weights_equal_the_picks_after_training_moved_the_logits(logits: str) -> None:
    """The exported codes (argmax of the logits) equal the values the forward picked (the cached,
    comparison-based pick), in both logits layouts, once training has moved the logits off their start."""
    torch.manual_seed(2)
    build, shape = NETS["G"]
    q = convert(build(), QuantSpec(weight="search", weight_bits=2, weight_opts={"logits": logits})).train()
    layers = {name: m for name, m in q.named_modules() if hasattr(m, "quantized_weight")}
    start = {name: m.weight_quantizer.value_logits().argmax(0) for name, m in layers.items()}
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        q(_inputs(shape)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    picked = {name: m.quantized_weight().detach() for name, m in layers.items()}
    assert any(not torch.equal(m.weight_quantizer.value_logits().argmax(0), start[name])
               for name, m in layers.items())  # training changed some picks
    frozen = {name: f for name, f in freeze(q).items() if isinstance(f, FrozenLayer)}
    assert frozen.keys() == picked.keys()
    for name, layer in frozen.items():
        assert torch.equal(layer.dequantize(), picked[name]), name


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_freeze_dequantize_reproduces_the_simulated_forward_exactly(method: str, net: str) -> None:
    torch.manual_seed(1)
    build, shape = NETS[net]
    model = build()
    for per_channel in (True, False):
        spec = QuantSpec(weight=method, weight_bits=_bits(method), per_channel=per_channel, act="sign",
                         act_bits=1)
        q = convert(model, spec).eval()
        out = q(_inputs(shape))
        frozen = {name: f for name, f in freeze(q).items() if isinstance(f, FrozenLayer)}
        rebuilt = convert(model, QuantSpec(act="sign", act_bits=1)).eval()  # float weights, sign acts
        layers = dict(rebuilt.named_modules())
        for name, layer in frozen.items():
            assert layer.method == method
            weight = layer.dequantize()
            assert layer.codes.dtype == torch.uint8 and int(layer.codes.max()) < layer.n_levels
            assert layer.codebook.shape[0] == (weight.shape[layer.channel_dim] if per_channel else 1)
            assert layer.channel_dim == (1 if layer.kind == "conv_transpose2d" else 0)
            if layer.scale is not None:
                grid = torch.arange(layer.n_levels, dtype=torch.float32)
                assert torch.equal(layer.codebook, grid * layer.scale[:, None] + layer.offset[:, None])
            layers[name].weight.data = weight
        assert torch.equal(rebuilt(_inputs(shape)), out), (method, per_channel)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_gradients_flow_through_every_quantized_layer(method: str) -> None:
    torch.manual_seed(2)
    for build, shape in NETS.values():
        q = convert(build(), QuantSpec(weight=method, weight_bits=_bits(method), act="sign", act_bits=1))
        q(_inputs(shape)).square().mean().backward()
        trainable = [(n, p) for n, p in q.named_parameters() if p.requires_grad]
        assert trainable
        for name, param in trainable:
            assert param.grad is not None and torch.isfinite(param.grad).all(), (method, name)
        first_layer_grad = (q[0].weight_quantizer.logits if method == "search" else q[0].weight).grad
        assert first_layer_grad.abs().sum() > 0


def test_freeze_reports_activation_levels() -> None:
    spec = QuantSpec(weight="minmax", weight_bits=4, act="act", act_bits=2, overrides={"3": {"act": "sign",
                                                                                             "act_bits": 1}})
    frozen = freeze(convert(tiny_discriminator(), spec))
    assert list(frozen) == ["0", "1", "2", "3", "5"]
    acts = [f for f in frozen.values() if isinstance(f, FrozenAct)]
    assert [a.method for a in acts] == ["act", "sign"]
    assert torch.allclose(acts[0].levels, torch.tensor([0, 1 / 3, 2 / 3, 1]))
    assert acts[1].levels.tolist() == [-1.0, 1.0]


def test_lq_activation_has_unsigned_learned_levels() -> None:
    act = QuantAct("lq", 2)
    with pytest.raises(ConfigError, match="has not seen any data"):
        act.levels()
    x = torch.rand(64, 8) * 3 - 0.5
    y = act(x)
    table = act.levels()
    assert len(table) == 4 and table[0] == 0 and (table >= 0).all()
    assert torch.isin(y.unique(), table).all()


def test_learned_range_gets_pact_gradient() -> None:
    act = QuantAct("act", 2, {"learn_range": True, "hi": 1.0})
    x = torch.tensor([-1.0, 0.2, 0.6, 1.5, 3.0], requires_grad=True)
    act(x).sum().backward()
    assert act.quantizer.hi.grad.item() == pytest.approx(2.0)  # two inputs above hi
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("method", ["em", "lq", "kmeans", "search"])
def test_state_dict_round_trip(method: str) -> None:
    torch.manual_seed(4)
    spec = QuantSpec(weight=method, weight_bits=2)
    trained = convert(tiny_discriminator(), spec)
    trained.train()
    trained(_inputs((3, 1, 28, 28))).sum().backward()  # one training step updates the quantizer state
    trained.eval()
    fresh = convert(tiny_discriminator(), spec).eval()
    fresh.load_state_dict(trained.state_dict())
    x = _inputs((3, 1, 28, 28))
    assert torch.equal(fresh(x), trained(x))


def test_em_warm_update_runs_in_training_only() -> None:
    layer = QuantLinear(64, 8, method="em", bits=2).eval()
    layer(torch.randn(2, 64))  # the first use fits
    alpha = layer.weight_quantizer.alpha.clone()
    with torch.no_grad():
        layer.weight.mul_(2)
    layer(torch.randn(2, 64))
    assert torch.equal(layer.weight_quantizer.alpha, alpha)
    layer.train()
    layer(torch.randn(2, 64))
    once = layer.weight_quantizer.alpha.clone()
    layer(torch.randn(2, 64))  # same weights: the quantized weight is reused, no second update
    assert torch.equal(layer.weight_quantizer.alpha, once)
    for _ in range(5):
        with torch.no_grad():
            layer.weight.add_(0.0)  # a new weight version, as after an optimizer step
        layer(torch.randn(2, 64))
    assert torch.allclose(layer.weight_quantizer.alpha, 2 * alpha, rtol=0.1)


@pytest.mark.parametrize(("method", "optimizer"), [
    ("minmax", lambda params: torch.optim.Adam(params, lr=0.05, fused=True)),
    ("em", lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, fused=True)),
    ("search", lambda params: torch.optim.SGD(params, lr=50.0, fused=True)),
    ("search", lambda params: torch.optim.Adam(params, lr=0.5, fused=True)),
])
def test_cached_quantized_weights_follow_fused_optimizer_steps(method: str, optimizer) -> None:
    """Fused optimisers update parameters without bumping their version counter; the layer caches
    (quantized weight, search pick) must still see every step."""
    torch.manual_seed(11)
    layer = QuantLinear(32, 16, method=method, bits=2)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    opt = optimizer(trainable)
    x = torch.randn(64, 32)
    changed = False
    for _ in range(4):
        before = layer.quantized_weight().detach().clone()
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cached = layer.quantized_weight().detach()
        fresh = layer.weight_quantizer.encode(layer.weight).decode()  # from the current parameters
        assert torch.equal(cached, fresh)
        changed |= not torch.equal(before, cached)
    assert changed


def test_hooks_temperature_anneal_refit() -> None:
    spec = QuantSpec(weight="search", weight_bits=1, overrides={"5": {"weight": "em"}})
    q = convert(tiny_discriminator(), spec)
    assert set_temperature(q, 0.5) == 2 and float(q[0].weight_quantizer.tau) == 0.5
    assert anneal(q, 10) == 2
    assert float(q[2].weight_quantizer.tau) == pytest.approx(0.97**10)
    anneal(q, 1000)
    assert float(q[2].weight_quantizer.tau) == pytest.approx(1e-4)
    with torch.no_grad():
        q[5].weight.mul_(3)
    assert refit(q) == 1
    assert float(q[5].weight_quantizer.alpha.mean()) > 0


def test_direct_layer_construction() -> None:
    conv = QuantConv2d(3, 4, 3, padding=1, method="kmeans", bits=3)
    out = conv(torch.randn(1, 3, 8, 8))
    assert out.shape == (1, 4, 8, 8)
    assert conv.quantized_weight()[0].unique().numel() <= 8


def test_spec_loads_from_yaml_and_validates(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("weight: em\nweight_bits: 2\nweight_opts: {paper: true}\nact: sign\nact_bits: 1\n"
                    "keep_full_precision: ['main.0']\noverrides:\n  'main.9': {weight_bits: 8}\n")
    spec = load_config(QuantSpec, path)
    assert spec.weight_opts == {"paper": True} and spec.for_module("main.9").weight_bits == 8
    assert spec.for_module("main.0") is None
    assert load_config(QuantSpec, path, ["weight_bits=3"]).weight_bits == 3


@pytest.mark.parametrize(("data", "message"), [
    ({"weight": "emm", "weight_bits": 2}, "did you mean 'em'"),
    ({"weight_bits": 9}, "out of range"),
    ({"weight_bits": 0}, "out of range"),
    ({"weight_bits": 2.5}, "integer"),
    ({"act": "sign"}, "needs act_bits"),
    ({"act_bits": 1}, "act is null"),
    ({"act": "relu", "act_bits": 1}, "valid: act, dorefa, lq, rsign, sign"),
    ({"weight": "sign", "weight_bits": 1}, "unknown weight quantization method"),
    ({"overrides": {"x": {"wieght_bits": 3}}}, "did you mean 'weight_bits'"),
    ({"overrides": {"x": {"weight_bits": 33}}}, "out of range"),
    ({"weight": "em", "weight_bits": 2, "weight_opts": {"tol2": 1}}, "did you mean 'tol'"),
    ({"weight": "search", "weight_bits": 1, "weight_opts": {"values": "pow2-3"}}, "need more than 1 bits"),
    ({"weight": "search", "weight_bits": 3, "weight_opts": {"values": "pow3"}}, "valid: binary, pow2-2"),
    ({"weight": "search", "weight_bits": 2, "weight_opts": {"logits": "reduced"}}, "'centered' or 'full'"),
])
def test_bad_specs_raise_value_error(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lowbit.config.from_dict(QuantSpec, data)


def test_convert_names_the_layer_that_cannot_be_quantized() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    with pytest.raises(ConfigError, match="layer '0'.*constant"):
        convert(model, QuantSpec(weight="minmax", weight_bits=2))


def test_lazy_reexports() -> None:
    assert lowbit.QuantSpec is QuantSpec and lowbit.convert is convert and lowbit.freeze is freeze


def test_a_model_converted_under_inference_mode_runs_and_matches():
    """Weights created inside torch.inference_mode are inference tensors (no version counter): the
    weight cache must step aside, and the output must equal the same model converted normally."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    spec = QuantSpec(weight="minmax", weight_bits=2)
    x = torch.randn(2, 3, 9, 9)
    expected = convert(fp, spec).eval()(x).detach()
    with torch.inference_mode():
        q = convert(fp, spec).eval()
        assert q[0].weight.is_inference()
        out = q(x)
    torch.testing.assert_close(out, expected)
