"""Datasets from local files (never a download) and the synthetic planted-features dataset.

* ``mnist``, ``fashion_mnist``: IDX files, gzipped or not.
* ``cifar10``: CIFAR-10's binary version (``data_batch_1.bin`` ...) or its Python version (the pickles
  torchvision downloads), read with a restricted unpickler that admits only what those files hold.
* ``planted``: synthetic images with a robust and a non-robust class feature of known size.

Images are returned as tensors in [0, 1] (float32), labels as int64. Real datasets are stored compactly as
uint8 and converted per item.

Examples:
    >>> import advfeat as af
    >>> p = af.data.planted(n_train=100, n_test=50)
    >>> x, y = p.train[0]
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([1, 16, 16]), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._checks import check_positive_int, check_seed

__all__ = [
    "ImageDataset", "read_idx", "mnist", "fashion_mnist", "cifar10", "from_release", "Planted", "planted",
    "FASHION_MNIST_ROOT", "RELEASE_FOLDERS", "CLASS_NAMES",
]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the IDX files."""

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "mnist": tuple(str(i) for i in range(10)),
    "planted": tuple(f"class {i}" for i in range(10)),
}
"""The class names of each dataset, in label order (for figures and reports)."""


class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images ``(N, C, H, W)`` (uint8, or floating in [0, 1]) and int64 labels ``(N,)``; items are
    ``(float32 image in [0, 1], label)``. ``tensors()`` gives the whole set at once. Pixels outside [0, 1] and
    labels below 0 (or, with ``classes``, not below it) are refused."""

    def __init__(self, images: Tensor, labels: Tensor, classes: int | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating, got {images.dtype}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        if images.is_floating_point() and images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
            raise ValueError(f"images must be pixels in [0, 1] (or uint8 in 0..255), found values in "
                             f"[{float(images.min()):g}, {float(images.max()):g}]")
        top = "C" if classes is None else str(classes)
        if labels.numel() and not (0 <= int(labels.min()) and (classes is None or int(labels.max()) < classes)):
            raise ValueError(f"labels must be class indices in [0, {top}), found [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _to_float(self, images: Tensor) -> Tensor:
        return images.float().div_(255) if images.dtype == torch.uint8 else images.float()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self._to_float(self.images[i]), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Batched fetch for DataLoader (one conversion per batch, not per image)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x, y = self._to_float(self.images[idx]), self.labels[idx]
        return list(zip(x.unbind(0), y.unbind(0), strict=True))

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images as float32 in [0, 1] and all labels."""
        return self._to_float(self.images), self.labels

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0


# -- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------------

_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path} is a damaged gzip file ({type(e).__name__}: {e}); download or copy it again"
                             ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} of {dtype}, but the file holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, name: str, hint: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{root / name}[.gz] not found{hint}")


def _idx_pair(root: str | Path, train: bool, hint: str) -> ImageDataset:
    r = Path(root)
    prefix = "train" if train else "t10k"
    images = read_idx(_find(r, f"{prefix}-images-idx3-ubyte", hint))
    label_file = _find(r, f"{prefix}-labels-idx1-ubyte", hint)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{r}: images {images.shape} and labels {labels.shape} do not match")
    try:
        return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                            torch.from_numpy(labels.astype(np.int64)), classes=10)
    except ValueError as e:
        raise ValueError(f"{label_file}: {e}") from None


def mnist(root: str | Path, train: bool = True) -> ImageDataset:
    """MNIST from the IDX files in ``root`` (``train-images-idx3-ubyte[.gz]`` and the others)."""
    return _idx_pair(root, train, "")


def fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, train: bool = True) -> ImageDataset:
    """Fashion-MNIST from IDX files; by default where ``apt-get install dataset-fashion-mnist`` puts them."""
    return _idx_pair(root, train, " (on Debian: apt-get install dataset-fashion-mnist)")


# -- CIFAR-10 ------------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the plain containers (by opcode) and the few numpy names a CIFAR pickle refers to."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes; it only turns a str into bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 file holds only numpy arrays")


def _load_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        d = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = np.asarray(d.get("data")), np.asarray(d.get("labels"), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: not a CIFAR-10 batch (data {data.shape} {data.dtype}, labels {labels.shape})")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3073 (1 label byte + 3072 pixels)")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def cifar10(root: str | Path, train: bool = True) -> ImageDataset:
    """CIFAR-10 from ``root`` (or its ``cifar-10-batches-bin`` / ``cifar-10-batches-py`` folder): the
    binary version is used if present, else the Python version (restricted unpickling)."""
    r = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    for folder in (r, r / "cifar-10-batches-bin", r / "cifar-10-batches-py"):
        if all((folder / f"{n}.bin").exists() for n in names):
            parts = [_load_cifar_bin(folder / f"{n}.bin") for n in names]
            break
        if all((folder / n).exists() for n in names):
            parts = [_load_cifar_pickle(folder / n) for n in names]
            break
    else:
        raise FileNotFoundError(f"CIFAR-10 {'training' if train else 'test'} batches ({names[0]}[.bin], ...) "
                                f"not found in {r}; advfeat reads local files only")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"CIFAR-10 labels must be in [0, 10), found [{y.min()}, {y.max()}]")
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), classes=10)


# -- the authors' released constructed datasets ---------------------------------------------------------------

RELEASE_FOLDERS = ("d_robust_CIFAR", "d_non_robust_CIFAR", "drand_CIFAR", "ddet_CIFAR")
"""The folders of MadryLab/constructed-datasets: D_R, D_NR, D_rand and D_det of the paper, built on CIFAR-10."""


def from_release(folder: str | Path) -> ImageDataset:
    """A constructed dataset released with the paper (MadryLab/constructed-datasets: ``d_robust_CIFAR``,
    ``d_non_robust_CIFAR``, ``drand_CIFAR``, ``ddet_CIFAR``) as a map-style dataset of (image in [0, 1], label).

    ``folder`` holds ``CIFAR_ims`` and ``CIFAR_lab``, each a list of tensors written with ``torch.save``; the
    parts are concatenated. Read with ``torch.load(..., weights_only=True)``: no code from the files runs.
    """
    from ._io import load_tensors

    root = Path(folder)
    parts: list[Tensor] = []
    for name in ("CIFAR_ims", "CIFAR_lab"):
        f = root / name
        if not f.exists():
            hint = f" (the release's folders: {', '.join(RELEASE_FOLDERS)})" if root.name not in RELEASE_FOLDERS else ""
            raise FileNotFoundError(f"folder: {f} not found; a released dataset holds CIFAR_ims and CIFAR_lab{hint}")
        loaded = load_tensors(f, "a list of tensors of the authors' release", "download the release again",
                              argument="folder")
        chunks = loaded if isinstance(loaded, (list, tuple)) else [loaded]
        if not chunks or not all(isinstance(c, Tensor) for c in chunks):
            raise ValueError(f"{f}: expected a list of tensors, got {type(loaded).__name__}")
        parts.append(torch.cat(list(chunks)))
    images, labels = parts
    if images.dtype != torch.uint8 and not (images.is_floating_point() and not images.is_complex()):
        raise ValueError(f"{root / 'CIFAR_ims'}: expected uint8 pixels (0..255) or real floating pixels in [0, 1], got "
                         f"{images.dtype}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{root / 'CIFAR_lab'}: expected integer class labels, got {labels.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{root / 'CIFAR_ims'}: expected images (N, 3, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(f"{root / 'CIFAR_lab'}: expected {images.shape[0]} integer labels, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{root / 'CIFAR_ims'}: images contain NaN or inf")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"{root / 'CIFAR_lab'}: CIFAR-10 labels must lie in [0, 10), found "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if images.is_floating_point() and images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{root / 'CIFAR_ims'}: pixel values must lie in [0, 1], found "
                         f"[{float(images.min()):g}, {float(images.max()):g}]")
    return ImageDataset(images if images.dtype == torch.uint8 else images.float(), labels.long(), classes=10)


# -- planted features --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planted:
    """The planted dataset: ``train`` and ``test`` splits and the feature directions.

    Each image is ``0.5 + robust_norm * a[y] + nonrobust_norm * b[y] + noise`` (clamped to [0, 1]) where the
    rows of ``robust_directions`` (``a``) and ``nonrobust_directions`` (``b``) are orthonormal in pixel space.
    """

    train: ImageDataset
    test: ImageDataset
    robust_directions: Tensor
    nonrobust_directions: Tensor
    robust_norm: float
    nonrobust_norm: float

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """How much of each class's robust and non-robust feature the images ``x`` carry: the coefficients
        of ``x - 0.5`` along each direction, shapes (N, classes) and (N, classes)."""
        flat = x.reshape(x.shape[0], -1).double() - 0.5
        return flat @ self.robust_directions.double().T, flat @ self.nonrobust_directions.double().T


def _smooth(n: int, shape: tuple[int, int, int], g: torch.Generator) -> Tensor:
    """Low-frequency random patterns: coarse noise upsampled (visible blobs)."""
    c, h, w = shape
    coarse = torch.randn(n, c, max(2, h // 4), max(2, w // 4), generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def planted(
    n_train: int = 10000,
    n_test: int = 2000,
    *,
    shape: tuple[int, int, int] = (1, 16, 16),
    classes: int = 10,
    robust_norm: float = 2.5,
    robust_noise: float = 1.0,
    nonrobust_norm: float = 0.3,
    nonrobust_noise: float = 0.02,
    pixel_noise: float = 0.02,
    seed: int = 0,
) -> Planted:
    """Synthetic images whose class shows in a robust and in a non-robust feature, of known sizes.

    * Robust feature: ``robust_norm * a[y]`` with ``a[y]`` a smooth, visible unit pattern, plus Gaussian noise
      of std ``robust_noise`` along every robust direction: predictive but not perfect (about 81% with the
      defaults), and far too large for an L2 attack of eps 0.5 to move.
    * Non-robust feature: ``nonrobust_norm * b[y]`` with ``b[y]`` a high-frequency unit pattern, with noise of
      std ``nonrobust_noise``: nearly perfectly predictive (99.9%), yet an L2 move of ``nonrobust_norm *
      sqrt(2)`` (0.42 with the defaults, below eps 0.5) swaps it to another class.
    * Everything else: pixel noise of std ``pixel_noise`` orthogonal to both feature subspaces.

    The directions are orthonormal (QR of random patterns), so ``Planted.features`` measures each feature
    exactly (up to clamping into [0, 1], which touches about 3% of the pixels). Seeded and deterministic.

    With the defaults and ``advfeat.models.PlantedNet`` (Adam, lr 3e-3 one-cycle, 60 epochs, batch 128)
    a standard model reaches about 100% clean and 0% accuracy under L2 PGD at eps 0.5; adversarial training
    at eps 0.5 (7 steps) keeps about 83% clean and 62% robust. The model learns the small non-robust feature
    only after it has fitted the large robust one: train long enough (30+ epochs), or it stays robust.
    """
    check_positive_int("n_train", n_train)
    check_positive_int("n_test", n_test)
    check_seed("seed", seed)
    c, h, w = shape
    d = c * h * w
    if 2 * classes > d:
        raise ValueError(f"shape {shape} has {d} pixels, too few for 2 x {classes} orthogonal feature directions")
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    g = torch.Generator().manual_seed(seed)
    smooth = _smooth(classes, shape, g).reshape(classes, d)
    rough = torch.randn(classes, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([smooth, rough]).T)  # d x 2C, orthonormal columns
    a, b = q[:, :classes].T.contiguous(), q[:, classes:].T.contiguous()
    # orient each robust pattern so that its brighter part is positive (purely cosmetic)
    a = a * torch.where(a.sum(1, keepdim=True) < 0, -1.0, 1.0)

    def split(n: int, g: torch.Generator) -> ImageDataset:
        y = torch.randint(0, classes, (n,), generator=g)
        noise = torch.randn(n, d, generator=g, dtype=torch.float64) * pixel_noise
        noise -= (noise @ a.T) @ a + (noise @ b.T) @ b  # pixel noise lives outside the feature subspaces
        ra = torch.randn(n, classes, generator=g, dtype=torch.float64) * robust_noise
        rb = torch.randn(n, classes, generator=g, dtype=torch.float64) * nonrobust_noise
        ra[torch.arange(n), y] += robust_norm
        rb[torch.arange(n), y] += nonrobust_norm
        x = 0.5 + ra @ a + rb @ b + noise
        return ImageDataset(x.clamp(0, 1).float().reshape(n, c, h, w), y)

    train = split(n_train, torch.Generator().manual_seed(seed * 2 + 1))
    test = split(n_test, torch.Generator().manual_seed(seed * 2 + 2))
    return Planted(train, test, a.float(), b.float(), float(robust_norm), float(nonrobust_norm))
