"""Modern recurrences with closed-form step Jacobians: minGRU, minLSTM, LRU, RG-LRU, a
selective SSM (S6) and sLSTM; the shared parallel scan; parameter sensitivity."""

from .lru import LRU
from .mingru import MinGRU
from .minlstm import MinLSTM
from .rglru import RGLRU
from .scan import linear_scan, log_space_scan
from .selective_ssm import SelectiveSSM
from .slstm import SLSTM

__all__ = ["MinGRU", "MinLSTM", "LRU", "RGLRU", "SelectiveSSM", "SLSTM", "linear_scan",
           "log_space_scan"]
