"""Pickling a reduced model (``torch.save(model)``, ``copy.deepcopy(model)``).

The patch swaps the classes of the model and its blocks for generated subclasses
(:func:`~tokenreduce.models.base.reduced_class`), which no importer can find by name, so the default
pickling of a reduced model fails.  Instead:

* a patched block (or other patched module) pickles as its stock class, without the reduction's
  attributes (``_tr_*``);
* the patched model pickles as its stock class plus what re-applies the reduction on load: the
  reducer class, its resolved parameters, its learned parameters' ``state_dict`` (learned methods),
  the restoration mode and ``trace_source``.  Unpickling rebuilds the stock model, then patches it
  again with a reducer built from those (its learned parameters loaded), so the loaded model gives
  the same outputs as the saved one.

The model is rebuilt through a placeholder class whose ``__setstate__`` re-applies the reduction
once the stock state is in place; references back to the model from inside it are kept, as
pickle and ``deepcopy`` keep them for any object.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["new_stock", "reduce_as_stock", "reduce_reduced_model", "restore_pending"]

_PICKLED = "_tr_pickled"
"""Key of the reduction's description in a pickled reduced model's state."""


def _stock_state(module: nn.Module) -> dict[str, Any]:
    """``module.__getstate__()`` (its ``__dict__``) without the reduction's attributes (``_tr_*``)."""
    return {k: v for k, v in module.__getstate__().items() if not k.startswith("_tr_")}


def new_stock(base: type) -> nn.Module:
    """An empty instance of the stock class ``base`` (its state is set by unpickling)."""
    return base.__new__(base)


def reduce_as_stock(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """``__reduce_ex__`` of a patched block or head: pickle it as its stock class."""
    return new_stock, (self._tr_base,), _stock_state(self)


def reduce_reduced_model(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """``__reduce_ex__`` of a reduced model: its stock state plus what re-applies the reduction on load."""
    ctx = self._tr_ctx
    reducer = ctx.reducer
    module = reducer.module
    spec = {
        "method": ctx.method,
        "reducer": type(reducer),
        "params": reducer.params,
        "module_state": None if module is None else module.state_dict(),
        "restore": getattr(reducer, "restore", None),
        "trace_source": ctx.trace_source,
    }
    return restore_pending, (self._tr_base,), {**_stock_state(self), _PICKLED: spec}


_PENDING: dict[type, type] = {}


def restore_pending(base: type) -> nn.Module:
    """An empty reduced model of stock class ``base``, waiting for its state (which re-applies the reduction)."""
    if base not in _PENDING:
        _PENDING[base] = type(f"Unpickling{base.__name__}", (base,), {"__setstate__": _setstate_and_apply})
    obj = base.__new__(base)
    obj.__class__ = _PENDING[base]
    return obj


def _setstate_and_apply(self: nn.Module, state: dict[str, Any]) -> None:
    """Set the stock state, then apply the pickled reduction again (as :func:`tokenreduce.apply` would)."""
    from . import adapter_for
    from .base import patch

    state = dict(state)
    spec = state.pop(_PICKLED)
    base = type(self).__mro__[1]
    self.__class__ = base
    base.__setstate__(self, state)
    adapter = adapter_for(self)
    reducer = spec["reducer"](adapter.model_info(self), spec["params"])
    if spec["module_state"] is not None:
        first = next(self.parameters())
        reducer.module.to(device=first.device, dtype=first.dtype)
        reducer.module.load_state_dict(spec["module_state"])
    reducer.restore = spec["restore"]
    patch(self, adapter, reducer, spec["method"], trace_source=spec["trace_source"])
