"""Test-only callbacks that a ``batchlab`` command loads by class path, for tests that run it as a subprocess.

Under DDP Lightning starts each further rank by re-running the command line, so whatever a test wants to observe
inside a rank has to be something the command itself can name: a callback given with
``--trainer.callbacks+=probes.RecordSeenRows``. The tests put this folder on the subprocess's ``PYTHONPATH``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from batchlab.model import MLPRegressor


class RecordSeenRows(Callback):
    """Record the training inputs this rank trains on, epoch by epoch, in the order seen, and save them to
    ``{out_dir}/rank{global_rank}.pt`` as ``{epoch: tensor of rows}`` when training ends.

    Rows rather than indices: the batches hold no indices, and the rows of synthetic data are all distinct, so a test
    maps them back to row numbers of the full data set.
    """

    def __init__(self, out_dir: str = "seen") -> None:
        self.out_dir = out_dir
        self.seen: dict[int, torch.Tensor] = {}
        self._rows: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._rows.append(batch[0].detach().cpu())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seen[trainer.current_epoch] = torch.cat(self._rows)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.seen, out / f"rank{trainer.global_rank}.pt")


class RecordBatchSizes(Callback):
    """Record, per optimizer step, the rows this rank trains on (summed over accumulated batches) and the LR the
    optimizer steps with (first param group, read just before the step); and the readings of the trainer's
    ``NoiseScaleMonitor``, if it has one, as ``[step, b_simple, method]``, and the changes of its ``BatchSizeWarmup``
    as ``[step, global batch, reason]``; and the steps at which the monitor's DDP communication hook read the
    gradient buckets (``hook_reads``; it should on the measured steps only). Saved to
    ``{out_dir}/rank{global_rank}.json`` as ``{"sizes": {step: rows}, "lrs": {step: lr}, "readings": [...],
    "changes": [...], "hook_reads": [...]}`` (None where there is no such callback or hook) when training ends."""

    def __init__(self, out_dir: str = "sizes") -> None:
        self.out_dir = out_dir
        self.sizes: dict[int, int] = {}
        self.lrs: dict[int, float] = {}
        self.hook_reads: list[int] = []
        self._norms_before: dict[str, Any] = {}

    def _hook(self, trainer: Trainer) -> Any:
        from batchlab.callbacks import NoiseScaleMonitor

        monitor = next((c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor)), None)
        return getattr(monitor, "_ranks", None)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.sizes[step] = self.sizes.get(step, 0) + len(batch[0])
        hook = self._hook(trainer)
        if hook is not None:  # the hook's sums, held (not changed) to see whether this batch's backward adds to them
            self._norms_before = dict(hook.local_sq)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        hook, before = self._hook(trainer), self._norms_before
        if hook is not None and (hook.local_sq.keys() != before.keys()
                                 or any(v is not before[k] for k, v in hook.local_sq.items())):
            self.hook_reads.append(trainer.global_step - 1)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = float(optimizer.param_groups[0]["lr"])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from batchlab.callbacks import BatchSizeWarmup, NoiseScaleMonitor

        monitor = next((c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor)), None)
        readings = [[r.step, r.b_simple, r.method] for r in monitor.readings] if monitor is not None else None
        warmup = next((c for c in trainer.callbacks if isinstance(c, BatchSizeWarmup)), None)
        changes = [[c.step, c.batch_size, c.reason] for c in warmup.changes] if warmup is not None else None
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hook_reads = self.hook_reads if self._hook(trainer) is not None else None
        record = {"sizes": self.sizes, "lrs": self.lrs, "readings": readings, "changes": changes,
                  "hook_reads": hook_reads}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class MarkStep(Callback):
    """Rank 0 writes the file ``path`` once training has passed optimizer step ``step``: a test that sends a signal
    waits for it, so that the signal lands after that step however slow or loaded the machine is."""

    def __init__(self, step: int, path: str = "step-reached") -> None:
        self.step = step
        self.path = path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_rank == 0 and trainer.global_step >= self.step and not Path(self.path).exists():
            Path(self.path).write_text(str(trainer.global_step))


class NonFiniteOnOneRank(MLPRegressor):
    """The seed's MLP whose training loss is infinite on rank 1 alone at optimizer step ``at_step`` (each rank's
    loss is its own shard's: at the edge of divergence one rank's can overflow a step before the others')."""

    def __init__(self, *args: Any, at_step: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_step = at_step

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        trainer = self._trainer
        if trainer is not None and trainer.global_rank == 1 and trainer.global_step == self.at_step:
            loss = loss * float("inf")
        return loss


def _linear_truth(dim: int, distance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``NoisyLinear``'s target weights w* and its own weights w* + delta, |delta| = ``distance``: both from a
    fixed seed, so that the model and its data agree without being given each other."""
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    delta = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    return w_star, w_star + delta / delta.norm() * distance


class NoisyLinear(LightningModule):
    """A bias-free linear model held (SGD at LR 0) at distance ``distance`` from the w* of ``NoisyLinearData``, so
    that its gradient noise scale stays at the closed form B_simple = (dim + 1) + dim sigma^2 / distance^2 however
    long it trains (tests/test_callbacks.py's linear problem, loadable by class path)."""

    def __init__(self, dim: int = 4, distance: float = 1.0) -> None:
        super().__init__()
        self.net = torch.nn.Linear(dim, 1, bias=False).double()
        with torch.no_grad():
            self.net.weight.copy_(_linear_truth(dim, distance)[1].T)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class NoisyLinearData(LightningDataModule):
    """x ~ N(0, I), y = w* . x + N(0, sigma^2), served by a plain shuffled torch ``DataLoader``."""

    def __init__(self, n: int = 16384, dim: int = 4, sigma: float = 1.0, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.dim, self.sigma, self.batch_size = n, dim, sigma, batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.n, self.dim, generator=g, dtype=torch.float64)
        noise = self.sigma * torch.randn(self.n, 1, generator=g, dtype=torch.float64)
        self.rows = TensorDataset(x, x @ _linear_truth(self.dim, 1.0)[0] + noise)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=True)
