"""``SplitData``: the examples' shared loaders. A subclass sets ``self.splits`` (``train`` and ``val``, each a tuple
of tensors) in ``setup`` and declares ``batch_size`` and ``data_seed`` hparams; this serves them as sliced tensor
batches (``batchlab.data.TensorBatches``), sharded across DDP ranks, the batch size read at loader time.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule

from batchlab.data import TensorBatches


class SplitData(LightningDataModule):
    """Training batches of ``hparams.batch_size``, shuffled; validation in one batch per rank."""

    splits: dict

    def _world(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self) -> TensorBatches:
        rank, world = self._world()
        rows = len(self.splits["train"][0]) // world
        # Every step a full batch, as steps to target assume (without it the grid's largest B alternates with a
        # smaller last batch); a batch beyond the data, as the batch-size finder tries, is one batch of all of it.
        return TensorBatches(self.splits["train"], self.hparams.batch_size, shuffle=True,
                             drop_last=self.hparams.batch_size <= rows, rank=rank, world_size=world,
                             seed=self.hparams.data_seed)

    def val_dataloader(self) -> TensorBatches:
        rank, world = self._world()
        return TensorBatches(self.splits["val"], len(self.splits["val"][0]), rank=rank, world_size=world)
