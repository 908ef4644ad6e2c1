"""Tests of pyboundary.zoo.data: IDX reader, offline sources, limits, folders, missing sources."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pyboundary.zoo import data
from pyboundary.zoo.data import MissingSourceError, load_dataset, read_idx

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAS_FASHION = (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


def write_idx(path, array, code, compress):
    """Write ``array`` as an IDX file (big-endian) with type ``code``."""
    dtypes = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.asarray(array, dtype=dtypes[code]).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)])
def test_read_idx_round_trip(tmp_path, compress, code, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.random((3, 4, 5)) * 200).astype(dtype)
    if code == 0x0C:
        arr = arr - 100  # negative values exercise the sign of big-endian int32
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr, code, compress)
    out = read_idx(path)
    assert out.shape == (3, 4, 5)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    write_idx(short, np.zeros((4,), np.uint8), 0x08, False)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(ValueError, match="payload"):
        read_idx(short)


def write_fake_fashion(folder, n_train=12, n_test=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", images, 0x08, True)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels, 0x08, True)
        out[part] = (images, labels)
    return out


def test_fashion_mnist_from_override_dir(tmp_path, monkeypatch):
    raw = write_fake_fashion(tmp_path / "fm")
    monkeypatch.setenv("PYBOUNDARY_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    test = load_dataset("fashion-mnist", "test")
    images, labels = raw["t10k"]
    assert test.x.shape == (6, 1, 28, 28) and test.x.dtype == torch.float32
    np.testing.assert_allclose(test.x[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    assert test.labels.tolist() == labels.tolist() and test.labels.dtype == torch.int64
    assert test.classes[9] == "Ankle boot"
    assert len(load_dataset("fashion-mnist", "train")) == 12
    assert len(load_dataset("fashion-mnist", "all")) == 18


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    train = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    assert train.shape == (60000, 28, 28) and train.dtype == np.uint8
    assert labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10
    test = load_dataset("fashion-mnist", "test")
    assert test.x.shape == (10000, 1, 28, 28)
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert 0.0 <= float(test.x.min()) and float(test.x.max()) <= 1.0
    assert float(test.x.max()) == 1.0  # 255 -> 1


def test_missing_fashion_mnist_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PYBOUNDARY_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.parametrize("name,package", [("foolbox-mnist", "pip install foolbox"),
                                          ("mnist5k", "pip install --no-deps mlxtend"),
                                          ("digits", "pip install scikit-learn")])
def test_missing_package_sources_say_what_to_install(monkeypatch, name, package):
    monkeypatch.setattr(data, "_package_dir", lambda pkg: None)
    data._package_table.cache_clear()
    with pytest.raises(MissingSourceError, match=package):
        load_dataset(name)


# ----------------------------------------------------------------------------- sklearn digits


def test_digits_splits():
    train, test, full = (load_dataset("digits", s) for s in ("train", "test", "all"))
    assert len(full) == 1797 and len(train) + len(test) == 1797
    assert test.x.shape[1:] == (1, 8, 8) and test.x.dtype == torch.float32
    assert float(full.x.min()) == 0.0 and float(full.x.max()) == 1.0
    # stratified: every class has ~25 % of its samples in test
    frac = torch.bincount(test.labels, minlength=10).double() / torch.bincount(full.labels, minlength=10).double()
    assert bool(((frac - 0.25).abs() < 0.01).all())
    # train and test are disjoint and together make up the whole set
    key = lambda d: {tuple(r) for r in torch.cat([d.x.flatten(1), d.labels[:, None].float()], 1).tolist()}  # noqa: E731
    assert key(train) | key(test) == key(full)
    y = full.labels.numpy()
    i_train, i_test = (data._stratified_split(y, 0.25, s) for s in ("train", "test"))
    assert np.intersect1d(i_train, i_test).size == 0 and i_train.size + i_test.size == 1797
    # first image of sklearn's load_digits(): a zero, rows 0 and 1
    np.testing.assert_allclose(full.x[0, 0, :2].numpy() * 16,
                               [[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0]])
    assert full.labels[:3].tolist() == [0, 1, 2]
    assert train.identity != test.identity


def test_limit_is_seeded_nested_and_validated():
    a = load_dataset("digits", limit=50, seed=3)
    b = load_dataset("digits", limit=50, seed=3)
    c = load_dataset("digits", limit=50, seed=4)
    big = load_dataset("digits", limit=120, seed=3)
    full = load_dataset("digits")
    assert len(a) == 50 and a.identity == b.identity and torch.equal(a.x, b.x)
    assert c.identity != a.identity and not torch.equal(a.labels, c.labels)
    rows = lambda d: {tuple(r) for r in d.x.flatten(1).tolist()}  # noqa: E731
    assert rows(a) <= rows(big)
    assert load_dataset("digits", limit=10_000).identity == full.identity
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(ValueError, match="limit"):
            load_dataset("digits", limit=bad)


def test_bad_names_and_splits_list_valid_ones():
    with pytest.raises(ValueError, match="valid names.*fashion-mnist"):
        load_dataset("cifar-10-full")
    with pytest.raises(ValueError, match=r"split='val'.*valid splits: \['train', 'test', 'all'\]"):
        load_dataset("digits", "val")
    with pytest.raises(TypeError, match="name"):
        load_dataset(3)


def test_subset_and_iter_batches():
    d = load_dataset("digits", limit=30)
    s = d.subset([4, 0, 7])
    assert torch.equal(s.x, d.x[[4, 0, 7]]) and torch.equal(s.labels, d.labels[[4, 0, 7]])
    assert s.identity != d.identity and s.identity == d.subset([4, 0, 7]).identity
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[1, 2]] = True
    assert torch.equal(d.subset(mask).x, d.x[1:3])
    with pytest.raises(ValueError, match="out of range"):
        d.subset([30])
    batches = list(data.iter_batches(d.x, d.labels, 8))
    assert [len(b[1]) for b in batches] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([b[0] for b in batches]), d.x)
    assert len(list(data.iter_batches(d.x, batch_size=30))) == 1
    with pytest.raises(ValueError, match="batch_size"):
        list(data.iter_batches(d.x, d.labels, 0))


# ----------------------------------------------------------------------------- folders


def write_folder(root, sizes=((5, 4),), mode="L"):
    """root/<cls>/<i>.png with pixel value 10*label + i everywhere; returns expected values."""
    expected = []
    for label, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            size = sizes[(label * 3 + i) % len(sizes)]
            value = 10 * label + i
            Image.new(mode, size, value if mode == "L" else (value, value, value)).save(root / cls / f"{i}.png")
            expected.append((label, value))
    return expected


def test_folder_of_images(tmp_path):
    expected = write_folder(tmp_path / "set")
    d = load_dataset(str(tmp_path / "set"))
    assert d.classes == ["cat", "dog"]
    assert d.x.shape == (6, 1, 4, 5)  # PIL size is (W, H)
    assert d.labels.tolist() == [label for label, _ in expected]
    np.testing.assert_allclose(d.x.amax((1, 2, 3)).numpy(), [v / 255 for _, v in expected], atol=1e-7)
    with pytest.raises(ValueError, match="split='train'"):
        load_dataset(str(tmp_path / "set"), "train")
    assert load_dataset(tmp_path / "set").identity == d.identity  # a Path works too


def test_folder_rgb_split_layout_and_errors(tmp_path):
    write_folder(tmp_path / "tt" / "train", mode="RGB")
    write_folder(tmp_path / "tt" / "test", mode="RGB")
    tr = load_dataset(str(tmp_path / "tt"), "train")
    assert tr.x.shape == (6, 3, 4, 5)
    assert len(load_dataset(str(tmp_path / "tt"), "all")) == 12
    write_folder(tmp_path / "mixed", sizes=((5, 4), (6, 4)))
    with pytest.raises(ValueError, match="share one size"):
        load_dataset(str(tmp_path / "mixed"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- packaged samples


@pytest.mark.skipif(not HAS_FOOLBOX, reason="foolbox not installed (pip install foolbox)")
@pytest.mark.parametrize("name,shape,n_classes", [
    ("foolbox-imagenet", (3, 224, 224), 1000), ("foolbox-cifar10", (3, 32, 32), 10),
    ("foolbox-cifar100", (3, 32, 32), 100), ("foolbox-mnist", (1, 28, 28), 10),
    ("foolbox-fmnist", (1, 28, 28), 10)])
def test_foolbox_samples(name, shape, n_classes):
    d = load_dataset(name)
    assert d.x.shape == (20,) + shape and len(d.classes) == n_classes
    assert 0.0 <= float(d.x.min()) and float(d.x.max()) <= 1.0
    folder = data._package_dir("foolbox") / "data"
    prefix = data._FOOLBOX[name][0]
    files = sorted(p for p in folder.iterdir() if p.stem.split("_")[0] == prefix)
    assert d.labels.tolist() == [int(p.stem.split("_")[-1]) for p in files]
    with pytest.raises(ValueError, match="valid splits"):
        load_dataset(name, "train")


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed (pip install --no-deps mlxtend)")
def test_mnist5k():
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert float(test.x.max()) == 1.0
