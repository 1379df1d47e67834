"""The seed notebook's model as a LightningModule: an MLP regressor trained with MSE.

LightningCLI exposes the constructor as ``--model.*`` flags. The optimizer is configured here, through the
model's own arguments (``--model.lr``, ``--model.optimizer``, ``--model.momentum``), not through LightningCLI's
``--optimizer`` group (batchlab turns that off): the learning rate must be an ``lr`` attribute for Lightning's
LR finder and for the batch-size study to set it, and one way to configure it is enough.

With the defaults (``hidden_sizes=[8]``, SGD, ``lr=0.001``) it is the notebook's ``MyNeuralNet``, layer for layer,
created in the same order so that the same seed gives the same initial weights.

Two opt-in speed settings (``configs/fast.yaml`` turns on the first) change how a step runs, never what it computes:

- ``lean_step``: for models so small that Lightning's per-step machinery costs more than the maths. The step is
  written out with manual optimization (the same zero_grad, forward, backward, step as the notebook) and the
  training loss goes to the logger through ``RunSummary`` instead of ``self.log``, whose per-call bookkeeping was
  the largest single cost of a seed step. Where nothing listens to the backward and optimizer-step hooks (one
  device, 32-bit precision, no callback or module overriding them), the step calls ``loss.backward()`` and the
  optimizer itself instead of going through ``manual_backward`` and the strategy and precision layers of
  ``LightningOptimizer.step``, whose only work there would be calling those empty hooks (``hookless_step``).
- ``compile``: ``torch.compile`` the network (forward and backward), for large batches on a GPU, where
  ``reduce-overhead`` also captures the step's kernels in CUDA graphs.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
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
        lean_step: Run the training step with manual optimization and leave the training loss to ``RunSummary``,
            which logs ``train/loss`` at the same cadence and steps. The results are the same; what is lost is the
            loss on the progress bar and in ``trainer.callback_metrics`` (so no checkpoint or early stopping can
            monitor ``train/loss``), and, as with any manual optimization, the Trainer's
            ``accumulate_grad_batches`` and ``gradient_clip_val``. Worth it when a step takes well under a
            millisecond (the seed's four points at batch size 2).
        compile: ``torch.compile`` the network with this mode (``default``, ``reduce-overhead`` or
            ``max-autotune``); None runs it eagerly. Compiling takes seconds to minutes, so it pays off only for long
            runs of large batches, mostly on a GPU (``reduce-overhead`` captures CUDA graphs there). Checkpoints
            keep the same keys either way.
    """

    def __init__(
        self,
        n_features: int = 2,
        hidden_sizes: list[int] = [8],  # noqa: B006 (jsonargparse needs a literal default)
        lr: float = 1e-3,
        optimizer: Literal["sgd", "adam"] = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lean_step: bool = False,
        compile: Optional[Literal["default", "reduce-overhead", "max-autotune"]] = None,
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
        if compile not in (None, "default", "reduce-overhead", "max-autotune"):
            raise ConfigError(f"compile={compile!r} is not allowed: use null, 'default', 'reduce-overhead' or 'max-autotune'")
        self.save_hyperparameters()
        widths = [n_features, *hidden_sizes]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 1))
        metrics = MetricCollection({"loss": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.automatic_optimization = not lean_step
        self._hookless = False  # set for each fit in on_train_start
        self._cuda_graphs = compile == "reduce-overhead"
        # RunSummary reads this to know that it must write the training loss itself.
        self.logs_train_loss = not lean_step
        if compile is not None:
            # Module.compile compiles in place, so parameter names and checkpoints stay those of the eager net.
            self.net.compile(mode=compile)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets bookkeeping attributes (the current hook's name) on the module around every hook, a dozen
        # times per step, and nn.Module.__setattr__ checks each against parameters, buffers and submodules first.
        # For a plain value under a name that is none of those, that check ends in object.__setattr__ anyway.
        if name == "_current_fx_name":  # Lightning's own, set twice per hook call: never a parameter or module
            object.__setattr__(self, name, value)
        elif type(value) in _PLAIN_TYPES and name not in self.__dict__.get("_parameters", _EMPTY) and (
            name not in self.__dict__.get("_buffers", _EMPTY) and name not in self.__dict__.get("_modules", _EMPTY)
        ):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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
        if self.automatic_optimization:
            return self._shared_step(batch, "train")
        # The lean step: the notebook's four lines. Through Lightning's backward and optimizer wrappers (precision
        # plugins, strategies and the backward/optimizer hooks) unless nothing would listen to them.
        x, y = batch
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer = self.optimizers()
        if self._hookless:
            optimizer.optimizer.zero_grad()  # the torch optimizer's own: the wrapper's costs a third more
            loss = F.mse_loss(self(x), y)
            loss.backward()
            step_without_hooks(optimizer)
        else:
            optimizer.zero_grad()
            loss = F.mse_loss(self(x), y)
            self.manual_backward(loss)
            optimizer.step()
        return loss.detach()

    def on_train_start(self) -> None:
        self._hookless = not self.automatic_optimization and hookless_step(self.trainer, self)

    def on_train_end(self) -> None:
        self._hookless = False

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self(batch[0])

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before each validation pass to save memory, and calls this every epoch even
        # when there is nothing to validate (the seed run: a zero_grad per two steps). Gradients are zeroed before
        # every backward anyway, so skipping it there changes nothing but the time.
        if any(self.trainer.num_val_batches):
            super().on_validation_model_zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


# Lightning inspects ``training_step``'s signature at every step (``inspect.getfullargspec``, to decide whether to
# pass ``batch_idx``): ~30 us on the 2-core VM, a tenth of a seed step. ``inspect`` takes a precomputed
# ``__signature__`` as it is, which leaves ~9 us. A subclass that overrides ``training_step`` is inspected as usual.
MLPRegressor.training_step.__signature__ = inspect.signature(MLPRegressor.training_step)  # type: ignore[attr-defined]

_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})
_EMPTY: dict = {}

# The hooks that manual_backward and LightningOptimizer.step call around the backward and the optimizer step.
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def hookless_step(trainer: Trainer, module: LightningModule) -> bool:
    """Whether, in this fit, ``manual_backward(loss)`` and ``optimizer.step()`` do nothing but ``loss.backward()``,
    the optimizer's step and Lightning's step counting: one device, plain 32-bit precision, and no callback or module
    hook around the backward and the step. Strategies and precision plugins are matched by exact type, so that a
    subclass (or DDP, or mixed precision) keeps Lightning's path."""
    if type(trainer.strategy) is not SingleDeviceStrategy or type(trainer.precision_plugin) is not Precision:
        return False
    if any(is_overridden(hook, module, LightningModule) for hook in (*_STEP_HOOKS, "backward")):
        return False
    return not any(is_overridden(hook, cb, Callback) for cb in trainer.callbacks for hook in _STEP_HOOKS)


def step_without_hooks(optimizer: LightningOptimizer) -> None:
    """``optimizer.step()`` for a ``hookless_step`` fit: the optimizer's own step between the two callbacks that
    Lightning's manual-optimization loop installs on the ``LightningOptimizer`` to count steps (``global_step``) and
    profile them; the strategy and precision layers in between would only call the empty hooks.

    The only use of Lightning's private API in batchlab (``_on_before_step``/``_on_after_step``, no public way to
    count a step exists); ``tests/test_fast_path.py`` checks that steps are counted and hooks still run when
    overridden.
    """
    optimizer._on_before_step()
    optimizer.optimizer.step()
    optimizer._on_after_step()
