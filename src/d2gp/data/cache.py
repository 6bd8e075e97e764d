"""On-disk cache of preprocessed image tensors.

One ``.pt`` file per request in :func:`cache_dir` (``$D2GP_CACHE`` or ``~/.cache/d2gp``). The
file stores ``{"key": <canonical JSON of the request>, "images": <tensor>}``; its name ends with
a SHA-1 of that JSON. The key contains :data:`CACHE_VERSION`, which must be bumped whenever the
preprocessing changes, so stale entries are never read. Files are written atomically
(:func:`d2gp.checkpoints.atomic_save`: a temporary file in the same folder, then :func:`os.replace`)
and read with ``weights_only=True``. A file
that cannot be read, or whose key does not match, is reported with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from d2gp.checkpoints import atomic_save

__all__ = ["CACHE_VERSION", "cache_dir", "cache_path", "files_fingerprint", "load_cached", "save_cached"]

#: Bump when any loader's preprocessing changes: it is part of every cache key.
CACHE_VERSION = "4"  # 4: 16-bit grey PNGs scaled by 65535 (version 3 clipped them at 255)


def cache_dir() -> Path:
    """``$D2GP_CACHE`` if set (and non-empty), else ``~/.cache/d2gp``."""
    return Path(os.environ.get("D2GP_CACHE") or Path.home() / ".cache" / "d2gp").expanduser()


def _key_json(key: dict[str, Any]) -> str:
    return json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True)


def cache_path(key: dict[str, Any]) -> Path:
    """Cache file of ``key`` (a JSON-serialisable dict with at least ``name``, ``split``, ``size``)."""
    digest = hashlib.sha1(_key_json(key).encode()).hexdigest()[:16]
    return cache_dir() / f"{key['name']}-{key['split']}-{key['size']}px-{digest}.pt"


def files_fingerprint(files: list[Path] | tuple[Path, ...]) -> str:
    """SHA-1 of the ``(path, size, mtime_ns)`` of ``files``: changes when any file changes."""
    digest = hashlib.sha1()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_cached(key: dict[str, Any]) -> torch.Tensor | None:
    """The cached tensor of ``key``, or ``None`` if absent or unreadable (then with a warning)."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(entry, dict) and entry.get("key") == _key_json(key)):
            raise ValueError("unexpected content")
        images = entry["images"]
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.float32 and images.ndim == 4):
            raise ValueError("unexpected tensor")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply rebuilt
        warnings.warn(f"corrupt cache file {path} ({exc}); rebuilding it", RuntimeWarning, stacklevel=3)
        return None
    return images


def save_cached(key: dict[str, Any], images: torch.Tensor) -> None:
    """Atomically write ``images`` under ``key`` (:func:`~d2gp.checkpoints.atomic_save`); a failure only warns."""
    path = cache_path(key)
    try:
        # clone: a view (e.g. images[:k]) would otherwise save its whole underlying storage
        atomic_save({"key": _key_json(key), "images": images.clone()}, path)
    except OSError as exc:
        warnings.warn(f"could not write cache file {path} ({exc})", RuntimeWarning, stacklevel=3)
