"""tokenreduce: token pruning and merging for Vision Transformers.

>>> import timm, tokenreduce as tr
>>> model = timm.create_model("deit_small_patch16_224").eval()
>>> tr.apply(model, "tome", r=13)       # doctest: +SKIP
"""

from .api import apply, gmacs, methods, remove, stats, unreduced
from .calibrate import calibrate
from .state import TokenState
from .viz import visualize

__version__ = "0.1.0"

__all__ = [
    "TokenState", "apply", "calibrate", "gmacs", "methods", "remove", "stats", "unreduced", "visualize", "__version__",
]
