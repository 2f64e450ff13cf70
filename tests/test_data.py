"""Data loaders on small files in each real format, written here; planted features; Fashion-MNIST if installed."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

import advfeat as af
from advfeat.data import FASHION_MNIST_ROOT, ImageDataset, read_idx


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    data = header + body
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_and_mnist_layout(tmp_path, gz):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", imgs, gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        ds = af.data.mnist(tmp_path, train=prefix == "train")
        assert len(ds) == n and ds.images.dtype == torch.uint8
        x, y = ds[1]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(imgs[1]).float().div(255)[None]) and int(y) == labels[1]
    arr = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    write_idx(tmp_path / "ints", arr, gz)
    assert np.array_equal(read_idx(tmp_path / "ints"), arr)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        af.data.fashion_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        af.data.mnist(tmp_path)


def cifar_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar10_binary_and_python_versions(tmp_path, layout):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = tmp_path / f"cifar-10-batches-{layout}"
    folder.mkdir()
    expected = {}
    for i, name in enumerate(names):
        data, labels = cifar_arrays(4, i)
        expected[name] = (data, labels)
        if layout == "bin":
            rec = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
            rec.tofile(folder / f"{name}.bin")
        else:
            with open(folder / name, "wb") as f:  # as the Python 2 originals: bytes keys, a list of labels
                pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels.tolist()}, f, protocol=2)
    train, test = af.data.cifar10(tmp_path), af.data.cifar10(tmp_path, train=False)
    assert len(train) == 20 and len(test) == 4 and train.images.shape == (20, 3, 32, 32)
    data, labels = expected["data_batch_2"]
    x, y = train[5]
    assert torch.equal(x, torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255) and int(y) == labels[1]


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (__builtin__|builtins)\.print"):
        af.data.cifar10(tmp_path, train=False)


def test_cifar_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="local files only"):
        af.data.cifar10(tmp_path)


def test_planted_is_deterministic_and_measures_its_features():
    p = af.data.planted(600, 200, seed=3)
    q = af.data.planted(600, 200, seed=3)
    assert torch.equal(p.train.images, q.train.images) and torch.equal(p.test.labels, q.test.labels)
    assert not torch.equal(p.train.images, af.data.planted(600, 200, seed=4).train.images)
    a, b = p.robust_directions.double(), p.nonrobust_directions.double()
    both = torch.cat([a, b])
    assert torch.allclose(both @ both.T, torch.eye(20, dtype=torch.float64), atol=1e-5)  # orthonormal
    x, y = p.train.tensors()
    assert x.shape == (600, 1, 16, 16) and x.min() >= 0 and x.max() <= 1
    ra, rb = p.features(x)
    rows = torch.arange(600)
    assert abs(ra[rows, y].mean() - p.robust_norm) < 0.25 and abs(rb[rows, y].mean() - p.nonrobust_norm) < 0.03
    # the robust feature is predictive but imperfect; the non-robust one nearly perfect
    robust_acc = (ra.argmax(1) == y).double().mean()
    nonrobust_acc = (rb.argmax(1) == y).double().mean()
    assert 0.75 < robust_acc < 0.97 and nonrobust_acc > 0.99
    # swapping the non-robust feature to another class is a small L2 move; the robust one is not
    t = (y + 1) % 10
    x2 = x + (p.nonrobust_norm * (b[t] - b[y])).float().reshape(x.shape)
    assert (p.features(x2)[1].argmax(1) == t).double().mean() > 0.95
    assert p.nonrobust_norm * 2**0.5 < 0.5 < p.robust_norm / 2


def test_planted_bad_arguments():
    with pytest.raises(ValueError, match="classes"):
        af.data.planted(10, 10, classes=1)
    with pytest.raises(ValueError, match="too few"):
        af.data.planted(10, 10, shape=(1, 4, 4), classes=10)


def test_image_dataset_batches_in_a_loader():
    ds = ImageDataset(torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8), torch.arange(10) % 3)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 4, 4) and x.dtype == torch.float32 and x.max() <= 1 and y.tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2))


@pytest.mark.skipif(not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_package():
    train, test = af.data.fashion_mnist(), af.data.fashion_mnist(train=False)
    assert len(train) == 60000 and len(test) == 10000 and train.images.shape[1:] == (1, 28, 28)
    assert sorted(test.labels.unique().tolist()) == list(range(10))
