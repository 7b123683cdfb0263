"""tokenreduce: token pruning and merging for Vision Transformers.

>>> import timm, tokenreduce as tr
>>> model = timm.create_model("deit_small_patch16_224").eval()
>>> tr.apply(model, "tome", r=13)       # doctest: +SKIP
"""

from . import methods
from .api import apply, gmacs, is_reduced, last_forward, reducer, remove, stats, unreduced
from .calibrate import calibrate
from .export import export_onnx
from .ops.cpu_kernels import set_cpu_kernels
from .state import TokenState
from .viz import visualize


def train(model, method, train_data, **kwargs):
    """Train a learned method's parameters, or with ``recipe=`` fine-tune the backbone with any method under a
    paper's recipe; see :func:`tokenreduce.training.learned.train_reducer`.

    >>> out = tr.train(model, "ltmp", dataset, out_dir="runs/ltmp", target=0.6)   # doctest: +SKIP
    >>> tr.apply(model, "ltmp", checkpoint=out["checkpoint"])                      # doctest: +SKIP
    >>> out = tr.train(model, "evit", dataset, out_dir="runs/evit", recipe="evit", budget=0.6)  # doctest: +SKIP
    """
    from .training.learned import train_reducer

    return train_reducer(model, method, train_data, **kwargs)

__version__ = "0.1.0"

__all__ = [
    "TokenState", "apply", "calibrate", "export_onnx", "gmacs", "is_reduced", "last_forward", "methods", "reducer",
    "remove", "set_cpu_kernels", "stats", "train", "unreduced", "visualize",
    "__version__",
]
