"""Margin-scan throughput at 224x224x3: ours vs the published per-image method, 1 and 2 processes.

Model ``efficientnet-lite0`` (pretrained ImageNet-1k, 4.65M parameters), foolbox's ImageNet samples
(``foolbox-imagenet``, 224x224 RGB in [0, 1]; the seeded ``--limit`` subset of ``pyboundary scan``),
family ``dct:K=16,T=16`` (14 diagonal 16x16 DCT blocks per channel, 768 dimensions each), L2.

Rows, in three fresh processes each (so each has its own memory peak):

* **ours, 1 process**: ``margin_scan`` of ``n`` images x 14 members with the defaults (automatic
  batch size from the memory probe, channels-last copy, refinement on), as ``pyboundary scan``
  runs it; the probe's time is included;
* **ours, 2 processes**: ``torchrun --standalone --nproc_per_node=2 -m pyboundary scan ...`` on the
  same images (torchrun gives each rank 1 thread);
* **published**: the per-image method of ``bench_scan.py`` (one image and one member at a time,
  a dense 150528 x 768 basis per member: 462 MB; 1 forward + 10 reverse + 1 forward rows per
  iteration) on the first ``n_published`` images x members ``--members`` (basis construction
  excluded from its time).

Columns: pairs per wall second, CPU seconds per pair (user + system of the process tree), forward
and reverse model rows per pair (ours from the engine's trace, published by counting), median
margin, peak resident memory per process (VmHWM, polled), and the ratio to the published method.
Margins are compared on the pairs both computed.

Run (from the repo root; ~10 min on the shared 2-core machine; results: benchmarks/README.md):
    nice -n 10 .venv/bin/python benchmarks/bench_scan_imagenet.py --n 4 --n-published 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = "dct:K=16,T=16"
MODEL = "efficientnet-lite0"
DATA = "foolbox-imagenet"


# ------------------------------------------------------------------------------ workers
def _load(n: int):
    from pyboundary import zoo

    ds = zoo.load_dataset(DATA, limit=n, seed=0)
    return zoo.load_model(MODEL), ds


def _rows_counter():
    """Patch the scan's engine to add up forward and reverse model rows from each call's trace."""
    from pyboundary.scans import margins

    totals = {"forward": 0, "reverse": 0}
    real = margins._engine()

    def counting(*args, **kwargs):
        res = real(*args, **kwargs)
        totals["forward"] += sum(rows for rows, _ in res.trace)
        totals["reverse"] += sum(rows * passes for rows, passes in res.trace)
        return res

    margins._engine = lambda: counting
    return totals


def worker_ours(n: int, threads: int, batch_size: int | None) -> dict:
    import torch

    from pyboundary.scans.margins import margin_scan

    torch.set_num_threads(threads)
    model, ds = _load(n)
    rows = _rows_counter()
    t0, c0 = time.perf_counter(), time.process_time()
    scan = margin_scan(model, ds, SPEC, batch_size=batch_size, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    pairs = scan.margins.numel()
    return {"pairs": pairs, "wall": wall, "cpu": cpu, "forward_rows": rows["forward"] / pairs,
            "reverse_rows": rows["reverse"] / pairs, "margins": scan.margins.tolist(),
            "batch": scan.meta.get("batching", {}), "converged": int(scan.converged.sum())}


def worker_published(n_published: int, members: list, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_scan import dense_basis, published_subspace_deepfool

    from pyboundary._utils.model import model_guard
    from pyboundary.subspaces import parse_subspaces

    torch.set_num_threads(threads)
    model, ds = _load(n_published)
    family = parse_subspaces(SPEC, tuple(ds.x.shape[1:]))
    counts = {"forward": 0, "reverse": 0}
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *a, **k):
        counts["reverse"] += 1  # one scalar output of a one-image graph: one reverse row
        return real_grad(outputs, inputs, *a, **k)

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            counts["forward"] += x.shape[0]
            return self.inner(x)

    counted = Counting(model)
    margins, wall, cpu = {}, 0.0, 0.0
    torch.autograd.grad = counting_grad
    try:
        with model_guard(counted):
            for j in members:
                basis = dense_basis(family, j)  # excluded from the time (as in bench_scan.py)
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(n_published):
                    margins[f"{i},{j}"] = published_subspace_deepfool(counted, ds.x[i:i + 1], basis)
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
                del basis
    finally:
        torch.autograd.grad = real_grad
    pairs = len(margins)
    return {"pairs": pairs, "wall": wall, "cpu": cpu, "forward_rows": counts["forward"] / pairs,
            "reverse_rows": counts["reverse"] / pairs, "margins": margins}


# ------------------------------------------------------------------------------ orchestration
def _descendants(pid: int) -> list:
    children, out = {}, []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    stack = [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_watched(cmd: list, env: dict) -> dict:
    """Run ``cmd``; poll the peak RSS (VmHWM) of it and its descendants; CPU time of the tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            hwm = _hwm(pid)
            if hwm is not None:
                peaks[pid] = max(peaks.get(pid, 0), hwm)
        time.sleep(0.25)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    # the python processes (not torchrun's launcher shell) with their peaks, largest first
    return {"stdout": out, "stderr": err, "wall": wall, "peaks": sorted(peaks.values(), reverse=True)}


def _worker_cmd(*args) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", *map(str, args)]


def _tree_cpu(before) -> float:
    now = os.times()
    return (now.children_user - before.children_user) + (now.children_system - before.children_system)


def measure(n=4, n_published=2, members=(0, 7, 13), threads=2, nproc=2, batch_size=None, torchrun=True) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = {}
    before = os.times()
    r = run_watched(_worker_cmd("ours", n, threads, batch_size or 0), env)
    rows["ours, 1 process"] = {**json.loads(r["stdout"].strip().splitlines()[-1]),
                               "peak": r["peaks"][0], "tree_cpu": _tree_cpu(before)}
    before = os.times()
    r = run_watched(_worker_cmd("published", n_published, threads, ",".join(map(str, members))), env)
    rows["published"] = {**json.loads(r["stdout"].strip().splitlines()[-1]), "peak": r["peaks"][0]}
    if torchrun and nproc > 1:
        with tempfile.TemporaryDirectory() as tmp:
            before = os.times()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "pyboundary", "scan", "--model", MODEL, "--data", DATA, "--subspaces", SPEC,
                   "--limit", str(n), "--out", str(Path(tmp) / "run"), "--no-progress"]
            if batch_size:
                cmd += ["--batch-size", str(batch_size)]
            r = run_watched(cmd, {**env, "OMP_NUM_THREADS": "1"})
            cpu = _tree_cpu(before)
            scanned = [line for line in r["stdout"].splitlines() if line.startswith("scanned ")]
            pairs, secs = int(scanned[-1].split()[1]), float(scanned[-1].split()[4])
            # the ranks are the processes with the largest peaks (the launcher is small)
            rows[f"ours, {nproc} processes (torchrun)"] = {"pairs": pairs, "wall": secs, "cpu": cpu,
                                                             "peak": r["peaks"][:nproc], "stdout": r["stdout"]}
    return {"n": n, "n_published": n_published, "members": list(members), "threads": threads, "rows": rows}


def _median(values) -> float:
    import statistics

    finite = [v for v in values if v == v and v != float("inf")]
    return statistics.median(finite) if finite else float("nan")


def format_table(res: dict) -> str:
    rows = res["rows"]
    pub = rows["published"]
    pub_rate = pub["pairs"] / pub["wall"]
    gib = 2**30
    lines = [f"EfficientNet-Lite0, {DATA}, {SPEC}, L2; ours: {res['n']} images x 14 members; published: "
             f"{res['n_published']} images x members {res['members']}; {res['threads']} threads per process "
             f"(torchrun: 1 per rank)",
             "| run | pairs | pairs/s | CPU-s/pair | fwd rows/pair | rev rows/pair | median margin | "
             "peak RSS per process | pairs/s vs published |",
             "|---|---|---|---|---|---|---|---|---|"]
    ours_m = rows["ours, 1 process"]["margins"]
    for name, r in rows.items():
        rate = r["pairs"] / r["wall"]
        peak = r["peak"] if isinstance(r["peak"], list) else [r["peak"]]
        if "margins" in r:
            values = r["margins"].values() if isinstance(r["margins"], dict) else [v for row in r["margins"] for v in row]
            med = f"{_median(list(values)):.3f}"
        else:
            med = "(same pairs)"
        fwd = f"{r['forward_rows']:.1f}" if "forward_rows" in r else "-"
        rev = f"{r['reverse_rows']:.1f}" if "reverse_rows" in r else "-"
        lines.append(f"| {name} | {r['pairs']} | {rate:.3f} | {r['cpu'] / r['pairs']:.2f} | {fwd} | {rev} | {med} | "
                     + " + ".join(f"{p / gib:.2f} GiB" for p in peak) + f" | {rate / pub_rate:.1f}x |")
    shared = [(ours_m[int(k.split(',')[0])][int(k.split(',')[1])], v) for k, v in pub["margins"].items()]
    ratios = sorted(b / a for a, b in shared if a > 0 and a != float("inf") and b != float("inf"))
    if ratios:
        lines.append(f"median margin published/ours on the {len(ratios)} shared pairs: {ratios[len(ratios) // 2]:.3f}")
    batch = rows["ours, 1 process"].get("batch") or {}
    if batch:
        lines.append(f"ours, 1 process: batch of {batch.get('batch_size')} pairs ({batch.get('source')}), "
                     f"probe estimate {batch.get('per_row_bytes', 0) / 2**20:.0f} MiB per pair")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=4, help="images scanned by ours (x 14 members)")
    ap.add_argument("--n-published", type=int, default=2, help="images run by the published method")
    ap.add_argument("--members", type=int, nargs="+", default=[0, 7, 13], help="members for the published method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (1: skip)")
    ap.add_argument("--batch-size", type=int, default=None, help="ours: pairs per batch (default: automatic)")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.worker:
        kind, *rest = a.worker
        if kind == "ours":
            out = worker_ours(int(rest[0]), int(rest[1]), int(rest[2]) or None)
        else:
            out = worker_published(int(rest[0]), [int(m) for m in rest[2].split(",")], int(rest[1]))
        print(json.dumps(out))
        return 0
    res = measure(a.n, a.n_published, tuple(a.members), a.threads, a.nproc, a.batch_size, torchrun=a.nproc > 1)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
