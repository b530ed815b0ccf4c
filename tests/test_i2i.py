"""Image-to-image GANs: model shapes, paired datasets, PSNR/SSIM, pix2pix training, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowbit.cli import main
from lowbit.config import from_dict
from lowbit.data.paired import area_downsample, edge_maps, load_pairs, read_pairs
from lowbit.errors import ConfigError, DataError
from lowbit.export import load as load_packed
from lowbit.metrics.paired import psnr, ssim
from lowbit.models import create_model
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.i2i import I2IConfig, train_i2i
from lowbit.train.networks import checkpoint_config, load_generator

# ------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("size", [28, 32, 64, 256])
def test_unet_resnet_and_patchgan_keep_the_image_size(size):
    x = torch.randn(2, 1, size, size)
    for name, kwargs in (("unet-g", {}), ("unet-g", {"norm": "instance"}), ("resnet-g", {"blocks": 1}),
                         ("resnet-g", {"blocks": 1, "upsampling": "upsample", "norm": "batch"})):
        g = create_model(name, size=size, width=4, **kwargs)
        assert g(x).shape == (2, 1, size, size), (name, kwargs)
        assert g.input_shape == g.image_shape == (1, size, size)
    scores = create_model("patchgan-d", size=size, width=4)(x, x)
    assert scores.shape[:2] == (2, 1) and scores.shape[2] == scores.shape[3] > 1


@pytest.mark.parametrize(("name", "kwargs"),
                         [("unet-g", {"width": 4}), ("resnet-g", {"width": 4, "blocks": 1})])
@pytest.mark.parametrize("scale", [2, 4])
def test_super_resolution_generators_take_small_inputs(name, kwargs, scale):
    g = create_model(name, size=28, scale=scale, in_channels=3, out_channels=3, **kwargs)
    small = torch.randn(2, 3, 28 // scale, 28 // scale)
    out = g(small)
    assert out.shape == (2, 3, 28, 28) and out.abs().max() <= 1
    d = create_model("patchgan-d", size=28, scale=scale, in_channels=3, out_channels=3, width=4)
    assert d(small, out).shape[:2] == (2, 1)


def test_unet_has_skip_concatenations_and_dropout():
    g = create_model("unet-g", size=64, width=4)
    assert sum(isinstance(m, torch.nn.Dropout) for m in g.modules()) == 3  # the 3 levels above the innermost
    g.eval()
    x = torch.randn(1, 1, 64, 64)
    assert torch.equal(g(x), g(x))


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("unet-g", {"size": 20}, "28..256"),
    ("unet-g", {"size": 28, "depth": 6}, "below 1 pixel"),
    ("unet-g", {"size": 28, "scale": 3}, "divide"),
    ("resnet-g", {"size": 28, "n_down": 4}, "lower n_down"),
    ("resnet-g", {"size": 28, "upsampling": "pixelshuffle"}, "upsampling"),
    ("patchgan-d", {"size": 28, "norm": "group"}, "unknown norm"),
])
def test_bad_model_settings_are_config_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model(name, **kwargs)


# ------------------------------------------------------------------------------------------ datasets


def test_super_resolution_pairs_are_area_down_sampled_and_deterministic():
    a, b = read_pairs("sr4-fashion-mnist", "test", limit=50)
    assert a.shape == (50, 1, 7, 7) and b.shape == (50, 1, 28, 28) and a.dtype == np.uint8
    manual = b.reshape(50, 1, 7, 4, 7, 4).astype(np.float64).mean(axis=(3, 5))
    assert np.abs(a - manual).max() <= 0.5
    again = read_pairs("sr4-fashion-mnist", "test", limit=50)
    assert np.array_equal(a, again[0]) and np.array_equal(b, again[1])
    x2, y2 = load_pairs("sr2-fashion-mnist", "test", limit=5)
    assert x2.shape == (5, 1, 14, 14) and y2.min() >= -1 and y2.max() <= 1


def test_edges_are_binary_sobel_maps_of_the_target():
    a, b = read_pairs("edges2fashion", "test", limit=20)
    assert set(np.unique(a)) <= {0, 255} and 0.05 < (a > 0).mean() < 0.6
    assert np.array_equal(a, edge_maps(b))
    square = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    square[..., 2:6, 2:6] = 255
    edges = edge_maps(square)[0, 0] > 0
    assert edges[2, 2] and edges[1, 3] and not edges[0, 0] and not edges[4, 4]  # the border, not the inside


def test_area_downsample_refuses_a_non_dividing_factor():
    with pytest.raises(ConfigError, match="factor"):
        area_downsample(np.zeros((1, 1, 28, 28), dtype=np.uint8), 3)


def _write_pairs(root, n: int = 4, a_size: int = 14, b_size: int = 28) -> None:
    rng = np.random.default_rng(0)
    for side, size in (("A", a_size), ("B", b_size)):
        (root / side).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / side / f"{i}.png")


def test_paired_folder_reads_matching_names(tmp_path):
    _write_pairs(tmp_path)
    a, b = load_pairs("paired-folder", root=tmp_path)
    assert a.shape == (4, 1, 14, 14) and b.shape == (4, 1, 28, 28)
    rgb, _ = load_pairs("paired-folder", root=tmp_path, channels=3)
    assert rgb.shape == (4, 3, 14, 14)


@pytest.mark.parametrize(("damage", "match"), [
    (lambda root: (root / "B" / "2.png").unlink(), r"2.png: no target image '2\.\*' in .*B; add it"),
    (lambda root: (root / "A" / "3.png").unlink(), r"3.png: no input image"),
    (lambda root: Image.new("L", (27, 27)).save(root / "B" / "1.png"),
     r"1.png: 27x27 but 0.png in B/ is 28x28"),
    (lambda root: [Image.new("L", (21, 21)).save(root / "B" / f"{i}.png") for i in range(4)],
     r"A images are 14x14 and B images 21x21; B must be A's size or a whole multiple"),
    (lambda root: __import__("shutil").rmtree(root / "B"), r"no B/ subfolder"),
])
def test_bad_paired_folders_name_the_file_and_the_fix(tmp_path, damage, match):
    _write_pairs(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=match):
        load_pairs("paired-folder", root=tmp_path)


def test_unknown_paired_dataset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'sr4-mnist'"):
        load_pairs("sr4-mnst")


# ------------------------------------------------------------------------------------------ metrics


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """SSIM of two H x W images (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03),
    averaged over every pixel with the borders reflect-padded (torchmetrics' convention)."""
    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    g /= g.sum()
    window = np.outer(g, g)

    def filt(image: np.ndarray) -> np.ndarray:
        image = np.pad(image, 5, mode="reflect")
        h, w = image.shape
        return np.array([[np.sum(window * image[i:i + 11, j:j + 11]) for j in range(w - 10)]
                         for i in range(h - 10)])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def test_psnr_and_ssim_match_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 28, 28, generator=gen) * 2 - 1
    output = (target + 0.1 * torch.randn(3, 1, 28, 28, generator=gen)).clamp(-1, 1)
    mse = ((output - target) ** 2).flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(psnr(output, target).numpy(), 10 * np.log10(4.0 / mse), rtol=1e-5)
    expected = [_ssim_reference(o[0].double().numpy(), t[0].double().numpy())
                for o, t in zip(output, target, strict=True)]
    np.testing.assert_allclose(ssim(output, target).numpy(), expected, atol=1e-4)
    assert float(psnr(target, target + 1e-3).mean()) > 60 and float(ssim(target, target).min()) > 0.999


def test_evaluate_scores_an_image_to_image_generator_on_the_test_pairs():
    from lowbit.metrics import evaluate

    g = create_model("unet-g", size=28, scale=4, width=4, dropout=0.0)
    scores = evaluate(g, "sr4-fashion-mnist", n=40, batch=20, kid_subsets=2, progress=False)
    inputs, targets = load_pairs("sr4-fashion-mnist", "test", limit=40)
    with torch.no_grad():
        expected = psnr(g.eval()(inputs), targets).mean()
    assert scores["n"] == 40 and scores["psnr"] == pytest.approx(float(expected), rel=1e-5)
    assert {"ssim", "fid", "kid", "is", "extractor"} <= set(scores) and "fashion-mnist" in scores["extractor"]


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def digits_pairs(tmp_path_factory):
    """sklearn digits as an A/B folder: 14x14 inputs (area down-sampled) -> 28x28 targets."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-sr")
    (root / "A").mkdir()
    (root / "B").mkdir()
    for i, image in enumerate(load_digits().images[:256]):
        big = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)
        small = area_downsample(np.asarray(big)[None, None], 2)[0, 0]
        big.save(root / "B" / f"{i:04d}.png")
        Image.fromarray(small).save(root / "A" / f"{i:04d}.png")
    return root


def tiny_i2i(root, **changes) -> I2IConfig:
    data = {
        "name": "tiny-i2i",
        "data": {"dataset": "paired-folder", "root": str(root)},
        "generator": {"model": "unet-g", "kwargs": {"size": 28, "scale": 2, "width": 8, "dropout": 0.0}},
        "discriminator": {"model": "patchgan-d", "kwargs": {"size": 28, "scale": 2, "width": 8}},
        "steps": 60,
        "batch_size": 16,
        "log_every": 10,
        "sample_every": 30,
        "checkpoint_every": 20,
        **changes,
    }
    return from_dict(I2IConfig, data)


def test_tiny_pix2pix_run_lowers_l1_and_writes_a_loadable_generator(digits_pairs, tmp_path):
    result = train_i2i(tiny_i2i(digits_pairs), tmp_path / "run", progress=False)
    l1 = [row["l1"] for row in result.history]
    assert l1[-1] < 0.8 * l1[0], l1
    assert (tmp_path / "run" / "samples" / "step_000060.png").is_file()
    g = load_generator(result.model_path)
    assert g.input_shape == (1, 14, 14) and isinstance(checkpoint_config(result.model_path), I2IConfig)
    a, _ = load_pairs("paired-folder", root=digits_pairs, limit=4)
    assert g(a).shape == (4, 1, 28, 28)


def test_image_to_image_resume_reproduces_an_uninterrupted_run(digits_pairs, tmp_path):
    full = train_i2i(tiny_i2i(digits_pairs, steps=30), tmp_path / "full", progress=False)
    train_i2i(tiny_i2i(digits_pairs, steps=20), tmp_path / "cut", progress=False)
    resumed = train_i2i(tiny_i2i(digits_pairs, steps=30), tmp_path / "cut", resume=True, progress=False)
    assert resumed.history == full.history
    a, b = load_checkpoint(full.model_path), load_checkpoint(resumed.model_path)
    for key, value in a["generator"].items():
        assert torch.equal(value, b["generator"][key]), key


def test_quantization_aware_fine_tuning_starts_from_the_fp_run(digits_pairs, tmp_path):
    fp = train_i2i(tiny_i2i(digits_pairs, steps=10), tmp_path / "fp", progress=False)
    quant = {"weight": "dorefa", "weight_bits": 4, "act": "act", "act_bits": 1}
    cfg = tiny_i2i(digits_pairs, steps=10, init_from=str(fp.model_path),
                   generator={"model": "unet-g", "quant": quant,
                              "kwargs": {"size": 28, "scale": 2, "width": 8, "dropout": 0.0}})
    result = train_i2i(cfg, tmp_path / "qat", progress=False)
    assert any(type(m).__name__ == "QuantConv2d" for m in load_generator(result.model_path).modules())


def test_distillation_pulls_the_quantized_generator_towards_the_fp_teacher(digits_pairs, tmp_path):
    fp = train_i2i(tiny_i2i(digits_pairs, steps=20), tmp_path / "fp", progress=False)
    teacher = load_generator(fp.model_path)
    a, _ = load_pairs("paired-folder", root=digits_pairs, limit=64)
    with torch.no_grad():
        target = teacher(a)
    quant = {"weight": "dorefa", "weight_bits": 4, "act": "act", "act_bits": 1}
    kwargs = {"size": 28, "scale": 2, "width": 8, "dropout": 0.0}
    generator = {"model": "unet-g", "quant": quant, "kwargs": kwargs}
    gaps = {}
    for weight in (0.0, 100.0):
        cfg = tiny_i2i(digits_pairs, steps=30, init_from=str(fp.model_path), generator=generator,
                       l1_weight=0.0, distill=weight, distill_features=weight / 10)
        result = train_i2i(cfg, tmp_path / f"d{weight}", progress=False)
        with torch.no_grad():
            gaps[weight] = float((load_generator(result.model_path).eval()(a) - target).abs().mean())
    assert gaps[100.0] < 0.75 * gaps[0.0], gaps
    with pytest.raises(ConfigError, match="'distill_features' must be >= 0 and needs init_from"):
        tiny_i2i(digits_pairs, distill_features=1.0)


def test_bad_image_to_image_configs_are_rejected_before_any_file(digits_pairs, tmp_path):
    wrong_scale = {"model": "unet-g", "kwargs": {"size": 28, "scale": 4, "width": 8}}
    with pytest.raises(ConfigError, match=r"gives \(1, 14, 14\) inputs .* needs \(1, 7, 7\)"):
        train_i2i(tiny_i2i(digits_pairs, generator=wrong_scale), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="l1_weight"):
        tiny_i2i(digits_pairs, l1_weight=-1)
    with pytest.raises(ConfigError, match="wgan"):
        tiny_i2i(digits_pairs, loss="wgan")


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def tiny_sr_model(tmp_path_factory):
    """`lowbit train` on a `task: i2i` config: a width-4 x4 super-resolution U-Net, 6 steps."""
    root = tmp_path_factory.mktemp("tiny-sr")
    config = root / "sr.yaml"
    config.write_text(
        "name: tiny-sr\ntask: i2i\ndata: {dataset: sr4-fashion-mnist, limit: 64}\n"
        "generator: {model: unet-g, kwargs: {size: 28, scale: 4, width: 4, dropout: 0.0}}\n"
        "discriminator: {model: patchgan-d, kwargs: {size: 28, scale: 4, width: 4}}\n"
        "steps: 6\nbatch_size: 16\nlog_every: 3\nsample_every: 6\ncheckpoint_every: 6\n")
    assert main(["train", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run" / "model.safetensors"


def test_eval_cli_scores_psnr_and_writes_the_comparison_grid(tiny_sr_model, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_sr_model), "--n", "20", "--batch", "10", "--kid-subsets", "2",
                 "--out", str(out)]) == 0
    assert "PSNR" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["scores"]["n"] == 20 and "ssim" in result["scores"]
    grid = Image.open(result["grid_png"])
    assert grid.size == (3 * 30 + 2, 16 * 30 + 2)  # input | output | target, 16 test pairs


def test_run_quantizes_an_image_to_image_checkpoint_end_to_end(tiny_sr_model, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-sr-w4a1", "pretrained": str(tiny_sr_model), "out_dir": str(tmp_path / "run"),
        "generator_quant": {"weight": "dorefa", "weight_bits": 4, "act": "act", "act_bits": 1,
                            "keep_full_precision": ["model.1.model.0", "model.1.model.3"]},
        "qat": {"steps": 4, "log_every": 2, "eval_every": 2, "eval_samples": 20},
        "eval": {"samples": 20, "batch_size": 10}}))
    assert main(["run", str(config), "--quiet"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    fp, q = results["scores"]["full precision"], results["scores"]["quantized"]
    assert fp["n"] == q["n"] == 20 and {"psnr", "ssim", "fid"} <= set(fp) & set(q)
    assert [row["step"] for row in results["qat_history"]] == [2, 4] and "psnr" in results["qat_history"][0]
    assert (tmp_path / "run" / "samples_compare.png").is_file() and results["packed"]
    packed = load_packed(results["packed"])
    inputs, _ = load_pairs("sr4-fashion-mnist", "test", limit=2)
    expected = load_generator(tmp_path / "run" / "qat" / "model.safetensors")(inputs)
    torch.testing.assert_close(packed(inputs), expected, atol=1e-4, rtol=1e-4)
    bad = yaml.safe_load(config.read_text()) | {"qat": {"steps": 4, "ema": 0.9}}
    config.write_text(yaml.safe_dump(bad))
    assert main(["run", str(config), "--quiet"]) == 2
