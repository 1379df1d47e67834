"""The toy regression data: the seed notebook's four points, or a synthetic set of any size.

``ToyRegressionData`` is a LightningDataModule; LightningCLI exposes its constructor as ``--data.*`` flags
(``--data.batch_size 8``, ``--data.n_samples 1000 --data.noise 1``). Targets are the sum of the features, as in
the notebook (y = x1 + x2), plus optional Gaussian label noise.

The batch size lives in one place, ``hparams.batch_size``, exposed as the ``batch_size`` property and read each
time a dataloader is built, which is what Lightning's batch-size finder writes to.

Batches are sliced from in-memory tensors by ``TensorBatches`` rather than assembled sample by sample through a
``Dataset`` and ``collate_fn``; on a GPU the tensors move to the device once, in ``setup``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import TensorDataset

from batchlab.batching import BatchSizes
from batchlab.errors import (ConfigError, FiniteFloat, Fraction, NonNegativeFloat, PositiveInt, check,
                             check_arguments)
from batchlab.notebook import NOTEBOOK_X, NOTEBOOK_Y
from batchlab.synthetic import make_synthetic

__all__ = ["BatchOrder", "NOTEBOOK_X", "NOTEBOOK_Y", "TensorBatches", "ToyRegressionData", "make_synthetic"]


class BatchOrder:
    """The order in which one rank visits the rows of a split, epoch by epoch: TensorBatches' sampler.

    On a single device it consumes the global torch RNG exactly as ``DataLoader(shuffle=True)`` does (the
    ``RandomSampler`` draws a seed, then a ``randperm`` from a generator seeded with it), so a seeded batchlab run
    shuffles like the notebook. Across several ranks it mirrors ``DistributedSampler``: a permutation seeded with
    ``seed + epoch``, padded to a multiple of the world size, every ``world_size``-th row from ``rank``. Lightning
    calls ``set_epoch`` at each epoch start, as it does for a ``DistributedSampler``.

    With ``device`` set (a GPU), the permutation is drawn there, from a generator on that device seeded the same
    way: the global RNG stream is consumed as before, but the order is no longer the one a DataLoader (which
    shuffles on the CPU) would give. A CPU permutation of millions of rows can take longer than a GPU epoch over
    them (docs/performance.md). On the CPU ``device`` changes nothing.
    """

    def __init__(
        self,
        n: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        self.n, self.shuffle, self.rank, self.world_size, self.seed = n, shuffle, rank, world_size, seed
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.epoch = 0
        self._generator: Optional[torch.Generator] = None  # reseeded for every permutation

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Rows this rank visits per epoch."""
        return math.ceil(self.n / self.world_size)

    def indices(self) -> Optional[Tensor]:
        """This epoch's row indices for this rank, or None for all rows in order (then batches are views)."""
        if self.world_size == 1:
            if not self.shuffle:
                return None
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            return self._randperm(seed)
        if self.shuffle:
            order = self._randperm(self.seed + self.epoch)
        else:
            order = torch.arange(self.n, device=self.device)
        total = len(self) * self.world_size
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        return order[self.rank : total : self.world_size]

    def _randperm(self, seed: int) -> Tensor:
        # ``manual_seed`` resets the whole generator state, so one generator reseeded per epoch draws what a new one
        # would; at the seed's two steps per epoch, creating it was a measurable share of the epoch.
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        return torch.randperm(self.n, generator=self._generator.manual_seed(seed), device=self.device)


class TensorBatches:
    """An iterable of batches sliced from same-length tensors: ``DataLoader(TensorDataset(*tensors), ...)`` without
    the per-sample ``__getitem__``, the collate and the Python-int sampler.

    Written here because no library does this: DataLoader indexes one sample at a time (or one Python list of
    ints per batch with ``__getitems__``), which costs more than the model at the seed's sizes. Yields tuples of
    tensors on the tensors' own device. Lightning accepts any sized iterable as a dataloader. Shuffled CPU data above
    ``PACK_MIN_BYTES`` is gathered from one packed copy of the tensors (``_row_store``): the same batches, faster.

    Args:
        tensors: Same-length tensors; each batch holds the same rows of every one.
        batch_size: Rows per batch.
        shuffle: A new order every epoch (``BatchOrder``); False visits the rows in order, as views.
        drop_last: Drop the last, smaller batch.
        rank: This process's rank, for sharding across devices.
        world_size: Number of ranks sharing the rows.
        seed: Base seed of the sharded shuffle (``DistributedSampler``'s).
        shuffle_on_device: Draw the permutation on the tensors' device (see ``BatchOrder``): fast on a GPU, but
            not the order a DataLoader gives.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_on_device: bool = False,
    ) -> None:
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.drop_last = drop_last
        device = self.tensors[0].device if shuffle_on_device else None
        self.sampler = BatchOrder(len(self.tensors[0]), shuffle, rank, world_size, seed, device)
        # Lightning reads these as it would a DataLoader's: ``batch_sampler`` on anything with a ``sampler``, and
        # ``dataset`` for the data's length (the batch-size finder stops once a batch holds all of it).
        self.batch_sampler = None
        self.dataset = TensorDataset(*self.tensors)
        self._rows = _row_store(self.tensors) if shuffle else None
        # Set by a batch-size warmup (``batching.resizable``): each batch's size is then read from it as it is cut.
        self.sizes: Optional[BatchSizes] = None

    def __len__(self) -> int:
        rows, b = len(self.sampler), self.sizes.latest if self.sizes is not None else self.batch_size
        return rows // b if self.drop_last else math.ceil(rows / b)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # A single-process DataLoader iterator draws a base seed for its workers even when it has none; draw it
        # too, so the global RNG stream (and so every later shuffle) matches a DataLoader-based run.
        torch.empty((), dtype=torch.int64).random_()
        order = self.sampler.indices()
        device = self.tensors[0].device
        if order is not None and order.device != device:
            order = order.to(device, non_blocking=True)
        tensors, b = self.tensors, self.batch_size
        if self.sizes is not None:
            yield from self._growing(order)
            return
        # Written out for speed: at the seed's sizes this loop runs once per step, beside a step of a fraction of a
        # millisecond (docs/performance.md).
        if order is None:
            for start in range(0, len(self) * b, b):
                yield tuple(t[start : start + b] for t in tensors)
        elif self._rows is not None:
            rows, bounds = self._rows
            for start in range(0, len(self) * b, b):
                batch = rows.index_select(0, order[start : start + b])
                yield tuple(batch[:, lo:hi].contiguous() for lo, hi in bounds)
        elif len(tensors) == 2:
            x, y = tensors
            for start in range(0, len(self) * b, b):
                idx = order[start : start + b]
                yield x.index_select(0, idx), y.index_select(0, idx)
        else:
            for start in range(0, len(self) * b, b):
                idx = order[start : start + b]
                yield tuple(t.index_select(0, idx) for t in tensors)


    def _growing(self, order: Optional[Tensor]) -> Iterator[tuple[Tensor, ...]]:
        """The batches of one epoch, each as large as ``sizes`` says when it is cut."""
        sizes, rows = self.sizes, len(self.sampler)
        sizes.start_epoch()
        start = 0
        while start < rows:
            b = sizes.peek()
            if self.drop_last and start + b > rows:
                return
            sizes.cut()
            if order is None:
                yield tuple(t[start : start + b] for t in self.tensors)
            else:
                idx = order[start : start + b]
                yield tuple(t.index_select(0, idx) for t in self.tensors)
            start += b


# Above this many bytes of data, gathering a shuffled batch row by row from each tensor misses the CPU caches once
# per tensor and row, and gathering whole rows from one packed copy is faster; below it, where the data fits in the
# caches, the packed path's extra copies cost more than they save. scripts/bench.py measures it with and without
# (batchlab-unpacked); docs/performance.md has the figures.
PACK_MIN_BYTES = 8 << 20


def _row_store(tensors: tuple[Tensor, ...]) -> Optional[tuple[Tensor, list[tuple[int, int]]]]:
    """For large CPU data: one ``(n, sum of widths)`` copy of 2-D tensors of one dtype, side by side, and each
    tensor's column range in it. A batch is then one gather of whole rows, split back into contiguous tensors equal
    to the ones the per-tensor gathers give. Costs one copy of the data, made once. None where it does not apply."""
    first = tensors[0]
    if (
        len(tensors) < 2
        or first.device.type != "cpu"
        or any(t.dim() != 2 or t.dtype != first.dtype or t.device != first.device for t in tensors)
        or sum(t.nbytes for t in tensors) < PACK_MIN_BYTES
    ):
        return None
    widths = [t.shape[1] for t in tensors]
    edges = [0]
    for w in widths:
        edges.append(edges[-1] + w)
    return torch.cat(tensors, dim=1), list(zip(edges, edges[1:]))


class ToyRegressionData(LightningDataModule):
    """y = sum(x) regression: the notebook's four points by default, or ``n_samples`` synthetic ones.

    Args:
        batch_size: Samples per batch on each device (the global batch is this times devices, nodes and
            gradient accumulation). The notebook's 2 by default.
        shuffle: Reshuffle the training rows every epoch, as ``DataLoader(shuffle=True)`` does.
        drop_last: Drop the last, smaller training batch of each epoch.
        n_samples: Number of synthetic samples; None uses the notebook's four points.
        n_features: Features per sample (the notebook has 2); other values need synthetic data.
        noise: Standard deviation of the Gaussian label noise added to the targets.
        x_range: Synthetic features are drawn uniformly from [low, high].
        data_seed: Seed of the data and the split, separate from the training seed (``--seed_everything``).
        clean_eval: Validate and test against the noise-free targets sum(x): the loss is then the model's own
            error, whose floor is 0 for every draw of the data (against noisy targets the floor is the noise
            variance give or take that draw's luck, which a target just above it can make unreachable).
        val_fraction: Fraction of the samples held out for validation (0: no validation, as in the notebook);
            a held-out split has at least 2 samples.
        test_fraction: Fraction of the samples held out for ``batchlab test``.
        eval_batch_size: Batch size for validation, test and predict; None uses ``batch_size``.
        predict_x: Inputs that ``predict`` and the end-of-fit summary predict, one row per sample; None gives the
            notebook's [[10, 11]] (with more features, [[10, 11, 12, ...]]).
        on_device: Keep the whole data set on the training device, moved there once; False moves each batch.
        device_shuffle: Draw each epoch's training order on the training device. On a GPU with millions of rows
            this removes a CPU permutation per epoch that would otherwise dominate (docs/performance.md);
            the order is then no longer the one ``DataLoader(shuffle=True)`` draws under the same seed, so runs
            stop matching the notebook's loop step for step. On the CPU it changes nothing.
    """

    def __init__(
        self,
        batch_size: PositiveInt = 2,
        shuffle: bool = True,
        drop_last: bool = False,
        n_samples: Optional[PositiveInt] = None,
        n_features: PositiveInt = 2,
        noise: NonNegativeFloat = 0.0,
        x_range: tuple[FiniteFloat, FiniteFloat] = (0.0, 10.0),
        data_seed: int = 0,
        clean_eval: bool = False,
        val_fraction: Fraction = 0.0,
        test_fraction: Fraction = 0.0,
        eval_batch_size: Optional[PositiveInt] = None,
        predict_x: Optional[list[list[FiniteFloat]]] = None,
        on_device: bool = True,
        device_shuffle: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(ToyRegressionData.__init__, locals())
        check(
            n_samples is not None or n_features == 2,
            f"n_features={n_features} needs synthetic data: the notebook's points have 2 features; set n_samples",
        )
        low, high = x_range
        check(low < high, f"x_range={list(x_range)} is not allowed: use two finite numbers [low, high] with low < high")
        check(
            val_fraction + test_fraction < 1,
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data: keep it below 1",
        )
        if predict_x is None:
            predict_x = [[10.0 + i for i in range(n_features)]]
        check(len(predict_x) > 0, "predict_x=[] is not allowed: give at least one row")
        for row in predict_x:
            check(
                len(row) == n_features,
                f"predict_x row {list(row)} has {len(row)} values: each row needs n_features={n_features}",
            )
        self.save_hyperparameters()
        # Plain floats: the parsed values are jsonargparse's FiniteFloat, which torch's safe loader would refuse.
        self.hparams.predict_x = [[float(v) for v in row] for row in predict_x]
        n = n_samples if n_samples is not None else len(NOTEBOOK_X)
        check(
            self.train_size() >= 1,
            f"n_samples={n} with val_fraction={val_fraction} and test_fraction={test_fraction} leaves no training "
            "sample: use more samples or smaller fractions",
        )
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return self.hparams.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.hparams.batch_size = value

    @property
    def predict_x(self) -> Tensor:
        return torch.tensor(self.hparams.predict_x, dtype=torch.float32)

    def full_data(self) -> tuple[Tensor, Tensor]:
        """All samples, before the split, on the CPU."""
        hp = self.hparams
        if hp.n_samples is None:
            x, y = torch.tensor(NOTEBOOK_X), torch.tensor(NOTEBOOK_Y)
            if hp.noise > 0:
                g = torch.Generator().manual_seed(hp.data_seed)
                y = y + hp.noise * torch.randn(y.shape, generator=g)
            return x, y
        return make_synthetic(hp.n_samples, hp.n_features, hp.noise, tuple(hp.x_range), hp.data_seed)

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        hp = self.hparams
        x, y = self.full_data()
        n = len(x)
        n_val, n_test = _split_size(n, hp.val_fraction), _split_size(n, hp.test_fraction)
        if n_val or n_test:
            # Held-out rows come from a permutation of the data seed; each split keeps the original row order,
            # so the training rows are the same tensor a plain DataLoader would be given.
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.data_seed + 1))
            val_idx, test_idx = perm[:n_val].sort().values, perm[n_val : n_val + n_test].sort().values
            train_idx = perm[n_val + n_test :].sort().values
            parts = {"train": train_idx, "val": val_idx, "test": test_idx}
            if hp.clean_eval:
                clean = x.sum(dim=1, keepdim=True)
                y = torch.where(torch.isin(torch.arange(n), train_idx)[:, None], y, clean)
        else:
            parts = {"train": None}  # all rows, in order: the tensors themselves, not a copy
        device = self.trainer.strategy.root_device if self.trainer is not None and hp.on_device else "cpu"
        self.splits = {
            name: (x.to(device), y.to(device)) if idx is None else (x[idx].to(device), y[idx].to(device))
            for name, idx in parts.items()
            if idx is None or len(idx) > 0
        }
        self._predict = self.predict_x.to(device)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _batches(self, split: str, batch_size: int, shuffle: bool = False, drop_last: bool = False):
        if split not in self.splits:
            return []
        rank, world = self._rank_and_world()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return TensorBatches(
            self.splits[split], batch_size, shuffle, drop_last, rank, world, seed, self.hparams.device_shuffle
        )

    def train_size(self) -> int:
        """Samples in the training split, known before ``setup``."""
        hp = self.hparams
        n = hp.n_samples if hp.n_samples is not None else len(NOTEBOOK_X)
        return n - _split_size(n, hp.val_fraction) - _split_size(n, hp.test_fraction)

    def check_training_batches(self, world_size: int = 1) -> None:
        """Raise ``ConfigError`` where the batch size leaves no training batch: with ``drop_last``, a batch larger
        than each device's share of the training split.

        Checked before a run starts (``batchlab.preflight``) rather than in ``train_dataloader``: Lightning's
        batch-size finder builds the loader at sizes beyond the data on purpose, and stops on the data's size.
        """
        n = self.train_size()
        rows = math.ceil(n / world_size)
        if self.hparams.drop_last and self.batch_size > rows:
            share = f"{n} samples" if world_size == 1 else f"{n} samples, {rows} per device on {world_size} devices"
            raise ConfigError(
                f"batch_size={self.batch_size} with drop_last=true leaves no training batch: the training split has "
                f"{share}; use batch_size <= {rows}, or drop_last false"
            )

    def check_val_split(self) -> None:
        """Raise ``ConfigError`` where there is no validation split to validate on (a fit without one is fine)."""
        check(self.hparams.val_fraction > 0,
              "there is no validation split: set --data.val_fraction above 0 (e.g. 0.2)")

    def check_test_split(self) -> None:
        """Raise ``ConfigError`` where there is no test split to test on."""
        check(self.hparams.test_fraction > 0, "there is no test split: set --data.test_fraction above 0 (e.g. 0.2)")

    def train_dataloader(self) -> TensorBatches:
        rows = math.ceil(len(self.splits["train"][0]) / self._rank_and_world()[1])
        if self.batch_size > rows:
            # Only the batch-size finder's trials, or a datamodule used outside the CLI, get here with drop_last.
            outcome = "no batch: drop_last drops it" if self.hparams.drop_last else f"one batch of {rows}"
            rank_zero_warn(
                f"batch_size={self.batch_size} is larger than the {rows} training samples per device: "
                f"each epoch trains {outcome}"
            )
        return self._batches("train", self.batch_size, self.hparams.shuffle, self.hparams.drop_last)

    def val_dataloader(self):
        return self._batches("val", self._eval_batch_size())

    def test_dataloader(self) -> TensorBatches:
        self.check_test_split()
        return self._batches("test", self._eval_batch_size())

    def predict_dataloader(self) -> TensorBatches:
        return TensorBatches((self._predict,), self._eval_batch_size())

    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.batch_size


def _split_size(n: int, fraction: float) -> int:
    # A held-out split gets at least two samples: R2 is undefined on one.
    return 0 if fraction == 0 else max(2, round(n * fraction))
