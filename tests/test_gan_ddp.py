"""Two-process (gloo, CPU) GAN training: DDP keeps the ranks' weights identical, only rank 0 writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.config import from_dict
from lowbit.train.distributed import cleanup
from lowbit.train.gan import GanConfig, train_gan
from tiny_gan import tiny_gan

CONFIG = tiny_gan(
    name="ddp",
    loss="wgan-gp",
    discriminator={"model": "dcgan-d-16-nobn", "kwargs": {"width": 8}},
    steps=4,
    log_every=2,
    sample_every=4,
    checkpoint_every=2,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    finished = False
    try:
        result = train_gan(from_dict(GanConfig, CONFIG), Path(out) / "run", overwrite=True, progress=False)
        weights = torch.cat([p.detach().flatten() for p in result.generator.parameters()])
        torch.save({"weights": weights, "history": result.history}, Path(out) / f"rank{rank}.pt")
        finished = True
    finally:
        cleanup(synchronize=finished)  # a bare destroy_process_group lets gloo abort ~1 exit in 4


def test_two_ranks_stay_in_sync_and_only_rank_zero_logs(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(rank0["weights"], rank1["weights"])  # each rank's own in-memory weights
    initial = torch.cat([p.detach().flatten() for p in _initial_generator().parameters()])
    assert not torch.equal(rank0["weights"], initial)
    assert [row["step"] for row in rank0["history"]] == [2, 4] and rank1["history"] == []
    assert len(list((tmp_path / "run" / "samples").iterdir())) == 1


def _initial_generator() -> torch.nn.Module:
    from lowbit.models import create_model

    torch.manual_seed(0)
    return create_model("dcgan-g-16", width=8, latent_dim=16)


def test_train_command_with_nproc_2_runs_under_torchrun(tmp_path):
    """`lowbit train CONFIG --nproc 2` relaunches itself as 2 gloo ranks; rank 0 writes the run."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_gan(steps=4, log_every=2, sample_every=4, checkpoint_every=2)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lowbit.cli", "train", str(config), "--nproc", "2", "--out", str(out),
               "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained tiny for 4 steps" in done.stdout
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "last.safetensors").is_file()
    assert len((out / "log.csv").read_text().splitlines()) == 3  # header + rows at steps 2 and 4
    bad = subprocess.run([*command[:6], "0", *command[7:]], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--nproc must be >= 1" in bad.stderr
