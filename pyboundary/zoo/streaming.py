"""Image folders of any size, read lazily: file names and labels in memory, pixels on demand.

:func:`open_image_folder` lists a folder (nothing is decoded but the files it selects), checks
the selected files and returns an :class:`ImageFolderStream`, a ``torch.utils.data.Dataset``
whose items are ``(image (C, H, W) float32 in [0, 1], label)``. The margin scan reads it through
a ``DataLoader`` with worker processes, so a folder of a million images costs memory for its
file names only.

Layouts
    * class folders: ``root/<class>/<image>`` (torchvision's ImageFolder), or
      ``root/<split>/<class>/<image>`` when root holds only ``train``/``val``/``test`` folders;
    * a flat folder ``root/<image>`` with a labels file (``labels.txt`` or ``labels.csv`` in
      root, or ``labels_file=``): one line per image, ``<file name> <label>`` separated by
      white space or a comma (``ILSVRC2012_val_00000001.JPEG 65``, Kaggle's
      ``ImageId,PredictionString`` with the WordNet id first); a header line is skipped; a file
      name without suffix matches the image of that stem. Without a labels file the images are
      unlabelled (label -1). An image without a label, or a label for a missing file, is refused.

Class indices (``class_index='auto'`` picks by the names)
    * ``'wordnet'``: names are WordNet ids (``n01440764``): the ImageNet-1k index, i.e. the
      position in the sorted list of the 1,000 ILSVRC-2012 synsets (the order ImageNet models are
      trained with), whichever subset of classes the folder holds; a WordNet id outside
      ImageNet-1k is refused. The list ships as ``imagenet_wnids.txt`` (1,000 ids, sorted).
    * ``'index'``: names are integers (``0`` ... ``999``, zero-padding allowed): the index itself.
    * ``'names'``: anything else: sorted names, index = position (as ImageFolder does).
    Names mixing WordNet ids and others are refused (a silent fallback to sorted names would
    mislabel an ImageNet folder).

Preprocessing (``preprocess=``)
    * ``'imagenet'``: RGB, resize the short side to 256 (bilinear with antialiasing, PIL's
      resampling), center crop 224 x 224, values / 255 in [0, 1]: the standard evaluation
      transform of ImageNet models. Normalisation belongs to the model (e.g. the
      ``efficientnet-lite0`` spec normalises inside), so margins are in [0, 1]-pixel units.
    * ``'none'``: the image as stored, values / 255; all selected images must share one size;
      one channel if every image is grey-scale, else RGB.
    * ``'auto'``: ``'none'`` when the selected images share one size, else ``'imagenet'``.

Bad files
    Every selected file is opened and (``check='full'``, default) decoded once before use, in
    worker processes; a file that cannot be read or decoded, or whose mode has no RGB meaning
    (16-bit/float ``I;16``/``I``/``F``), is *skipped and reported* (``stream.skipped``: (path,
    reason) pairs) or, with ``on_bad='error'``, refused with every bad path in the message.
    Grey-scale, palette, CMYK and alpha images are converted to RGB (the alpha channel dropped),
    as ImageNet's own grey and CMYK JPEGs are. A file that breaks later (changed on disk) raises
    :class:`BadImageError` naming it.

Subsets: ``limit``/``seed`` draw a seeded subset of the listing (the same rule as
:func:`pyboundary.zoo.data.subset_indices`) before any file is opened, so the others are never read.
Identity: a hash of the relative paths, file sizes, labels, class mapping, preprocessing and
subset (not of the pixels: hashing a large folder would read all of it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._utils.results import Result
from .._utils.validation import check_choice, check_int
from .data import subset_indices

__all__ = [
    "ImageFolderStream", "BadImageError", "open_image_folder", "imagenet_wnids", "PREPROCESSING",
    "IMAGENET_RESIZE", "IMAGENET_CROP", "preprocess_image",
]

IMAGENET_RESIZE = 256
IMAGENET_CROP = 224
PREPROCESSING = ("imagenet", "none", "auto")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".webp"})
_LABEL_FILES = ("labels.txt", "labels.csv")
_WNID = re.compile(r"^n\d{8}$")
_GREY_MODES = frozenset({"1", "L", "LA"})
#: modes with an unambiguous 8-bit RGB (or grey) meaning
_CONVERTIBLE = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La"})
_SPLITS = ("train", "val", "test")


class BadImageError(ValueError):
    """An image file that cannot be used (unreadable, undecodable, or of an unsupported mode)."""


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple:
    """The 1,000 ImageNet-1k (ILSVRC-2012) WordNet ids in class-index order (sorted)."""
    text = (Path(__file__).with_name("imagenet_wnids.txt")).read_text()
    ids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(ids) != 1000 or list(ids) != sorted(ids):  # pragma: no cover - a damaged install
        raise RuntimeError("imagenet_wnids.txt is damaged: expected 1000 sorted WordNet ids")
    return ids


# ------------------------------------------------------------------------------ listing
@dataclass
class _Listing:
    root: Path
    paths: list            # absolute Paths
    labels: list | None    # ints, or None (unlabelled)
    classes: list          # class names, index = label
    class_index: str       # 'wordnet' | 'index' | 'names' | 'none'


def _images_in(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_mapping(names, class_index: str, where: str):
    """(name -> index, classes, kind) for class names (folder names or labels-file labels)."""
    names = sorted(set(names))
    if class_index == "auto":
        is_wnid = [bool(_WNID.match(n)) for n in names]
        if all(is_wnid):
            class_index = "wordnet"
        elif any(is_wnid):
            odd = [n for n, w in zip(names, is_wnid) if not w][:5]
            raise ValueError(f"{where}: class names mix WordNet ids with other names ({odd}); rename them "
                             "or pass class_index='names' to index them in sorted order")
        elif all(n.isdigit() for n in names):
            class_index = "index"
        else:
            class_index = "names"
    if class_index == "wordnet":
        wnids = imagenet_wnids()
        pos = {w: i for i, w in enumerate(wnids)}
        unknown = [n for n in names if n not in pos]
        if unknown:
            raise ValueError(f"{where}: {len(unknown)} class name(s) are not ImageNet-1k WordNet ids, "
                             f"e.g. {unknown[:5]}")
        return {n: pos[n] for n in names}, list(wnids), "wordnet"
    if class_index == "index":
        bad = [n for n in names if not n.isdigit()]
        if bad:
            raise ValueError(f"{where}: class_index='index' needs integer class names, got {bad[:5]}")
        idx = {n: int(n) for n in names}
        if len(set(idx.values())) != len(idx):
            raise ValueError(f"{where}: class names {names[:10]} give the same index twice (e.g. '1' and '01')")
        return idx, [str(i) for i in range(max(idx.values()) + 1)], "index"
    if class_index == "names":
        return {n: i for i, n in enumerate(names)}, names, "names"
    raise ValueError(f"class_index must be 'auto', 'wordnet', 'index' or 'names', got {class_index!r}")


def _list_class_folders(root: Path, split: str, class_index: str) -> _Listing:
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if subdirs and set(subdirs) <= set(_SPLITS):
        valid = [s for s in _SPLITS if s in subdirs] + ["all"]
        if split not in valid:
            raise ValueError(f"split={split!r} is not valid for folder {str(root)!r}; valid splits: {valid}")
        parts = [s for s in ("train", "test") if s in subdirs] if split == "all" else [split]
        dirs = [root / s for s in parts]
    else:
        if split not in ("test", "all"):
            raise ValueError(f"split={split!r} is not valid for folder {str(root)!r} (no train/val/test "
                             "sub-folders): use 'test' or 'all'")
        dirs = [root]
    names = sorted({p.name for d in dirs for p in d.iterdir() if p.is_dir()})
    if not names:
        raise ValueError(f"folder {str(root)!r} has no class sub-folders")
    mapping, classes, kind = _class_mapping(names, class_index, f"folder {str(root)!r}")
    paths, labels = [], []
    for d in dirs:
        for name in names:
            if (d / name).is_dir():
                found = _images_in(d / name)
                paths += found
                labels += [mapping[name]] * len(found)
    return _Listing(root, paths, labels, classes, kind)


def _read_labels_file(path: Path) -> list:
    """[(file name, label text)] from a labels file (white-space or comma separated)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f for f in re.split(r"[,\s]+", line) if f]
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected '<file name> <label>', got {line!r}")
        rows.append((fields[0], fields[1], number))
    return rows


def _list_flat(root: Path, labels_file, class_index: str, split: str) -> _Listing:
    if split not in ("test", "all"):
        raise ValueError(f"split={split!r} is not valid for the flat folder {str(root)!r}: use 'test' or 'all'")
    images = _images_in(root)
    if not images:
        raise ValueError(f"folder {str(root)!r} has no images with suffixes {sorted(IMAGE_SUFFIXES)} "
                         "and no class sub-folders")
    if labels_file is None:
        found = [root / n for n in _LABEL_FILES if (root / n).is_file()]
        if len(found) > 1:
            raise ValueError(f"folder {str(root)!r} has both {_LABEL_FILES}: pass labels_file= to choose")
        labels_file = found[0] if found else None
    if labels_file is None:
        return _Listing(root, images, None, [], "none")
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise FileNotFoundError(f"labels file {str(labels_file)!r} not found")
    rows = _read_labels_file(labels_file)
    by_name = {p.name: p for p in images}
    by_stem = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    find = lambda name: by_name.get(name) or (by_stem[name][0] if len(by_stem.get(name, [])) == 1 else None)  # noqa: E731
    if rows and find(rows[0][0]) is None and not (rows[0][1].isdigit() or _WNID.match(rows[0][1])):
        rows = rows[1:]  # a header line such as 'ImageId,PredictionString'
    label_of, missing = {}, []
    for name, label, number in rows:
        path = find(name)
        if path is None:
            missing.append(name)
            continue
        if path in label_of and label_of[path] != label:
            raise ValueError(f"{labels_file}:{number}: {name!r} is labelled twice ({label_of[path]!r}, {label!r})")
        label_of[path] = label
    if missing:
        raise ValueError(f"{labels_file}: {len(missing)} labelled file(s) not found in {str(root)!r}, "
                         f"e.g. {missing[:5]}")
    unlabelled = [p.name for p in images if p not in label_of]
    if unlabelled:
        raise ValueError(f"{labels_file}: {len(unlabelled)} image(s) of {str(root)!r} have no label, "
                         f"e.g. {unlabelled[:5]}")
    mapping, classes, kind = _class_mapping(label_of.values(), class_index, f"labels file {str(labels_file)!r}")
    return _Listing(root, images, [mapping[label_of[p]] for p in images], classes, kind)


def _list_folder(root: Path, split: str, labels_file, class_index: str) -> _Listing:
    has_dirs = any(p.is_dir() for p in root.iterdir())
    if has_dirs and labels_file is None:
        return _list_class_folders(root, split, class_index)
    return _list_flat(root, labels_file, class_index, split)


# ------------------------------------------------------------------------------ pixels
def _open_rgb(path: Path, channels: int):
    """The decoded PIL image converted to RGB (channels 3) or L (channels 1)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in _CONVERTIBLE:
                raise BadImageError(f"{path}: unsupported image mode {im.mode!r} (expected 8-bit grey, "
                                    "palette, RGB(A) or CMYK)")
            im.load()
            return im.convert("RGB" if channels == 3 else "L")
    except BadImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImageError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None


def _resize_short_side(im, size: int):
    from PIL import Image

    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return im.resize(new, Image.Resampling.BILINEAR)


def _center_crop(im, size: int):
    w, h = im.size
    if w < size or h < size:  # only after a resize to a smaller short side than the crop
        raise ValueError(f"cannot crop {size}x{size} from an image of {w}x{h}")
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def _to_tensor(im) -> Tensor:
    import numpy as np

    arr = np.asarray(im, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).to(torch.float32).div_(255.0)
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def preprocess_image(path, preprocess: str = "imagenet", channels: int = 3,
                     resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP) -> Tensor:
    """One image file as a (C, H, W) float32 tensor in [0, 1] (see the module docstring)."""
    im = _open_rgb(Path(path), 3 if preprocess == "imagenet" else channels)
    if preprocess == "imagenet":
        im = _center_crop(_resize_short_side(im, resize), crop)
    return _to_tensor(im)


def _inspect(path: Path, full: bool):
    """(ok, reason, (w, h), mode) of one file without keeping its pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if mode not in _CONVERTIBLE:
                return False, f"unsupported image mode {mode!r}", size, mode
            if full:
                im.load()
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot read the image ({type(exc).__name__}: {exc})", None, None
    return True, "", size, mode


class _InspectAll(torch.utils.data.Dataset):
    def __init__(self, paths, full):
        self.paths, self.full = paths, full

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return _inspect(self.paths[i], self.full)


def _inspect_all(paths, full: bool, workers: int, progress: bool) -> list:
    from tqdm.auto import tqdm

    if workers <= 0 or len(paths) < 64:
        it = (_inspect(p, full) for p in paths)
    else:
        loader = torch.utils.data.DataLoader(_InspectAll(paths, full), batch_size=None, num_workers=workers)
        it = iter(loader)
    return list(tqdm(it, total=len(paths), desc="checking images", unit="file",
                     disable=not progress or len(paths) < 500, leave=False))


# ------------------------------------------------------------------------------ the dataset
@dataclass(eq=False)
class ImageFolderStream(Result, torch.utils.data.Dataset):
    """A labelled image folder read lazily (see the module docstring).

    Items: ``(x (C, H, W) float32 in [0, 1], label int)`` (label -1 when unlabelled).

    Attributes:
        root: the folder.
        paths: the image files, in sample order.
        labels: (N,) int64 labels (-1 where unknown), or None for an unlabelled folder.
        classes: class names, index = label (ImageNet-1k WordNet ids for 'wordnet').
        class_index: 'wordnet', 'index', 'names' or 'none'.
        preprocess: 'imagenet' or 'none' (what ``auto`` resolved to).
        image_shape: (C, H, W) of every item.
        skipped: [(path, reason)] of the files left out as unusable.
        name, split, identity: as for :class:`pyboundary.zoo.data.ImageDataset`.
    """

    root: Path
    paths: list
    labels: Tensor | None
    classes: list
    class_index: str
    preprocess: str
    image_shape: tuple
    skipped: list = field(default_factory=list)
    name: str = ""
    split: str = "test"
    identity: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[int(i)]
        x = preprocess_image(path, self.preprocess, self.image_shape[0])
        if tuple(x.shape) != tuple(self.image_shape):
            raise BadImageError(f"{path}: decoded to shape {tuple(x.shape)}, expected {self.image_shape} "
                                "(did the file change after it was checked?)")
        label = -1 if self.labels is None else int(self.labels[int(i)])
        return x, label

    @property
    def n_classes(self) -> int | None:
        """Number of classes the labels index (None when the folder names are indices or unlabelled:
        the model defines the classes)."""
        return len(self.classes) if self.class_index in ("wordnet", "names") else None

    def summary(self) -> dict:
        return {"name": self.name, "split": self.split, "n": len(self), "image_shape": list(self.image_shape),
                "n_classes": self.n_classes, "class_index": self.class_index, "preprocess": self.preprocess,
                "skipped": len(self.skipped), "identity": self.identity}

    def describe(self) -> str:
        """One line: size, layout, preprocessing, skipped files."""
        text = (f"{len(self)} images from {str(self.root)!r} ({self.class_index} class index, "
                f"{self.preprocess} preprocessing, {self.image_shape[0]}x{self.image_shape[1]}x{self.image_shape[2]})")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unusable file(s)"
        return text


def open_image_folder(
    root,
    *,
    split: str = "test",
    labels_file=None,
    class_index: str = "auto",
    preprocess: str = "imagenet",
    limit: int | None = None,
    seed: int = 0,
    check: str = "full",
    on_bad: str = "skip",
    workers: int = 0,
    progress: bool = False,
) -> ImageFolderStream:
    """List an image folder and return it as a lazily read :class:`ImageFolderStream`.

    Args:
        root: the folder (class folders, split folders, or flat with a labels file).
        split: 'test' (default), 'all', or 'train'/'val'/'test' for a folder of split folders.
        labels_file: labels of a flat folder (default ``root/labels.txt`` or ``root/labels.csv``).
        class_index: 'auto', 'wordnet', 'index' or 'names' (module docstring).
        preprocess: 'imagenet' (resize 256, center crop 224), 'none' or 'auto'.
        limit, seed: a seeded random subset of ``limit`` images, drawn from the listing before
            any file is read (contained in the subset of a larger limit with the same seed).
        check: 'full' (decode every selected file once) or 'header' (open the header only).
        on_bad: 'skip' (leave bad files out, listed in ``.skipped``, with a warning) or 'error'.
        workers: worker processes for the check (0: in this process).
        progress: a bar while checking large folders.
    Raises:
        ValueError: bad arguments, an unusable layout, bad files with ``on_bad='error'``, or no
            usable image left. FileNotFoundError: a missing root or labels file.
    """
    if isinstance(root, os.PathLike):
        root = os.fspath(root)
    if not isinstance(root, str):
        raise TypeError(f"root must be a folder path, got {type(root).__name__}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder at {root!r}")
    check_choice("preprocess", preprocess, PREPROCESSING)
    check_choice("check", check, ("full", "header"))
    check_choice("on_bad", on_bad, ("skip", "error"))
    check_choice("class_index", class_index, ("auto", "wordnet", "index", "names"))
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    limit = check_int("limit", limit, minimum=1, allow_none=True)
    workers = check_int("workers", workers, minimum=0)
    listing = _list_folder(Path(root), split, labels_file, class_index)
    n = len(listing.paths)
    if n == 0:
        raise ValueError(f"folder {root!r} has no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    idx = subset_indices(n, limit, seed)
    chosen = list(range(n)) if idx is None else idx.tolist()
    paths = [listing.paths[i] for i in chosen]
    labels = None if listing.labels is None else [listing.labels[i] for i in chosen]
    report = _inspect_all(paths, check == "full", workers, progress)
    bad = [(str(p), r[1]) for p, r in zip(paths, report) if not r[0]]
    if bad and on_bad == "error":
        listed = "; ".join(f"{p}: {r}" for p, r in bad[:10])
        raise BadImageError(f"{len(bad)} unusable image file(s) in {root!r}: {listed}")
    keep = [i for i, r in enumerate(report) if r[0]]
    if not keep:
        raise ValueError(f"no usable image in {root!r} ({len(bad)} unusable: {bad[:3]})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unusable image file(s) in {root!r}: "
                      + "; ".join(f"{p} ({r})" for p, r in bad[:5]) + (" ..." if len(bad) > 5 else ""),
                      stacklevel=2)
    paths = [paths[i] for i in keep]
    labels = None if labels is None else [labels[i] for i in keep]
    sizes = {report[i][2] for i in keep}
    if preprocess == "auto":
        preprocess = "none" if len(sizes) == 1 else "imagenet"
    if preprocess == "imagenet":
        shape = (3, IMAGENET_CROP, IMAGENET_CROP)
    else:
        if len(sizes) != 1:
            raise ValueError(f"folder {root!r}: with preprocess='none' the images must share one size, found "
                             f"(W, H) sizes {sorted(sizes)[:5]}{' ...' if len(sizes) > 5 else ''} "
                             "(preprocess='imagenet' resizes and crops them)")
        (w, h), = sizes
        grey = all(report[i][3] in _GREY_MODES for i in keep)
        shape = (1 if grey else 3, h, w)
    label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    identity = _identity(Path(root), paths, labels, listing.class_index, preprocess, shape, split,
                         None if idx is None else (int(limit), int(seed)))
    return ImageFolderStream(root=Path(root), paths=paths, labels=label_tensor, classes=listing.classes,
                             class_index=listing.class_index, preprocess=preprocess, image_shape=shape,
                             skipped=bad, name=str(root), split=split, identity=identity)


def _identity(root: Path, paths, labels, class_index, preprocess, shape, split, subset) -> str:
    h = hashlib.sha256()
    h.update(repr(("image-folder", class_index, preprocess, tuple(shape), split, subset)).encode())
    for i, p in enumerate(paths):
        rel = os.path.relpath(p, root)
        size = os.path.getsize(p)
        h.update(f"{rel}\0{size}\0{-1 if labels is None else labels[i]}\n".encode())
    return h.hexdigest()[:16]
