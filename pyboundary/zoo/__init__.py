"""Data sets, reference models, training and model loading (offline only: nothing is downloaded).

* :func:`load_dataset`: digits, Fashion-MNIST, MNIST-5k, foolbox's labelled samples, image folders,
  ``package-photos`` (:func:`load_package_photos`: real photographs shipped inside PyPI packages);
  :func:`open_image_folder`: an image folder of any size, read lazily (:mod:`.streaming`);
  :func:`T1` / :func:`T2`: the synthetic data of Ortiz-Jimenez et al. (2020).
* :func:`build`: untrained reference architectures; :func:`train`: a seeded training loop.
* :func:`reference_model`: trained once on offline data and cached (crash-safe, lock-protected);
  :func:`train_cached`: the same for any in-memory dataset (:func:`derived_dataset`), adversarial
  training and per-epoch checkpoints included.
* :func:`load_model`: a model from a command-line spec; :func:`efficientnet_lite0`: pretrained ImageNet.
"""

from .architectures import ARCHS, build
from .cache import (
    cache_dir,
    default_epochs,
    load_state_file,
    reference_model,
    train_cached,
    weights_hash,
)
from .data import (
    DATASETS,
    ImageDataset,
    MissingSourceError,
    derived_dataset,
    iter_batches,
    load_dataset,
    load_folder,
    read_idx,
)
from .photos import load_package_photos
from .pretrained import PRETRAINED, PixelScale, efficientnet_lite0
from .specs import load_model
from .streaming import BadImageError, ImageFolderStream, imagenet_wnids, open_image_folder
from .synthetic import T1, T2, SyntheticDataset, random_orthogonal
from .training import accuracy, train

__all__ = [
    "ARCHS", "build", "train", "accuracy", "reference_model", "train_cached", "default_epochs", "cache_dir",
    "weights_hash", "load_state_file", "load_model", "efficientnet_lite0", "PixelScale", "PRETRAINED",
    "open_image_folder", "ImageFolderStream", "BadImageError", "imagenet_wnids",
    "DATASETS", "ImageDataset", "MissingSourceError", "load_dataset", "derived_dataset", "load_folder",
    "load_package_photos", "read_idx", "iter_batches",
    "T1", "T2", "SyntheticDataset", "random_orthogonal",
]
