"""Streamed image folders (pyboundary.zoo.streaming): layouts, class indices, preprocessing, bad files."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pyboundary.zoo import streaming
from pyboundary.zoo.streaming import BadImageError, imagenet_wnids, open_image_folder


def _png(path, value, size=(40, 30), mode="RGB"):
    """A constant image whose red channel encodes ``value`` (0..255), so labels can be read back."""
    w, h = size
    if mode == "L":
        arr = np.full((h, w), value, dtype=np.uint8)
    else:
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[..., 0] = value
        arr[..., 1] = 7
    Image.fromarray(arr, mode).save(path)


def _class_tree(root, names, per_class, size=(40, 30)):
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            _png(root / name / f"img{k:03d}.png", 10 * c + 1, size)


def test_wordnet_folders_map_to_imagenet_indices_with_bad_and_grey_files(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and list(wnids) == sorted(wnids)
    names = [wnids[1], wnids[7], wnids[999]]
    _class_tree(tmp_path, names, per_class=100)
    _png(tmp_path / names[0] / "grey.png", 5, mode="L")  # code 5: a grey image of class 0
    (tmp_path / names[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match=r"skipped 1 unusable image file.*broken\.png"):
        ds = open_image_folder(tmp_path, preprocess="none")
    assert len(ds) == 301 and ds.class_index == "wordnet" and ds.n_classes == 1000
    assert [p for p, _ in ds.skipped] == [str(tmp_path / names[1] / "broken.png")]
    counts = torch.bincount(ds.labels, minlength=1000)
    assert (counts[1], counts[7], counts[999]) == (101, 100, 100)
    for i in range(len(ds)):  # every image's content says which folder it came from
        x, label = ds[i]
        code = round(float(x[0, 0, 0]) * 255)
        assert {1: 0, 5: 0, 11: 1, 21: 2}[code] == names.index(wnids[label])
    grey = ds.paths.index(tmp_path / names[0] / "grey.png")
    x, _ = ds[grey]
    assert x.shape == (3, 30, 40) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    with pytest.raises(BadImageError, match="broken.png"):
        open_image_folder(tmp_path, preprocess="none", on_bad="error")


def test_flat_folder_with_labels_file(tmp_path):
    wnids = imagenet_wnids()
    lines = ["ImageId,PredictionString"]
    for k in range(20):
        _png(tmp_path / f"val_{k:02d}.png", k)
        lines.append(f"val_{k:02d},{wnids[k * 37]} 0 0 10 10")  # Kaggle style: stem, WordNet id first
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = open_image_folder(tmp_path, preprocess="none")
    assert ds.class_index == "wordnet" and ds.labels.tolist() == [k * 37 for k in range(20)]
    # index labels, white-space separated, explicit file
    (tmp_path / "labels.csv").unlink()
    idx_file = tmp_path / "val.txt"
    idx_file.write_text("".join(f"val_{k:02d}.png {5 * k}\n" for k in range(20)))
    ds = open_image_folder(tmp_path, labels_file=idx_file, preprocess="none")
    assert ds.class_index == "index" and ds.labels.tolist() == [5 * k for k in range(20)] and ds.n_classes is None
    # an image without a label, and a label without an image, are refused
    idx_file.write_text("".join(f"val_{k:02d}.png {k}\n" for k in range(19)))
    with pytest.raises(ValueError, match=r"1 image\(s\).*have no label.*val_19\.png"):
        open_image_folder(tmp_path, labels_file=idx_file, preprocess="none")
    idx_file.write_text("".join(f"val_{k:02d}.png {k}\n" for k in range(21)))
    with pytest.raises(ValueError, match=r"not found.*val_20\.png"):
        open_image_folder(tmp_path, labels_file=idx_file, preprocess="none")
    # no labels file at all: an unlabelled stream
    idx_file.unlink()
    ds = open_image_folder(tmp_path, preprocess="none")
    assert ds.labels is None and ds[0][1] == -1


def test_index_folders_mixed_names_and_unknown_wordnet_ids(tmp_path):
    _class_tree(tmp_path / "idx", ["0", "5", "017"], per_class=2)
    ds = open_image_folder(tmp_path / "idx", preprocess="none")
    assert ds.class_index == "index" and sorted(set(ds.labels.tolist())) == [0, 5, 17]
    _class_tree(tmp_path / "mixed", ["n01440764", "cats"], per_class=1)
    with pytest.raises(ValueError, match="mix WordNet ids"):
        open_image_folder(tmp_path / "mixed")
    ds = open_image_folder(tmp_path / "mixed", class_index="names", preprocess="none")
    assert ds.classes == ["cats", "n01440764"]
    _class_tree(tmp_path / "w21k", ["n00000001"], per_class=1)
    with pytest.raises(ValueError, match="not ImageNet-1k WordNet ids.*n00000001"):
        open_image_folder(tmp_path / "w21k")


def test_imagenet_preprocessing_geometry(tmp_path):
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a" / "square256.png")
    wide = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    ds = open_image_folder(tmp_path, preprocess="imagenet", class_index="names")
    assert ds.image_shape == (3, 224, 224)
    x, _ = ds[ds.paths.index(tmp_path / "a" / "square256.png")]
    # short side already 256: no resize, the crop is rows/cols 16..240 exactly
    assert torch.equal(x, torch.from_numpy(arr[16:240, 16:240]).permute(2, 0, 1).float() / 255)
    x, _ = ds[ds.paths.index(tmp_path / "a" / "wide.png")]
    assert x.shape == (3, 224, 224) and 0 <= float(x.min()) and float(x.max()) <= 1
    # auto: one size -> as stored; several sizes -> imagenet
    assert open_image_folder(tmp_path, preprocess="auto", class_index="names").preprocess == "imagenet"


def test_limit_reads_only_the_selected_files(tmp_path, monkeypatch):
    _class_tree(tmp_path, ["a", "b"], per_class=50)
    opened = set()
    real = streaming._inspect

    def spy(path, full):
        opened.add(path)
        return real(path, full)

    monkeypatch.setattr(streaming, "_inspect", spy)
    small = open_image_folder(tmp_path, preprocess="none", limit=7, seed=3)
    assert len(small) == 7 and opened == set(small.paths)
    large = open_image_folder(tmp_path, preprocess="none", limit=20, seed=3)
    assert set(small.paths) <= set(large.paths) and small.identity != large.identity
    again = open_image_folder(tmp_path, preprocess="none", limit=7, seed=3)
    assert again.identity == small.identity and again.paths == small.paths


def test_dataloader_workers_read_the_same_images(tmp_path):
    _class_tree(tmp_path, ["a", "b", "c"], per_class=4)
    ds = open_image_folder(tmp_path, preprocess="none")
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in range(len(ds))]))
    assert torch.equal(torch.cat(ys), ds.labels)


def test_a_file_that_breaks_after_the_check_is_named(tmp_path):
    _class_tree(tmp_path, ["a"], per_class=2)
    ds = open_image_folder(tmp_path, preprocess="none")
    ds.paths[1].write_bytes(b"now broken")
    with pytest.raises(BadImageError, match="img001.png"):
        ds[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[0][0].shape == (3, 30, 40)
