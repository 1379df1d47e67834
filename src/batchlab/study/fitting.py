"""The one way a study trains: ``Fitter.fit``, used by every measurement (throughput, the LR sweep's trials, the
noise scale's reference run).

Each fit starts from copies of the configured model and data, with the batch size and LR set through the
batch-size finder's and the LR finder's contracts (a ``batch_size`` attribute or hparam of the model or the data,
an ``lr`` or ``learning_rate`` one of the model), from the run's seed, on a fresh Trainer built from the
configuration's Trainer arguments (accelerator, devices, precision, strategy...) less those the study sets itself,
with Lightning's per-fit chatter hidden (``batchlab.quiet.quiet_lightning``).

Ctrl+C and SIGTERM stop a study cleanly: inside ``Fitter.stopping_on_signals()`` they are only noted, the running
fit ends at its next step, the study then raises ``RunInterrupted`` and a fit cut short is not a measurement.
Under DDP ``StudyStopTogether`` makes every rank stop after the same step (``batchlab.signals``).
``CurveRecorder`` records the monitored metric of a fit, at every validation.
"""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor

from batchlab.errors import ConfigError, check
from batchlab.quiet import quiet_lightning
from batchlab.signals import RunInterrupted, StopTogether, agreed_signal, noting_signals, signal_of
from batchlab.study.ranks import Ranks
from batchlab.study.results import CurvePoint

# Trainer arguments a study sets itself for each of its runs; every other one (accelerator, devices, precision,
# strategy, gradient clipping...) comes from the configuration.
STUDY_OWNED = {
    "logger", "callbacks", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "val_check_interval",
    "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches", "limit_test_batches",
    "limit_predict_batches", "num_sanity_val_steps", "enable_progress_bar", "enable_model_summary",
    "enable_checkpointing", "default_root_dir", "log_every_n_steps", "fast_dev_run", "overfit_batches",
    "reload_dataloaders_every_n_epochs", "profiler",
}


# The batch-size finder's and the LR finder's contracts: an attribute or hparam of the model or the data.
def _holders(name: str, *objects: Any) -> list[Any]:
    holders = []
    for obj in objects:
        if obj is None:
            continue
        if hasattr(obj, name):
            holders.append(obj)
        hparams = getattr(obj, "hparams", None)
        if hparams is not None and name in hparams:
            holders.append(hparams)
    return holders


def get_value(name: str, *objects: Any) -> Any:
    holder = _holders(name, *objects)[-1]
    return holder[name] if isinstance(holder, dict) else getattr(holder, name)


def set_value(name: str, value: Any, *objects: Any) -> None:
    for holder in _holders(name, *objects):
        if isinstance(holder, dict):
            holder[name] = value
        else:
            setattr(holder, name, value)


def lr_name(model: LightningModule) -> str:
    for name in ("lr", "learning_rate"):
        if _holders(name, model):
            return name
    raise ConfigError(
        f"{type(model).__name__} has no `lr` or `learning_rate` attribute or hparam: the study sets the learning "
        "rate through it (the LR finder's contract)"
    )


def check_batch_size_holder(model: LightningModule, datamodule: Any) -> None:
    check(
        bool(_holders("batch_size", model, datamodule)),
        f"neither {type(model).__name__} nor {type(datamodule).__name__} has a `batch_size` attribute or hparam: "
        "the study sets the batch size through it (the batch-size finder's contract)",
    )


def reinitialise(model: LightningModule, seed: int) -> None:
    """Draw new initial weights for ``model`` from ``seed``, as its constructor would: every submodule's own
    ``reset_parameters`` (torch's layers all have one), in module order. A parameter a custom module creates
    without one keeps its value, the same for every seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not model:
                reset()


class Fitter:
    """Runs a study's fits, and stops the study on a signal.

    Args:
        model: The configured model; every fit trains a copy of it, from its initial weights.
        datamodule: The configured data; every fit reads a copy of it.
        trainer_kwargs: The configuration's Trainer arguments (those the study sets itself are left out).
        seed: Every fit starts from it.
        out: The study's folder, as configured (where an interrupted study says its measurements are kept).
    """

    def __init__(self, model: LightningModule, datamodule: LightningDataModule, trainer_kwargs: dict[str, Any],
                 seed: int, out: str) -> None:
        self.model, self.datamodule, self.seed = model, datamodule, seed
        self.trainer_kwargs = {k: v for k, v in trainer_kwargs.items() if k not in STUDY_OWNED}
        self.lr_attr = lr_name(model)
        self.root: Optional[Path] = None  # the study's folder, once open: the Trainers' default_root_dir
        self.out = out
        with quiet_lightning():
            probe = Trainer(**{**self.trainer_kwargs, "logger": False, "enable_progress_bar": False})
        self.strategy, self.device = probe.strategy, probe.strategy.root_device
        self.ranks = Ranks(probe.strategy, probe.world_size)
        self._stop: Optional[str] = None
        self._active: Optional[Trainer] = None
        # What this process's fits spent, optimizer steps and training samples: the folder records each
        # measurement's share of it (``StudyFolder.measured``), so that a resumed study still knows its cost.
        self.fits = self.steps = self.samples = 0

    def trainer(self, callbacks: list[Callback], max_steps: int, validate_every: Optional[int]) -> Trainer:
        """A Trainer for one of the study's runs: ``max_steps`` optimizer steps, validating every
        ``validate_every`` of them (never for None), logging and saving nothing."""
        kwargs = dict(self.trainer_kwargs)
        kwargs.update(
            logger=False, callbacks=callbacks, max_steps=max_steps, max_epochs=-1, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
            default_root_dir=str(self.root) if self.root else None, log_every_n_steps=max(1, max_steps),
        )
        if validate_every is None:
            kwargs["limit_val_batches"] = 0
        else:
            kwargs.update(val_check_interval=validate_every, check_val_every_n_epoch=None)
        return Trainer(**kwargs)

    def fit(self, batch_size: int, lr: float, callbacks: list[Callback], max_steps: int,
            validate_every: Optional[int], seed: Optional[int] = None) -> tuple[LightningModule, Trainer]:
        """Train a copy of the model at the global ``batch_size`` and ``lr``; returns the model and its Trainer.
        From another ``seed`` than the study's the copy gets new initial weights (``reinitialise``) and another
        data order."""
        model, data = copy.deepcopy(self.model), copy.deepcopy(self.datamodule)
        seed = self.seed if seed is None else seed
        if seed != self.seed:
            reinitialise(model, seed)
        set_value("batch_size", batch_size // self.ranks.world_size, model, data)
        set_value(self.lr_attr, lr, model)
        seed_everything(seed, verbose=False)
        self.check_stop()
        if self.ranks.world_size > 1:
            callbacks = [*callbacks, StudyStopTogether(self)]
        with quiet_lightning():
            trainer = self._active = self.trainer(callbacks, max_steps, validate_every)
            try:
                trainer.fit(model, datamodule=data)
            except BaseException as exc:
                signame = signal_of(exc)  # Lightning's own SIGTERM handler stops a fit with an exception
                if signame is None:
                    raise
                self._stop = signame
            finally:
                self._active = None
                self.fits += 1
                self.steps += trainer.global_step
                self.samples += trainer.global_step * batch_size
        self.check_stop()  # a fit cut short by a signal is not a measurement
        return model, trainer

    def check_monitor(self, monitor: str) -> None:
        """One validation batch, so that a metric the model does not log is reported before any measurement."""
        model, data = copy.deepcopy(self.model), copy.deepcopy(self.datamodule)
        with quiet_lightning():
            trainer = self.trainer([StudyStopTogether(self)] if self.ranks.world_size > 1 else [], max_steps=1,
                                   validate_every=1)
            trainer.limit_val_batches = 1
            trainer.validate(model, datamodule=data, verbose=False)
        if monitor not in trainer.callback_metrics:
            logged = sorted(trainer.callback_metrics) or "nothing (is there a validation split?)"
            raise ConfigError(f"the model does not log monitor={monitor!r} in validation; it logs {logged}")

    @contextmanager
    def stopping_on_signals(self) -> Iterator[None]:
        """Turn Ctrl+C and SIGTERM into a clean stop: the running fit ends at its next step, nothing unfinished is
        recorded, and ``RunInterrupted`` says how to resume."""
        self._stop, self._active = None, None
        with noting_signals(self.signal_handler):
            yield

    def signal_handler(self, signum: int, frame: Any) -> None:
        self._stop = signal.Signals(signum).name
        if self._active is not None and self.ranks.world_size == 1:  # under DDP StudyStopTogether stops all ranks
            self._active.should_stop = True

    @property
    def stop_signal(self) -> Optional[str]:
        """The signal this rank had, if any."""
        return self._stop

    def check_stop(self) -> None:
        """Raise ``RunInterrupted`` once a signal came. Under DDP every rank calls this at the same points, so the
        ranks agree there, and all stop together, or none."""
        if self.ranks.world_size > 1:
            # Only the ranks' joint answer counts: a signal landing just after it waits for the next check.
            agreed = agreed_signal(self.strategy, self._stop)
            if agreed is None:
                return
            self._stop = agreed
        if self._stop:
            message = (f"study interrupted by {self._stop}; every finished measurement is kept in "
                       f"{self.root or self.out}: rerun the same command to resume")
            raise RunInterrupted(self._stop, message if self.ranks.is_global_zero else None)


class StudyStopTogether(StopTogether):
    """``StopTogether`` for the study's fits: a signal is the study's to note (its handler covers the time between
    fits too), and the ranks that agree on it end the fit, which the study then discards as unfinished."""

    def __init__(self, fitter: Fitter) -> None:
        super().__init__()
        self.fitter = fitter
        self.handle = fitter.signal_handler  # type: ignore[method-assign]

    def own_signal(self) -> Optional[str]:
        return self.fitter.stop_signal

    def stop(self, trainer: Trainer, signame: str) -> None:
        trainer.should_stop = True


class CurveRecorder(Callback):
    """Records the monitored metric at every validation, with the step, samples seen and seconds so far, and
    stops a fit whose training loss is no longer finite (it has diverged; no need to wait for a check)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.curve: list[CurvePoint] = []
        self.samples = 0
        self.diverged_at: Optional[int] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += extract_batch_size(batch) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        diverged = isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all())
        if trainer.world_size > 1:
            # Each rank's loss is its own shard's: one rank's can overflow a step before the others'. A rank that
            # stopped alone would leave the others waiting in their next collective for ever: they agree first.
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            self.diverged_at = trainer.global_step
            trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            available = sorted(k for k in trainer.callback_metrics if not k.startswith("train"))
            raise ConfigError(
                f"the model does not log monitor={self.monitor!r} in validation; it logs {available or 'nothing'}"
            )
        self.curve.append(CurvePoint(step=trainer.global_step, samples=self.samples,
                                     seconds=time.perf_counter() - self._start, value=float(value)))
