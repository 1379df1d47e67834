"""The seed notebook's model as a LightningModule: an MLP regressor trained with MSE.

LightningCLI exposes the constructor as ``--model.*`` flags. The optimizer is configured here, through the
model's own arguments (``--model.lr``, ``--model.optimizer``, ``--model.momentum``), not through LightningCLI's
``--optimizer`` group (batchlab turns that off): the learning rate must be an ``lr`` attribute for Lightning's
LR finder and for the batch-size study to set it, and one way to configure it is enough.

With the defaults (``hidden_sizes=[8]``, SGD, ``lr=0.001``) it is the notebook's ``MyNeuralNet``, layer for layer,
created in the same order so that the same seed gives the same initial weights.

``compile`` runs the network through ``torch.compile`` (forward and backward), for large batches on a GPU, where
``reduce-overhead`` also captures the step's kernels in CUDA graphs; it changes how a step runs, never what it
computes.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from batchlab.errors import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, check_arguments


class MLPRegressor(LightningModule):
    """An MLP, ``n_features -> hidden_sizes... -> 1`` with ReLU between layers, trained on the MSE.

    Args:
        n_features: Inputs per sample; the CLI links it to ``--data.n_features``.
        hidden_sizes: Width of each hidden layer; the notebook's ``[8]``. An empty list is a linear model.
        lr: Learning rate, the notebook's 0.001. Read when the optimizer is built.
        optimizer: ``sgd`` (the notebook's) or ``adam``.
        momentum: SGD momentum (the notebook uses none); ignored by Adam.
        weight_decay: L2 penalty passed to the optimizer.
        compile: ``torch.compile`` the network with this mode (``default``, ``reduce-overhead`` or
            ``max-autotune``); None runs it eagerly. Compiling takes seconds to minutes, so it pays off only for long
            runs of large batches, mostly on a GPU (``reduce-overhead`` captures CUDA graphs there). Checkpoints
            keep the same keys either way.
    """

    def __init__(
        self,
        n_features: PositiveInt = 2,
        hidden_sizes: list[PositiveInt] = [8],  # noqa: B006 (jsonargparse needs a literal default)
        lr: PositiveFloat = 1e-3,
        optimizer: Literal["sgd", "adam"] = "sgd",
        momentum: Fraction = 0.0,
        weight_decay: NonNegativeFloat = 0.0,
        compile: Optional[Literal["default", "reduce-overhead", "max-autotune"]] = None,
    ) -> None:
        super().__init__()
        check_arguments(MLPRegressor.__init__, locals())
        self.save_hyperparameters()
        widths = [n_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 1))
        metrics = MetricCollection({"loss": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        if compile is not None:
            # Module.compile compiles in place, so parameter names and checkpoints stay those of the eager net.
            self.net.compile(mode=compile)

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
