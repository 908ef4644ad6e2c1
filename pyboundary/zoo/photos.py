"""Real photographs shipped inside installable Python packages (offline natural images).

No labelled natural-image set beyond foolbox's 20 ImageNet samples exists offline, but several
PyPI packages ship a few camera photographs as sample data. This module finds them in the
installed packages (without importing the packages) and prepares them for ImageNet models.
Which photographs are used, and why others are left out, is fixed in :data:`PACKAGE_PHOTOS`:
kept are camera photographs of real scenes and objects; left out are microscopy images,
documents, logos, drawings, renders, synthetic or derived images (a depth map, a synthetic
motion blur, the right image of a stereo pair), exact duplicates, and the "Lena" image.

The photographs carry no labels: experiments that need none (clean-vs-perturbed detection uses
the model's predictions) can use them. Install the packages without their dependencies (only
the files are read)::

    pip install --no-deps scikit-image imgaug mahotas pywavelets imagecorruptions ultralytics gradio

(scikit-learn and matplotlib are regular dependencies of pyboundary's extras.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["PACKAGE_PHOTOS", "PHOTO_PACKAGES", "find_package_photos", "load_package_photos", "prepare_image"]

#: (package, file inside the package, short name) of every photograph used.
PACKAGE_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/brick.png", "brick"),
    ("skimage", "data/camera.png", "camera"),
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/coins.png", "coins"),
    ("skimage", "data/grass.png", "grass"),
    ("skimage", "data/gravel.png", "gravel"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble_deep_field"),
    ("skimage", "data/moon.png", "moon"),
    ("skimage", "data/motorcycle_left.png", "motorcycle"),
    ("skimage", "data/retina.jpg", "retina"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("imgaug", "quokka.jpg", "quokka"),
    ("mahotas", "demos/data/luispedro.jpg", "luispedro"),
    ("pywt", "data/aero.npz", "aero"),
    ("pywt", "data/ascent.npz", "ascent"),
    ("imagecorruptions", "frost/frost1.png", "frost1"),
    ("imagecorruptions", "frost/frost2.png", "frost2"),  # frost3.png is a pixel-exact copy of it
    ("imagecorruptions", "frost/frost4.jpg", "frost4"),
    ("imagecorruptions", "frost/frost5.jpg", "frost5"),
    ("imagecorruptions", "frost/frost6.jpg", "frost6"),
    ("ultralytics", "assets/bus.jpg", "bus"),
    ("ultralytics", "assets/zidane.jpg", "zidane"),
    ("gradio", "media_assets/images/cheetah.jpg", "cheetah"),
    ("gradio", "media_assets/images/cheetah1.jpg", "cheetah1"),
    ("gradio", "media_assets/images/lion.jpg", "lion"),
    ("gradio", "media_assets/images/tower.jpg", "tower"),
    ("gradio", "test_data/cheetah2.jpg", "cheetah2"),
)

#: PyPI distribution of each package above (for the install hint).
PHOTO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "skimage": "scikit-image",
                  "imgaug": "imgaug", "mahotas": "mahotas", "pywt": "pywavelets",
                  "imagecorruptions": "imagecorruptions", "ultralytics": "ultralytics", "gradio": "gradio"}


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_package_photos() -> tuple[list, list]:
    """Paths of the photographs of :data:`PACKAGE_PHOTOS` that are installed.

    Returns:
        (found, missing): found is a list of (name, path) in table order; missing lists the PyPI
        distributions whose photographs were not found.
    """
    found, missing = [], []
    for package, relative, name in PACKAGE_PHOTOS:
        root = _package_dir(package)
        path = root / relative if root is not None else None
        if path is not None and path.is_file():
            found.append((name, path))
        elif PHOTO_PACKAGES[package] not in missing:
            missing.append(PHOTO_PACKAGES[package])
    return found, missing


def _read_image(path: Path):
    """A PIL RGB image from an image file or a uint8 (H, W) array in an .npz file (key 'data')."""
    from PIL import Image

    if path.suffix == ".npz":
        with np.load(path) as z:
            arr = np.asarray(z[z.files[0]])
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"{path}: expected a uint8 (H, W[, 3]) image array, got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr).convert("RGB")
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def prepare_image(image, size: int = 224) -> np.ndarray:
    """The standard ImageNet evaluation crop of a PIL image: resize the short side to
    round(size * 256 / 224) (bicubic), crop the central size x size square. Returns (size, size, 3)
    uint8."""
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    w, h = image.size
    short = round(size * 256 / 224)
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_package_photos(size: int = 224) -> tuple[Tensor, list]:
    """The installed photographs of :data:`PACKAGE_PHOTOS`, prepared by :func:`prepare_image`.

    Args:
        size: side of the square crop (224 for ImageNet models).
    Returns:
        x (N, 3, size, size) float32 in [0, 1], and the N short names, in table order.
    Raises:
        FileNotFoundError: none of the photographs is installed (the message names the packages).
    """
    found, missing = find_package_photos()
    if not found:
        raise FileNotFoundError("no package photographs are installed: pip install --no-deps "
                                + " ".join(missing))
    arrays = [prepare_image(_read_image(path), size) for _, path in found]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(torch.float32) / 255.0
    return x, [name for name, _ in found]
