"""Two gloo processes on CPU: the monitor's reduced figures equal one process on the
concatenated batch."""

import json
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rnnscope.monitor import GradientMonitor

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo is not available")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 10, 4, generator=g), torch.randn(8, 10, 1, generator=g)


def _step(model, x, y, monitor):
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return monitor.step().to_dict()  # the Record's JSON form


def _worker(rank, world, store_path, out_path):
    # a file store: no port to pick, nothing on the network
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Model())
        x, y = _batch()
        n = x.shape[0] // world
        mon = GradientMonitor(model, replay_every=1, max_batch=100, loggers=()).attach()
        rec = _step(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n], mon)
        mon.detach()
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump(rec, fh)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / "rank0.json"
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2,
                       join=True, start_method="spawn")
    ddp = json.loads(out.read_text())
    torch.manual_seed(0)
    model = Model()
    x, y = _batch()
    mon = GradientMonitor(model, replay_every=1, max_batch=100).attach()
    single = _step(model, x, y, mon)
    mon.detach()
    a, b = ddp["layers"]["module.rnn"], single["layers"]["rnn"]
    torch.testing.assert_close(torch.tensor(a["input_grad"]), torch.tensor(b["input_grad"]),
                               rtol=1e-5, atol=0)
    for key in b["state_grad"]:
        for which in ("h", "c"):
            torch.testing.assert_close(torch.tensor(a["state_grad"][key][which]),
                                       torch.tensor(b["state_grad"][key][which]),
                                       rtol=1e-5, atol=0)
        assert a["gates"][key]["mean"] == pytest.approx(b["gates"][key]["mean"], rel=1e-6)
        torch.testing.assert_close(torch.tensor(a["gates"][key]["hist"]),
                                   torch.tensor(b["gates"][key]["hist"]))
    assert ddp["global_norm"] == pytest.approx(single["global_norm"], rel=1e-5)
    for k, v in b["param_norms"].items():
        assert a["param_norms"][k] == pytest.approx(v, rel=1e-5), k
