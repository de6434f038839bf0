"""Training-time gradient-flow monitor: statistics, alerts, loggers, schedules."""

from .alerts import Alert, AlertPolicy, GradientFlowWarning
from .loggers import CSVLogger, JSONLLogger, Logger, TensorBoardLogger, read_jsonl
from .monitor import GradientMonitor
from .schedules import every, never

__all__ = ["Alert", "AlertPolicy", "CSVLogger", "GradientFlowWarning", "GradientMonitor",
           "JSONLLogger", "Logger", "TensorBoardLogger", "every", "never", "read_jsonl"]
