"""Weight search (002 §2): RDHS, SGT, the value spaces, the channel-expanded conv and annealing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn import QuantConv2d, QuantLinear, anneal
from lowbit.quant.search import VALUE_SPACES, SearchQuantizer, first_argmax_value, value_space, zero_sum_basis


def test_value_space_presets_and_lists() -> None:
    assert value_space("binary", 1).tolist() == [-1.0, 1.0]
    assert value_space("pow2-2", 2).tolist() == [-1.0, -0.5, 0.5, 1.0]
    assert value_space("pow2-3", 3).tolist() == [-1, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1]
    assert value_space(None, 4).abs().min() == 2.0**-7 and len(value_space(None, 4)) == 16
    assert value_space([0.5, -2, 1], 2).tolist() == [-2.0, 0.5, 1.0]
    assert set(VALUE_SPACES) == {"binary", "pow2-2", "pow2-3"}
    with pytest.raises(ConfigError, match="need more than 2 bits"):
        value_space("pow2-3", 2)
    with pytest.raises(ConfigError, match="distinct"):
        value_space([1, 1], 1)


def test_zero_sum_basis_is_orthonormal_and_orthogonal_to_ones() -> None:
    for m in (2, 3, 4, 8, 16):
        basis = zero_sum_basis(m)
        assert basis.shape == (m, m - 1)
        assert torch.allclose(basis.T @ basis, torch.eye(m - 1), atol=1e-6)
        assert torch.allclose(basis.T @ torch.ones(m), torch.zeros(m - 1), atol=1e-6)
        assert torch.allclose(basis @ basis.T, torch.eye(m) - torch.full((m, m), 1.0 / m), atol=1e-6)
    assert zero_sum_basis(2)[:, 0].tolist() == pytest.approx([-(0.5**0.5), 0.5**0.5])


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_pick_is_the_first_argmax_value(m: int) -> None:
    scores = torch.randn(m, 300, 5, generator=torch.Generator().manual_seed(m))
    scores[:, :40] = scores[:, :40].round()  # many exact ties: the first maximum wins, as in torch.max
    scores[m - 1, 40:60] = scores[0, 40:60] = 9.0
    values = torch.linspace(-1, 1, m)
    assert torch.equal(first_argmax_value(scores, values), values[scores.max(dim=0).indices])


def test_the_pick_is_shared_while_alive_and_not_kept_after() -> None:
    import gc
    import pickle

    quantizer = SearchQuantizer(2, shape=(6, 4), values="pow2-2", scale=1.0, mode="sgt").train()
    quantizer.refit(torch.randn(6, 4))
    first = quantizer.picked_values()
    held = (first * 2).sum()  # a graph holds the pick, as a layer's forward does
    second = quantizer.picked_values()
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # one pick, shared
    del first, second, held
    gc.collect()
    assert quantizer.__dict__["_pick_cache"][1]() is None  # nothing held once the graphs are gone
    with torch.no_grad():
        quantizer.logits.add_(torch.randn(quantizer.logits.shape))
    picked = quantizer.picked_values().detach()
    assert torch.equal(picked, quantizer.values[quantizer.value_logits().argmax(0)])
    clone = pickle.loads(pickle.dumps(quantizer))
    assert torch.equal(clone.picked_values(), picked)


def test_nan_logits_raise_a_clear_error() -> None:
    quantizer = SearchQuantizer(2, shape=(4,), values="pow2-2", scale=1.0)
    quantizer.refit(torch.randn(4))
    with torch.no_grad():
        quantizer.logits[:, 2] = float("nan")
    with pytest.raises(ConfigError, match="logits hold NaN"):
        quantizer(torch.zeros(4))


def _search_with_random_logits(shape: tuple[int, ...], logits: str, **opts) -> SearchQuantizer:
    quantizer = SearchQuantizer(2, shape=shape, values="pow2-2", scale=1.0, logits=logits, **opts)
    quantizer.refit(torch.randn(*shape))
    with torch.no_grad():
        quantizer.logits.normal_(generator=torch.Generator().manual_seed(0))
    return quantizer


def _chain_to_parameter(quantizer: SearchQuantizer, value_grad: torch.Tensor) -> torch.Tensor:
    """dL/dlogits from dL/dtheta: the identity (full) or B^T (centered, theta = B phi)."""
    if not quantizer.centered:
        return value_grad
    return torch.einsum("kj,k...->j...", quantizer.basis, value_grad)


@pytest.mark.parametrize("logits", ["full", "centered"])
def test_sgt_gradient_is_upstream_times_sign_of_value_difference(logits: str) -> None:
    quantizer = _search_with_random_logits((5, 3), logits, mode="sgt")
    upstream = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    out = quantizer(torch.zeros(5, 3))
    values = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    theta = quantizer.value_logits().detach()  # [m, *weight.shape]
    assert theta.shape == (4, 5, 3) and quantizer.logits.shape == (4 if logits == "full" else 3, 5, 3)
    picked = values[theta.argmax(0)]
    assert torch.equal(out.detach(), picked)
    out.backward(upstream)
    expected = torch.stack([upstream * torch.sign(value - picked) for value in values])
    assert torch.allclose(quantizer.logits.grad, _chain_to_parameter(quantizer, expected), atol=1e-6)


@pytest.mark.parametrize("logits", ["full", "centered"])
def test_rdhs_gradient_is_the_softmax_relaxation(logits: str) -> None:
    quantizer = _search_with_random_logits((7,), logits, tau=0.5)
    upstream = torch.randn(7, generator=torch.Generator().manual_seed(2))
    quantizer(torch.zeros(7)).backward(upstream)
    values = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    y = torch.softmax(quantizer.value_logits().detach().T / 0.5, dim=-1)  # [7, m]
    soft = (y * values).sum(-1, keepdim=True)
    expected = (upstream[:, None] * y * (values - soft) / 0.5).T
    assert torch.allclose(quantizer.logits.grad, _chain_to_parameter(quantizer, expected), atol=1e-6)


def test_centered_logits_start_on_the_same_values_with_one_logit_fewer() -> None:
    weights = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    full, centered = (SearchQuantizer(3, channel_dim=0, rows=6, shape=(6, 4, 3, 3), logits=kind)
                      for kind in ("full", "centered"))
    full.refit(weights)
    centered.refit(weights)
    assert centered.logits.numel() * 8 == full.logits.numel() * 7
    full_logits = full.value_logits()
    assert torch.allclose(centered.value_logits(), full_logits - full_logits.mean(0), atol=1e-5)
    assert torch.equal(centered.encode(weights).codes, full.encode(weights).codes)
    assert torch.equal(centered(weights), full(weights))


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("mode", ["rdhs", "sgt"])
def test_centered_logits_follow_the_full_sgd_trajectory_exactly(mode: str, float64_default: None) -> None:
    """Under SGD with momentum and weight decay (002 §3.1) the centered run is the mean-removed
    full run: the same weights are picked at every step (float64, so rounding cannot flip a pick)."""
    gen = torch.Generator().manual_seed(8)
    inputs, targets = torch.randn(128, 12, generator=gen), torch.randn(128, generator=gen)
    layers, optimizers = [], []
    for logits in ("full", "centered"):
        torch.manual_seed(8)
        layer = QuantLinear(12, 1, bias=False, method="search", bits=2,
                            opts={"scale": 1.0, "mode": mode, "logits": logits, "tau": 0.5})
        layers.append(layer)
        optimizers.append(torch.optim.SGD([layer.weight_quantizer.logits], lr=0.05, momentum=0.9,
                                          weight_decay=1e-3))
    start = layers[0].quantized_weight().detach()
    for _ in range(60):
        picked = []
        for layer, optimizer in zip(layers, optimizers, strict=True):
            optimizer.zero_grad()
            (layer(inputs)[:, 0] - targets).square().mean().backward()
            optimizer.step()
            picked.append(layer.quantized_weight().detach())
        assert torch.equal(picked[0], picked[1])
    assert not torch.equal(picked[0], start)  # the search did move weights
    full, centered = (layer.weight_quantizer.value_logits().detach() for layer in layers)
    assert torch.allclose(centered, full - full.mean(0), atol=1e-9)


@pytest.mark.parametrize(("stored", "loaded"), [("full", "centered"), ("centered", "full")])
def test_logits_load_across_layouts(stored: str, loaded: str) -> None:
    weights = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    source = SearchQuantizer(2, channel_dim=0, rows=5, shape=(5, 8), logits=stored)
    source.refit(weights)
    with torch.no_grad():
        source.logits.add_(torch.randn(source.logits.shape, generator=torch.Generator().manual_seed(10)))
    target = SearchQuantizer(2, channel_dim=0, rows=5, shape=(5, 8), logits=loaded)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.encode(weights).codes, source.encode(weights).codes)
    assert torch.allclose(target.value_logits() - target.value_logits().mean(0),
                          source.value_logits() - source.value_logits().mean(0), atol=1e-5)


def test_mu_zero_is_deterministic_and_mu_positive_samples() -> None:
    weights = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    deterministic = SearchQuantizer(2, shape=(64, 8), scale=1.0, mu=0.0).train()
    deterministic.refit(weights)
    torch.manual_seed(0)
    first = deterministic(weights)
    torch.manual_seed(1)
    assert torch.equal(first, deterministic(weights))
    noisy = SearchQuantizer(2, shape=(64, 8), scale=1.0, mu=1.0).train()
    noisy.refit(weights)
    torch.manual_seed(0)
    a = noisy(weights)
    torch.manual_seed(0)
    assert torch.equal(a, noisy(weights))
    assert not torch.equal(a, noisy(weights))
    assert torch.equal(noisy.eval()(weights), first)  # evaluation never samples


@pytest.mark.parametrize(("mode", "optimizer_cls", "logits"), [("rdhs", torch.optim.Adam, "full"),
                                                              ("sgt", torch.optim.SGD, "full"),
                                                              ("sgt", torch.optim.SGD, "centered"),
                                                              ("sgt", torch.optim.Adam, "centered")])
def test_search_solves_a_regression_with_a_known_best_assignment(mode: str, optimizer_cls: type, logits: str
                                                                 ) -> None:
    gen = torch.Generator().manual_seed(4)
    values = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    target_codes = torch.randint(0, 4, (12,), generator=gen)
    inputs = torch.randn(256, 12, generator=gen)
    targets = inputs @ values[target_codes]
    torch.manual_seed(4)
    layer = QuantLinear(12, 1, bias=False, method="search", bits=2, opts={"scale": 1.0, "mode": mode,
                                                                                 "logits": logits})
    quantizer = layer.weight_quantizer
    start_codes = quantizer.value_logits().detach().argmax(0)[0].clone()
    assert not torch.equal(start_codes, target_codes)
    start_logits = quantizer.logits.detach().clone()
    optimizer = optimizer_cls([quantizer.logits], lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(inputs)[:, 0] - targets).square().mean()
        loss.backward()
        optimizer.step()
    assert not torch.equal(quantizer.logits.detach(), start_logits)
    assert torch.equal(quantizer.value_logits().detach().argmax(0)[0], target_codes)
    assert float((layer(inputs)[:, 0] - targets).detach().square().mean()) == 0.0


def test_expanded_conv_equals_kernel_form_with_m_fold_channels() -> None:
    torch.manual_seed(5)
    base = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 9)
    outputs, grads = [], []
    for form in ("kernel", "expand"):
        layer = QuantConv2d.from_float(base, "search", 2, {"form": form, "tau": 0.7}, per_channel=True)
        out = layer(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(layer.weight_quantizer.logits.grad)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_expanded_form_only_for_conv2d() -> None:
    with pytest.raises(ConfigError, match="needs a zero-padded Conv2d"):
        QuantLinear(4, 4, method="search", bits=1, opts={"form": "expand"})
    with pytest.raises(ConfigError, match="mode 'rdhs' only"):
        QuantConv2d(4, 4, 3, method="search", bits=1, opts={"form": "expand", "mode": "sgt"})


def test_scale_is_fitted_learned_or_fixed() -> None:
    weights = torch.randn(32, 16, generator=torch.Generator().manual_seed(6)) * 0.05
    learned = QuantLinear(16, 32, method="search", bits=1, per_channel=False)
    learned.weight.data = weights
    learned.weight_quantizer.refit(weights)
    scale = learned.weight_quantizer.scale
    assert isinstance(scale, nn.Parameter)
    assert float(scale.detach()) == pytest.approx(float(weights.abs().mean()), rel=0.05)  # BWN optimum
    fixed = QuantLinear(16, 32, method="search", bits=1, opts={"scale": 0.25})
    assert not isinstance(fixed.weight_quantizer.scale, nn.Parameter)
    assert set(fixed.quantized_weight().unique().tolist()) <= {-0.25, 0.25}


def test_anneal_schedule() -> None:
    layer = QuantLinear(3, 3, method="search", bits=1, opts={"tau": 2.0, "tau_decay": 0.5, "tau_min": 0.1})
    for epoch, tau in [(0, 2.0), (1, 1.0), (3, 0.25), (5, 0.1)]:
        anneal(layer, epoch)
        assert float(layer.weight_quantizer.tau) == pytest.approx(tau)
