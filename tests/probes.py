"""Test-only callbacks that a ``batchlab`` command loads by class path, for tests that run it as a subprocess.

Under DDP Lightning starts each further rank by re-running the command line, so whatever a test wants to observe
inside a rank has to be something the command itself can name: a callback given with
``--trainer.callbacks+=probes.RecordSeenRows``. The tests put this folder on the subprocess's ``PYTHONPATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

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
