"""The seed notebook's model as a LightningModule: an MLP regressor trained with MSE.

LightningCLI exposes the constructor as ``--model.*`` flags. The optimizer is configured here, through the
model's own arguments (``--model.lr``, ``--model.optimizer``, ``--model.momentum``), not through LightningCLI's
``--optimizer`` group (batchlab turns that off): the learning rate must be an ``lr`` attribute for Lightning's
LR finder and for the batch-size study to set it, and one way to configure it is enough.

With the defaults (``hidden_sizes=[8]``, SGD, ``lr=0.001``) it is the notebook's ``MyNeuralNet``, layer for layer,
created in the same order so that the same seed gives the same initial weights.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from batchlab.errors import ConfigError, check


class MLPRegressor(LightningModule):
    """An MLP, ``n_features -> hidden_sizes... -> 1`` with ReLU between layers, trained on the MSE.

    Args:
        n_features: Inputs per sample; the CLI links it to ``--data.n_features``.
        hidden_sizes: Width of each hidden layer; the notebook's ``[8]``. An empty list is a linear model.
        lr: Learning rate, the notebook's 0.001. Read when the optimizer is built.
        optimizer: ``sgd`` (the notebook's) or ``adam``.
        momentum: SGD momentum (the notebook uses none); ignored by Adam.
        weight_decay: L2 penalty passed to the optimizer.
    """

    def __init__(
        self,
        n_features: int = 2,
        hidden_sizes: list[int] = [8],  # noqa: B006 (jsonargparse needs a literal default)
        lr: float = 1e-3,
        optimizer: Literal["sgd", "adam"] = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check(n_features >= 1, f"n_features={n_features} is not allowed: use a positive integer")
        for width in hidden_sizes:
            check(width >= 1, f"hidden_sizes={list(hidden_sizes)} is not allowed: every width must be >= 1")
        check(math.isfinite(lr) and lr > 0, f"lr={lr} is not allowed: use a finite number > 0")
        check(0 <= momentum < 1, f"momentum={momentum} is not allowed: use a number in [0, 1)")
        check(
            math.isfinite(weight_decay) and weight_decay >= 0,
            f"weight_decay={weight_decay} is not allowed: use a finite number >= 0",
        )
        if optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer={optimizer!r} is not allowed: use 'sgd' or 'adam'")
        self.save_hyperparameters()
        widths = [n_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 1))
        metrics = MetricCollection({"loss": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @property
    def lr(self) -> float:
        return self.hparams.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.hparams.lr = value

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        pred = self(x)
        loss = F.mse_loss(pred, y)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True)
        else:
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(pred, y)
            self.log_dict(metrics, batch_size=len(x))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
