"""``LastCheckpoint``: Lightning's ``ModelCheckpoint`` reduced to one ``last.ckpt`` written when training ends.

``configs/fast.yaml`` adds it (``trainer.callbacks+``), which replaces Lightning's default checkpoint callback:

    batchlab fit -c configs/seed.yaml -c configs/fast.yaml      # runs/seed/version_N/checkpoints/last.ckpt

Why: the default callback saves a checkpoint at every epoch end (6 ms each on the 2-core VM, against a seed epoch
of two 0.3 ms steps), and even ``ModelCheckpoint(save_top_k=0, save_last=True)`` still runs its per-step and
per-epoch checks and rebuilds its ``state_key`` string for every hook call. Being a ``ModelCheckpoint``, it is
still ``trainer.checkpoint_callback``, so ``last_model_path``, ``ckpt_path="last"`` and the run summary work.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` once, at the end of training (and nothing per step or per epoch).

    Args:
        dirpath: Folder of the checkpoint; None puts it in the logger's ``version_N/checkpoints``, as Lightning does.
        save_weights_only: Save the weights alone, without optimizer and loop state (no resuming from it).
    """

    def __init__(self, dirpath: Optional[Union[str, Any]] = None, save_weights_only: bool = False) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, save_weights_only=save_weights_only)
        self._fixed_state_key = super().state_key  # it depends on constructor arguments only

    @property
    def state_key(self) -> str:
        return self._fixed_state_key

    # ModelCheckpoint's end-of-training hook writes last.ckpt; these would only decide not to save.
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        pass

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass
