"""`lowbit run`: a tiny end-to-end main job on an MNIST slice, and its bad inputs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from lowbit.cli import main
from lowbit.config import from_dict
from lowbit.train.gan import GanConfig, train_gan


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A small full-precision DCGAN trained briefly on 512 MNIST images."""
    cfg = from_dict(
        GanConfig,
        {
            "name": "tiny-fp",
            "data": {"dataset": "mnist", "limit": 512},
            "generator": {"model": "dcgan-g-28", "kwargs": {"width": 8}},
            "discriminator": {"model": "dcgan-d-28", "kwargs": {"width": 8}},
            "steps": 30,
            "batch_size": 32,
            "log_every": 10,
            "sample_every": 30,
            "checkpoint_every": 30,
        },
    )
    return train_gan(cfg, tmp_path_factory.mktemp("fp") / "run", progress=False).model_path


def run_config(path: Path, checkpoint: Path, out: Path, **changes) -> Path:
    data = {
        "name": "tiny-w4a1",
        "pretrained": str(checkpoint),
        "generator_quant": {"weight": "dorefa", "weight_bits": 4, "act": "sign", "act_bits": 1},
        "qat": {"steps": 10, "data_limit": 512, "log_every": 5, "eval_every": 5, "eval_samples": 50},
        "eval": {"samples": 200, "batch_size": 100},
        "out_dir": str(out),
        **changes,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_writes_report_scores_and_packed_export(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(run_config(tmp_path / "run.yaml", pretrained, out)), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = Path(re.search(r"report: (\S+)", printed).group(1))
    assert report == (out / "report.html").resolve() and report.is_file()
    html = report.read_text()
    assert "Scores: full precision vs quantized" in html and html.count("data:image/png;base64,") >= 4
    results = json.loads((out / "results.json").read_text())
    fp, q = results["scores"]["full precision"], results["scores"]["quantized"]
    assert fp["n"] == q["n"] == 200 and fp["extractor"] == q["extractor"] and "mnist" in fp["extractor"]
    assert all(s["fid"] > 0 and s["is"] >= 1 for s in (fp, q))
    assert [row["step"] for row in results["qat_history"]] == [5, 10]
    assert all("fid" in row for row in results["qat_history"])  # the FID curve during QAT
    packed = Path(results["packed"])
    compression = {row["model"]: row for row in results["compression"]}
    fp_bytes = compression["full precision"]["size_bytes"]
    assert compression[f"packed file {packed.name}"]["size_bytes"] == packed.stat().st_size
    assert packed.stat().st_size < fp_bytes / 3  # 4-bit codes of a model that is almost all conv weights
    weights = {row["layer"]: row for row in results["weights"]}
    assert set(weights) == {"0", "3", "6", "9"} and all(row["bits"] == 4 for row in weights.values())


def test_run_with_model_selection_scores_the_selected_and_the_last_generator(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    qat = {"steps": 10, "data_limit": 512, "log_every": 5, "select": {"every": 5, "samples": 100}}
    assert main(["run", str(run_config(tmp_path / "run.yaml", pretrained, out, qat=qat)), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    selection = results["selection"]
    logged = {row["step"]: row["val_fid"] for row in results["qat_history"] if "val_fid" in row}
    assert sorted(logged) == [5, 10] and selection["val_fid"] == min(logged.values())
    assert [selection[k] for k in ("steps", "samples", "split", "seed")] == [10, 100, "test", 1]
    assert list(results["scores"]) == ["full precision", "quantized", "quantized (last step)"]
    assert f"model selection: step {selection['step']} of 10" in capsys.readouterr().out


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"generator_qaunt": {}}, "unknown config key 'generator_qaunt' (did you mean 'generator_quant'?)"),
        ({"pretrained": "dcgan-mnits"}, "checkpoint not found: 'dcgan-mnits'"),
        ({"generator_quant": {"weight": "em", "weight_bits": 12}}, "bits=12 is out of range"),
        ({"qat": {"steps": 0}}, "qat.steps must be >= 1"),
        ({"qat": {"select": {"every": 5, "seed": 0}}}, "qat.select must be held out from the final eval"),
        ({"qat": {"select": {"every": 5, "split": "train"}}}, "got seed 1, split train"),
    ],
)
def test_run_bad_input_is_a_clear_error_and_writes_nothing(pretrained, tmp_path, capsys, changes, message):
    out = tmp_path / "run"
    config = run_config(tmp_path / "bad.yaml", pretrained, out, **changes)
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_run_with_a_corrupted_pretrained_checkpoint(pretrained, tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(pretrained.read_bytes()[:-100])
    (tmp_path / "broken.json").write_bytes(pretrained.with_suffix(".json").read_bytes())
    out = tmp_path / "run"
    assert main(["run", str(run_config(tmp_path / "bad.yaml", broken, out)), "--quiet"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not out.exists()


def test_resnet_experiment_config_quantizes_every_hidden_conv_input_to_one_bit():
    """configs/experiments/sr4-fashion-resnet-w1a1.yaml (its generator comes from
    pretrain-sr4-fashion-resnet.yaml, trained by hand): a valid run config whose spec, on that architecture,
    gives the first and last conv 8-bit
    weights and every other conv 1-bit weights, and with input_act puts a 1-bit quantizer in front of the six
    convs that read the float residual stream (blocks 2-6's first convs and the first transposed conv; block 1
    reads the quantized ReLU before it)."""
    from lowbit.commands.train import training_job
    from lowbit.config import load_config
    from lowbit.nn import convert
    from lowbit.pipeline import RunConfig
    from lowbit.train.networks import create_network

    root = Path(__file__).parent.parent / "configs"
    cfg = load_config(RunConfig, root / "experiments" / "sr4-fashion-resnet-w1a1.yaml")
    generator = create_network(training_job(str(root / "pretrain-sr4-fashion-resnet.yaml"), [])[0].generator)
    spec = cfg.generator_quant
    bits = {name: m.weight_quantizer.bits for name, m in convert(generator, spec).named_modules()
            if hasattr(m, "weight_quantizer")}
    assert bits.pop("model.2") == bits.pop("model.24") == 8 and set(bits.values()) == {1} and len(bits) == 16
    as_converted = convert(generator, dataclasses.replace(spec, input_act=False))
    extra = sum(type(m).__name__ == "QuantAct" for m in convert(generator, spec).modules()) - sum(
        type(m).__name__ == "QuantAct" for m in as_converted.modules())
    assert extra == 6


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_run_and_pretrain_configs_load(path):
    """Every top-level config is a valid `lowbit run` or `lowbit train` config; a run config's
    networks build from the shipped checkpoint with its quantizer options (search layouts, ...)."""
    from lowbit.config import load_config
    from lowbit.pipeline import RunConfig, qat_config
    from lowbit.train.networks import build_networks, checkpoint_config, resolve_checkpoint

    if path.stem.startswith("pretrain-"):
        from lowbit.commands.train import training_job

        assert training_job(str(path), [])[0].steps >= 1  # a GanConfig, or an I2IConfig with task: i2i
        return
    cfg = load_config(RunConfig, path)
    checkpoint = resolve_checkpoint(cfg.pretrained)
    networks = build_networks(qat_config(cfg, checkpoint_config(checkpoint), checkpoint))
    for network, spec in zip(networks, (cfg.generator_quant, cfg.discriminator_quant), strict=True):
        methods = {m.weight_quantizer.method for m in network.modules() if hasattr(m, "weight_quantizer")}
        assert (spec.weight in methods) if spec is not None and spec.weight else not methods
