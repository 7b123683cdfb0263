"""One model loader: timm models by name, the bundled reference model, and checkpoints as timm reads them.

>>> model = load_model("deit_small_patch16_224", checkpoint="train/model_best.pth.tar", use_ema=True)  # doctest: +SKIP
>>> model = load_model("reference")          # the bundled Fashion-MNIST ViT, trained weights  # doctest: +SKIP

Checkpoints go through timm's own reader (:func:`timm.models.load_state_dict`), so
everything timm's ``validate.py --checkpoint`` takes is taken here: safetensors
files, ``torch.save`` files (``.pth``, ``.pth.tar``, ``.bin``) holding a bare state
dict or a training checkpoint (``state_dict`` / ``model`` keys; ``state_dict_ema`` /
``model_ema`` with ``use_ema=True``), with DDP's ``module.`` and ``torch.compile``'s
``_orig_mod.`` prefixes removed.  The resumable ``checkpoint.pt`` of a tokenreduce
training run is read too (its model weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

REFERENCE_NAME = "reference"
"""The name of the bundled reference model (:mod:`tokenreduce.models.reference`)."""


class ModelLoadError(RuntimeError):
    """A model or its weights cannot be loaded: not a checkpoint, weights that do not fit, a failed download."""


def load_model(
    name: str = REFERENCE_NAME,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    use_ema: bool = False,
    img_size: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A model in eval mode on ``device``: a timm model by name, or the bundled reference model.

    Args:
        name: a timm model name (``timm.list_models()``; ``hf-hub:`` names too),
            ``"reference"`` for the bundled Fashion-MNIST ViT (its shipped trained weights
            unless ``checkpoint`` is given), or ``"hf:DIR_OR_ID"`` for a Hugging Face
            transformers model (a ``save_pretrained`` directory works offline; needs
            ``tokenreduce[hf]``; see :func:`tokenreduce.models.hf.load_hf_model`).
        pretrained: timm's pretrained weights (downloaded; timm models only).
        checkpoint: weights to load (see the module docstring for the formats).  For the
            reference model the architecture is taken from a ``reference_vit.json`` next to
            the file, else from the shipped model's.
        use_ema: take the EMA weights of a training checkpoint when it has them (timm's
            ``validate.py --use-ema``).
        img_size: input resolution, passed to ``timm.create_model`` (the model's data
            config then resizes to it too).
        model_kwargs: further ``timm.create_model`` keyword arguments (timm's
            ``--model-kwargs``); for the reference model, ``VisionTransformer`` arguments
            that override its configuration.
        device: where the model is put.

    Raises:
        ValueError: unknown model name, an option the model does not take.
        TypeError: a keyword argument the model does not accept.
        FileNotFoundError: ``checkpoint`` does not exist.
        ModelLoadError: the checkpoint cannot be read or does not fit the model; the
            pretrained weights cannot be fetched.
    """
    kwargs = dict(model_kwargs or {})
    if name == REFERENCE_NAME:
        model = _reference_model(checkpoint, use_ema, pretrained, img_size, kwargs)
    elif name.startswith("hf:"):  # a Hugging Face model: hf:DIR (offline) or hf:HUB_ID (tokenreduce[hf])
        from .hf import load_hf_model

        model = load_hf_model(name[3:], img_size=img_size, model_kwargs=kwargs)
        if checkpoint is not None:
            load_weights(model, checkpoint, use_ema=use_ema, name=name)
    else:
        model = _timm_model(name, pretrained, img_size, kwargs)
        if checkpoint is not None:
            load_weights(model, checkpoint, use_ema=use_ema, name=name)
    return model.to(device).eval()


def _timm_model(name: str, pretrained: bool, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if ":" not in name and not timm.is_model(name):  # "hf-hub:..." / "local-dir:..." are resolved by timm
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}: not a timm model name (see timm.list_models()){hint}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise TypeError(f"{name} does not take the keyword argument(s) {_kwargs_text(kwargs)}: {err}") from err
    except Exception as err:  # noqa: BLE001 - download / hub / bad-argument errors come in many types
        if pretrained:
            raise ModelLoadError(f"could not create {name} with pretrained weights (no internet?): {err}") from err
        raise ValueError(f"could not create {name} with {_kwargs_text(kwargs) or 'default arguments'}: {err}") from err
    if img_size is not None:  # the data config (resolve_data_config) reads the input size from here
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        channels = cfg.get("input_size", (3,))[0]
        model.pretrained_cfg = {**cfg, "input_size": (channels, img_size, img_size)}
    return model


def _reference_model(
    checkpoint: str | Path | None, use_ema: bool, pretrained: bool, img_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    from .reference import INFO_FILE, REFERENCE_CONFIG, WEIGHTS_FILE, build_reference_model, data_path

    if pretrained:
        raise ValueError("'reference' is the bundled trained model: pretrained weights apply to timm models only")
    if img_size is not None and img_size != REFERENCE_CONFIG["img_size"]:
        raise ValueError(f"the reference model takes {REFERENCE_CONFIG['img_size']}x{REFERENCE_CONFIG['img_size']} "
                         f"inputs; img_size={img_size} does not apply")
    shipped = data_path(WEIGHTS_FILE)
    if checkpoint is None and not shipped.is_file():
        raise FileNotFoundError(f"reference weights {shipped} not found (is the package installed with its data?)")
    path = shipped if checkpoint is None else Path(checkpoint)
    info = path.with_name(INFO_FILE)
    if not info.is_file():  # weights without their record (a fine-tuned copy): the shipped architecture
        info = shipped.with_name(INFO_FILE)
    config = json.loads(info.read_text()).get("config") if info.is_file() else None
    model = build_reference_model({**(config or {}), **kwargs})
    load_weights(model, path, use_ema=use_ema, name=REFERENCE_NAME)
    return model


def read_state_dict(path: str | Path, *, use_ema: bool = False) -> dict[str, Any]:
    """The model weights in a checkpoint file, read by timm (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ModelLoadError: the file is not a checkpoint timm can read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} {'is not a file' if path.exists() else 'not found'}")
    from ..training.checkpoint import MAGIC, load_checkpoint

    with path.open("rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:  # a tokenreduce training run's resumable checkpoint.pt
        return dict(load_checkpoint(path)["model"])
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema)
    except Exception as err:  # noqa: BLE001 - safetensors / pickle / zip errors
        reason = f"{type(err).__name__}: {err}".strip()
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        raise ModelLoadError(
            f"{path} is not a model checkpoint that can be read (expected a .safetensors file or a torch.save "
            f".pth / .pth.tar / .bin file with a state dict; reading it failed with {reason})"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        if isinstance(state, Mapping) and not use_ema and ({"state_dict_ema", "model_ema"} & set(state)):
            raise ModelLoadError(f"{path} holds EMA weights only ('state_dict_ema' / 'model_ema'): pass use_ema "
                                 "(--use-ema) to load them")
        raise ModelLoadError(f"{path} does not hold a state dict of tensors (a training checkpoint with "
                             "'state_dict', 'model' or 'state_dict_ema' entries, or the weights themselves)")
    return dict(state)


def load_weights(model: nn.Module, path: str | Path, *, use_ema: bool = False, name: str = "the model") -> None:
    """Load the weights in checkpoint ``path`` into ``model`` (strict: every key, every shape).

    Raises:
        FileNotFoundError: no such file.
        ModelLoadError: not a readable checkpoint, or its weights do not fit ``model``
            (the message lists the missing, unexpected and mis-shaped keys).
    """
    state = read_state_dict(path, use_ema=use_ema)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes))
                 if keys]
        raise ModelLoadError(f"the weights in {path} do not fit {name}: {'; '.join(parts)}")
    model.load_state_dict(state)


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in kwargs.items())
