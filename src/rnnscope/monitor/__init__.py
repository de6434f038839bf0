"""Training-time gradient-flow monitor: statistics, alerts, loggers, schedules."""

from .alerts import Alert, AlertPolicy, GradientFlowWarning
from .loggers import CSVLogger, JSONLLogger, Logger, TensorBoardLogger, read_jsonl
from .monitor import GradientMonitor
from .record import LayerRecord, Record
from .schedules import every, never

__all__ = ["Alert", "AlertPolicy", "CSVLogger", "GradientFlowWarning", "GradientMonitor",
           "JSONLLogger", "LayerRecord", "Logger", "Record", "TensorBoardLogger", "every",
           "never", "read_jsonl"]
