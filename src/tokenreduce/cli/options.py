"""Shared pieces of the command line: argument types, the parent parsers of the shared flags, output files.

The flag names follow timm's ``validate.py`` / ``train.py`` (``--data-dir`` or a
positional ``DATA_DIR``, ``-b/--batch-size``, ``-j/--workers``, ``--amp``,
``--amp-dtype``, ``--device``, ``--model-kwargs``, ``--checkpoint``, ``--use-ema``,
``--torchcompile``), so that what users type from memory works.  Each parent parser
is built fresh for every command (argparse shares a parent's actions with its
children, so per-command defaults must not be set on a shared one).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

AMP_DTYPES = ("bfloat16", "float16")
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16"}
"""``--amp-dtype`` names → the short names the timing code and the records use."""


# -- argument types ----------------------------------------------------------------------------


def parse_param(text: str) -> tuple[str, Any]:
    """``"r=13"`` → ``("r", 13)``; values are Python literals (``layers=3,6,9`` → a tuple), ``true`` /
    ``false`` / ``none`` in any case the booleans and ``None``, else strings."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    words, word = {"true": True, "false": False, "none": None}, raw.strip().lower()
    try:
        value = words[word] if word in words else ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def _number_type(convert: type, expected: str, accepts: Callable[[Any], bool], doc: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` if ``accepts`` it, else an error saying what was ``expected``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    parse.__doc__ = doc
    return parse


positive_int = _number_type(int, "a whole number >= 1", lambda v: v >= 1, "An integer >= 1 (batch sizes, counts).")
nonnegative_int = _number_type(int, "a whole number >= 0", lambda v: v >= 0,
                               "An integer >= 0 (worker processes, warm-up iterations).")
positive_float = _number_type(float, "a number > 0", lambda v: v > 0, "A number > 0 (learning rates).")
fraction = _number_type(float, "a fraction in (0, 1]", lambda v: 0.0 < v <= 1.0,
                        "A number in (0, 1]: a budget (share of the unreduced GMACs kept), a crop fraction.")


def device_name(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (torch.cuda.is_available())")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    return text


def resolve_device(name: str) -> str:
    """``cuda`` under ``torchrun`` → this process's GPU (``cuda:$LOCAL_RANK``); anything else as given."""
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


# -- parent parsers of the shared flags ----------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """``--device``, ``--threads``, ``--no-progress``: every command."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("run options")
    g.add_argument("--device", type=device_name, default="cpu",
                   help="torch device: cpu, cuda, cuda:N, mps (default: %(default)s; under torchrun cuda means "
                   "each process's own GPU)")
    g.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def model_options(default: str | None, *, help_default: str) -> argparse.ArgumentParser:
    """The model and its weights, as timm's validate.py names them."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="NAME", default=default,
                   help=f"timm model name, or 'reference' for the bundled Fashion-MNIST ViT (default: {help_default})")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (downloaded)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="model weights as timm reads them: .safetensors, or a torch.save .pth / .pth.tar / .bin "
                   "(a state dict or a training checkpoint; 'module.' prefixes are removed)")
    g.add_argument("--use-ema", action="store_true", help="load the EMA weights of a training --checkpoint")
    g.add_argument("--img-size", type=positive_int, metavar="N", help="input resolution (default: the model's)")
    g.add_argument("--model-kwargs", nargs="*", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="keyword arguments for timm.create_model, e.g. drop_path_rate=0.1")
    return p


def data_options(*, batch_default: int | None, batch_help: str, data_help: str) -> argparse.ArgumentParser:
    """The data folder (positional or ``--data-dir``), ``-b/--batch-size``, ``-j/--workers``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("data", nargs="?", metavar="DATA_DIR", help=f"{data_help} (same as --data-dir)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", "--data", dest="data_dir", metavar="DIR", help=data_help)
    g.add_argument("-b", "--batch-size", type=positive_int, default=batch_default, metavar="N", help=batch_help)
    g.add_argument("-j", "--workers", type=nonnegative_int, default=0, metavar="N",
                   help="data-loading worker processes (default: %(default)s, load in the main process)")
    return p


def amp_options(*, default_help: str) -> argparse.ArgumentParser:
    """``--amp`` / ``--no-amp`` and ``--amp-dtype``."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("precision")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help=f"autocast the forward to --amp-dtype (weights stay fp32); default: {default_help}")
    g.add_argument("--amp-dtype", choices=AMP_DTYPES, default="bfloat16",
                   help="autocast dtype (default: %(default)s; float16 is for GPUs)")
    return p


def method_options(*, multiple: bool, default: Any, required: bool = False, help: str) -> argparse.ArgumentParser:
    """``--method``, ``--param NAME=VALUE``, ``--budget``."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("token reduction")
    g.add_argument("--method", nargs="+" if multiple else None, default=default, required=required,
                   metavar="NAME", help=help)
    g.add_argument("--param", action="append", type=parse_param, metavar="NAME=VALUE",
                   help="a method parameter under its official name, e.g. r=13 or layers=3,6,9 (repeatable)")
    g.add_argument("--budget", type=fraction, metavar="F",
                   help="fraction of the unreduced GMACs to keep, in (0, 1]; resolves the method's main knob")
    return p


def output_options(flag: str, default: str | None, *, what: str) -> argparse.ArgumentParser:
    """A results file (``--json`` / ``--out``) and ``--overwrite``."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    shown = f"default: {default}" if default else "default: not written"
    g.add_argument(flag, default=default, metavar="PATH",
                   help=f"write {what} here ({shown}; '' to skip). An existing file is kept: the results go "
                   "beside it as NAME-1, NAME-2, ... unless --overwrite")
    g.add_argument("--overwrite", action="store_true", help=f"replace an existing {flag} file")
    return p


def data_dir(args: argparse.Namespace, *, must_exist: bool = True) -> str | None:
    """The data folder, given positionally or as ``--data-dir`` (once).

    Raises:
        ValueError: given twice, or (``must_exist``) not there: a number there is most likely a second
            ``--budget`` value, and the message says so.
    """
    positional, flag = getattr(args, "data", None), getattr(args, "data_dir", None)
    if positional and flag and positional != flag:
        raise ValueError(f"give the data folder once: DATA_DIR ({positional}) or --data-dir ({flag})")
    folder = positional or flag
    if must_exist and folder is not None and not Path(folder).exists():
        hint = ""
        try:
            float(folder)
            hint = (" (a number: --budget takes one value per run; `tokenreduce sweep --budgets A B ...` "
                    "runs several)")
        except ValueError:
            pass
        raise ValueError(f"data folder {folder} does not exist{hint}")
    return folder


def amp_dtype(args: argparse.Namespace, default: bool = False) -> str | None:
    """The autocast dtype's short name (``bf16`` / ``fp16``), or ``None`` for fp32."""
    on = default if args.amp is None else args.amp
    return DTYPE_SHORT[args.amp_dtype] if on else None


def deprecated(old: str, new: str) -> None:
    """Tell the user that a flag has a new name (it still works)."""
    print(f"note: {old} is deprecated; use {new}", file=sys.stderr)


# -- output files ------------------------------------------------------------------------------------


def free_path(path: Path) -> Path:
    """``path`` if it does not exist, else the first of ``NAME-1.EXT``, ``NAME-2.EXT``, ... that does not."""
    if not path.exists():
        return path
    i = 1
    while True:
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
        i += 1


def is_rank_zero() -> bool:
    """Whether this process writes the results (rank 0 under ``torchrun``; always, run alone)."""
    return os.environ.get("RANK", "0") == "0"


def check_writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` and write (then delete) a probe file in it, before any work is done.

    Under ``torchrun`` only rank 0 writes; the other ranks check permissions without writing.

    Raises:
        ValueError: the folder cannot be created or written, naming ``flag``.
    """
    if not is_rank_zero():
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise ValueError(f"{flag} {folder}: cannot write there")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tokenreduce-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"{flag} {folder}: cannot write there ({reason})") from None


def check_output(
    path: str | None, flag: str, *, suffixes: Collection[str] | None = None, suffix_hint: str = ""
) -> Path | None:
    """Check, before any work, that results can be written to ``path`` (``None`` / ``''``: no output).

    Raises:
        ValueError: ``path`` is a folder, has a suffix not in ``suffixes``, or its folder
            cannot be created or written.
    """
    if not path:
        return None
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {target} is a folder; give a file name, e.g. {target / 'results.json'}")
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {target}: the file name must end in {suffix_hint or ', '.join(sorted(suffixes))}")
    check_writable_folder(target.parent, flag)
    return target


def write_output(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write a results file atomically (temporary file + rename) and say where it went.

    Without ``overwrite`` an existing ``path`` is kept and the results go beside it
    (:func:`free_path`).  ``write(tmp)`` writes the content to the temporary path
    (which has ``path``'s suffix).  Returns the path written.
    """
    target = path if overwrite else free_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    note = f" ({path} exists, kept; --overwrite replaces it)" if target != path else ""
    print(f"wrote {target}{note}")
    return target


def write_text_output(path: Path, text: str, *, overwrite: bool) -> Path:
    """:func:`write_output` of a text file."""
    return write_output(path, lambda tmp: tmp.write_text(text), overwrite=overwrite)
