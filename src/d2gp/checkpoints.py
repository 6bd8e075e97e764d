"""Writing files that are never half-written, and reading them back safely.

Every file d2gp writes (weights, training checkpoints, results) goes through
:func:`atomic_save` / :func:`atomic_write_text`: written to a temporary file in the same folder,
flushed to disk, then moved over the target with :func:`os.replace` — a run killed at any
moment leaves either the old file or the new one. Checkpoints are loaded with
``torch.load(weights_only=True)`` and must carry a ``"format"`` tag, so a corrupt or foreign
file is refused with a clear :class:`CheckpointError` instead of a traceback from deep inside
PyTorch.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write_text", "write_json", "load_checkpoint",
    "rng_state", "set_rng_state", "seed_everything", "save_training_state", "restore_training_state",
]


class CheckpointError(ValueError):
    """A weights or checkpoint file is missing, corrupt, or not the kind expected."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    _atomic(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(json.dumps(data, indent=2, default=str) + "\n", path)


def load_checkpoint(path: str | os.PathLike, expected_format: str | None = None, what: str = "checkpoint") -> dict:
    """Load a dict saved by :func:`atomic_save` with ``weights_only=True``.

    :param path: the file.
    :param expected_format: the ``"format"`` tag it must carry (``None``: any dict).
    :param what: how to name the file in error messages.
    :raises CheckpointError: missing, unreadable, not a dict, or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{what} {path} is corrupt or not a PyTorch weights file ({first_line[:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a {type(data).__name__}, not a dict of weights")
    if expected_format is not None and data.get("format") != expected_format:
        found = data.get("format", "no format tag")
        raise CheckpointError(f"{what} {path} is not a {expected_format} file (found: {found})")
    return data


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global PyTorch random state (training code draws its randomness from PyTorch only)."""
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])


def save_training_state(path: str | os.PathLike, format: str, model, optimizer, scheduler, generator: torch.Generator,
                        **extra: Any) -> None:
    """Atomically save everything a training loop needs to resume exactly (plus ``extra`` entries)."""
    atomic_save({"format": format, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
                 **extra}, path)


def restore_training_state(path: str | os.PathLike, format: str, model, optimizer, scheduler,
                           generator: torch.Generator, what: str = "training checkpoint") -> dict:
    """Load what :func:`save_training_state` wrote into the given objects; return the whole state dict."""
    state = load_checkpoint(path, format, what=what)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    set_rng_state(state["rng"])
    return state
