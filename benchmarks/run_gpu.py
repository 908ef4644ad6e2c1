"""The GPU benchmarks in one command: ops, engine (grad_strategy, peers) and scan on a CUDA device.

    make bench-gpu                      # = .venv/bin/python benchmarks/run_gpu.py
    .venv/bin/python benchmarks/run_gpu.py --quick --device cpu --no-readme   # pipeline smoke run

Runs, each in its own process, with ``--device cuda``:
  1. benchmarks/bench_ops.py        compiled ops vs their twins (and the dense-basis projection)
  2. benchmarks/strategy_deepfool.py  grad_strategy 'loop' vs 'batched' (the engine's CUDA default)
  3. benchmarks/bench_deepfool.py   the engine vs foolbox / adv-lib / torchattacks / ART (wall time)
  4. benchmarks/bench_scan.py       margin scan vs the published per-image method
writes their raw outputs under --out (default out/bench-gpu/) and replaces the text between the
``gpu-benchmarks`` markers of benchmarks/README.md with the tables, the GPU, torch and the date.
It refuses to run on a machine without CUDA or without the compiled CUDA kernels (build them with
a CUDA torch and CUDA_HOME set: `make setup`); a failed step is reported in the section and makes
the exit status non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- gpu-benchmarks:begin -->", "<!-- gpu-benchmarks:end -->"


def _run(cmd: list[str], log: Path, timeout: int) -> tuple[int, str]:
    """Run one benchmark step; its stdout+stderr go to `log`; returns (exit status, stdout)."""
    print("run-gpu:", " ".join(cmd), flush=True)
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}")
        return 124, ""
    log.write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    return res.returncode, res.stdout


def ops_table(bench_json: Path) -> str:
    """Markdown table of bench_ops.py's pytest-benchmark JSON: min ms per contender and group."""
    data = json.loads(bench_json.read_text())
    groups: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        impl = b["params"].get("impl", b["name"])
        groups.setdefault(b["group"], {})[impl] = 1000 * b["stats"]["min"]
    lines = ["| op, shape (batch 64, float32) | compiled ms | twin ms | dense basis ms | twin / compiled |",
             "|---|---|---|---|---|"]
    for group in sorted(groups):
        g = groups[group]
        comp, twin, dense = g.get("compiled"), g.get("twin"), g.get("dense-basis")
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        ratio = "-" if comp is None or twin is None else f"{twin / comp:.1f}x"
        lines.append(f"| {group.replace(' b64', '')} | {fmt(comp)} | {fmt(twin)} | {fmt(dense)} | {ratio} |")
    return "\n".join(lines)


def _machine(device: str) -> str:
    import torch

    sys.path.insert(0, str(ROOT))
    from pyboundary import ops

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU (CPU run)"
    return (f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); pyboundary ops "
            f"{ops.backend()['ops']}, CUDA kernels {ops.backend()['cuda_kernels']}")


def _check_device(device: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from pyboundary import ops

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("run-gpu: no CUDA device (torch.cuda.is_available() is False)")
        if not ops.backend()["cuda_kernels"]:
            sys.exit("run-gpu: the compiled library has no CUDA kernels (rebuild with a CUDA torch and "
                     f"CUDA_HOME set, e.g. `make clean-build setup`); backend: {ops.backend()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-gpu"))
    ap.add_argument("--readme", default=str(HERE / "README.md"))
    ap.add_argument("--no-readme", action="store_true", help="only write the outputs under --out")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not a measurement")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per step")
    args = ap.parse_args(argv)
    _check_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    n, n_pub, n_scan = (40, 1, 8) if args.quick else (500, 4, 60)

    sections, failed = [], []

    ops_cmd = [py, "-m", "pytest", "benchmarks/bench_ops.py", "-o", "python_files=bench_*.py", "-q", "-p",
               "no:cacheprovider", f"--device={args.device}", f"--benchmark-json={out / 'bench_ops.json'}"]
    if args.quick:
        ops_cmd += ["-k", "28x28 and not dense"]
    rc, _ = _run(ops_cmd, out / "bench_ops.log", args.timeout)
    if rc == 0:
        sections.append(f"Compiled ops vs twins (`bench_ops.py --device {args.device}`, min over rounds, each "
                        "call timed to completion):\n\n" + ops_table(out / "bench_ops.json"))
    else:
        failed.append("bench_ops.py")

    steps = [
        ("strategy_deepfool.py", "grad_strategy 'loop' vs 'batched' (`strategy_deepfool.py`, LeNet / "
         "Fashion-MNIST, batch 100; wall time on cuda)",
         [py, "benchmarks/strategy_deepfool.py", f"--device={args.device}", f"--n={n}"]),
        ("bench_deepfool.py", "Engine vs peers (`bench_deepfool.py`; wall time on cuda)",
         [py, "benchmarks/bench_deepfool.py", f"--device={args.device}", f"--n={n}", "--repeats=3",
          f"--json={out / 'bench_deepfool.json'}"] + (["--skip=art,torchattacks"] if args.quick else [])),
        ("bench_scan.py", "Margin scan vs the published per-image method (`bench_scan.py`, wall time; "
         "the pairs/CPU-s columns do not apply on a GPU)",
         [py, "benchmarks/bench_scan.py", f"--device={args.device}", "--threads", "1", f"--n={n_scan}",
          f"--n-published={n_pub}"]),
    ]
    for name, title, cmd in steps:
        rc, stdout = _run(cmd, out / (name.replace(".py", ".log")), args.timeout)
        if rc == 0:
            body = stdout.strip()
            sections.append(f"{title}:\n\n" + (body if body.startswith("|") or "\n|" in body else f"```\n{body}\n```"))
        else:
            failed.append(name)
            sections.append(f"{title}: **failed** (exit status {rc}, see `{out / name.replace('.py', '.log')}`)")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join([f"Measured {stamp} by `make bench-gpu` ({'QUICK smoke run, not a measurement; ' if args.quick else ''}"
                        f"device {args.device}): {_machine(args.device)}.", *sections])
    (out / "gpu_section.md").write_text(text + "\n")
    print(f"run-gpu: tables in {out / 'gpu_section.md'}")
    if not args.no_readme:
        readme = Path(args.readme)
        src = readme.read_text()
        if BEGIN not in src or END not in src:
            print(f"run-gpu: {readme} has no {BEGIN} ... {END} markers; section not written", file=sys.stderr)
            return 1
        head, rest = src.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"run-gpu: updated the GPU section of {readme}")
    if failed:
        print(f"run-gpu: FAILED steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
