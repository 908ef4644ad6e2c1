"""Margin scans over several processes (``torchrun --nproc_per_node=N -m pyboundary scan ...``).

Sharding: the (sample, subspace) pairs are laid out sample-major on the fixed batch grid of
:func:`pyboundary.scans.margins.margin_scan` (batch b = pairs [b*B, (b+1)*B)), and batch b goes to rank
b % world, so every rank gets contiguous blocks of samples and the load is balanced. Each rank
scans its batches into its own part store ``<final>.part<rank>-of-<world>`` (crash-safe like any
store); then rank 0 merges the parts into the final store, one transaction per part, and the
parts are removed. Because every pair is computed in the same batch as in a single-process scan,
the numbers are those of the single-process scan (bit for bit on the same machine and thread
settings; tests allow float32 rounding).

Resume: rank 0 validates the final store first (same refusal rules as a single-process scan) and
merges into it every leftover part (of any earlier world size); each rank then seeds its new part
with the pairs of the final store and resumes it, so no finished pair is recomputed. A
single-process ``scan --resume`` also merges leftover parts first.

Process groups: gloo on CPU, nccl on CUDA (each rank on ``cuda:<LOCAL_RANK>``). Errors on any
rank are gathered and raised on every rank, so no rank waits forever on a failed peer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .margins import _channels_last_copy, _stored_grid, margin_scan, plan_scan_batches, prepare_scan, scan_from_store
from .store import ResultStore, remove_store, writer_lock

__all__ = ["world_from_env", "part_path", "leftover_parts", "merge_parts", "distributed_scan", "DistributedScanError"]


class DistributedScanError(RuntimeError):
    """A rank failed; the message holds every failing rank's error."""


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun / world 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    return (rank, world, local) if world > 1 else None


def part_path(final, rank: int, world: int) -> Path:
    """Path of rank ``rank``'s part store next to the final store."""
    final = Path(final)
    return final.with_name(f"{final.name}.part{rank}-of-{world}")


def leftover_parts(final) -> list:
    """Part stores of an interrupted multi-process scan next to ``final`` (any world size)."""
    final = Path(final)
    return sorted(p for p in final.parent.glob(f"{final.name}.part*-of-*")
                  if not p.name.endswith(("-wal", "-shm", "-journal", ".lock")))


def merge_parts(final) -> int:
    """Merge every leftover part store into ``final`` (created from the parts' metadata if absent),
    removing each part once merged. A part made with other settings is refused (StoreError).
    Returns the number of pairs added. A part whose rank is still writing it (a multi-process
    scan still running) is refused (:class:`~pyboundary.scans.store.StoreLockedError`) before
    anything is merged."""
    added = 0
    parts = leftover_parts(final)
    with contextlib.ExitStack() as held:
        for part in parts:
            held.enter_context(writer_lock(part))
        for part in parts:
            with ResultStore(final, mode="resume", meta=_meta_of(part)) as st:
                added += st.merge_from(part)
            remove_store(part)
    return added


def load_with_parts(final):
    """The scan in ``final`` together with the pairs in the part stores of a multi-process scan
    that is still running or was interrupted (they reach ``final`` only when the ranks finish or
    a resume merges them). Nothing is changed: the stores are read into a temporary copy.
    Returns (:class:`~pyboundary.scans.margins.MarginScan`, pairs found only in the parts)."""
    import tempfile

    final = Path(final)
    parts = leftover_parts(final)
    sources = ([final] if final.exists() else []) + parts
    with tempfile.TemporaryDirectory(prefix="pyboundary-show-") as tmp:
        with ResultStore(Path(tmp) / "scan.sqlite", mode="create", meta=_meta_of(sources[0])) as st:
            in_final = st.merge_from(final) if final.exists() else 0
            for part in parts:
                st.merge_from(part)
            return scan_from_store(st), st.count_pairs() - in_final


def _init_group(device: str, init_method: str | None, rank: int | None, world: int | None):
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    kwargs = {}
    if init_method is not None:
        kwargs = {"init_method": init_method, "rank": rank, "world_size": world}
    dist.init_process_group(backend=backend, **kwargs)
    return True


def _gather_status(error: BaseException | None) -> None:
    """All ranks exchange their status; raise DistributedScanError on every rank if any failed."""
    import torch.distributed as dist

    statuses = [None] * dist.get_world_size()
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(statuses, mine)
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        msg = "; ".join(f"rank {r}: {s}" for r, s in failed)
        if error is not None and len(failed) == 1 and isinstance(error, (ValueError, TypeError)):
            raise error
        raise DistributedScanError(msg) from error


def distributed_scan(model, data, subspaces, *, store, resume: bool = False, device=None,
                     init_method: str | None = None, rank: int | None = None, world: int | None = None,
                     progress: bool = True, **scan_kwargs):
    """One rank's share of a multi-process :func:`~pyboundary.scans.margins.margin_scan`.

    Call it on every rank with identical arguments (the same model weights and data: the stored
    metadata must agree). The process group is taken from torchrun's environment (or
    ``init_method``/``rank``/``world`` for tests, e.g. ``file:///tmp/x``) unless one is already
    initialised; a group this function created is destroyed at the end.

    Args:
        model: callable (N, C, H, W) -> (N, L) logits, the same weights on every rank.
        data: the inputs, as for margin_scan (a tensor (N, C, H, W) or a dataset).
        subspaces: a :class:`~pyboundary.subspaces.Subspace` family or a spec (``dct:K=8,T=1``).
        store: path of the final result store (required).
        resume: continue an interrupted scan (final store and parts).
        device: engine device; for CUDA use ``cuda:<local rank>``.
        init_method: torch.distributed init method (e.g. ``file:///tmp/x``) when no process group
            exists yet; None: torchrun's environment variables.
        rank: this process's rank with ``init_method`` (None: from the environment).
        world: the number of processes with ``init_method`` (None: from the environment).
        progress: show rank 0's tqdm bar (the other ranks never show one).
        **scan_kwargs: the other arguments of margin_scan (p, labels, batch_size, limit, seed,
            model_name, deepfool_kwargs, ...).
    Returns:
        the complete MarginScan on rank 0, None on the other ranks.
    """
    import torch.distributed as dist

    if store is None:
        raise ValueError("distributed_scan needs store= (the final result store path)")
    dev = device if device is not None else "cpu"
    created = _init_group(str(dev), init_method, rank, world)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        final = Path(store)
        part = part_path(final, rank, world)
        error = None
        planned = [None]  # (grid, engine batch, per-batch check {budget, fixed} or None)
        try:
            if rank == 0:  # plan the batch grid, validate (and create) the final store before anyone computes
                meta, plan = _planned_meta(model, data, subspaces, final, resume, dev, scan_kwargs)
                check = {"budget": plan.budget, "fixed": plan.fixed} if plan.source == "auto" else None
                planned[0] = (meta["batch_size"], plan.batch_size, check)
                with ResultStore(final, mode="resume" if resume else "create", meta=meta) as st:
                    st.record_meta({"batching": meta["batching"]})  # this run's batching
                if resume:  # parts of an earlier run, possibly with another number of processes
                    merge_parts(final)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
        _gather_status(error)
        dist.broadcast_object_list(planned, src=0)
        grid, engine_batch, check = planned[0]
        # planned on rank 0: the engine's calls take rank 0's size and, when it was chosen
        # automatically, are checked batch by batch against the rank's budget
        rank_kwargs = {**scan_kwargs, "batch_size": engine_batch, "memory_budget": "off", "_batch_check": check}
        try:
            if not resume:
                remove_store(part)  # a stale part of an unrelated earlier run
            _seed_part(model, data, subspaces, final, part, grid, rank_kwargs)
            margin_scan(model, data, subspaces, store=part, resume=True, device=device,
                        progress=progress and rank == 0, shard=(rank, world), **rank_kwargs)
        except Exception as exc:  # noqa: BLE001
            error = exc
        _gather_status(error)
        result = None
        if rank == 0:
            with ResultStore(final, mode="resume", meta=_meta_of(part)) as st:
                for r in range(world):
                    st.merge_from(part_path(final, r, world))
                result = scan_from_store(st)
        dist.barrier()
        remove_store(part)
        return result
    finally:
        if created:
            dist.destroy_process_group()


def _prepare_kwargs(scan_kwargs: dict) -> dict:
    """The margin_scan arguments that define the scan's metadata (prepare_scan's keywords)."""
    keys = ("p", "labels", "limit", "seed", "model_name", "deepfool_kwargs")
    return {k: v for k, v in scan_kwargs.items() if k in keys}


def _local_world() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _planned_meta(model, data, subspaces, final: Path, resume: bool, device, scan_kwargs):
    """Rank 0: (the final store's metadata with the batch grid every rank will use, the
    :class:`~pyboundary._utils.batching.BatchPlan` of the engine's calls).

    The grid is planned like a single-process scan's (:func:`~pyboundary.scans.margins.plan_scan_batches`),
    except that on CPU the ranks of one machine share its memory, so each gets the budget divided
    by the number of local ranks (``LOCAL_WORLD_SIZE``); a resumed scan keeps its stored grid.
    """
    import torch

    from .._utils.memory import parse_memory_budget, resolve_budget
    src, family, params, meta = prepare_scan(model, data, subspaces, **_prepare_kwargs(scan_kwargs))
    dev = torch.device(device)
    budget = scan_kwargs.get("memory_budget")
    if dev.type == "cpu" and _local_world() > 1 and parse_memory_budget(budget) != "off":
        budget = resolve_budget(budget, dev)[0] // _local_world()
    fast = _channels_last_copy(model, src.image_shape, dev, scan_kwargs.get("channels_last"))
    engine_model, layout = (model, torch.contiguous_format) if fast is None else (fast, torch.channels_last)
    grid, plan = plan_scan_batches(engine_model, src, family, params, dev, batch_size=scan_kwargs.get("batch_size"),
                                   memory_budget=budget, grid=_stored_grid(final, resume), layout=layout)
    meta["batch_size"] = grid
    meta["batching"] = plan.summary()
    return meta, plan


def _meta_of(path) -> dict:
    with ResultStore(path, mode="read") as st:
        return st.meta


def _seed_part(model, data, subspaces, final: Path, part: Path, grid: int, scan_kwargs) -> None:
    """Create/validate the part store (batch grid ``grid``) and copy into it the pairs already
    merged into the final store."""
    meta = prepare_scan(model, data, subspaces, **_prepare_kwargs(scan_kwargs))[-1]
    meta["batch_size"] = grid
    with ResultStore(part, mode="resume", meta=meta) as st:
        if final.exists():
            st.merge_from(final)
