"""Loaders for data the user already has on disk (``root`` required; nothing is downloaded).

Each dataset has two functions:

* ``find_*(root, split, name)`` lists (sorted) the files the loader will read, raising
  :class:`~d2gp.data.common.DataError` when there are none. The list also fingerprints the
  cache entry, so adding/changing files invalidates it.
* ``build_*(request)`` reads ``request.files`` and returns the images of ``request.split``.

Datasets:

* ``mnist``: IDX files (``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``, optionally ``.gz``).
* ``fastmri``: fastMRI single-coil knee ``.h5`` volumes (ground-truth reconstructions).
* ``celeba`` / ``folder``: CelebA in the torchvision layout, or any folder of PNG/JPEG images.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .common import (
    SPLITS,
    DataError,
    Request,
    center_crop,
    fraction_sizes,
    normalize_max,
    resize,
    shuffled_split,
)

__all__ = [
    "read_idx",
    "find_mnist",
    "build_mnist",
    "find_fastmri",
    "build_fastmri",
    "find_images",
    "build_images",
]

# --------------------------------------------------------------------------- mnist (IDX)

#: IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed, by its ``.gz`` suffix).

    Layout: 2 zero bytes, a type code byte, the number of dimensions ``d``, then ``d``
    big-endian uint32 sizes, then the data in C order.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # EOFError: a truncated .gz
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"not an IDX file (bad magic number): {path}")
    ndim, offset = raw[3], 4 + 4 * raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) != offset + dtype.itemsize * int(np.prod(shape)):
        raise DataError(f"IDX file size does not match its header {shape}: {path}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def find_mnist(root: Path, split: str, name: str = "mnist") -> list[Path]:
    """The IDX image file of ``split``: ``train-images`` for train/val, ``t10k-images`` for test.

    Looked for in ``root`` and in the torchvision layout ``root/MNIST/raw``, spelled
    ``<stem>-images-idx3-ubyte`` or ``<stem>-images.idx3-ubyte``, optionally with ``.gz``.
    """
    stem = "t10k" if split == "test" else "train"
    folders = (root, root / "MNIST" / "raw")
    for folder in folders:
        for base in (f"{stem}-images-idx3-ubyte", f"{stem}-images.idx3-ubyte"):
            for candidate in (folder / base, folder / f"{base}.gz"):
                if candidate.is_file():
                    return [candidate]
    raise DataError(
        f"no MNIST file {stem}-images-idx3-ubyte[.gz] found in {' or '.join(map(str, folders))}"
    )


def build_mnist(request: Request) -> torch.Tensor:
    """MNIST digits ``/255`` resized (bilinear, antialiased) to ``size``, 1 channel.

    test = the ``t10k`` file in file order. train/val = the ``train`` file shuffled with
    ``seed``; val is the last ``min(5000, max(1, n // 12))`` images (5 000 of the standard 60 000)
    and train the rest.
    """
    (path,) = request.files
    digits = read_idx(path)
    if digits.ndim != 3:
        raise DataError(f"expected a 3-D IDX image file (n, h, w), got shape {digits.shape}: {path}")
    n = len(digits)
    if n < (1 if request.split == "test" else 2):
        raise DataError(f"MNIST file {path} holds {n} image(s); the {request.split} split needs at least "
                        f"{1 if request.split == 'test' else 2} (train and val are both cut from it)")
    if request.split == "test":
        idx = np.arange(n)
    else:
        n_val = min(5000, max(1, n // 12))
        idx = shuffled_split(n, {"train": n - n_val, "val": n_val}, request.seed)[request.split]
    idx = idx[: request.max_images]
    images = torch.from_numpy(digits[idx].astype(np.float32) / 255.0)[:, None]
    return resize(images, request.size)


# --------------------------------------------------------------------------- fastmri

#: Ground-truth datasets looked for in each fastMRI file, in order of preference.
FASTMRI_KEYS = ("reconstruction_esc", "reconstruction_rss")
#: fastMRI ground truths are 320x320; larger images are centre-cropped to this side.
FASTMRI_CROP = 320
#: ``floor(EDGE_FRACTION * n_slices)`` slices are skipped at each end of a volume (mostly noise).
FASTMRI_EDGE_FRACTION = 0.1


def find_fastmri(root: Path, split: str, name: str = "fastmri") -> list[Path]:
    """All ``*.h5`` files under ``root`` (recursively), sorted."""
    files = sorted(root.rglob("*.h5"))
    if not files:
        raise DataError(f"no fastMRI .h5 files found under {root}")
    return files


def _read_fastmri_volume(path: Path) -> np.ndarray:
    """The ground-truth slices ``(slices, H, W)`` of one file, without the edge slices."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            key = next((k for k in FASTMRI_KEYS if k in f), None)
            if key is None:
                raise DataError(
                    f"fastMRI file {path} has no {' or '.join(FASTMRI_KEYS)} dataset (found: {', '.join(sorted(f))})"
                )
            volume = f[key]
            if volume.ndim != 3:
                raise DataError(f"{path}:{key} should be (slices, H, W), got shape {volume.shape}")
            skip = int(FASTMRI_EDGE_FRACTION * volume.shape[0])
            return np.asarray(volume[skip : volume.shape[0] - skip], dtype=np.float32)
    except OSError as exc:
        raise DataError(f"cannot read fastMRI file {path}: {exc}") from None


def build_fastmri(request: Request) -> torch.Tensor:
    """Ground-truth slices of the split's volumes, 1 channel.

    Files (volumes) are split ~80/10/10 with ``seed`` (:func:`fraction_sizes`, at least 3 files),
    so slices of one knee never appear in two splits. Per volume, ``floor(0.1 * n_slices)``
    edge slices are skipped at each end; each slice is centre-cropped to
    ``min(320, H, W)`` squared, normalised to max 1 (magnitudes are >= 0), and resized to
    ``size`` (bilinear, antialiased).
    """
    files = request.files
    sizes = fraction_sizes(len(files), "fastMRI .h5 files (volumes)")
    chosen = shuffled_split(len(files), sizes, request.seed)[request.split]
    images, count = [], 0
    for i in chosen:
        if request.max_images is not None and count >= request.max_images:
            break
        slices = torch.from_numpy(_read_fastmri_volume(files[i]))[:, None]
        slices = normalize_max(center_crop(slices, FASTMRI_CROP))
        images.append(resize(slices, request.size))
        count += len(slices)
    if not images or count == 0:
        raise DataError(f"the {request.split} fastMRI volumes under {request.root} contain no slices")
    return torch.cat(images)[: request.max_images]


# --------------------------------------------------------------------------- celeba / folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CELEBA_PARTITION = "list_eval_partition.txt"


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def find_images(root: Path, split: str, name: str = "folder") -> list[Path]:
    """Image files to read, sorted; for CelebA also the partition file (last) if present.

    ``celeba`` first looks for the torchvision layout ``root/celeba/img_align_celeba`` (or
    ``root/img_align_celeba``) with ``list_eval_partition.txt`` in its parent folder; otherwise,
    and always for ``folder``, every ``.png``/``.jpg``/``.jpeg`` under ``root`` (recursively).
    """
    if name == "celeba":
        for images_dir in (root / "celeba" / "img_align_celeba", root / "img_align_celeba"):
            if images_dir.is_dir():
                files = _image_files(images_dir, recursive=False)
                if not files:
                    raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in {images_dir}")
                partition = images_dir.parent / CELEBA_PARTITION
                return files + [partition] if partition.is_file() else files
    files = _image_files(root, recursive=True)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def _split_images(request: Request) -> list[Path]:
    """The image files of the requested split (CelebA partition file, else seeded 80/10/10)."""
    files = list(request.files)
    if files[-1].name == CELEBA_PARTITION:
        partition_file, files = files[-1], files[:-1]
        wanted = str(SPLITS.index(request.split))  # 0 = train, 1 = val, 2 = test
        with open(partition_file) as f:
            names = {line.split()[0] for line in f if line.split()[1:2] == [wanted]}
        chosen = [p for p in files if p.name in names]
        if not chosen:
            raise DataError(f"{partition_file} lists none of the images for split {request.split!r}")
        return chosen
    sizes = fraction_sizes(len(files), "images")
    return [files[i] for i in shuffled_split(len(files), sizes, request.seed)[request.split]]


#: Pillow modes of 16-bit grey images (PNG): scaled by 2¹⁶ − 1, not 255 (``convert("RGB")`` would clip them).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def _load_rgb(path: Path) -> torch.Tensor:
    """One image file as a float RGB tensor ``(1, 3, H, W)`` in [0, 1] (grey is replicated).

    8-bit images are divided by 255, 16-bit grey PNGs by 65535. Pillow refuses images above
    about 179 M pixels (a decompression bomb) before decoding them.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in _SIXTEEN_BIT_MODES:
                grey = np.asarray(img, dtype=np.float64) / 65535.0
                array = np.repeat(grey[:, :, None].astype(np.float32), 3, axis=2)
            else:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def build_images(request: Request) -> torch.Tensor:
    """RGB images of the split: largest centred square (CelebA: 178x178 of 178x218), resized.

    Resizing is bilinear with antialiasing. Only the first ``max_images`` files of the split
    are decoded.
    """
    paths = _split_images(request)[: request.max_images]
    return torch.cat([resize(center_crop(_load_rgb(p)), request.size) for p in paths])
