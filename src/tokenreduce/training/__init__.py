"""Training: a small generic engine (:mod:`.engine`), its tasks (:mod:`.tasks`, and :mod:`.learned` for the
learned token-reduction methods) and the reference model's recipe (:mod:`.reference`)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .engine import TrainConfig, TrainResult, train
from .tasks import ClassificationTask, Task

__all__ = [
    "CheckpointError",
    "ClassificationTask",
    "Task",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
