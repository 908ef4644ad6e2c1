"""Feeding a margin scan: the images of each batch of (sample, member) pairs, and its progress bar.

:class:`BatchFeeder` turns the scan's fixed grid of pair batches into input tensors on the
engine's device. Two sources:

* an in-memory tensor ``x`` (N, C, H, W): each batch is ``x[samples]``;
* a map-style dataset (e.g. :class:`pyboundary.zoo.streaming.ImageFolderStream`) whose items
  are ``(image (C, H, W), label)``: the distinct samples of the batches are read in order by a
  ``torch.utils.data.DataLoader`` with ``workers`` processes, a few images per load, and kept
  only until the last batch that uses them has been built. Batches are sample-major, so at
  most the images of about one batch plus the loader's read-ahead (``workers x 2`` loads) are
  in memory at any time, whatever the size of the dataset.

On a CUDA device the loader returns pinned (page-locked) host memory and every host-to-device
copy is issued with ``non_blocking=True``, so reading and copying overlap the engine's work; on
CPU nothing is pinned. (No GPU was available to this work: the CUDA branch is covered by unit
tests of the decisions it makes, not executed.)

:class:`ScanProgress` is the bar: pairs done out of the whole scan (pairs finished by an earlier,
interrupted run count as done), the average rate of this run in pairs/s (tqdm with
``smoothing=0``: pairs computed now / time since the start, never the earlier runs' pairs) and the
ETA from it, refreshed every second between batches on a terminal so the elapsed time stays
current.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["BatchFeeder", "ScanProgress", "to_device", "default_workers"]


def default_workers(device) -> int:
    """Loader processes for a streamed dataset: 1 on CPU (decoding a 224x224 image costs ~1 % of
    one pair's DeepFool time there, and every extra process takes a core from the engine), 4 on
    CUDA (the engine no longer needs the CPU cores)."""
    return 4 if torch.device(device).type == "cuda" else 1


def to_device(t: Tensor, device) -> Tensor:
    """``t`` on ``device``; to CUDA through pinned memory with a non-blocking copy."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return t.to(dev)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(dev, non_blocking=True)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, data, order):
        self.data, self.order = data, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        item = self.data[self.order[i]]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return torch.as_tensor(x)


class BatchFeeder:
    """Iterate ``(pairs, xb)`` over the scan's batches: ``pairs`` (P, 2) int64 (sample, member),
    ``xb`` (P, C, H, W) the pairs' images on ``device`` in ``layout``.

    Args:
        data: tensor (N, C, H, W) or a map-style dataset of ``(image, label)`` items.
        batches: list of (P_b, 2) int64 tensors, samples ascending across batches (sample-major).
        device: the engine's device.
        workers: loader processes for a dataset (None: :func:`default_workers`; 0 = read in
            this process).
        layout: memory format of ``xb`` (e.g. ``torch.channels_last``).
    """

    def __init__(self, data, batches: list, device, *, workers: int | None = None,
                 layout=torch.contiguous_format):
        self.data, self.batches, self.device, self.layout = data, batches, torch.device(device), layout
        self.workers = default_workers(self.device) if workers is None else int(workers)

    def __iter__(self):
        if isinstance(self.data, Tensor):
            for chunk in self.batches:
                xb = to_device(self.data[chunk[:, 0]], self.device)
                yield chunk, xb.contiguous(memory_format=self.layout)
            return
        yield from self._streamed()

    def loader(self, order: list) -> torch.utils.data.DataLoader:
        """The DataLoader reading the images of ``order`` (sample indices) in that order."""
        per_load = self._images_per_load()
        kwargs = dict(batch_size=per_load, shuffle=False, num_workers=self.workers,
                      pin_memory=self.device.type == "cuda")
        if self.workers > 0:
            kwargs.update(prefetch_factor=2, persistent_workers=False)
        return torch.utils.data.DataLoader(_Subset(self.data, order), **kwargs)

    def _images_per_load(self) -> int:
        """About the number of distinct images of one batch (at least 1, at most 32)."""
        if not self.batches:
            return 1
        first = self.batches[0][:, 0]
        distinct = int(first.max() - first.min()) + 1
        return max(1, min(32, distinct))

    def _streamed(self):
        if not self.batches:
            return
        order = torch.unique(torch.cat([b[:, 0] for b in self.batches])).tolist()
        loads = iter(self.loader(order))
        cache, position = {}, 0  # sample -> image on the device; next index of ``order`` to read
        for b, chunk in enumerate(self.batches):
            samples = chunk[:, 0].tolist()
            last = max(samples)
            while last not in cache:
                images = to_device(next(loads), self.device)
                for row in images:
                    cache[order[position]] = row
                    position += 1
            xb = torch.stack([cache[s] for s in samples]).contiguous(memory_format=self.layout)
            upcoming = int(self.batches[b + 1][:, 0].min()) if b + 1 < len(self.batches) else None
            for s in [s for s in cache if upcoming is None or s < upcoming]:
                del cache[s]
            yield chunk, xb


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ScanProgress:
    """tqdm bar over the scan's pairs with the rate of this run and the ETA (see module docstring).

    Args:
        total: pairs of the whole scan (this process's share).
        done: pairs already finished before this run (resume).
        enabled: False = no bar.
        note: text shown after the rate (e.g. the batch size).
    """

    def __init__(self, total: int, done: int = 0, *, enabled: bool = True, note: str = ""):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="pair", desc="margin scan", disable=not enabled,
                        leave=False, smoothing=0, dynamic_ncols=True)
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self._stop = threading.Event()
        self._ticker = None
        if enabled and _is_terminal(self.bar.fp):  # a log file gets a line per update, not per second
            self._ticker = threading.Thread(target=self._tick, name="pyboundary-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def update(self, pairs: int) -> None:
        self.bar.update(pairs)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2.0)
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
