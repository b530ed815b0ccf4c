"""Classifier studies (seed 002 Tables 1/3/4 shape) as named-trial studies of ``lowbit.studies``: trial
configs, dependency order, reuse of finished runs, ratios against the reference trial and the CLI, on a
tiny digits setup."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lowbit import cli
from lowbit.commands.classify import summarize
from lowbit.config import from_dict
from lowbit.errors import ConfigError
from lowbit.studies import StudyConfig, run_study
from lowbit.studies.named import dependency_waves, expand_named, named_trial

BASE = {"model": "extractor-8", "kwargs": {"feature_dim": 16}, "data": {"dataset": "digits", "limit": 300},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0}, "epochs": 2, "batch_size": 64,
        "threads": 1}
TRIALS = {"fp": {}, "sgt-w1": {"init_from": "@fp", "epochs": 1,
                               "quant": {"weight": "search", "weight_bits": 1,
                                         "weight_opts": {"scale": 1.0, "mode": "sgt"}}}}


def _study(**fields) -> StudyConfig:
    return from_dict(StudyConfig, {"name": "s", "trial": "classifier", "base": BASE, **fields})


def test_trial_config_merges_overrides_and_resolves_trial_references(tmp_path):
    study = _study(trials=TRIALS, seeds=[4])
    trial = named_trial(study, "sgt-w1", 4, tmp_path)
    cfg = trial.config
    assert cfg["init_from"] == str(tmp_path / "trials" / "fp-s4" / "run" / "model.safetensors")
    assert trial.after == ("fp-s4",) and trial.id == "sgt-w1-s4"
    assert trial.params == {"trial": "sgt-w1", "seed": 4}
    assert cfg["seed"] == 4 and cfg["epochs"] == 1 and cfg["data"]["limit"] == 300
    assert cfg["optim"]["name"] == "adam"
    assert cfg["quant"]["weight_opts"]["mode"] == "sgt" and cfg["name"] == "sgt-w1-s4"
    with pytest.raises(ConfigError, match="names no trial"):
        named_trial(_study(trials={"fp": {}, "x": {"init_from": "@y"}}), "x", 0, tmp_path)
    with pytest.raises(ConfigError, match=r"'trials\.x\.epoch' \(did you mean 'epochs'"):
        named_trial(_study(trials={"fp": {}, "x": {"epoch": 1}}), "x", 0, tmp_path)
    shared = _study(seeds=[0, 4], trials={"fp": {"seeds": [0]}, "sgt-w1": TRIALS["sgt-w1"]})
    assert shared.trial_seeds("fp") == [0] and shared.trial_seeds("sgt-w1") == [0, 4]
    assert named_trial(shared, "sgt-w1", 4, tmp_path).config["init_from"] == str(
        tmp_path / "trials" / "fp-s0" / "run" / "model.safetensors")
    waves = dependency_waves(expand_named(shared, tmp_path))
    assert [[t.id for t in wave] for wave in waves] == [["fp-s0"], ["sgt-w1-s0", "sgt-w1-s4"]]
    with pytest.raises(ConfigError, match="runs none of the study seeds"):
        _study(trials={"fp": {"seeds": [7]}})
    with pytest.raises(ConfigError, match="reference"):
        _study(trials={"a": {}}, reference="fp")
    assert _study(trials={"a": {}, "b": {}}).reference == "a"
    with pytest.raises(ConfigError, match="names a file, which only load_study reads"):
        run_study(from_dict(StudyConfig, {"name": "s", "base": "b.yaml", "trials": {"a": {}}}), tmp_path)
    with pytest.raises(ConfigError, match="named 'trials' and 'axes'"):
        _study(trials={"a": {}}, axes=[{"name": "bits", "values": [1]}])


def test_summary_averages_and_picks_the_best_seed():
    rows = [{"trial": "t", "method": "m", "seed": s, "top1": a, "top5": 99.0, "delta_top1": d,
             "test_loss": 0.5, "time_ratio": 1.5, "memory_ratio": r, "multiplication_free": True}
            for s, a, d, r in [(0, 80.0, 2.0, 1.2), (1, 90.0, 1.0, 1.4)]]
    (row,) = summarize(rows)
    assert row["avg_top1"] == 85.0 and row["best_top1"] == 90.0 and row["avg_delta_top1"] == 1.5
    assert row["memory_ratio"] == pytest.approx(1.3) and row["seeds"] == 2


def test_study_cli_runs_trials_writes_tables_and_reuses_finished_runs(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "tiny-study", "base": "base.yaml", "trials": TRIALS}))
    out = tmp_path / "out"
    assert cli.main(["classifier-study", str(study), "--out", str(out), "--quiet"]) == 0
    assert "sgt-w1" in capsys.readouterr().out
    with open(out / "tiny-study.csv") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    fp, sgt = rows["fp"], rows["sgt-w1"]
    assert float(fp["time_ratio"]) == float(fp["memory_ratio"]) == 1.0 and float(fp["delta_top1"]) == 0
    assert float(sgt["delta_top1"]) == pytest.approx(float(fp["top1"]) - float(sgt["top1"]))
    assert sgt["multiplication_free"] == "True" and fp["multiplication_free"] == "False"
    assert float(sgt["top1"]) > 30.0  # chance is 10%
    run = out / "trials" / "{}-s0" / "run" / "metrics.json"
    sgt_metrics = json.loads(Path(str(run).format("sgt-w1")).read_text())
    assert float(sgt["memory_ratio"]) == pytest.approx(sgt_metrics["peak_train_bytes"] / json.loads(
        Path(str(run).format("fp")).read_text())["peak_train_bytes"])
    assert (out / "tiny-study.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tiny-study-summary.csv").is_file()
    assert json.loads((out / "tiny-study.json").read_text())[1]["trial"] == "sgt-w1"
    assert len(json.loads((out / "results.json").read_text())) == 2  # the shared study table has both
    stamp = Path(str(run).format("fp")).stat().st_mtime_ns
    assert cli.main(["classifier-study", str(study), "--out", str(out), "--quiet"]) == 0  # reuses both runs
    assert Path(str(run).format("fp")).stat().st_mtime_ns == stamp
    code = cli.main(["classifier-study", str(study), "--out", str(out), "--quiet",
                     "--set", "trials.fp.epochs=3"])
    assert code == 2 and "another config" in capsys.readouterr().err
