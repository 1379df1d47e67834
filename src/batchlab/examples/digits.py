"""The digits example: a small CNN trained with Adam on scikit-learn's bundled 8x8 handwritten digits (1,797
images, offline), ``configs/digits.yaml``:

    batchlab study -c configs/digits.yaml --quick

``DigitsData`` standardises the pixels with the training split's mean and spread and holds out a validation split;
``DigitsCNN`` logs ``val/loss`` and ``val/acc``. scikit-learn is an optional dependency (``batchlab[examples]``),
imported only when the data is built.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from batchlab.errors import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, check, check_arguments
from batchlab.examples.splits import SplitData


@functools.lru_cache(maxsize=1)
def digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(n, 1, 8, 8)`` pixel values 0-16 and their labels; kept, since a study builds the data
    anew for every one of its fits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1), torch.tensor(digits.target)


class DigitsData(SplitData):
    """scikit-learn's 8x8 digits as ``(1, 8, 8)`` float images and integer labels 0-9.

    Args:
        batch_size: Training images per batch on each device; read each time the training loader is built.
        val_fraction: Fraction of the 1,797 images held out for validation.
        data_seed: Seed of the split, separate from the training seed.
    """

    def __init__(self, batch_size: PositiveInt = 32, val_fraction: Fraction = 0.2, data_seed: int = 0) -> None:
        super().__init__()
        check_arguments(DigitsData.__init__, locals())
        check(val_fraction > 0, "val_fraction=0 is not allowed: the study validates on the held-out digits")
        # Checked here, before anything runs, so that a missing optional dependency is one line, not a traceback.
        check(importlib.util.find_spec("sklearn") is not None,
              "the digits example needs scikit-learn: pip install 'batchlab[examples]' (or scikit-learn)")
        self.save_hyperparameters()
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        x, y = digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.data_seed))
        n_val = max(1, round(len(x) * self.hparams.val_fraction))
        val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
        # The training split's statistics only, so that validation is data the model has not seen in any form.
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.splits = {"train": (x[train], y[train]), "val": (x[val], y[val])}


class DigitsCNN(LightningModule):
    """Two 3x3 convolutions (``channels`` wide, ReLU), a 2x2 max-pool and a linear layer to the 10 classes, trained
    on the cross-entropy with Adam.

    Args:
        channels: Output channels of the two convolutions.
        lr: Adam's learning rate; read when the optimizer is built (the study sets it).
        weight_decay: Adam's L2 penalty.
    """

    def __init__(self, channels: tuple[PositiveInt, PositiveInt] = (8, 16), lr: PositiveFloat = 2e-3,
                 weight_decay: NonNegativeFloat = 0.0) -> None:
        super().__init__()
        check_arguments(DigitsCNN.__init__, locals())
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 4 * 4, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), batch_size=len(y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
