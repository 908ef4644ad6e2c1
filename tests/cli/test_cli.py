"""The command line end to end on sklearn digits with a tiny seeded model (no training)."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pyboundary import cli
from pyboundary.scans.margins import MarginScan

TINY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    (tmp_path / "tinymod_cli.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYBOUNDARY_CACHE", str(tmp_path / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return "tinymod_cli:build"


def _scan_args(out, model, *extra):
    return ["scan", "--model", model, "--data", "digits", "--subspaces", "dct:K=4,T=2", "--out", str(out),
            "--limit", "20", "--batch-size", "16", "--no-progress", *extra]


def test_scan_then_show(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert cli.main(_scan_args(out, tiny_model)) == 0
    text = capsys.readouterr().out
    assert "L2 margins in dct:K=4,T=2 (20 samples, 3 subspaces" in text and "med.wrong" in text
    for name in ("scan.sqlite", "summary.txt", "margins.png", "histograms.png"):
        assert (out / name).stat().st_size > 0
    scan = MarginScan.load(out / "scan.sqlite")
    assert scan.complete and scan.margins.shape == (20, 3) and scan.labels is not None
    assert scan.meta["model"]["name"] == tiny_model and scan.meta["data"]["name"] == "digits"
    assert bool(torch.isfinite(scan.margins).all())
    # show prints the same table and re-draws the plots
    assert cli.main(["show", str(out), "--no-plot"]) == 0
    shown = capsys.readouterr().out
    assert scan.format_summary() in shown
    assert (out / "summary.txt").read_text().strip() in text
    # resume of a complete scan: nothing recomputed, same results
    assert cli.main(_scan_args(out, tiny_model, "--resume")) == 0
    assert MarginScan.load(out / "scan.sqlite") == scan
    # the summary describes the latest run's batching (the grid stays the stored one)
    capsys.readouterr()
    assert cli.main(_scan_args(out, tiny_model, "--resume", "--batch-size", "4")) == 0
    assert "batches of 16 pairs (engine calls of 4), explicit" in capsys.readouterr().out
    # a store file of another name gets a plot folder of its own (two stores in one folder)
    shutil.copy(out / "scan.sqlite", tmp_path / "other.sqlite")
    assert cli.main(["show", str(tmp_path / "other.sqlite")]) == 0
    assert (tmp_path / "other-plots" / "margins.png").stat().st_size > 0
    assert not (tmp_path / "margins.png").exists()


def test_linf_scan(tmp_path, tiny_model, capsys):
    out = tmp_path / "linf"
    assert cli.main(_scan_args(out, tiny_model, "--p", "inf")) == 0
    assert "L-inf of subspace coordinates margins" in capsys.readouterr().out  # a DCT family
    assert MarginScan.load(out / "scan.sqlite").p == math.inf


@pytest.mark.parametrize("argv_tail, message", [
    (["--subspaces", "dct:K=40"], "larger than the image"),
    (["--subspaces", "bogus:1"], "unknown subspace spec"),
    (["--p", "3"], "--p must be 2 or inf"),
    (["--batch-size", "0"], "positive integer"),
    (["--data", "no-such-dataset"], "unknown dataset"),
    (["--overshoot", "-1"], "--overshoot"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bad_arguments_exit_2_without_traceback(tmp_path, tiny_model, capsys, argv_tail, message):
    args = _scan_args(tmp_path / "bad", tiny_model)
    for flag, value in zip(argv_tail[::2], argv_tail[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_refusals(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    assert cli.main(_scan_args(out, tiny_model)) == 0
    capsys.readouterr()
    assert cli.main(_scan_args(out, tiny_model)) == 2  # existing store without --resume
    assert "--resume" in capsys.readouterr().err
    other = _scan_args(out, tiny_model, "--resume")
    other[other.index("--subspaces") + 1] = "dct:K=2,T=2"
    assert cli.main(other) == 2
    err = capsys.readouterr().err
    assert "differing keys" in err and "subspaces" in err
    assert cli.main(["show", str(tmp_path / "nothing")]) == 2
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "scan.sqlite").write_bytes(b"garbage" * 300)
    assert cli.main(["show", str(junk)]) == 2
    assert "not a readable pyboundary result store" in capsys.readouterr().err


def test_cuda_refused_without_gpu(tmp_path, tiny_model, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(_scan_args(tmp_path / "c", tiny_model, "--device", "cuda")) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_parser_has_exactly_the_commands(capsys):
    parser = cli.build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert names == {"demo", "scan", "show", "compare", "detect", "curvature", "topology", "track", "reproduce"}
    assert cli.main(["--help"]) == 0
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2


@pytest.mark.parametrize("command", ["scan", "detect", "curvature", "topology"])
def test_shared_flags_have_one_meaning(command):
    """--model --data --split --limit --seed --device --batch-size --out --no-progress on every
    model-and-data command, with the same types and defaults of --batch-size (automatic)."""
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = {a.dest: a for a in sub._actions}
    for dest in ("model", "data", "split", "limit", "seed", "device", "batch_size", "out", "no_progress"):
        assert dest in flags, f"{command} lacks --{dest.replace('_', '-')}"
    assert flags["batch_size"].default is None and flags["split"].default == "test"


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_demo_runs_twice_and_resumes(tmp_path, monkeypatch, capsys):
    from pyboundary import zoo as models

    torch.manual_seed(0)
    untrained = models.build("lenet", (1, 28, 28), 10)  # stands in for the cached reference model
    monkeypatch.setattr(models, "reference_model", lambda *a, **k: untrained)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--limit", "3", "--no-progress", "--max-iter", "5"]
    assert cli.main(args) == 0
    first = MarginScan.load(out / "scan.sqlite")
    assert first.n_samples == 3 and first.n_subspaces == 21
    assert cli.main(args) == 0  # a second run resumes the finished scan instead of failing
    assert "resuming it" in capsys.readouterr().out
    assert MarginScan.load(out / "scan.sqlite") == first
    assert cli.main(args[:4] + ["4"] + args[5:]) == 2  # other settings: refused, nothing overwritten


def test_tight_scan_is_a_stored_parameter_and_labelled(tmp_path, tiny_model, capsys):
    plain_out, tight_out = tmp_path / "plain", tmp_path / "tight"
    assert cli.main(_scan_args(plain_out, tiny_model)) == 0
    assert cli.main(_scan_args(tight_out, tiny_model, "--tight")) == 0
    assert "tight L2 margins in dct:K=4,T=2" in capsys.readouterr().out
    plain, tight = MarginScan.load(plain_out), MarginScan.load(tight_out)
    assert tight.meta["params"]["tight"] is True and "tight" not in plain.meta["params"]
    assert tight.tight and not plain.tight and tight.summary()["tight"] is True
    ok = plain.converged & tight.converged
    assert bool((tight.margins[ok] <= plain.margins[ok] * (1 + 1e-9)).all())
    assert bool((tight.margins[ok] < plain.margins[ok] * 0.999).any())
    assert cli.main(["show", str(tight_out), "--no-plot"]) == 0
    assert "tight L2 margins" in capsys.readouterr().out
    # a resume must use the same setting: the plain run refuses --tight
    assert cli.main(_scan_args(plain_out, tiny_model, "--resume", "--tight")) == 2


def test_tight_classes_flag(tmp_path, tiny_model, capsys):
    assert cli.main(_scan_args(tmp_path / "bad", tiny_model, "--tight-classes", "1")) == 2
    assert "--tight-classes needs --tight" in capsys.readouterr().err
    assert cli.main(_scan_args(tmp_path / "zero", tiny_model, "--tight-classes", "0")) == 0  # 0 asks nothing
    out = tmp_path / "wide"
    assert cli.main(_scan_args(out, tiny_model, "--tight", "--tight-classes", "1")) == 0
    scan = MarginScan.load(out)
    assert scan.tight and scan.meta["params"]["tight_classes"] == 1
    # the engine's default is stored as the number it means, so a later default cannot mix runs
    out = tmp_path / "default"
    assert cli.main(_scan_args(out, tiny_model, "--tight")) == 0
    params = MarginScan.load(out).meta["params"]
    assert params["tight_classes"] == 2 and params["tight_class_ratio"] == 1.2
    assert cli.main(_scan_args(out, tiny_model, "--resume", "--tight", "--tight-classes", "0")) == 2
    assert cli.main(_scan_args(out, tiny_model, "--resume", "--tight", "--tight-classes", "2")) == 0


def test_allocator_tip_only_for_large_cpu_inputs_without_tcmalloc(tmp_path, tiny_model, capsys):
    from pyboundary.cli.scan import allocator_tip

    def missing(path):
        return False

    def tip(shape, device="cpu", environ=None, platform="linux", exists=missing):
        return allocator_tip(shape, device, environ={} if environ is None else environ, platform=platform,
                             exists=exists)

    assert "libtcmalloc-minimal4" in tip((3, 224, 224))
    assert tip((1, 28, 28)) is None
    assert tip((3, 224, 224), device="cuda") is None
    assert tip((3, 224, 224), environ={"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}) is None
    assert tip((3, 224, 224), environ={"PYBOUNDARY_MALLOC": "system"}) is None  # the user's choice
    assert tip((3, 224, 224), platform="darwin") is None
    assert tip((3, 224, 224), exists=lambda path: True) is None  # installed: the command uses it
    assert cli.main(_scan_args(tmp_path / "small", tiny_model)) == 0
    assert "tip:" not in capsys.readouterr().err  # 8x8 digits: no tip


def test_heavy_commands_choose_tcmalloc_when_installed():
    from pyboundary.cli import allocator

    lib = allocator.CANDIDATES[0]

    def only(path):
        return lambda candidate: candidate == path

    env = allocator.reexec_environment("scan", {"PATH": "/bin"}, platform="linux", exists=only(lib))
    assert env["LD_PRELOAD"] == lib and env["PATH"] == "/bin" and env[allocator._MARKER] == "1"
    kept = allocator.reexec_environment("detect", {"LD_PRELOAD": "/x/libfoo.so"}, platform="linux",
                                        exists=only(lib))
    assert kept["LD_PRELOAD"] == f"{lib} /x/libfoo.so"  # the user's preloads stay
    for command, environ, platform, exists in [
        ("show", {}, "linux", only(lib)),  # reads a store: nothing to gain
        ("scan", {"PYBOUNDARY_MALLOC": "system"}, "linux", only(lib)),
        ("scan", {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux", only(lib)),  # the user chose one
        ("scan", {allocator._MARKER: "1"}, "linux", only(lib)),  # already re-executed once
        ("scan", {}, "darwin", only(lib)),
        ("scan", {}, "linux", only("/nowhere")),  # not installed
    ]:
        assert allocator.reexec_environment(command, environ, platform=platform, exists=exists) is None, command
    with pytest.raises(ValueError, match="PYBOUNDARY_MALLOC must be"):
        allocator.reexec_environment("scan", {"PYBOUNDARY_MALLOC": "glibc"}, platform="linux", exists=only(lib))
    assert allocator.allocator_in_use({"LD_PRELOAD": f"{lib}"}) == "tcmalloc"
    assert allocator.allocator_in_use({}) == "system"


def test_an_in_process_call_is_never_re_executed(monkeypatch):
    from pyboundary.cli import allocator

    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(allocator, "reexec_environment", lambda command: {"LD_PRELOAD": "x"})
    monkeypatch.setattr(allocator.sys, "argv", ["/usr/bin/pytest", "scan"])
    allocator.maybe_reexec("scan")
    assert calls == []  # a program calling pyboundary.cli.main in-process keeps running
    monkeypatch.setattr(allocator.sys, "argv", ["/venv/bin/pyboundary", "scan", "--out", "d"])
    monkeypatch.setattr(allocator.sys, "orig_argv", ["python", "-u", "/venv/bin/pyboundary", "scan", "--out", "d"],
                        raising=False)
    allocator.maybe_reexec("scan")
    # the same interpreter options and program, under the new environment
    assert calls and calls[0][1][1:] == ["-u", "/venv/bin/pyboundary", "scan", "--out", "d"]
    monkeypatch.delattr(allocator.sys, "orig_argv", raising=False)  # Python 3.9: the module form
    allocator.maybe_reexec("scan")
    assert calls[1][1][1:] == ["-m", "pyboundary", "scan", "--out", "d"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux")
@pytest.mark.parametrize("choice", ["tcmalloc", "system"])
def test_the_scan_command_runs_under_the_chosen_allocator(tmp_path, tiny_model, choice):
    from pyboundary.cli import allocator

    if choice == "tcmalloc" and allocator.find_tcmalloc() is None:
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._MARKER)}
    env.update(PYBOUNDARY_MALLOC=choice, PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pyboundary", *_scan_args(tmp_path / "run", tiny_model)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"malloc: {choice})" in done.stdout


def test_scan_over_an_empty_store_left_by_a_killed_creation(tmp_path, tiny_model):
    """A run killed while it created scan.sqlite leaves an empty file: it holds no results, so a
    new scan (with or without --resume) takes it over instead of refusing."""
    for resume in ([], ["--resume"]):
        out = tmp_path / f"run{len(resume)}"
        out.mkdir()
        (out / "scan.sqlite").write_bytes(b"")
        assert cli.main(_scan_args(out, tiny_model, *resume)) == 0
        assert MarginScan.load(out / "scan.sqlite").complete
