"""Study runner: grid expansion, pool/Ray backends, streaming tables, resumption, failed trials."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from sklearn.datasets import load_digits

from lowbit.config import from_dict
from lowbit.data import save_image_grid
from lowbit.errors import ConfigError
from lowbit.studies import StudyConfig, expand, load_study, run_study
from lowbit.studies.runner import available_cores, core_groups
from lowbit.studies.spec import Axis, make_trial

TRIAL = "test_studies:digits_trial"


_DATA = load_digits()  # at import, so pool workers fork with it loaded
IMAGES = torch.tensor(_DATA.data / 16.0, dtype=torch.float32)
LABELS = torch.tensor(_DATA.target)


def _levels(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized weights: sign * mean|w| at 1 bit, uniform min-max at k bits, unchanged at 32."""
    weight = weight.detach()
    if bits >= 32:
        return weight
    if bits == 1:
        return weight.sign() * weight.abs().mean()
    lo, hi = weight.min(), weight.max()
    step = (hi - lo) / (2**bits - 1)
    return torch.round((weight - lo) / step) * step + lo


def _quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The weights the forward pass sees, with a straight-through gradient."""
    return weight + (_levels(weight, bits) - weight).detach()


def _histogram(full: torch.Tensor, quantized: torch.Tensor, path) -> None:
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.hist(full.flatten().numpy(), bins=60, alpha=0.5, label="full precision")
    axis.hist(quantized.flatten().numpy(), bins=60, alpha=0.7, label="quantized")
    axis.legend()
    figure.savefig(path, format="png", dpi=70)
    plt.close(figure)


def digits_trial(config: dict, out_dir) -> dict:
    """A small real trial: a linear classifier on sklearn digits with quantized weights."""
    with open(out_dir / "calls.txt", "a") as handle:
        handle.write("call\n")
    if config.get("crash"):
        raise RuntimeError("boom on purpose")
    if config.get("die"):
        os._exit(7)
    images, labels = IMAGES, LABELS
    torch.manual_seed(config.get("seed", 0))
    model = torch.nn.Linear(64, 10)
    optim = torch.optim.SGD(model.parameters(), lr=config["lr"])
    history = []
    for step in range(config["steps"]):
        logits = images @ _quantize(model.weight, config["bits"]).t() + model.bias
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        history.append({"step": step, "loss": loss.item()})
    with torch.no_grad():
        logits = images @ _quantize(model.weight, config["bits"]).t() + model.bias
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    quantized = _levels(model.weight, config["bits"])
    templates = quantized.view(10, 1, 8, 8) / quantized.abs().max()
    save_image_grid(templates, out_dir / "templates.png", nrow=5)
    _histogram(model.weight.detach(), quantized, out_dir / "histogram.png")
    return {"accuracy": accuracy, "threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
            "history": history, "artifacts": {"samples": "templates.png", "histogram": "histogram.png"}}


def _study(tmp_path, **kw) -> StudyConfig:
    axes = [Axis("variant", {"w1": {"bits": 1}, "w32": {}, "crash": {"crash": True}, "die": {"die": True}})]
    return StudyConfig(name="digits", trial=TRIAL, base={"lr": 0.5, "steps": 40, "bits": 32}, axes=axes,
                       state_metric="loss", out_dir=str(tmp_path / "digits"), **kw)


def _calls(results_dir, record) -> int:
    return len((results_dir / "trials" / record["id"] / "calls.txt").read_text().splitlines())


def test_expand_substitutes_axis_values_and_hashes_configs():
    study = StudyConfig(name="s", base={"train": {"g": {"bits": 32}}, "tag": "$target"},
                        axes=[Axis("bits", [1, 2]),
                              Axis("target", {"D": {"train.d.bits": "$bits"},
                                              "both": {"train.d.bits": "$bits",
                                                       "train.g": {"bits": "$bits"}}})])
    trials = expand(study)
    assert [t.name for t in trials] == ["bits=1,target=D", "bits=1,target=both", "bits=2,target=D",
                                        "bits=2,target=both"]
    assert trials[1].config == {"train": {"g": {"bits": 1}, "d": {"bits": 1}}, "tag": "both"}
    assert trials[2].config == {"train": {"g": {"bits": 32}, "d": {"bits": 2}}, "tag": "D"}
    assert len({t.id for t in trials}) == 4
    study.select = {"bits": [2], "target": ["both"]}
    assert [t.name for t in expand(study)] == ["bits=2,target=both"]
    assert all(t.id.startswith(t.name.replace(",", "_")) for t in trials)


def test_study_config_errors_name_the_fix(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\naxes:\n  - {name: bits, values: [1, 2]}\nworkrs: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'workers'"):
        load_study(path)
    with pytest.raises(ConfigError, match=r"'\$bitz' names no axis; valid: \$bits"):
        expand(StudyConfig(name="s", base={"x": "$bitz"}, axes=[Axis("bits", [1])]))
    with pytest.raises(ConfigError, match="select: 'bitz' is not an axis"):
        StudyConfig(name="s", axes=[Axis("bits", [1])], select={"bitz": [1]})
    with pytest.raises(ConfigError, match="non-empty list"):
        Axis("bits", [])


def test_core_groups_split_cores_evenly():
    assert core_groups(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    assert core_groups(3, [0, 1]) == [[0], [1], [0]]
    assert core_groups(1, [5, 7]) == [[5, 7]]


def test_pool_runs_pinned_trials_records_failures_and_resumes(tmp_path):
    study = _study(tmp_path)
    records = run_study(study, workers=2, progress=False, allow_imports=True)
    results_dir = tmp_path / "digits"
    by_name = {r["name"]: r for r in records}
    assert len(records) == 4

    share = len(available_cores()) // 2
    for variant in ("w1", "w32"):
        ok = by_name[f"variant={variant}"]
        assert ok["status"] == "ok"
        trial = next(t for t in expand(study) if t.id == ok["id"])
        expected = digits_trial(trial.config, tmp_path)["accuracy"]
        assert ok["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-6)
        assert ok["metrics"]["threads"] == share and ok["metrics"]["cores"] == share
        assert ok["state"] == "convergent"
        assert (results_dir / "trials" / ok["id"] / ok["artifacts"]["samples"]).is_file()
    assert by_name["variant=crash"]["error"] == "RuntimeError: boom on purpose"
    assert "exit code 7" in by_name["variant=die"]["error"]
    assert "worker.log" in by_name["variant=die"]["error"]
    assert by_name["variant=w32"]["metrics"]["accuracy"] > 0.9

    with open(results_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == [t.name for t in expand(study)]
    assert rows[0].keys() >= {"variant", "accuracy", "status", "state", "error"}
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert json.loads((results_dir / "results.json").read_text())[0]["history"][0]["step"] == 0

    again = run_study(study, workers=2, progress=False, allow_imports=True)
    assert [r["status"] for r in again] == [r["status"] for r in records]
    for record in again:
        assert _calls(results_dir, record) == (1 if record["status"] == "ok" else 2)


def test_ray_backend_matches_pool(tmp_path):
    pytest.importorskip("ray")
    base = _study(tmp_path)
    study = StudyConfig(name="ray", trial=TRIAL, base=base.base, state_metric="loss",
                        axes=[Axis("variant", {"plain": {}, "crash": {"crash": True}})],
                        out_dir=str(tmp_path / "ray"))
    records = run_study(study, workers=2, backend="ray", progress=False, allow_imports=True)
    assert [r["status"] for r in records] == ["ok", "failed"]
    assert records[1]["error"] == "RuntimeError: boom on purpose"
    expected = digits_trial(expand(study)[0].config, tmp_path)["accuracy"]
    assert records[0]["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert records[0]["metrics"]["threads"] == max(1, len(available_cores()) // 2)
    assert (tmp_path / "ray" / "results.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/studies/*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_study_configs_expand_into_valid_trials(path):
    from lowbit.studies.trials import GanTrialConfig
    from lowbit.train.gan import GanConfig
    from lowbit.train.networks import checkpoint_config

    study = load_study(path)
    trials = expand(study) if study.search is None else [
        make_trial(study.base, {}, {key: 2 for key in study.search.d_keys + study.search.g_keys})]
    assert trials
    for trial in trials:  # GanConfig validates each network's QuantSpec (method names, bit ranges)
        train = from_dict(GanConfig, from_dict(GanTrialConfig, trial.config).train)
        assert train.init_from in ("dcgan-mnist", "wgangp-mnist", "dcgan-fashion")
        # fine-tuning needs the checkpoint's architecture (wgangp-mnist is width 16, not 32)
        shipped = checkpoint_config(train.init_from)
        for role in ("generator", "discriminator"):
            own, theirs = getattr(train, role), getattr(shipped, role)
            assert (own.model, own.kwargs) == (theirs.model, theirs.kwargs), (trial.name, role)
        assert train.data.dataset == shipped.data.dataset, trial.name
