"""Lightning callback and TensorBoard logger, driven end to end."""

import pytest
import torch
from torch import nn

from rnnscope.monitor import GradientMonitor, read_jsonl

lightning = pytest.importorskip("lightning.pytorch", reason="lightning is not installed "
                                "(pip install -e '.[test]')")


class LitSeq(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])

    def training_step(self, batch, _):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 15, 3, generator=g)
    y = x[:, 0, :1] + x[:, -1, 1:2]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_lightning_callback_steps_logs_and_detaches(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from rnnscope.integrations.lightning import GradientFlowCallback

    cb = GradientFlowCallback(replay_every=3, loggers=tmp_path / "mon")
    # the figures go through pl_module.log_dict, so Lightning's log_every_n_steps applies
    trainer = lightning.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), callbacks=[cb],
                                enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, accelerator="cpu", devices=1,
                                log_every_n_steps=1)
    model = LitSeq()
    trainer.fit(model, _loader())
    assert "rnnscope/grad_norm/global" in trainer.callback_metrics  # logged by the module
    steps, _ = read_jsonl(tmp_path / "mon" / "rnnscope-monitor.jsonl")
    assert [s["step"] for s in steps] == list(range(8))  # 4 batches × 2 epochs
    assert [s["exact"] for s in steps] == [s % 3 == 0 for s in range(8)]
    assert "state_grad" in steps[0]["layers"]["rnn"]
    assert not any(len(m._forward_hooks) or len(m._forward_pre_hooks) for m in model.modules())
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "rnnscope/grad_norm/global" in metrics and "rnnscope/rnn/input_grad/lag0" in metrics


def test_tensorboard_logger_writes_scalars_and_heatmap(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rnnscope.monitor import TensorBoardLogger

    model = LitSeq()
    tb = TensorBoardLogger(tmp_path, image_every=3)
    with GradientMonitor(model, loggers=[tb]) as mon:
        for x, y in _loader():
            ((model(x) - y) ** 2).mean().backward()
            mon.step()
            model.zero_grad()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "grad_norm/global" in tags["scalars"]
    assert len(acc.Scalars("grad_norm/global")) == 4
    assert "rnn/input_grad_heatmap" in tags["images"]
    taken = tmp_path / "events.txt"
    taken.write_text("mine")
    with pytest.raises(ValueError, match="events.txt' is an existing file; give a folder"):
        TensorBoardLogger(taken)
    assert taken.read_text() == "mine"


def test_lightning_resumed_fit_continues_the_monitor_log(tmp_path):
    """A fit resumed from a checkpoint (and a second fit with the same callback) numbers its
    records by the trainer's global step, so one log holds the whole run, in order."""
    from rnnscope.integrations.lightning import GradientFlowCallback

    log = tmp_path / "mon.jsonl"

    def trainer(epochs, cb):
        return lightning.Trainer(max_epochs=epochs, logger=False, callbacks=[cb],
                                 enable_progress_bar=False, enable_model_summary=False,
                                 enable_checkpointing=False, accelerator="cpu", devices=1)

    first = trainer(1, GradientFlowCallback(replay_every=3, loggers=log))
    first.fit(LitSeq(), _loader())
    first.save_checkpoint(tmp_path / "one.ckpt")
    resumed = trainer(2, GradientFlowCallback(replay_every=3, loggers=log))
    resumed.fit(LitSeq(), _loader(), ckpt_path=tmp_path / "one.ckpt")
    steps, _ = read_jsonl(log)
    assert [s["step"] for s in steps] == list(range(8))  # 4 batches, then 4 more
    # the replay schedule follows the global step too
    assert [s["exact"] for s in steps] == [s % 3 == 0 for s in range(8)]
    again = GradientFlowCallback(loggers=tmp_path / "again.jsonl")
    t = trainer(1, again)
    t.fit(LitSeq(), _loader())
    t.fit_loop.max_epochs = 2
    t.fit(t.lightning_module, _loader())
    assert [s["step"] for s in read_jsonl(tmp_path / "again.jsonl")[0]] == list(range(8))
