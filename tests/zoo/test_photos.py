"""Photographs shipped inside packages: discovery without imports, reading, the ImageNet crop."""

import numpy as np
import pytest
from PIL import Image

from pyboundary.zoo import photos


def test_prepare_image_resizes_the_short_side_and_crops_the_centre():
    # 300 x 200 image: left third red, middle third green, right third blue
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 1] = 255
    arr[:, 200:, 2] = 255
    out = photos.prepare_image(Image.fromarray(arr), 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # short side 200 -> 256, long side 300 -> 384; the central 224 columns of 384 are 80..303,
    # i.e. source columns 62.5..236.7: red, then green, then blue
    assert out[112, 0].tolist() == [255, 0, 0]
    assert out[112, 112].tolist() == [0, 255, 0]
    assert out[112, 223].tolist() == [0, 0, 255]
    # the red/green edge at source column 100 lands at 100 * 384/300 - 80 = 48
    row = out[112, :, 1].astype(int)
    assert abs(int(np.argmax(row > 127)) - 48) <= 1


def test_prepare_image_rejects_a_bad_size():
    with pytest.raises(ValueError, match="size"):
        photos.prepare_image(Image.new("RGB", (10, 10)), 0)


def _fake_packages(tmp_path, monkeypatch, present):
    """Lay out the files of PACKAGE_PHOTOS for the packages in ``present`` under tmp_path."""
    roots = {}
    for package, relative, _ in photos.PACKAGE_PHOTOS:
        if package not in present:
            continue
        root = tmp_path / package
        roots[package] = root
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            np.savez(path, data=np.full((300, 260), 128, dtype=np.uint8))
        else:
            mode = "RGBA" if path.suffix == ".png" else "RGB"
            Image.new(mode, (320, 240), (10, 200, 30, 0) if mode == "RGBA" else (10, 200, 30)).save(path)
    monkeypatch.setattr(photos, "_package_dir", lambda name: roots.get(name))


def test_find_and_load_package_photos_from_installed_packages(tmp_path, monkeypatch):
    _fake_packages(tmp_path, monkeypatch, {"sklearn", "pywt", "imagecorruptions"})
    found, missing = photos.find_package_photos()
    names = [n for n, _ in found]
    assert names == ["china", "flower", "aero", "ascent", "frost1", "frost2", "frost4", "frost5", "frost6"]
    assert "scikit-image" in missing and "gradio" in missing and "scikit-learn" not in missing
    x, got = photos.load_package_photos(224)
    assert got == names and tuple(x.shape) == (9, 3, 224, 224)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # grey .npz arrays become three equal channels; fully transparent PNGs are composited on white
    aero = x[names.index("aero")]
    assert float((aero - 128 / 255).abs().max()) < 1e-6
    frost = x[names.index("frost1")]
    assert float((frost - 1).abs().max()) < 1e-6
    china = x[names.index("china")]
    assert abs(float(china[1].mean()) - 200 / 255) < 1e-6


def test_no_photographs_installed_names_the_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(photos, "_package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="scikit-image"):
        photos.load_package_photos()


def test_table_has_unique_names_and_known_packages():
    names = [n for _, _, n in photos.PACKAGE_PHOTOS]
    assert len(names) == len(set(names)) == 32
    assert {p for p, _, _ in photos.PACKAGE_PHOTOS} == set(photos.PHOTO_PACKAGES)


def test_package_photos_dataset_and_joined_names(tmp_path, monkeypatch):
    from pyboundary import zoo

    _fake_packages(tmp_path, monkeypatch, {"sklearn", "ultralytics"})
    ds = zoo.load_dataset("package-photos")
    assert tuple(ds.x.shape) == (4, 3, 224, 224) and ds.labels.tolist() == [-1] * 4 and len(ds.classes) == 1000
    with pytest.raises(ValueError, match="split"):
        zoo.load_dataset("package-photos", split="train")
    joined = zoo.load_dataset("package-photos+package-photos", limit=6, seed=1)
    assert tuple(joined.x.shape) == (6, 3, 224, 224) and joined.identity != ds.identity
    assert joined.classes == ds.classes
    with pytest.raises(ValueError, match="same shape and classes"):
        zoo.load_dataset("package-photos+digits")
    monkeypatch.setattr(photos, "_package_dir", lambda name: None)
    with pytest.raises(zoo.MissingSourceError, match="pip install --no-deps"):
        zoo.load_dataset("package-photos")
