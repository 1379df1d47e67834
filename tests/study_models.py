"""A second model and data, unlike batchlab's own, to prove the study works with any LightningModule and
LightningDataModule: a classifier trained with Adam whose learning rate is a ``learning_rate`` hparam, logging
``val/acc`` (a metric to maximise), fed by a plain ``DataLoader`` from a DataModule whose batch size is a plain
attribute. Used by class_path (``study_models.Classifier``) from tests/test_study.py and tests/test_newcomer.py."""

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset


class Blobs(LightningDataModule):
    """Two Gaussian blobs in ``dim`` dimensions, labels 0/1."""

    def __init__(self, n: int = 2048, dim: int = 4, separation: float = 1.5, batch_size: int = 16) -> None:
        super().__init__()
        self.n, self.dim, self.separation = n, dim, separation
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (self.n,), generator=g)
        x = torch.randn(self.n, self.dim, generator=g) + self.separation * (2 * y[:, None].float() - 1)
        self.train = TensorDataset(x[: self.n * 3 // 4], y[: self.n * 3 // 4])
        self.val = TensorDataset(x[self.n * 3 // 4 :], y[self.n * 3 // 4 :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=512)


class Classifier(LightningModule):
    def __init__(self, dim: int = 4, learning_rate: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), batch_size=len(y))
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


class NormedClassifier(Classifier):
    """With batch norm, whose in-place running statistics torch.func cannot vmap over: the study must fall back
    to gradient norms at two batch sizes."""

    def __init__(self, dim: int = 4, learning_rate: float = 1e-3) -> None:
        super().__init__(dim, learning_rate)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )


class ManualClassifier(Classifier):
    """Manual optimization: its training_step steps the optimizer itself and returns nothing to differentiate."""

    def __init__(self, dim: int = 4, learning_rate: float = 1e-3) -> None:
        super().__init__(dim, learning_rate)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()


class SharedNames(Classifier):
    """Arguments named as those of batchlab's MLP, with other defaults: given by class_path, it must get its own
    defaults, none of the values batchlab's configs set for the MLP."""

    def __init__(
        self, dim: int = 4, lr: float = 0.5, hidden_sizes: list[int] = [3], momentum: float = 0.25  # noqa: B006
    ) -> None:
        super().__init__(dim, learning_rate=lr)
        self.hidden_sizes, self.momentum = hidden_sizes, momentum
