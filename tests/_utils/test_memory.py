"""The batch-size estimator (pyboundary._utils.memory and .batching): probe, budget, refusal, back-off."""

import os

import pytest
import torch

from pyboundary._utils import batching
from pyboundary._utils import memory as mem
from pyboundary._utils.batching import BackoffState, MemoryBudgetError, map_with_backoff, plan_batch_size
from pyboundary._utils.memory import measure_peak, parse_memory_budget

MiB = 2**20

needs_proc = pytest.mark.skipif(not mem.cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")


class WideLinear(torch.nn.Module):
    """16 -> WIDTH -> 1: each row's activations are WIDTH float32 values (1 MiB at 2^18), and
    its backward pass keeps a few of those: memory per row is known up to a small factor and
    dominates everything else."""

    WIDTH = 2**18

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, self.WIDTH)

    def forward(self, x):
        return torch.tanh(self.up(x)).sum(1, keepdim=True)


def _work(model, x):
    def run(r):
        xi = x[:r].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi).sum(), xi)
        return g.sum().item()
    return run


@needs_proc
def test_measure_peak_sees_a_touched_allocation():
    def fn():
        t = torch.ones(64 * MiB // 4)  # 64 MiB written
        return float(t[-1])
    peak = measure_peak(fn, "cpu")
    assert 60 * MiB < peak < 80 * MiB


_PRELOADS = {"tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
             "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
_AFTER_A_FREED_PHASE = """
import torch
from pyboundary._utils import memory as mem
earlier = [torch.ones(3 * 2**18).add_(1) for _ in range(150)]  # an earlier phase: 450 MiB, freed
del earlier
print(mem.measure_peak(lambda: [torch.ones(3 * 2**18).add_(1) for _ in range(100)]) / 2**20)
"""


@needs_proc
@pytest.mark.parametrize("allocator", [None, "tcmalloc", "jemalloc"])
def test_measure_peak_counts_memory_a_caching_allocator_kept_from_an_earlier_phase(allocator):
    """A preloaded tcmalloc keeps freed pages: a probe served from them did not grow the resident
    set and measured ~0 (a second probe in one process, e.g. the mean curvature after the principal
    curvatures, then chose the largest batch). The measurement hands them back first."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator is not None:
        if not os.path.exists(_PRELOADS[allocator]):
            pytest.skip(f"{allocator} is not installed ({_PRELOADS[allocator]})")
        env["LD_PRELOAD"] = _PRELOADS[allocator]
    out = subprocess.run([sys.executable, "-c", _AFTER_A_FREED_PHASE], env=env, capture_output=True, text=True,
                         check=True)
    assert 280 <= float(out.stdout.strip()) <= 330  # 300 MiB touched


@needs_proc
def test_auto_batch_within_factor_two_of_the_true_maximum():
    torch.manual_seed(0)
    model = WideLinear()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(256, 16)
    run = _work(model, x)
    budget = 96 * MiB
    plan = plan_batch_size(run, 256, device="cpu", memory_budget=budget, unit="rows")
    assert plan.source == "auto" and plan.need <= budget
    # Each row keeps WIDTH float32 values (1 MiB) for the pre-activation, the tanh output and the
    # gradient: 2-3 MiB per row at the peak (2 when the allocator reuses a freed block), so the
    # true maximum under 96 MiB is between 32 and 48 rows.
    assert 1.5 * MiB <= plan.per_row <= 4 * MiB
    assert 48 / 2 <= plan.batch_size * 1.5 and plan.batch_size <= 48, plan
    assert 32 / 2 <= plan.batch_size
    # and a batch of the chosen size, measured, stays within the budget
    assert measure_peak(lambda: run(plan.batch_size), "cpu") <= budget


def _counted_work(model, x):
    """(run, calls): _work(model, x) that records the rows of each call in calls."""
    calls = []

    def run(r):
        calls.append(r)
        return _work(model, x)(r)

    return run, calls


@needs_proc
def test_explicit_batch_above_the_budget_is_refused_before_the_work():
    model = WideLinear()
    run, calls = _counted_work(model, torch.randn(512, 16))

    with pytest.raises(MemoryBudgetError, match=r"batch_size=512 cannot fit.*needs an estimated .*GiB.*"
                                                r"memory budget of 64\.0 MiB.*batch_size <= \d+"):
        plan_batch_size(run, 512, device="cpu", batch_size=512, memory_budget=64 * MiB)
    assert max(calls) <= 4  # only probe rows ran
    ok = plan_batch_size(run, 512, device="cpu", batch_size=8, memory_budget=64 * MiB)
    assert ok.batch_size == 8 and ok.source == "explicit"


@needs_proc
def test_forward_only_work_is_planned_against_the_budget():
    """Forward-only work (predict, topology, noise accuracy) fits the memory budget from a probe of
    forward passes, made once per model and input shape, instead of 256 unchecked rows (~6 GB at
    224x224 on ImageNet models); an explicit size that cannot fit is refused before the work."""
    from pyboundary._utils.model import forward_batch_size, predict

    class Wide(WideLinear):  # ~2 MiB of activations per row, two logits
        def forward(self, x):
            s = super().forward(x)
            return torch.cat([s, -s], 1)

    model = Wide()
    rows = []
    model.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape[0]))
    x = torch.randn(300, 16)
    auto = forward_batch_size(model, x, memory_budget=64 * MiB)
    assert 4 <= auto < 64 and rows and max(rows) <= 4  # only probe rows ran
    rows.clear()
    assert forward_batch_size(model, x, memory_budget=64 * MiB) == auto and not rows  # the probe is reused
    with pytest.raises(MemoryBudgetError, match="batch_size=256 cannot fit"):
        forward_batch_size(model, x, 256, memory_budget=64 * MiB)
    assert predict(model, x[:10], batch_size=3).shape == (10,) and max(rows) == 3



def test_forward_only_work_where_memory_cannot_be_measured(monkeypatch):
    """No resettable /proc peak (macOS): forward-only work takes the default size silently (the
    differentiating pipelines warn there), and an explicit size is kept."""
    import warnings

    from pyboundary._utils import model as model_utils

    monkeypatch.setattr(model_utils, "cpu_peak_supported", lambda: False)
    net = torch.nn.Linear(16, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_utils.forward_batch_size(net, torch.randn(5, 16)) == batching.DEFAULT_BATCH_SIZE
        assert model_utils.forward_batch_size(net, torch.randn(5, 16), 7) == 7
        assert model_utils.forward_batch_size(net, torch.randn(0, 16)) == batching.DEFAULT_BATCH_SIZE


def test_small_work_is_not_probed_and_off_skips_the_probe():
    def run(r):  # pragma: no cover - must not be called
        raise AssertionError("probed")

    assert plan_batch_size(run, 3, device="cpu").source == "all"
    plan = plan_batch_size(run, 1000, device="cpu", memory_budget="off", default=256)
    assert (plan.batch_size, plan.source) == (256, "unchecked")
    assert plan_batch_size(run, 1000, device="cpu", memory_budget="off", batch_size=7).batch_size == 7


@needs_proc
def test_a_probe_is_reused_per_owner_and_key():
    model = WideLinear()
    run, calls = _counted_work(model, torch.randn(512, 16))

    first = plan_batch_size(run, 512, device="cpu", memory_budget=64 * MiB, reuse=(model, ("a", 16)))
    n_probe = len(calls)
    assert n_probe == 3  # warm-up and the two measured sizes
    again = plan_batch_size(run, 512, device="cpu", memory_budget=64 * MiB, reuse=(model, ("a", 16)))
    assert len(calls) == n_probe and again.per_row == first.per_row and again.batch_size == first.batch_size
    # the budget is re-read: the same probe, another budget, another size (and an explicit size is checked)
    assert plan_batch_size(run, 512, device="cpu", memory_budget=16 * MiB,
                           reuse=(model, ("a", 16))).batch_size < first.batch_size
    with pytest.raises(MemoryBudgetError):
        plan_batch_size(run, 512, device="cpu", batch_size=512, memory_budget=64 * MiB, reuse=(model, ("a", 16)))
    assert len(calls) == n_probe
    # another key, another owner, or no reuse: probed again
    plan_batch_size(run, 512, device="cpu", memory_budget=64 * MiB, reuse=(model, ("b", 16)))
    plan_batch_size(run, 512, device="cpu", memory_budget=64 * MiB, reuse=(WideLinear(), ("a", 16)))
    plan_batch_size(run, 512, device="cpu", memory_budget=64 * MiB)
    assert len(calls) == 4 * n_probe
    # owners are held weakly
    from pyboundary._utils import batching
    owner = WideLinear()
    plan_batch_size(run, 512, device="cpu", memory_budget=64 * MiB, reuse=(owner, ("a", 16)))
    assert owner in batching._PROBES
    import gc
    gc.collect()  # owners left unreferenced by earlier tests go first
    n_owners = len(batching._PROBES)
    del owner
    gc.collect()
    assert len(batching._PROBES) == n_owners - 1


@needs_proc
def test_deepfool_probes_once_per_model_and_shape():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    rows = []
    model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    x = torch.rand(40, 1, 8, 8)
    from pyboundary.attacks.deepfool import deepfool

    def model_rows(**kw):
        rows.clear()
        res = deepfool(model, x, batch_size=20, **kw)
        return sum(rows), res

    unprobed, ref = model_rows(memory_budget="off")
    first, a = model_rows()
    second, b = model_rows()
    assert first > unprobed and second == unprobed  # the probe ran in the first call only
    assert torch.equal(a.margin, ref.margin) and torch.equal(b.margin, ref.margin)
    unprobed_inf, _ = model_rows(p="inf", memory_budget="off")
    assert model_rows(p="inf")[0] > unprobed_inf  # other options: probed again
    assert model_rows(p="inf")[0] == unprobed_inf


def test_parse_memory_budget():
    assert parse_memory_budget(None) is None
    assert parse_memory_budget("off") == "off" and parse_memory_budget(False) == "off"
    assert parse_memory_budget("6GB") == 6 * 10**9
    assert parse_memory_budget("6G") == parse_memory_budget("6GiB") == 6 * 2**30
    assert parse_memory_budget("512 MiB") == 512 * MiB
    assert parse_memory_budget(1000) == 1000
    assert parse_memory_budget("40%") == pytest.approx(0.4)
    for bad in ("6 parsecs", "-1GB", "0", "150%", "0%"):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_memory_budget(bad)
    for bad in (1.5, True, [1]):
        with pytest.raises(TypeError, match="memory_budget"):
            parse_memory_budget(bad)


def test_budget_defaults_to_a_fraction_of_the_available_memory():
    budget, avail, origin = mem.resolve_budget(None, "cpu")
    assert avail > 0 and budget == int(mem.DEFAULT_BUDGET_FRACTION["cpu"] * avail)
    assert "available" in origin
    half, avail2, _ = mem.resolve_budget("50%", "cpu")
    assert abs(half - avail2 / 2) <= 1


# ------------------------------------------------------------------------------ back-off
class OOMAbove(torch.nn.Module):
    """Raises torch.cuda.OutOfMemoryError for batches above ``limit`` rows (no GPU needed)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.sizes = limit, []
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: {x.shape[0]} rows)")
        return self.lin(x)


def test_backoff_halves_until_the_batch_fits_and_keeps_the_smaller_size():
    model = OOMAbove(limit=5)
    x = torch.randn(37, 4)
    halvings = []
    state = BackoffState(16)
    out = map_with_backoff(lambda s, e: model(x[s:e]), 37, state, on_backoff=lambda a, b: halvings.append((a, b)))
    assert torch.allclose(torch.cat(out), model.lin(x))
    assert halvings == [(16, 8), (8, 4)]
    assert state.batch_size == 4 and state.backoffs == 2
    assert max(model.sizes[3:]) <= 4  # after the two failed tries every chunk fits


def test_backoff_reraises_at_one_row_and_other_errors_pass_through():
    model = OOMAbove(limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        map_with_backoff(lambda s, e: model(torch.randn(e - s, 4)), 4, 4, on_backoff=lambda a, b: None)

    def broken(s, e):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        map_with_backoff(broken, 4, 4)


def test_cpu_allocator_failure_counts_as_out_of_memory():
    err = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")
    assert batching.is_out_of_memory(err)
    assert batching.is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not batching.is_out_of_memory(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------------------ CUDA statistics, emulated
class FakeCuda:
    """The torch.cuda memory API as the probe uses it, over a counter that fake work moves."""

    def __init__(self, total, per_row, fixed):
        self.total, self.per_row, self.fixed = total, per_row, fixed
        self.allocated = self.peak = 0

    def install(self, monkeypatch):
        c = torch.cuda
        monkeypatch.setattr(c, "synchronize", lambda device=None: None)
        monkeypatch.setattr(c, "current_device", lambda: 0)
        monkeypatch.setattr(c, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(c, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(c, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(c, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(c, "mem_get_info", lambda device=None: (self.total - self.allocated, self.total))

    def run(self, rows):
        self.peak = max(self.peak, self.allocated + self.fixed + rows * self.per_row)


def test_cuda_probe_uses_allocator_statistics(monkeypatch):
    fake = FakeCuda(total=10 * 2**30, per_row=100 * MiB, fixed=300 * MiB)
    fake.install(monkeypatch)
    plan = plan_batch_size(fake.run, 10_000, device="cuda:0", memory_budget=2 * 2**30, unit="pairs")
    # exact allocator statistics: the slope is the per-row memory, the intercept the fixed part
    assert plan.per_row == pytest.approx(100 * MiB) and plan.fixed == pytest.approx(300 * MiB)
    true_max = (2 * 2**30 - 300 * MiB) // (100 * MiB)
    assert true_max / 2 <= plan.batch_size <= true_max
    default = plan_batch_size(fake.run, 10_000, device="cuda:0", unit="pairs")
    assert default.budget == int(mem.DEFAULT_BUDGET_FRACTION["cuda"] * 10 * 2**30)
    with pytest.raises(MemoryBudgetError, match="cannot fit"):
        plan_batch_size(fake.run, 10_000, device="cuda:0", batch_size=200, unit="pairs")


def test_automatic_batch_is_aligned_and_capped():
    fake_probe = mem.MemoryProbe(rows=(2, 4), peaks=(0, 0), per_row=1.0 * MiB, fixed=0.0)
    assert batching._largest_fit(fake_probe, 100 * MiB, cap=1000) == int(100 / mem.SAFETY)
    assert batching._largest_fit(fake_probe, 100 * MiB, cap=50) == 50


def test_plan_aligns_an_automatic_batch_to_whole_images(monkeypatch):
    monkeypatch.setattr(batching, "probe_memory", lambda run, dev, rows: mem.MemoryProbe(rows, (0, 0), 1.0 * MiB, 0.0))
    monkeypatch.setattr(batching, "cpu_peak_supported", lambda: True)
    plan = plan_batch_size(lambda r: None, 10_000, device="cpu", memory_budget=100 * MiB, align=14, unit="pairs")
    assert plan.batch_size == 84 and plan.source == "auto"  # 86 fit, 6 whole images of 14 members
    capped = plan_batch_size(lambda r: None, 10_000, device="cpu", memory_budget=100 * MiB, max_batch_size=30)
    assert capped.batch_size == 30


# ------------------------------------------------------------------------------ per-batch check
#: glibc gives large freed blocks back to the kernel, so a process's resident set follows what it
#: holds; a preloaded caching allocator (tcmalloc, jemalloc) keeps them and these tests would
#: measure its cache instead
releases_memory = pytest.mark.skipif("malloc" in os.environ.get("LD_PRELOAD", ""),
                                     reason="a preloaded allocator keeps freed memory")


def _fresh_peak():
    """The process's peak reset to what it holds now (as the memory probe leaves it)."""
    mem._trim_heap()
    mem._reset_rss_peak()


@needs_proc
@releases_memory
def test_a_batch_measured_over_the_budget_lowers_the_batches_after_it():
    def touch(s, e):  # 4 MiB written per row, kept until the call returns
        t = torch.ones((e - s) * MiB)
        return (s, e, float(t[-1]))

    _fresh_peak()
    state = BackoffState(32, budget=50 * MiB, device="cpu", align=4, unit="pairs")
    with pytest.warns(UserWarning, match="more than the memory budget") as caught:
        out = map_with_backoff(touch, 200, state)
    assert caught[0].filename == __file__  # the warning points at the caller's line, not the library
    assert out[0][:2] == (0, 32)
    assert [s for s, _, _ in out] == sorted({s for s, _, _ in out}) and out[-1][1] == 200  # complete, in order
    assert state.shrinks == 1 and state.batch_size == 12  # 128 MiB at 32 rows: 50 / 4 MiB -> 12
    assert all(e - s <= 12 for s, e, _ in out[1:])
    assert state.peak_used >= 120 * MiB


@needs_proc
@releases_memory
def test_results_kept_across_calls_do_not_count_against_the_next_call():
    kept = []

    def work(s, e):  # 3 MiB of scratch per row, freed; 1 MiB per row of results, kept
        scratch = torch.ones((e - s) * 3 * MiB // 4)
        kept.append(torch.ones((e - s) * MiB // 4) * float(scratch[-1]))
        return e - s

    _fresh_peak()
    state = BackoffState(16, budget=80 * MiB, device="cpu")
    sizes = map_with_backoff(work, 160, state)
    # each call needs ~64 MiB; the 16 MiB kept by each earlier call are not the next call's
    assert sizes == [16] * 10 and state.shrinks == 0
    assert 48 * MiB <= state.peak_used <= 80 * MiB


def test_a_shrink_keeps_the_fixed_part_and_the_alignment():
    state = BackoffState(56, budget=1000, fixed=200, align=14)
    with pytest.warns(UserWarning):
        state.after(56, 1600)  # (1600 - 200) / 56 = 25 per row; (1000 - 200) / 25 = 32 -> 28
    assert state.batch_size == 28 and state.shrinks == 1
    state.after(28, 900)  # within the budget: unchanged
    assert state.batch_size == 28
    assert state.aligned(13) == 13 and state.aligned(30) == 28


def test_the_per_batch_check_reads_cuda_statistics(monkeypatch):
    fake = FakeCuda(total=10 * 2**30, per_row=0, fixed=0)
    fake.install(monkeypatch)
    sizes = []

    def quadratic(s, e):  # memory that grows faster than the rows (what a probe cannot see)
        sizes.append(e - s)
        fake.peak = max(fake.peak, fake.allocated + (e - s) ** 2 * MiB)

    state = BackoffState(40, budget=400 * MiB, device="cuda:0")
    with pytest.warns(UserWarning, match="continuing with 10"):
        map_with_backoff(quadratic, 100, state)
    # 1600 MiB at 40 rows -> 10 rows (400 / 1600 x 40); 100 MiB at 10 rows is within the budget
    assert sizes == [40, 10, 10, 10, 10, 10, 10] and state.shrinks == 1


def test_only_an_automatic_batch_is_checked_per_batch():
    auto = batching.BatchPlan(32, "auto", "cpu", budget=100 * MiB)
    explicit = batching.BatchPlan(32, "explicit", "cpu", budget=100 * MiB)
    assert auto.state(align=4).budget == 100 * MiB and auto.state(align=4).align == 4
    assert explicit.state().budget is None  # an explicit batch size wins (checked before the work only)
    assert batching.BatchPlan(32, "unchecked", "cpu").state().budget is None


@needs_proc
@releases_memory
def test_the_process_peak_survives_the_measurements():
    big = torch.ones(96 * MiB // 4)  # 96 MiB written
    float(big[-1])
    high = mem.peak_rss()
    del big
    measure_peak(lambda: None, "cpu")  # resets the kernel's peak
    # the lifetime peak is kept for reports (pyboundary scan prints it); the kernel's RSS counters
    # are batched per thread (a few hundred KiB behind at a read), hence the slack
    assert mem.peak_rss() >= high - 2 * MiB
    start = mem.start_peak_window("cpu")
    quiet = mem.peak_since_window(start, "cpu")  # nothing allocated since the window started
    assert quiet is None or quiet - start < 8 * MiB
    t = torch.ones(64 * MiB // 4)
    float(t[-1])
    raised = mem.peak_since_window(start, "cpu")
    assert raised is not None and raised >= start + 48 * MiB, "64 MiB written did not raise the peak"
