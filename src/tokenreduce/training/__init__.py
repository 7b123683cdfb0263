"""Training: a small generic engine (:mod:`.engine`) and the tasks it runs (:mod:`.tasks`)."""

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
