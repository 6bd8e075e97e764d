"""Writing files that are never half-written, and reading them back safely.

Every file d2gp writes (weights, training checkpoints, results) goes through
:func:`atomic_save` / :func:`atomic_write_text`: written to a temporary file in the same folder,
flushed to disk, then moved over the target with :func:`os.replace` — a run killed at any
moment leaves either the old file or the new one. Checkpoints are loaded with
``torch.load(weights_only=True)`` and must carry a ``"format"`` tag, so a corrupt or foreign
file is refused with a clear :class:`CheckpointError` instead of a traceback from deep inside
PyTorch.

Output paths are checked before any work starts (:func:`check_output_path`), run directories
are locked while a process writes into them (:func:`lock_path`, :func:`locked_run_dir`), and
a resumed training state is compared with the settings it is resumed with
(:func:`restore_training_state`), so that nothing trained is ever overwritten or mixed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import pickle
import random
import secrets
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

__all__ = [
    "CheckpointError", "LockedError", "atomic_save", "atomic_write_text", "write_json", "read_json", "load_checkpoint",
    "require_entries", "check_output_path", "lock_path", "run_dir_lock", "locked_run_dir", "describe_differences",
    "rng_state", "set_rng_state", "seed_everything", "save_training_state", "restore_training_state",
]


class CheckpointError(ValueError):
    """A file or folder d2gp reads or writes is missing, corrupt, unwritable, or not the kind expected."""


class LockedError(CheckpointError):
    """Another live process holds the lock of a run directory or output file."""


def _temporary_file(folder: Path, name: str) -> tuple[int, str]:
    """Create a new temporary file beside ``folder/name``; like :func:`tempfile.mkstemp`, but with the
    permissions of any other new file (0o666 less the umask, 0644 typically) instead of 0600, since
    it becomes the result."""
    while True:
        tmp = str(folder / f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_file(path.parent, path.name)
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


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Read a JSON object (a dict) from ``path``.

    :param path: the file.
    :param what: how to name it in error messages (``"config.json of run runs/x"``).
    :raises CheckpointError: missing, unreadable, not JSON, or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what} {path} is corrupt or not JSON ({str(error)[:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data


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


def require_entries(data: dict, entries: dict[str, type | tuple[type, ...]], path: str | os.PathLike,
                    what: str = "checkpoint") -> None:
    """Check that ``data`` (a loaded file) has every key of ``entries``, each of the given type(s).

    :raises CheckpointError: naming the first missing or mistyped entry (a crafted or truncated file).
    """
    for key, kind in entries.items():
        if key not in data:
            raise CheckpointError(f"{what} {path} lacks its {key!r} entry: it is damaged or was not written by d2gp")
        if not isinstance(data[key], kind):
            raise CheckpointError(f"{what} {path} has a {type(data[key]).__name__} as {key!r}, "
                                  f"not a {getattr(kind, '__name__', kind)}: it is damaged or was not written by d2gp")


def check_output_path(path: str | os.PathLike, *, folder: bool, what: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written: a folder (``folder=True``) or a file.

    Nothing is created, but a probe file is written and removed in the nearest existing folder
    above ``path`` (a permission check that also holds for read-only file systems and root).

    :param path: the output folder or file.
    :param folder: whether ``path`` is to be a folder (else a file).
    :param what: how to name it in error messages (the CLI flag).
    :return: ``path`` as a :class:`~pathlib.Path`.
    :raises CheckpointError: ``path`` is a file where a folder is needed (or the reverse), lies under
        a file, or its folder cannot be written.
    """
    path = Path(path).expanduser()
    if path.exists():
        if folder and not path.is_dir():
            raise CheckpointError(f"{what} {path} is a file, not a folder")
        if not folder and path.is_dir():
            raise CheckpointError(f"{what} {path} is a folder; give the path of a file to write")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    try:
        fd, probe = _temporary_file(existing, "d2gp-write-check")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"{what} {path} cannot be written: no write access to {existing} "
                              f"({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def lock_path(lock: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on the file ``lock`` (created, and removed on release) while in the block.

    It is an advisory ``fcntl.flock`` lock: the kernel releases it when its process dies, so the
    lock file of a killed run is taken over without a question; the file holds the PID of its
    holder for the error message. On systems without ``fcntl`` (Windows) no lock is taken.

    :param lock: the lock file (its folder is created if needed).
    :param what: what it protects, for the error message (``"run directory runs/x"``).
    :raises LockedError: another live process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield Path(lock)
        return
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{what} is in use by another d2gp process (PID {holder}); wait for it to end, "
                              f"or choose another --out") from None
        try:
            if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
                break  # else: its holder removed it while we waited for it; lock the new one
        except OSError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a process that waits on it then locks a new file
        os.close(fd)


#: The lock file inside a run directory, present while a process trains into it.
RUN_LOCK = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the run directory ``run_dir`` (created if needed; :func:`lock_path`) in the block.

    :raises CheckpointError: ``run_dir`` cannot be written.
    :raises LockedError: another live process holds it.
    """
    run_dir = check_output_path(run_dir, folder=True, what="run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_path(run_dir / RUN_LOCK, f"run directory {run_dir}") as lock:
        yield lock


def locked_run_dir(function: Callable) -> Callable:
    """Decorate a function with a ``run_dir`` argument so that it runs holding the lock of that
    directory (:func:`run_dir_lock`): two runs never write into one directory. In distributed
    training rank 0 alone takes it (:func:`d2gp.distributed.rank0_context`): the processes of one
    run share it, and all of them raise the error when rank 0 cannot take it."""
    from d2gp.distributed import rank0_context

    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        run_dir = signature.bind(*args, **kwargs).arguments["run_dir"]
        with rank0_context(lambda: run_dir_lock(run_dir)):
            return function(*args, **kwargs)

    return wrapper


def describe_differences(saved: dict, current: dict) -> str:
    """``"lr (0.002 → 0.01), depth (7 → 5)"``: the keys whose values differ, with both values."""
    keys = [k for k in {**saved, **current} if saved.get(k) != current.get(k)]
    return ", ".join(f"{k} ({saved.get(k, 'unset')} → {current.get(k, 'unset')})" for k in keys)


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
                           generator: torch.Generator, what: str = "training checkpoint",
                           settings: dict | None = None, state: dict | None = None) -> dict:
    """Load what :func:`save_training_state` wrote into the given objects; return the whole state dict.

    :param state: the contents of ``path`` when they were loaded already (:func:`load_checkpoint`; in
        distributed training rank 0 reads the file and sends it to the others): ``path`` then only
        names the file in error messages.
    :param settings: the settings of the run that resumes; if the state was saved with a
        ``settings`` entry (``save_training_state(..., settings=...)``) they must be equal, else
        nothing is loaded and :class:`CheckpointError` names every difference.
    :raises CheckpointError: a corrupt or foreign file, other settings, or weights that do not fit ``model``.
    """
    if state is None:
        state = load_checkpoint(path, format, what=what)
    saved = state.get("settings")
    if settings is not None and isinstance(saved, dict) and saved != settings:
        raise CheckpointError(f"cannot resume from {what} {path}: it was made with other settings: "
                              f"{describe_differences(saved, settings)}; use the same ones, or delete {path} "
                              f"to start again")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{what} {path} does not fit this run ({first_line[:160]}); delete it to start "
                              f"again") from None
    return state
