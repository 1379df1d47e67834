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
