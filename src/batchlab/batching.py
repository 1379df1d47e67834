"""Training batches whose size changes during a fit: how ``batchlab.callbacks.BatchSizeWarmup`` grows the batch.

``BatchSizes`` holds the size of every training batch by its index since the fit began (a list of changes), and
counts the batches cut and trained. A loader cuts each batch at ``BatchSizes.cut()``; the warmup decides a change
and ``grow``s from the first batch not yet cut, so a change lands at a step known in advance, the same on every
rank, whatever the loader's prefetching, and the warmup moves the learning rate when that batch trains.

Two loaders read it:
- ``GrowingBatchSampler``, a torch ``BatchSampler`` that cuts its sampler's indices by ``BatchSizes``.
  ``resizable`` rebuilds any ``DataLoader`` over a map-style dataset around one. It is built inside the
  ``train_dataloader`` hook, so Lightning records its arguments as it does for any batch sampler and, under DDP,
  builds it again around a ``DistributedSampler``.
- batchlab's ``TensorBatches``, which reads ``sizes`` itself (``resizable`` sets it).

Written here because neither torch nor Lightning changes a batch size mid-epoch: Lightning's batch-size finder
rebuilds the loaders between trials (which restarts the epoch), and ``reload_dataloaders_every_n_epochs`` does
so only between epochs, too late for a run whose target comes within its first epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

from batchlab.errors import ConfigError


class BatchSizes:
    """The size of each training batch, by its index since the fit began (per device).

    Args:
        size: The first batch's size.
    """

    def __init__(self, size: int) -> None:
        self.changes: list[tuple[int, int]] = [(0, size)]  # (index of the first batch of this size, size)
        self.cut_count = 0  # batches a loader has cut (some may be prefetched, not yet trained)
        self.trained = 0  # batches trained; an epoch's loader starts cutting from here

    def at(self, index: int) -> int:
        """The size of batch ``index``."""
        return next(size for first, size in reversed(self.changes) if index >= first)

    @property
    def current(self) -> int:
        """The size of the next batch to train."""
        return self.at(self.trained)

    @property
    def latest(self) -> int:
        """The size the last change set (batches already cut may still be smaller)."""
        return self.changes[-1][1]

    def start_epoch(self) -> None:
        """A new epoch's iterator: what an epoch cut short left prefetched was never trained, so cutting resumes
        at the next batch to train."""
        self.cut_count = self.trained

    def peek(self) -> int:
        return self.at(self.cut_count)

    def cut(self) -> int:
        """The size of the next batch to cut, counting it as cut."""
        size = self.peek()
        self.cut_count += 1
        return size

    def grow(self, size: int, align: int = 1) -> int:
        """Batches from the first not yet cut (rounded up to a multiple of ``align``: a whole optimizer step of
        accumulated batches keeps one size) on have ``size`` rows; returns that batch's index."""
        first = -(-max(self.cut_count, self.trained) // align) * align
        self.changes = [c for c in self.changes if c[0] < first] + [(first, size)]
        return first

    def rows_trained(self) -> int:
        """Rows in the batches trained so far (on this device)."""
        ends = [first for first, _ in self.changes[1:]] + [self.trained]
        return sum(max(0, min(end, self.trained) - first) * size for (first, size), end in zip(self.changes, ends))

    def state_dict(self) -> dict[str, Any]:
        return {"changes": [list(c) for c in self.changes], "trained": self.trained}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BatchSizes:
        out = cls(1)
        out.changes = [(int(i), int(b)) for i, b in state["changes"]]
        out.trained = out.cut_count = int(state["trained"])
        return out


class GrowingBatchSampler(BatchSampler):
    """Batches of ``sizes``' sizes from ``sampler``'s indices, one epoch per iteration.

    Args:
        sampler: The indices, as a DataLoader's sampler yields them (a ``DistributedSampler`` under DDP).
        sizes: The size of each batch by its index since the fit began.
        drop_last: Drop a last batch smaller than its size.
    """

    def __init__(self, sampler: Sampler[int] | Sized, sizes: BatchSizes, drop_last: bool = False) -> None:
        # BatchSampler's own __init__ insists on a fixed batch size; the attributes Lightning reads are set here.
        self.sampler, self.sizes, self.drop_last = sampler, sizes, drop_last

    @property
    def batch_size(self) -> int:  # read by Lightning (and torch) as a DataLoader's batch size
        return self.sizes.latest

    def __iter__(self) -> Iterator[list[int]]:
        self.sizes.start_epoch()
        indices = iter(self.sampler)
        batch: list[int] = []
        size = self.sizes.peek()
        for i in indices:
            batch.append(i)
            if len(batch) == size:
                self.sizes.cut()
                yield batch
                batch, size = [], self.sizes.peek()
        if batch and not self.drop_last:
            self.sizes.cut()
            yield batch

    def __len__(self) -> int:
        # The epoch's length at the latest size: Lightning reads it once per epoch, for its progress bar.
        n, b = len(self.sampler), self.sizes.latest
        return n // b if self.drop_last else -(-n // b)


def resizable(loader: Any, sizes_for: Any) -> Any:
    """``loader`` made to cut its batches by the ``BatchSizes`` that ``sizes_for(initial batch size)`` returns:
    batchlab's ``TensorBatches`` reads them itself; a ``DataLoader`` over a map-style dataset is rebuilt around a
    ``GrowingBatchSampler`` with every other setting kept. Anything else raises ``ConfigError``."""
    from batchlab.data import TensorBatches

    if isinstance(loader, TensorBatches):
        loader.sizes = sizes_for(loader.batch_size)
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        kind = type(loader.dataset if isinstance(loader, DataLoader) else loader).__name__
        raise ConfigError(f"BatchSizeWarmup cannot change the batch size of a {kind}: it needs a train_dataloader "
                          "that returns a torch DataLoader over a map-style dataset (or batchlab's TensorBatches)")
    if isinstance(loader.batch_sampler, GrowingBatchSampler):
        return loader
    old = loader.batch_sampler
    sampler = getattr(old, "sampler", loader.sampler)
    drop_last = getattr(old, "drop_last", loader.drop_last)
    size = getattr(old, "batch_size", None) or loader.batch_size
    if not isinstance(size, int):
        raise ConfigError(f"BatchSizeWarmup cannot read the batch size of the train DataLoader's "
                          f"{type(old).__name__}: give it a batch_size attribute, or build the DataLoader with "
                          "batch_size=...")
    workers = loader.num_workers
    return DataLoader(
        loader.dataset, batch_sampler=GrowingBatchSampler(sampler, sizes_for(size), drop_last),
        num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
        pin_memory_device=loader.pin_memory_device,
    )
