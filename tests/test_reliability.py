"""Issue 18: every kind of bad input ends in one `error:` line and exit code 2 through the CLI, and in a
lowbit error type through the Python API - never a traceback, a hang, a half-written file or a silent
garbage model. Configs, checkpoints + sidecars, data files, sample counts, output paths, studies."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lowbit.cli import main
from lowbit.config import load_config
from lowbit.errors import CheckpointError, ConfigError, DataError, LimitError, OutputError
from lowbit.train.gan import GanConfig, train_gan
from lowbit.train.networks import load_generator
from tiny_gan import tiny_gan

TINY = tiny_gan(steps=10, checkpoint_every=5, sample_every=10)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``lowbit *argv`` in this process; the exit code and stderr."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_clean_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line 'error: ...' holding ``fragments``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary or lock files left under ``folder``."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == ".lowbit.lock"]


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny GAN run (its directory), shared read-only by the tests below."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    train_gan(from_tiny(), out, progress=False)
    return out


def from_tiny(**changes) -> GanConfig:
    from lowbit.config import from_dict

    return from_dict(GanConfig, {**TINY, **changes})


# ------------------------------------------------------------------------------------------ configs


ALIAS_BOMB = "\n".join(
    ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
) + "\nname: bomb\n"

BAD_CONFIGS = {
    "alias bomb": (ALIAS_BOMB.encode(), "LOWBIT_MAX_YAML_NODES"),
    "python tag": (b"name: !!python/object/apply:os.system ['touch PWNED']\n", "no tags"),
    "not utf-8": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    "recursive anchor": (b"name: &a [*a]\n", "refers to itself"),
    "deep nesting": (b"name: " + b"[" * 1000 + b"]" * 1000 + b"\n", "nested"),
    "syntax": (b"name: [1,\n", "invalid YAML"),
    "not a mapping": (b"- 1\n- 2\n", "top level must be a mapping"),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_file_is_one_error_line(kind, tmp_path, capsys, monkeypatch):
    text, fragment = BAD_CONFIGS[kind]
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    assert_clean_error(*run_cli(capsys, "train", str(config), "--out", "run", "--quiet"), fragment)
    with pytest.raises(ConfigError, match=fragment):
        load_config(GanConfig, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no run dir, no PWNED


BAD_OVERRIDES = {
    "python tag": ("steps=!!python/object/apply:os.system ['touch PWNED']", "no tags"),
    "not yaml": ("steps=[1,", "invalid YAML"),
    "alias bomb": ("name=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                   "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                   "[*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]", "alias bomb"),
    "negative lr": ("generator.lr=-0.001", "lr must be a positive number"),
    "nan lr": ("discriminator.lr=.nan", "lr must be a positive number"),
    "empty key": ("generator..lr=1", "empty key part"),
    "guard bound": ("guard.max_loss=-1", "guard: need max_loss >= 0"),
}


@pytest.mark.parametrize("kind", list(BAD_OVERRIDES))
def test_bad_override_is_one_error_line(kind, tmp_path, capsys, monkeypatch):
    override, fragment = BAD_OVERRIDES[kind]
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "tiny.yaml", TINY)
    assert_clean_error(*run_cli(capsys, "train", str(config), "--out", "run", "--quiet", "--set", override),
                       fragment)
    with pytest.raises(ConfigError, match=fragment):
        load_config(GanConfig, config, [override])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_raising_the_yaml_bound_lets_a_large_config_through(tmp_path, monkeypatch):
    from lowbit.config import read_yaml

    config = tmp_path / "big.yaml"
    config.write_text(ALIAS_BOMB.replace("name: bomb", "").replace("a8:", "name:"))
    with pytest.raises(LimitError, match="LOWBIT_MAX_YAML_NODES"):
        read_yaml(config)
    monkeypatch.setenv("LOWBIT_MAX_YAML_NODES", str(10**10))
    assert len(read_yaml(config)["name"]) == 10


def test_classifier_init_from_of_another_width_is_refused(tmp_path, capsys):
    from lowbit.models import create_model
    from lowbit.train.checkpoint import save_checkpoint
    from lowbit.train.classifier import CHECKPOINT_KIND, ClassifierConfig, build_classifier

    source = tmp_path / "model.safetensors"
    model = create_model("resnet20", width=8)
    save_checkpoint(source, {"kind": CHECKPOINT_KIND, "model": "resnet20", "kwargs": {"width": 8},
                             "quant": None, "keep_first_last": True, "state": model.state_dict(),
                             "metrics": {}})
    cfg = {"name": "c", "model": "resnet20", "kwargs": {"width": 16}, "init_from": str(source), "epochs": 1,
           "data": {"dataset": "digits", "limit": 64, "test_limit": 64, "pad_to": 32}}
    from lowbit.config import from_dict

    wanted = r"kwargs \{'width': 16\}, got a 'resnet20' with kwargs \{'width': 8\}"
    with pytest.raises(ConfigError, match=wanted):
        build_classifier(from_dict(ClassifierConfig, cfg))
    config = write_yaml(tmp_path / "c.yaml", cfg)
    assert_clean_error(*run_cli(capsys, "train-classifier", str(config), "--out", str(tmp_path / "run"),
                                "--quiet"), "init_from")
    assert not (tmp_path / "run").exists()


def test_onnx_opset_out_of_range_is_refused(tmp_path):
    import lowbit
    from lowbit.export import export_onnx

    spec = lowbit.QuantSpec(weight="minmax", weight_bits=8)
    generator = lowbit.convert(load_generator("dcgan-mnist"), spec)
    for opset in (0, 10, 999):
        with pytest.raises(ConfigError, match=f"ONNX opset must be an integer from 18 to .*, got {opset}"):
            export_onnx(generator, tmp_path / "g.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_onnx_opset_0_through_the_cli(tmp_path, capsys):
    config = write_yaml(tmp_path / "export.yaml", {
        "checkpoint": "dcgan-mnist", "output": str(tmp_path / "g.onnx"), "format": "onnx", "opset": 0,
        "quant": {"weight": "minmax", "weight_bits": 8}})
    assert_clean_error(*run_cli(capsys, "export", str(config)), "ONNX opset must be an integer")
    assert not (tmp_path / "g.onnx").exists()


# ------------------------------------------------------------------------------------------ sizes


def test_generate_count_beyond_the_bound_names_the_limit(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.png"
    line = assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "3000000000", "-o", str(out)),
                              "exceeds the limit of 10,000", "LOWBIT_MAX_GRID_SAMPLES")
    assert "3,000,000,000" in line
    monkeypatch.setenv("LOWBIT_MAX_GRID_SAMPLES", "2")
    assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "3", "-o", str(out)), "limit of 2")
    assert run_cli(capsys, "generate", "dcgan-mnist", "-n", "2", "-o", str(out))[0] == 0
    assert out.is_file()


def test_generate_nrow_0_is_refused(tmp_path, capsys):
    from lowbit.data import save_image_grid

    assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "4", "--nrow", "0", "-o",
                                str(tmp_path / "g.png")), "--nrow must be >= 1")
    with pytest.raises(ConfigError, match="nrow >= 1"):
        save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "g.png", nrow=0)
    assert list(tmp_path.iterdir()) == []


def test_eval_count_beyond_the_bound_names_the_limit(tmp_path, capsys):
    from lowbit.metrics import evaluate

    assert_clean_error(*run_cli(capsys, "eval", "dcgan-mnist", "--n", "2000000000", "--out",
                                str(tmp_path / "e.json")), "LOWBIT_MAX_SAMPLES")
    with pytest.raises(LimitError, match="batch = 100,000,000 exceeds the limit"):
        evaluate(load_generator("dcgan-mnist"), "mnist", n=100, batch=100_000_000)
    assert list(tmp_path.iterdir()) == []


def test_run_config_sample_count_is_bounded_before_training(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", {"name": "r", "out_dir": str(tmp_path / "out"),
                                                "eval": {"samples": 10**12}})
    assert_clean_error(*run_cli(capsys, "run", str(config)), "eval.samples", "LOWBIT_MAX_SAMPLES")
    assert not (tmp_path / "out").exists()


def test_image_side_is_bounded(tmp_path, capsys):
    from lowbit.train.classifier import pad_images

    config = write_yaml(tmp_path / "c.yaml", {"name": "c", "model": "extractor-8", "epochs": 1,
                                              "data": {"dataset": "digits", "limit": 64, "test_limit": 64,
                                                       "pad_to": 100_000}})
    assert_clean_error(*run_cli(capsys, "train-classifier", str(config), "--out", str(tmp_path / "run"),
                                "--quiet"), "data.pad_to = 100,000 exceeds the limit of 4,096",
                       "LOWBIT_MAX_IMAGE_SIZE")
    with pytest.raises(LimitError, match="LOWBIT_MAX_IMAGE_SIZE"):
        pad_images(torch.zeros(1, 1, 8, 8), 10**6)
    assert not (tmp_path / "run").exists()


def idx_gz(path: Path, shape: tuple[int, ...], payload: int) -> Path:
    """A gzipped IDX uint8 file whose header declares ``shape`` but holds ``payload`` zero bytes."""
    header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header)
        for _ in range(payload // (1 << 20)):
            handle.write(bytes(1 << 20))
    return path


def test_gzip_bomb_is_read_no_further_than_its_declared_size(tmp_path, capsys):
    from lowbit.data.idx import read_idx

    bomb = idx_gz(tmp_path / "train-images-idx3-ubyte.gz", (10, 28, 28), 64 << 20)  # 64 MB of zeros
    with pytest.raises(DataError, match=r"IDX payload has 7841 bytes but the header \(10, 28, 28\) needs"):
        read_idx(bomb)
    huge = idx_gz(tmp_path / "huge-idx3-ubyte.gz", (60000, 60000, 60000), 0)
    with pytest.raises(LimitError, match="declares 216,000,000,000,000 bytes .* LOWBIT_MAX_DATA_BYTES"):
        read_idx(huge)
    idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", (10,), 0)
    assert_clean_error(*run_cli(capsys, "data", "preview", "fashion-mnist", "--root", str(tmp_path), "-o",
                                str(tmp_path / "grid.png")), "IDX payload has 7841 bytes")
    assert not (tmp_path / "grid.png").exists()


# ------------------------------------------------------------------------------------------ checkpoints


def _pairs(skeleton: dict) -> list:
    return skeleton["__dict__"]


def damaged_copy(trained: Path, tmp_path: Path, damage) -> Path:
    """A copy of the run's model file whose sidecar JSON went through ``damage(meta)``."""
    target = tmp_path / "model.safetensors"
    shutil.copy(trained / "model.safetensors", target)
    meta = json.loads((trained / "model.json").read_text())
    damage(meta)
    text = json.dumps(meta).replace('"DEEP"', "[" * 5000 + "]" * 5000)  # too deep for json.dumps itself
    (tmp_path / "model.json").write_text(text)
    return target


def _drop_entry(name: str):
    def damage(meta: dict) -> None:
        meta["state"]["__dict__"] = [p for p in _pairs(meta["state"]) if p[0] != name]
    return damage


def _rename_tensor(meta: dict) -> None:
    text = json.dumps(meta["state"]).replace('"__tensor__": "', '"__tensor__": "missing/', 1)
    meta["state"] = json.loads(text)


def _nest(meta: dict) -> None:
    meta["state"]["__dict__"].append(["deep", "DEEP"])


SIDECAR_DAMAGE = {
    "no state": (lambda meta: meta.pop("state"), "field 'state' is missing"),
    "state is a list": (lambda meta: meta.update(state=[1, 2]), "field 'state' is missing or not a dict"),
    "state is a tuple": (lambda meta: meta.update(state={"__tuple__": [1]}), "is a tuple, not a mapping"),
    "sha is a number": (lambda meta: meta.update(sha256=5), "field 'sha256'"),
    "missing tensor": (_rename_tensor, "which is not in the tensor file"),
    "nested 5000 deep": (_nest, "nested too deeply"),
    "bad pairs": (lambda meta: meta["state"].update({"__dict__": [[1, 2, 3]]}), "[key, value] pairs"),
    "no generator": (_drop_entry("generator"), "entry 'generator' is missing"),
    "wrong format": (lambda meta: meta.update(format="x"), "not a lowbit-checkpoint/1 sidecar"),
}


@pytest.mark.parametrize("kind", list(SIDECAR_DAMAGE))
def test_damaged_sidecar_is_one_error_line(kind, trained, tmp_path, capsys):
    damage, fragment = SIDECAR_DAMAGE[kind]
    model = damaged_copy(trained, tmp_path, damage)
    with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_generator(model)
    out = tmp_path / "grid.png"
    assert_clean_error(*run_cli(capsys, "generate", str(model), "-n", "4", "-o", str(out)), fragment)
    assert not out.exists()


def test_declared_tensor_size_beyond_the_file_is_refused(trained, tmp_path, capsys):
    """A tensor file whose header declares a 4 TB tensor (checksum updated to match) is refused
    without allocating it."""
    import hashlib

    data = (trained / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**12]
    header[name]["data_offsets"] = [header[name]["data_offsets"][0], 4 * 10**12]
    text = json.dumps(header).encode()
    damaged = len(text).to_bytes(8, "little") + text + data[8 + size :]
    model = tmp_path / "model.safetensors"
    model.write_bytes(damaged)
    meta = json.loads((trained / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "sha256": hashlib.sha256(damaged).hexdigest()}))
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_generator(model)
    assert_clean_error(*run_cli(capsys, "generate", str(model), "-o", str(tmp_path / "g.png")),
                       "unreadable safetensors file")


def test_damaged_training_state_on_resume_is_one_error_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    side = run / "checkpoints" / "last.json"
    meta = json.loads(side.read_text())
    for pair in _pairs(meta["state"]):
        if pair[0] == "rng":
            pair[1] = {"__dict__": [["torch", 7]]}
    side.write_text(json.dumps(meta))
    config = write_yaml(tmp_path / "tiny.yaml", {**TINY, "steps": 12})
    assert_clean_error(*run_cli(capsys, "train", str(config), "--out", str(run), "--resume", "--quiet"),
                       "last.safetensors: checkpoint content does not fit")
    with pytest.raises(CheckpointError, match="checkpoint content does not fit"):
        train_gan(from_tiny(steps=12), run, resume=True, progress=False)


# ------------------------------------------------------------------------------------------ divergence


def test_huge_learning_rate_stops_with_exit_2_and_keeps_no_garbage_model(tmp_path, capsys):
    config = write_yaml(tmp_path / "tiny.yaml", {**TINY, "steps": 200})
    out = tmp_path / "run"
    line = assert_clean_error(*run_cli(capsys, "train", str(config), "--out", str(out), "--quiet", "--set",
                                       "generator.lr=1.0e+6", "--set", "discriminator.lr=1.0e+6"),
                              "became", "at step 1", "training diverged")
    assert "no checkpoint was written yet" in line
    assert not (out / "model.safetensors").exists() and leftovers(tmp_path) == []


def test_magnitude_bound_is_configurable(tmp_path):
    from lowbit.errors import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"became .* \(bound guard.max_weight = 0.5\)"):
        train_gan(from_tiny(guard={"max_weight": 0.5}), tmp_path / "a", progress=False)
    with pytest.raises(TrainingDivergedError, match=r"loss became .* \(bound guard.max_loss = 0.01\)"):
        train_gan(from_tiny(guard={"max_loss": 0.01}), tmp_path / "b", progress=False)


def test_non_finite_batchnorm_statistic_is_never_checkpointed(tmp_path, monkeypatch):
    """A BatchNorm running variance turns NaN after step 7: the guard (weights checked every 100 steps
    here) refuses the step-10 checkpoint, so the kept one is step 5's and every tensor in it is finite."""
    from lowbit.errors import TrainingDivergedError
    from lowbit.train import gan
    from lowbit.train.checkpoint import load_checkpoint

    original = gan.GanTrainer.g_step

    def poisoned(self, n, gen):
        loss = original(self, n, gen)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 7:
            norm = next(m for m in self.G.modules() if isinstance(m, torch.nn.BatchNorm2d))
            norm.running_var.fill_(float("nan"))
        return loss

    monkeypatch.setattr(gan.GanTrainer, "g_step", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"running_var.*became nan at step 10; the last good "
                                                     r"checkpoint .*last.safetensors is kept"):
        train_gan(from_tiny(guard={"every": 100}), tmp_path / "run", progress=False)
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert kept["step"] == 5
    tensors = [t for part in ("generator", "discriminator") for t in kept[part].values()
               if t.is_floating_point()]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors)


def test_guard_checks_nested_states_and_losses():
    from lowbit.errors import TrainingDivergedError
    from lowbit.train.guard import DivergenceGuard, GuardSpec

    guard = DivergenceGuard(GuardSpec(max_loss=10.0))
    guard.check_losses("step 1", {"loss": 9.0})
    with pytest.raises(TrainingDivergedError, match="loss became inf at step 2"):
        guard.check_losses("step 2", {"loss": float("inf")})
    state = {"optim": {"state": [{"exp_avg": torch.tensor([1.0, float("nan")])}]},
             "rng": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(TrainingDivergedError, match=r"'optim.state\[0\].exp_avg' \(max \|value\|\) became"):
        guard.check_state("step 3", state)


def test_classifier_divergence_is_a_lowbit_error(tmp_path):
    from lowbit.config import from_dict
    from lowbit.errors import TrainingDivergedError
    from lowbit.train.classifier import ClassifierConfig, train_classifier

    cfg = from_dict(ClassifierConfig, {"name": "c", "model": "extractor-8", "kwargs": {"feature_dim": 32},
                                       "epochs": 2, "batch_size": 64,
                                       "data": {"dataset": "digits", "limit": 256, "test_limit": 64},
                                       "optim": {"lr": 1.0e+8, "momentum": 0.0}})
    with pytest.raises(TrainingDivergedError, match="epoch 1.*lower optim.lr"):
        train_classifier(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ run-dir lock


def test_second_writer_is_refused_with_the_holder(tmp_path, capsys):
    import os

    from lowbit.errors import RunDirLockedError
    from lowbit.train.rundir import RunDirLock

    out = tmp_path / "run"
    config = write_yaml(tmp_path / "tiny.yaml", TINY)
    with RunDirLock(out):
        line = assert_clean_error(*run_cli(capsys, "train", str(config), "--out", str(out), "--quiet"),
                                  f"is in use by another lowbit process (PID {os.getpid()} on", "started")
        assert "choose another output directory" in line
        with pytest.raises(RunDirLockedError, match=f"PID {os.getpid()}"):
            train_gan(from_tiny(), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lowbit.lock"]  # the refused runs wrote nothing
    assert not out.exists()  # the lock made the directory and removed it again


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys

    from lowbit.train.rundir import RunDirLock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lowbit.train.rundir import RunDirLock; "
         f"RunDirLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from lowbit.errors import RunDirLockedError

        with pytest.raises(RunDirLockedError, match=f"PID {holder.pid} on"):
            RunDirLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lowbit.lock").is_file()  # kill -9 left the lock file behind
    with RunDirLock(out) as lock:
        assert json.loads((out / ".lowbit.lock").read_text())["pid"] == __import__("os").getpid()
        assert lock.fd is not None
    assert not (out / ".lowbit.lock").exists()


def test_stale_lock_takeover_is_announced(tmp_path, capsys):
    from lowbit.train.rundir import RunDirLock

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lowbit.lock").write_text(json.dumps({"pid": 4242, "host": "h", "started": "yesterday"}))
    with RunDirLock(out):
        pass
    assert "taking over the stale lock of PID 4242 on h, started yesterday" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ outputs


def test_output_directory_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "4", "-o", str(blocker / "g.png")),
                       "cannot write", "Not a directory")
    config = write_yaml(tmp_path / "tiny.yaml", TINY)
    assert_clean_error(*run_cli(capsys, "train", str(config), "--out", str(blocker), "--quiet"),
                       f"cannot write {blocker}: Not a directory")
    assert blocker.read_text() == "x" and leftovers(tmp_path) == []


def test_output_file_name_that_is_a_directory(tmp_path, capsys):
    from lowbit.io import atomic_write_text

    folder = tmp_path / "folder"
    folder.mkdir()
    assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "4", "-o", str(folder)),
                       "Is a directory", "give a file name")
    with pytest.raises(OutputError, match="Is a directory"):
        atomic_write_text(folder, "x")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("code, fragment", [(errno.EROFS, "Read-only file system"),
                                            (errno.EACCES, "Permission denied")])
def test_read_only_location(code, fragment, tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(code, __import__("os").strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "4", "-o", str(tmp_path / "g.png")),
                       fragment)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    from PIL import Image
    from safetensors import SafetensorError

    import lowbit.train.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    assert_clean_error(*run_cli(capsys, "generate", "dcgan-mnist", "-n", "4", "-o", str(tmp_path / "g.png")),
                       "No space left on device", "free some space")
    assert list(tmp_path.iterdir()) == []

    def full_safetensors(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_safetensors)
    with pytest.raises(OutputError, match="cannot write .*ck.safetensors: No space left on device; free"):
        checkpoint.save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_other_errors_inside_the_atomic_block_pass_through(tmp_path):
    from lowbit.io import atomic_path

    with pytest.raises(ConnectionResetError), atomic_path(tmp_path / "x"):
        raise ConnectionResetError(errno.ECONNRESET, "reset")  # a read error, not the output's fault
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ studies


def test_study_config_cannot_run_an_import_path_by_default(tmp_path, capsys, monkeypatch):
    from lowbit.studies import load_study, run_study

    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "study.yaml", {"name": "evil", "trial": "os:system",
                                                  "axes": [{"name": "x", "values": ["touch PWNED"]}]})
    assert_clean_error(*run_cli(capsys, "study", str(config), "--quiet"),
                       "trial 'os:system' is an import path", "--allow-import-trials")
    with pytest.raises(ConfigError, match="registered trial"):
        run_study(load_study(config), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no results dir, no PWNED


# ------------------------------------------------------------------------------------------ a real process


def test_a_real_lowbit_process_prints_one_line_and_exits_2(tmp_path):
    """The console entry point as a user runs it: one stderr line, exit status 2, no traceback."""
    import subprocess
    import sys

    config = tmp_path / "bad.yaml"
    config.write_bytes(b"name: !!python/object/apply:os.system ['touch PWNED']\n")
    done = subprocess.run([sys.executable, "-m", "lowbit.cli", "train", str(config), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_clean_error(done.returncode, done.stderr, "no tags such as !!python/object")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
