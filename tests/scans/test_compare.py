"""pyboundary.compare: scans of different models side by side, bootstrap differences, refusals."""

import math

import numpy as np
import pytest
import torch

import pyboundary as pb
from pyboundary.scans.comparison import ScanComparison, compare
from digits_models import digits, digits_mlp, one_thread_module  # noqa: F401

FAMILY = "dct:K=4,T=1"  # 5 diagonal 4x4 DCT blocks of the 8x8 digits


def _subset(seed: int, n: int = 200):
    ds = digits("test")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ds.subset(idx)


@pytest.fixture(scope="module")
def scans():
    """Standard and PGD-trained digits MLPs on the whole test split (450 images), and the
    standard one on two seeded subsets of 200 images (overlapping in ~90)."""
    ds = digits("test")
    std, robust = digits_mlp(seed=0), digits_mlp(seed=0, robust=True)
    kw = dict(progress=False, batch_size=512)
    return {
        "standard": pb.margin_scan(std, ds, FAMILY, model_name="mlp standard", **kw),
        "robust": pb.margin_scan(robust, ds, FAMILY, model_name="mlp pgd", **kw),
        "subset1": pb.margin_scan(std, _subset(1), FAMILY, model_name="mlp standard", **kw),
        "subset2": pb.margin_scan(std, _subset(2), FAMILY, model_name="mlp standard", **kw),
        "coarse": pb.margin_scan(std, ds, "dct:K=4,T=2", model_name="mlp standard", **kw),
    }


def test_two_models_table_and_significant_difference(scans):
    a, b = scans["standard"], scans["robust"]
    comp = compare([a, b])
    assert comp.names == ["mlp standard", "mlp pgd"] and comp.samples == "same"
    assert comp.median.shape == (2, 5) and comp.difference.shape == (1, 5)
    # the table's statistics are the scans' own summaries
    for r, scan in enumerate((a, b)):
        rows = [row for row in scan.subspace_stats() if row["group"] == "all"]
        np.testing.assert_allclose(comp.median[r], [row["median"] for row in rows], rtol=1e-12)
        np.testing.assert_allclose(comp.p5[r], [row["p5"] for row in rows], rtol=1e-12)
        np.testing.assert_allclose(comp.p95[r], [row["p95"] for row in rows], rtol=1e-12)
        assert comp.n_converged[r].tolist() == [row["n_converged"] for row in rows]
    np.testing.assert_allclose(comp.ratio[1], comp.median[1] / comp.median[0], rtol=1e-12)
    np.testing.assert_allclose(comp.difference[0], comp.median[1] - comp.median[0], rtol=1e-12)
    # PGD training widens the margins in every block, and the CI says so
    assert bool((comp.ci_low[0] > 0).all()) and bool(comp.significant.all())
    assert bool(((comp.ci_low <= comp.difference) & (comp.difference <= comp.ci_high)).all())
    text = comp.format_summary()
    assert "mlp pgd" in text and text.count(" *") == 5 and "paired, same samples" in text
    # pairing pays off: the paired CI is narrower than the unpaired one on the same data
    unpaired = compare([a, b], samples="independent")
    assert bool(((comp.ci_high - comp.ci_low) < (unpaired.ci_high - unpaired.ci_low)).all())


def test_model_against_itself_on_other_samples_covers_zero(scans):
    s1, s2 = scans["subset1"], scans["subset2"]
    comp = compare([s1, s2], samples="independent")
    assert not bool(comp.significant.any())  # same model: no difference the data can support
    assert bool(((comp.ci_low < 0) & (comp.ci_high > 0)).all())
    assert comp.names == ["mlp standard (#0)", "mlp standard (#1)"]  # repeated names told apart
    # the same seeds give the same intervals; another seed other (resampling is seeded)
    again = compare([s1, s2], samples="independent")
    np.testing.assert_array_equal(again.ci_low, comp.ci_low)
    other = compare([s1, s2], samples="independent", seed=1)
    assert not np.array_equal(other.ci_low, comp.ci_low)


def test_refusals_say_what_differs(scans):
    std = scans["standard"]
    with pytest.raises(ValueError, match=r"different subspace families: 'dct:K=4,T=1' \(5 members\) vs "
                                         r"'dct:K=4,T=2' \(3 members\)"):
        compare([std, scans["coarse"]])
    with pytest.raises(ValueError, match=r"hold different samples: digits \(identity \w+, 200 samples\) vs "
                                         r"digits \(identity \w+, 200 samples\).*samples='common'"):
        compare([scans["subset1"], scans["subset2"]])
    with pytest.raises(ValueError, match="hold different samples"):
        compare([std, scans["subset1"]])
    broken = pb.MarginScan(**{**std.__dict__, "margins": std.margins.clone()})
    broken.margins[3, 2] = math.nan
    with pytest.raises(ValueError, match=r"incomplete \(2249 of 2250 pairs computed\).*--resume"):
        compare([std, broken])
    with pytest.raises(ValueError, match="at least two scans"):
        compare([std])
    with pytest.raises(TypeError, match="sequence of MarginScan"):
        compare(std)
    with pytest.raises(TypeError, match=r"scans\[1\] must be a MarginScan"):
        compare([std, 3])
    with pytest.raises(ValueError, match="samples must be one of"):
        compare([std, std], samples="paired")
    with pytest.raises(ValueError, match="n_boot"):
        compare([std, std], n_boot=10)
    with pytest.raises(ValueError, match="confidence"):
        compare([std, std], confidence=95)
    with pytest.raises(ValueError, match="one entry per scan"):
        compare([std, std], names=["a"])


def test_identical_runs_and_failures_left_out(scans):
    std = scans["standard"]
    comp = compare([std, std], names=["a", "b"], n_boot=200)
    assert bool((comp.difference == 0).all()) and bool((comp.ci_low == 0).all() and (comp.ci_high == 0).all())
    # a failed pair (margin inf, not converged) is counted and left out of the statistics
    failed = pb.MarginScan(**{**std.__dict__, "margins": std.margins.clone(), "converged": std.converged.clone()})
    failed.margins[:10, 0] = math.inf
    failed.converged[:10, 0] = False
    comp = compare([std, failed], n_boot=200)
    assert comp.n_converged[:, 0].tolist() == [450, 440]
    assert comp.median[1, 0] == pytest.approx(float(np.median(std.margins[10:, 0].numpy())), rel=1e-12)


def test_protocol_save_load_pandas_plot(scans, tmp_path):
    comp = compare([scans["standard"], scans["robust"]], n_boot=200)
    s = comp.summary()
    assert s["samples"] == "same" and len(s["rows"]) == 10 and s["rows"][1]["significant"] is True
    frame = comp.to_pandas()
    assert list(frame["name"][:2]) == ["mlp standard", "mlp pgd"] and len(frame) == 10
    comp.save(tmp_path / "c.json")
    back = ScanComparison.load(tmp_path / "c.json")
    for name, text in (("bad.json", "not json"), ("list.json", "[1, 2]"),
                       ("cut.json", (tmp_path / "c.json").read_text()[:100])):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}' (is not a readable saved|does not hold a) scan comparison"):
            ScanComparison.load(tmp_path / name)
    for k, v in comp.to_numpy().items():
        w = back.to_numpy()[k]
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, w)
        else:
            assert v == w, k
    with pytest.raises(FileExistsError):
        comp.save(tmp_path / "c.json")
    png = comp.plot(tmp_path / "compare.png")
    assert png.stat().st_size > 10_000


def test_common_samples(scans):
    s1, s2 = scans["subset1"], scans["subset2"]
    k1, k2 = s1.sample_keys.numpy(), s2.sample_keys.numpy()
    shared = sorted(set(k1.tolist()) & set(k2.tolist()))
    assert 50 < len(shared) < 150
    comp = compare([s1, s2], samples="common", n_boot=200)
    assert comp.n_samples.tolist() == [len(shared)] * 2 and comp.samples == "common"
    # the same model on the same images: the same margins (to float noise of other batch mates)
    np.testing.assert_allclose(comp.median[1], comp.median[0], rtol=1e-6)
    assert bool((np.abs(comp.ci_high - comp.ci_low) < 1e-5 * comp.median[0]).all())
    # the rows compared are the shared images, in the first run's order
    pos1 = [int(np.flatnonzero(k1 == k)[0]) for k in k1 if k in set(shared)]
    np.testing.assert_allclose(comp.median[0], np.median(s1.margins.numpy()[pos1], axis=0), rtol=1e-12)
    no_keys = pb.MarginScan(**{**s2.__dict__, "sample_keys": None})
    with pytest.raises(ValueError, match=r"needs per-sample keys, which runs \['mlp standard \(#1\)'\] do not have"):
        compare([s1, no_keys], samples="common")
    far = pb.MarginScan(**{**s2.__dict__, "sample_keys": s2.sample_keys + 1})
    with pytest.raises(ValueError, match="0 sample"):
        compare([s1, far], samples="common")


def test_tight_and_plain_runs_are_labelled(scans, tmp_path):
    ds = digits("test").subset(torch.arange(40))
    std = digits_mlp(seed=0)
    kw = dict(progress=False, batch_size=512, model_name="mlp standard")
    plain = pb.margin_scan(std, ds, FAMILY, **kw)
    tight = pb.margin_scan(std, ds, FAMILY, deepfool_kwargs={"tight": True, "tight_classes": 0}, **kw)
    comp = compare([plain, tight], names=["plain", "tight"], n_boot=100)
    assert comp.tight == [False, True] and comp.summary()["tight"] == [False, True]
    text = comp.format_summary()
    assert "plain (L2 margins" in text and "tight (tight L2 margins" in text
    assert "tight runs measure the nearest boundary point found" in text
    assert bool((comp.ratio[1] <= 1 + 1e-9).all())  # tight medians never above DeepFool's
    comp.save(tmp_path / "c.json")
    assert ScanComparison.load(tmp_path / "c.json").tight == [False, True]
    # a comparison saved before the field existed still loads (no tight marks)
    import json
    data = json.loads((tmp_path / "c.json").read_text())
    del data["tight"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = ScanComparison.load(tmp_path / "old.json")
    assert old.tight == [] and "L2 margins" in old.format_summary()
