"""Pruning as a model transform (lowbit.nn.prune, lowbit.compress): masks, the Zhu & Gupta schedule, channel
removal through torch-pruning, sparse storage in the packed file, and errors for bad specs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gan_zoo import ExamplesDCGAN, ResnetGenerator, UnetGenerator, calibrated, trained_like_dcgan
from lowbit.errors import ConfigError
from lowbit.export import export_packed, load
from lowbit.export.pack import packed_nbytes
from lowbit.models import create_model
from lowbit.nn import PruneSpec, QuantSpec, compress, sparsity_of, transform_hooks
from lowbit.nn.prune import polynomial_sparsity


def _generator(seed: int = 0) -> nn.Module:
    return trained_like_dcgan(width=16, seed=seed)


def _weights(model):
    return {
        n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    }


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_removes_the_smallest_weights_at_the_ratio(scope):
    model = compress(_generator(), [PruneSpec(ratio=0.7, scope=scope)])
    layers = _weights(model)
    all_weights = torch.cat([m.weight.detach().abs().reshape(-1) for m in layers.values()])
    assert sparsity_of(model) == pytest.approx(0.7, abs=1e-4)
    for module in layers.values():
        kept = module.weight_mask.bool()
        assert torch.equal(module.weight[~kept], torch.zeros_like(module.weight[~kept]))
        if scope == "layer":
            assert (~kept).float().mean().item() == pytest.approx(0.7, abs=1 / module.weight.numel())
    original = torch.cat([m.weight.detach().abs().reshape(-1) for m in _weights(_generator()).values()])
    if scope == "global":  # one threshold for every layer: every kept weight outranks every pruned one
        kept_all = torch.cat([m.weight_mask.reshape(-1) for m in layers.values()]).bool()
        assert original[kept_all].min() >= original[~kept_all].max()
    assert all_weights.numel() == original.numel()


def test_gradual_schedule_follows_zhu_and_gupta():
    spec = PruneSpec(ratio=0.8, schedule="gradual", start_step=10, end_step=110, every=10)
    for step in (0, 10, 35, 60, 110, 500):
        progress = min(max((step - 10) / 100, 0), 1)
        assert polynomial_sparsity(spec, step) == pytest.approx(0.8 * (1 - (1 - progress) ** 3))
    model = compress(_generator(), [spec])
    (hook,) = transform_hooks(model)
    assert sparsity_of(model) == 0
    for step in range(0, 111):
        hook.after_step(model, step)
    assert sparsity_of(model) == pytest.approx(0.8, abs=1e-4)


def test_masks_stay_exact_through_training_steps_and_checkpoints(tmp_path):
    model = compress(_generator(), [PruneSpec(ratio=0.5), QuantSpec(weight="minmax", weight_bits=4)])
    model.train()
    (hook,) = transform_hooks(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks = {n: m.weight_mask.clone() for n, m in _weights(model).items()}
    for step in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 100)).square().mean().backward()
        optimizer.step()
        hook.after_step(model, step)
        for name, module in _weights(model).items():
            assert torch.equal(module.weight_mask, masks[name])
            assert torch.count_nonzero(module.weight[masks[name] == 0]) == 0
            assert torch.count_nonzero(module.quantized_weight()[masks[name] == 0]) == 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    restored = compress(_generator(seed=1), [PruneSpec(ratio=0.5), QuantSpec(weight="minmax", weight_bits=4)])
    restored.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    for name, module in _weights(restored).items():
        assert torch.equal(module.weight_mask, masks[name])
    model.eval(), restored.eval()
    z = torch.randn(4, 100)
    with torch.no_grad():
        assert torch.equal(model(z), restored(z))


@pytest.mark.parametrize(("bits", "act"), [(4, None), (2, "sign"), (1, "sign")])
def test_sparse_packed_file_has_the_formula_size_and_parity(tmp_path, bits, act):
    spec = QuantSpec(weight="minmax", weight_bits=bits, act=act, act_bits=1 if act else 32)
    model = compress(_generator(), [PruneSpec(ratio=0.8, keep=["9"]), spec]).eval()
    path = export_packed(model, tmp_path / "s.lowbit")
    graph = load(path, kernel_path="torch").graph
    for node in graph.nodes:
        weight = node.attrs.get("weight", {})
        if weight.get("sparse"):
            count = math.prod(weight["shape"])
            kept = int(dict(_weights(model))[node.module].weight_mask.sum())
            assert node.tensors["mask"].numel() == packed_nbytes(count, 1) == math.ceil(count / 8)
            assert node.tensors["codes"].numel() == packed_nbytes(kept, bits)
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(z)
        assert torch.equal(load(path, kernel_path="torch")(z), expected)
        diff = (load(path)(z) - expected).abs()  # the fastest path: binary layers with the mask as a plane
    assert (diff > 1e-3).float().mean().item() <= 0.02
    dense = export_packed(compress(_generator(), [spec]).eval(), tmp_path / "d.lowbit")
    assert path.stat().st_size < dense.stat().st_size * (1 / bits + 0.2 + 0.1)


def test_unstructured_80_percent_at_4_bits_is_below_a_fifteenth_of_fp32(tmp_path):
    model = create_model("dcgan-g-28")
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    packed = compress(model, [PruneSpec(ratio=0.8), QuantSpec(weight="minmax", weight_bits=4)]).eval()
    size = export_packed(packed, tmp_path / "g.lowbit").stat().st_size
    assert fp32 / size >= 15, f"{fp32 / size:.1f}x"


@pytest.mark.parametrize("criterion", ["l1", "bn_gamma", "group_l2"])
@pytest.mark.parametrize("builder", [ExamplesDCGAN, ResnetGenerator, UnetGenerator])
def test_channel_pruning_shrinks_the_model_and_keeps_its_shapes(builder, criterion):
    name = {
        ExamplesDCGAN: "examples-dcgan",
        ResnetGenerator: "cyclegan-resnet",
        UnetGenerator: "pix2pix-unet",
    }
    model = calibrated(name[builder])
    x = torch.randn(2, *{"examples-dcgan": (16, 1, 1)}.get(name[builder], (3, 16, 16)))
    model.input_shape = list(x.shape[1:])
    if criterion == "bn_gamma" and builder is ResnetGenerator:  # InstanceNorm without scales: nothing to rank
        with pytest.raises(ConfigError, match="needs BatchNorm layers with affine scales"):
            compress(model, [PruneSpec(kind="channels", ratio=0.5, criterion=criterion)])
        return
    pruned = compress(model, [PruneSpec(kind="channels", ratio=0.5, criterion=criterion)])
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    assert after < 0.45 * before  # about (1 - ratio)^2 of every inner conv
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


def test_channel_pruning_at_ratio_zero_changes_nothing():
    model = calibrated("pix2pix-unet")
    model.input_shape = [3, 16, 16]
    same = compress(model, [PruneSpec(kind="channels", ratio=0.0)])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def test_channel_pruned_quantized_model_exports_with_parity(tmp_path):
    model = _generator()
    pruned = compress(
        model,
        [
            PruneSpec(kind="channels", ratio=0.5),
            QuantSpec(weight="minmax", weight_bits=4, act="sign", act_bits=1),
        ],
    ).eval()
    path = export_packed(pruned, tmp_path / "c.lowbit")
    z = torch.randn(8, 100)
    with torch.no_grad():
        expected = pruned(z)
        assert torch.equal(load(path, kernel_path="torch")(z), expected)
        assert ((load(path)(z) - expected).abs() > 1e-3).float().mean() <= 0.02
    unpruned = compress(model, [QuantSpec(weight="minmax", weight_bits=4, act="sign", act_bits=1)]).eval()
    full_size = export_packed(unpruned, tmp_path / "u.lowbit").stat().st_size
    assert path.stat().st_size < 0.55 * full_size  # the latent inputs stay: 1/2 there, 1/4 elsewhere


def _output_error(model: nn.Module, spec: PruneSpec, z: torch.Tensor) -> float:
    """|pruned(z) - model(z)|^2 / |model(z)|^2."""
    with torch.no_grad():
        reference = model(z)
        return float((compress(model, [spec]).eval()(z) - reference).pow(2).sum() / reference.pow(2).sum())


def test_learned_channel_gates_keep_the_output_closer_than_filter_norms():
    from lowbit.train.networks import load_generator, resolve_checkpoint

    torch.set_num_threads(1)
    generator = load_generator(resolve_checkpoint("dcgan-mnist"))
    z = torch.randn(128, generator.latent_dim, generator=torch.Generator().manual_seed(5))
    learned = PruneSpec(kind="channels", ratio=0.5, criterion="learned", learn_steps=50)
    l1 = _output_error(generator, PruneSpec(kind="channels", ratio=0.5), z)
    assert _output_error(generator, learned, z) < 0.8 * l1  # seen: 0.14 vs 0.25
    pruned = compress(generator, [learned])
    widths = [m.num_features for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    assert widths == [m.num_features // 2 for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    no_norms = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    no_norms.latent_dim = 8
    with pytest.raises(ConfigError, match="criterion learned .* needs BatchNorm layers with affine scales"):
        compress(no_norms, [PruneSpec(kind="channels", criterion="learned")])
    images_in = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3))
    images_in.input_shape = [3, 16, 16]
    with pytest.raises(ConfigError, match="no latent_dim .*use l1, bn_gamma or group_l2"):
        compress(images_in, [PruneSpec(kind="channels", criterion="learned")])
    with pytest.raises(ConfigError, match="learn_steps >= 1"):
        PruneSpec(kind="channels", criterion="learned", learn_steps=0)


def test_bad_specs_are_clear_errors():
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        PruneSpec(ratio=1.0)
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        PruneSpec(ratio=-0.1)
    with pytest.raises(ConfigError, match="unknown channels pruning criterion 'l3'"):
        PruneSpec(kind="channels", criterion="l3")
    with pytest.raises(ConfigError, match="match no conv / linear layer.*weight layers are: 0, 3"):
        compress(_generator(), [PruneSpec(layers=["decoder.*"])])
    with pytest.raises(ConfigError, match="before quantization"):
        compress(_generator(), [QuantSpec(weight="minmax", weight_bits=4), PruneSpec(kind="channels")])
    with pytest.raises(ConfigError, match="unknown transform type 'distill'"):
        compress(_generator(), [{"type": "distill"}])
    with pytest.raises(ConfigError, match="no transform is registered for str"):
        compress(_generator(), ["prune"])
    from_config = compress(
        _generator(),
        [{"type": "prune", "ratio": 0.25}, {"type": "quant", "weight": "minmax", "weight_bits": 2}],
    )
    assert sparsity_of(from_config) == pytest.approx(0.25, abs=1e-3)


def test_gan_training_keeps_masks_exact_through_steps_and_resume(tmp_path):
    """A tiny GAN run with a gradual unstructured prune and 4-bit QAT of G, cut and resumed: the final masks
    and weights equal an uninterrupted run's, and every pruned weight is exactly 0."""
    from lowbit.config import from_dict
    from lowbit.train.checkpoint import load_checkpoint
    from lowbit.train.gan import GanConfig, train_gan
    from lowbit.train.networks import load_generator
    from tiny_gan import tiny_gan

    def config(steps):
        cfg = tiny_gan(steps=steps)
        gradual = {"schedule": "gradual", "start_step": 0, "end_step": 12, "every": 4}
        cfg["generator"]["transforms"] = [{"type": "prune", "ratio": 0.6, **gradual}]
        cfg["generator"]["quant"] = {"weight": "minmax", "weight_bits": 4}
        return from_dict(GanConfig, cfg)

    full = train_gan(config(20), tmp_path / "full", progress=False)
    train_gan(config(10), tmp_path / "cut", progress=False)
    resumed = train_gan(config(20), tmp_path / "cut", resume=True, progress=False)
    a, b = load_checkpoint(full.model_path)["generator"], load_checkpoint(resumed.model_path)["generator"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    generator = load_generator(full.model_path)
    assert sparsity_of(generator) == pytest.approx(0.6, abs=1e-3)
    for module in _weights(generator).values():
        assert torch.count_nonzero(module.weight[module.weight_mask == 0]) == 0
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        cfg = tiny_gan()
        cfg["generator"]["transforms"] = [{"type": "prune", "ratio": 2}]
        from_dict(GanConfig, cfg)


@pytest.mark.parametrize("criterion", ["l1", "learned"])
def test_channel_pruning_keeps_the_training_mode_and_the_batchnorm_statistics(criterion):
    """A generator built for training stays in train mode after channel pruning (its BatchNorm layers must
    keep tracking statistics in the fine-tune), and pruning itself updates no running statistic."""
    model = create_model("dcgan-g-16", width=8, latent_dim=16).train()
    def tracked() -> list[int]:
        return [m.num_batches_tracked.item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    before = tracked()
    compress(model, [PruneSpec(kind="channels", criterion=criterion, ratio=0.5, learn_steps=2)], inplace=True)
    assert all(m.training for m in model.modules()) and tracked() == before
    compress(model.eval(), [PruneSpec(kind="channels", ratio=0.25)], inplace=True)
    assert not any(m.training for m in model.modules())
