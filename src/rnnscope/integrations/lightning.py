"""Lightning callback: `GradientFlowCallback` (extra: pip install 'rnnscope[lightning]').

It attaches a GradientMonitor to the LightningModule at fit start, steps it at
`on_before_optimizer_step` (after backward, gradients unscaled/accumulated, before the
optimizer consumes them), logs its scalar figures with `pl_module.log_dict` (so Lightning's
loggers, rank handling and step bookkeeping apply) and detaches at the end of fit — also when
fit raises. The monitor's step is the trainer's `global_step` (one per optimizer step), so a
fit resumed from a checkpoint, or a second fit with the same callback, continues the log's
step numbers instead of starting again at 0.
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError("GradientFlowCallback needs Lightning: pip install "
                          "'rnnscope[lightning]'") from e

from ..monitor import GradientMonitor
from ..monitor.loggers import flat_scalars


class GradientFlowCallback(Callback):
    """Monitor gradient flow through time while Lightning trains.

    Args:
        prefix: prefix of the logged metric names.
        **monitor_kwargs: passed to GradientMonitor (every, replay_every, max_batch, loggers,
            alerts, history, preset).

    Attributes:
        monitor: the GradientMonitor (None before fit starts); its `.history` and `.alerts`
            hold the recent records and alerts.
    """

    def __init__(self, prefix: str = "rnnscope/", **monitor_kwargs):
        super().__init__()
        self.prefix = prefix
        self.monitor_kwargs = monitor_kwargs
        self.monitor: GradientMonitor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.monitor = GradientMonitor(pl_module, **self.monitor_kwargs).attach()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # before the forward, whose hooks read the schedules at this step: the trainer's
        # global step is restored from a checkpoint only after on_fit_start
        if self.monitor is not None:
            self.monitor.step_count = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is None:
            return
        record = self.monitor.step()
        if record is None:
            return
        metrics = {self.prefix + k: float(v) for k, v in flat_scalars(record).items()}
        for alert in self.monitor.alerts:
            if alert.step == record.step:
                metrics[f"{self.prefix}alert/{alert.kind}"] = 1.0
        if metrics:
            # every rank holds the same figures (the monitor reduced them across ranks), so no
            # further sync; Lightning's loggers write them from rank 0
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()
