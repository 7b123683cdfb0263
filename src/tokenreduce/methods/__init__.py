"""One module per method; :data:`REGISTRY` maps the public names to reducer classes."""

from __future__ import annotations

import sys
import types

from .base import ModelInfo, Reducer
from .bat import BAT
from .cropr import Cropr
from .dtps import DTPS
from .dynamicvit import DynamicViT
from .evit import EViT
from .ltmp import LTMP
from .ppt import PPT
from .random_prune import RandomPrune
from .tome import ToMe
from .tomesd import ToMeSD
from .tps import TPS

_ALL = (ToMe, ToMeSD, EViT, RandomPrune, PPT, TPS, BAT, LTMP, Cropr, DynamicViT, DTPS)
REGISTRY: dict[str, type[Reducer]] = {cls.name: cls for cls in _ALL}


def available_methods() -> list[str]:
    """Names of the available methods, sorted."""
    return sorted(REGISTRY)


def get_method(name: str) -> type[Reducer]:
    """The reducer class registered under ``name``.

    Raises:
        ValueError: unknown name; the message lists the available methods.
    """
    if not isinstance(name, str) or name.lower() not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name.lower()]


class _CallablePackage(types.ModuleType):
    """``tokenreduce.methods`` is this package and also lists the names when called.

    ``tr.methods()`` is the documented way to list methods, and ``import tokenreduce.methods.tome`` must keep
    working; a plain function named ``methods`` on the top-level package would shadow the subpackage, so the
    package itself is made callable (a module ``__class__`` assignment, which Python supports for this).
    """

    def __call__(self) -> list[str]:
        """Names of the available methods, sorted."""
        return available_methods()


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "BAT", "Cropr", "DTPS", "DynamicViT", "EViT", "LTMP", "PPT", "REGISTRY", "TPS", "ModelInfo", "RandomPrune",
    "Reducer", "ToMe", "ToMeSD", "available_methods", "get_method",
]
