"""Facts about a run that fit, tune and the study all report: its device, its seed, its folder, its global batch
size, and its hyperparameters as TensorBoard's HParams tab and ``hparams.yaml`` show them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def global_batch_size(trainer: Trainer, per_device: int) -> int:
    """Samples per optimizer step over all devices: per device x devices x nodes x accumulated batches."""
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def global_seed() -> Optional[int]:
    """The seed ``seed_everything`` (``--seed_everything``) set for this process, if any."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def run_dir(trainer: Trainer) -> Optional[str]:
    """The run's folder, as ``Trainer.log_dir`` names it, without its broadcast.

    ``Trainer.log_dir`` is a collective call under DDP: made on rank 0 alone (the only rank that writes), it waits
    forever for the other ranks. Only rank 0's answer is meaningful: another rank's logger may name a later
    version, since it looks for a free one after rank 0 has created its folder.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return trainer.default_root_dir


def log_hparams(trainer: Trainer, params: dict[str, Any], metrics: Optional[dict[str, float]] = None) -> None:
    """Log hyperparameters (and, for TensorBoard's HParams tab, metrics) and bring ``hparams.yaml`` up to date.

    Lightning writes ``hparams.yaml`` once, at the start of a fit, from the hyperparameters as they were built;
    a value changed since (the batch size a search found) would otherwise never reach it.
    """
    logger = trainer.logger
    if logger is None or not trainer.is_global_zero:
        return
    logger.log_hyperparams(params, metrics=metrics)
    logger.save()
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        path = Path(logger.log_dir) / "hparams.yaml"
        if path.is_file():
            save_hparams_to_yaml(path, logger.hparams)


def run_hparams(trainer: Trainer, pl_module: LightningModule, **extra: Any) -> dict[str, Any]:
    """A run's hyperparameters for TensorBoard's HParams and ``hparams.yaml``: the data's and the model's as they
    are now, which is after a batch-size search wrote its size into them, then ``extra``."""
    params: dict[str, Any] = {}
    if trainer.datamodule is not None:
        params.update(trainer.datamodule.hparams)
    params.update(pl_module.hparams)
    params.update(extra)
    return {k: v for k, v in params.items() if not k.startswith("_")}
