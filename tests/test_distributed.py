"""DDP: two CPU processes under torchrun train exactly like one process on the global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import ConfigError
from lowbit.train import distributed
from lowbit.train.distributed import DistContext, distributed_loader

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_distributed import train_digits
train_digits(sys.argv[1])
"""


def train_digits(out_dir: str) -> None:
    """Two epochs of SGD on an MLP over sklearn digits, in however many processes torchrun started."""
    from sklearn.datasets import load_digits

    ctx = distributed.setup()
    data = load_digits()
    images = torch.tensor(data.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(data.target)
    torch.manual_seed(0)
    model = distributed.wrap(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                                 torch.nn.Linear(32, 10)), ctx)
    optim = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    loader = distributed_loader(images, labels, batch_size=64, ctx=ctx, seed=3, drop_last=True)
    losses = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(distributed.all_reduce_mean({"loss": loss.item()}, ctx)["loss"])
    count = distributed.all_reduce_sum(torch.tensor([len(loader) * loader.batch_size]), ctx)
    if ctx.is_main:
        module = model.module if ctx.distributed else model
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, f"{out_dir}/model.safetensors")
        Path(out_dir, "log.json").write_text(json.dumps({"losses": losses, "world": ctx.world_size,
                                                         "samples": int(count.item())}))
    distributed.cleanup()


def test_two_process_ddp_equals_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    train_digits(str(single))
    script = tmp_path / "ddp_digits.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    assert distributed.launch(2, [str(multi)], entry=[str(script)]) == 0

    log_single = json.loads((single / "log.json").read_text())
    log_multi = json.loads((multi / "log.json").read_text())
    assert (log_single["world"], log_multi["world"]) == (1, 2)
    assert log_multi["samples"] == log_single["samples"] == (1797 // 64) * 64
    assert log_multi["losses"] == pytest.approx(log_single["losses"], abs=1e-5)
    assert log_single["losses"][-1] < 0.5 * log_single["losses"][0]
    weights_multi = load_file(multi / "model.safetensors")
    for name, value in load_file(single / "model.safetensors").items():
        torch.testing.assert_close(weights_multi[name], value, atol=1e-5, rtol=1e-4)


def test_loader_shards_each_global_batch_and_checks_divisibility():
    images, labels = torch.arange(12.0).view(12, 1), torch.arange(12)
    whole = [y.tolist() for _, y in distributed_loader(images, labels, 4, DistContext(), seed=1)]
    parts = [[y.tolist() for _, y in distributed_loader(images, labels, 4, DistContext(rank=r, world_size=2),
                                                        seed=1)] for r in range(2)]
    for k, batch in enumerate(whole):
        assert sorted(parts[0][k] + parts[1][k]) == sorted(batch)
    with pytest.raises(ConfigError, match="multiple of 2"):
        distributed_loader(images, labels, 5, DistContext(world_size=2))
    with pytest.raises(ConfigError, match="at least 1 process"):
        distributed.torchrun_command(0, ["x.py"], [])
    assert distributed.torchrun_command(2, distributed.LOWBIT_TRAIN, ["c.yaml"])[:3] == [
        sys.executable, "-m", "torch.distributed.run"]
