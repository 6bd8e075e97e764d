"""Shared helpers of :mod:`d2gp.data`: errors, seeded splits, resizing and cropping.

Every loader goes through these helpers so that a given operation (a seeded split,
a resize, a centre crop, ...) is implemented exactly once.

Conventions
-----------
* Images are ``torch.float32`` tensors of shape ``(N, C, H, W)`` with values in ``[0, 1]``.
* Randomness comes only from :func:`make_rng`, a :class:`numpy.random.Generator` seeded by
  ``(seed, *stream)``, so results depend on nothing but the arguments (not on global RNG state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SPLITS",
    "DataError",
    "Request",
    "make_rng",
    "shuffled_split",
    "fraction_sizes",
    "resize",
    "pad_to_square",
    "center_crop",
    "normalize_max",
    "random_crops",
    "existing_dir",
]

#: The split names accepted by :func:`d2gp.data.load_images`.
SPLITS: tuple[str, ...] = ("train", "val", "test")


class DataError(ValueError):
    """A dataset cannot be loaded; the message is one line naming the problem."""


@dataclass(frozen=True)
class Request:
    """A validated load request, handed to a dataset builder.

    Attributes:
        name: dataset name (as registered).
        split: one of :data:`SPLITS`.
        size: output side length ``H = W`` in pixels.
        seed: non-negative integer seed of the split / crop randomness.
        root: data folder of a real loader (``None`` for embedded datasets).
        files: the files a real loader found under ``root`` (see ``find_files``), in sorted order.
        max_images: return at most this many images (``None``: all); loaders stop decoding early.
    """

    name: str
    split: str
    size: int
    seed: int = 0
    root: Path | None = None
    files: tuple[Path, ...] = field(default=(), repr=False)
    max_images: int | None = None


def make_rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent generator for ``(seed, *stream)``.

    ``stream`` separates independent uses of one seed (e.g. one stream per split), using
    :class:`numpy.random.SeedSequence` entropy mixing, so streams do not overlap.
    """
    return np.random.default_rng([seed, *stream])


def shuffled_split(n: int, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Split ``range(n)`` into disjoint index sets after a seeded shuffle.

    A permutation ``pi`` of ``{0, ..., n-1}`` is drawn from ``make_rng(seed)``; the splits are
    consecutive chunks of ``pi`` in the order of ``sizes`` (so e.g. with sizes
    ``{"train": 55000, "val": 5000}`` the validation set is the *last* 5 000 shuffled indices).

    Args:
        n: number of items.
        sizes: split name -> number of items; the sizes must add up to ``n``.
        seed: permutation seed.

    Returns:
        split name -> ``int64`` index array (in shuffled order).
    """
    if sum(sizes.values()) != n:
        raise ValueError(f"split sizes {sizes} do not add up to {n}")
    perm = make_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes.values()])
    return {name: perm[a:b] for name, a, b in zip(sizes, bounds[:-1], bounds[1:])}


def fraction_sizes(n: int, what: str, val: float = 0.1, test: float = 0.1) -> dict[str, int]:
    """Train/val/test sizes for ``n`` items split ~80/10/10.

    ``n_val = max(1, round(val * n))``, ``n_test = max(1, round(test * n))`` and train takes the
    rest, so every split holds at least one item.

    Args:
        n: number of items (files, volumes, images).
        what: plural noun naming the items, used in the error message.

    Raises:
        DataError: if ``n < 3`` (one item per split is the minimum).
    """
    if n < 3:
        raise DataError(f"need at least 3 {what} for a train/val/test split, found {n}")
    n_val, n_test = max(1, round(val * n)), max(1, round(test * n))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def resize(images: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a batch ``(N, C, H, W)`` to ``size`` and clamp to ``[0, 1]``.

    Uses :func:`torch.nn.functional.interpolate` with ``align_corners=False``; when an axis is
    shrunk, ``antialias=True`` widens the interpolation kernel by the downscaling factor (a
    triangle filter for ``"bilinear"``, Keys' cubic for ``"bicubic"``), which avoids aliasing.
    Bicubic can overshoot, hence the final clamp (a no-op for bilinear on ``[0, 1]`` data).

    Args:
        images: float tensor ``(N, C, H, W)`` with values in ``[0, 1]``.
        size: output side (square) or ``(height, width)``.
        mode: ``"bilinear"`` or ``"bicubic"``.
    """
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    in_hw = tuple(images.shape[-2:])
    if in_hw != out_hw:
        downsampling = out_hw[0] < in_hw[0] or out_hw[1] < in_hw[1]
        images = F.interpolate(images, size=out_hw, mode=mode, align_corners=False, antialias=downsampling)
    return images.clamp(0.0, 1.0)


def pad_to_square(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(N, C, H, W)`` symmetrically to ``(N, C, S, S)`` with ``S = max(H, W)``.

    When the padding is odd, the extra row/column goes to the bottom/right.
    """
    h, w = images.shape[-2:]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return F.pad(images, (left, s - w - left, top, s - h - top))


def center_crop(images: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """Centre crop ``(N, C, H, W)`` to a square of side ``min(side, H, W)``.

    With ``side=None`` this is the largest centred square (e.g. CelebA's 178x218 -> 178x178).
    The crop starts at ``(H - s) // 2, (W - s) // 2``.
    """
    h, w = images.shape[-2:]
    s = min(h, w) if side is None else min(side, h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top : top + s, left : left + s]


def normalize_max(images: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each image (over C, H, W) of non-negative ``(N, C, H, W)`` data so its maximum is 1.

    All-zero images stay zero (the divisor is ``max(max_value, eps)``).
    """
    peak = images.amax(dim=(1, 2, 3), keepdim=True).clamp_min(eps)
    return images.clamp_min(0.0) / peak


def random_crops(
    image: torch.Tensor,
    n: int,
    size: int,
    rng: np.random.Generator,
    *,
    flip: bool = False,
    min_range: float = 0.0,
    max_tries: int = 100,
) -> torch.Tensor:
    """``n`` random ``size x size`` crops of one image ``(C, H, W)`` -> ``(n, C, size, size)``.

    Top-left corners are uniform over all valid positions. With ``flip=True`` each crop is
    mirrored horizontally with probability 1/2. Crops whose dynamic range
    ``max(x) - min(x)`` is below ``min_range`` (flat background, e.g. the black border of the
    retina image) are redrawn, up to ``max_tries`` times per crop, then kept anyway.
    """
    _, h, w = image.shape
    if size > h or size > w:
        raise DataError(f"crop size {size} is larger than the image ({h}x{w})")
    crops = []
    for _ in range(n):
        for _ in range(max_tries):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            crop = image[:, top : top + size, left : left + size]
            if float(crop.max() - crop.min()) >= min_range:
                break
        if flip and rng.random() < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


def existing_dir(root: str | os.PathLike, name: str) -> Path:
    """``root`` as an absolute :class:`~pathlib.Path`, checking that it is a folder."""
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"root folder for dataset {name!r} does not exist (or is not a folder): {path}")
    return path
