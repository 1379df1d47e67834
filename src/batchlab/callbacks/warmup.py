"""``BatchSizeWarmup``: let the batch size grow during a fit, as the critical batch size grows.

    batchlab fit -c configs/study.yaml -c configs/batch_size_warmup.yaml
    Trainer(callbacks=[NoiseScaleMonitor(), BatchSizeWarmup(factor=2, max_batch_size=4096)])

The fit starts at its configured batch size. Whenever the monitored noise scale (the critical batch's estimate:
``NoiseScaleMonitor.b_simple_since`` the last change, over at least ``min_readings`` measurements, with its |G|^2
one standard error higher so that noise alone rarely grows it) passes ``factor`` x the global batch, or at the
steps or samples of a ``schedule``, the batch is multiplied by ``factor``, up to ``max_batch_size``, and the
learning rate by the rule's factor (``sqrt`` for Adam-family optimizers, ``linear`` for others, as Merrill et al.
2025, "Critical Batch Size Revisited", do for OLMo; the study's rules). The batch grows from the first batch the
loader has not yet cut (``batchlab.batching``), and the LR moves when that batch trains, so the two always change
at the same step, on every rank. The batch size the datamodule (or module) holds follows it.

The state (the sizes by batch and the changes made) is in the checkpoint: a resumed fit goes on with
the batch size and schedule where they were (the LR is in the optimizer's own state). Each change is logged as
``train/batch_size`` and ``train/lr`` and is a ``BatchSizeChange`` in ``changes``, which ``summary.json`` keeps as
``batch_size_schedule``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr

from batchlab import scaling
from batchlab.batching import BatchSizes, resizable
from batchlab.callbacks.noise_monitor import NoiseScaleMonitor
from batchlab.errors import ConfigError, PositiveInt, check, check_arguments

LRRule = Literal["auto", "sqrt", "linear", "none"]


@dataclass
class BatchSizeChange:
    """One batch size the fit trained at, from ``step`` on: after ``samples`` samples (all ranks), the global
    batch and the learning rate of the first param group; ``reason`` is what moved it."""

    step: int
    samples: int
    batch_size: int
    lr: Optional[float]
    reason: str


class BatchSizeWarmup(Callback):
    """Grow the batch size during a fit (see the module's docstring).

    Args:
        factor: The batch is multiplied by this integer at each change.
        max_batch_size: The largest global batch; None: the size a batch-size finder found earlier in this fit
            where one ran (its memory limit on a GPU), else the training data of one device.
        schedule: Fixed points (in ``schedule_unit``) at which the batch grows, one change each; None follows
            the ``NoiseScaleMonitor`` in the trainer's callbacks.
        schedule_unit: ``steps`` (optimizer steps) or ``samples`` (seen, all ranks).
        lr_rule: How the LR follows the batch: ``sqrt`` (x sqrt(factor)), ``linear`` (x factor) or ``none``;
            ``auto``: sqrt for Adam-family optimizers, linear for others.
        min_readings: Noise-scale measurements the monitor must make before each change (after the last one): a
            measurement at a batch far below B_simple is noisy, and each change should rest on some at its size.
    """

    def __init__(self, factor: PositiveInt = 2, max_batch_size: Optional[PositiveInt] = None,
                 schedule: Optional[list[PositiveInt]] = None, schedule_unit: Literal["steps", "samples"] = "steps",
                 lr_rule: LRRule = "auto", min_readings: PositiveInt = 5) -> None:
        check_arguments(BatchSizeWarmup.__init__, locals())
        check(factor >= 2, f"BatchSizeWarmup factor={factor}: the batch must grow, use an integer factor >= 2")
        if schedule is not None:
            check(list(schedule) == sorted(set(schedule)),
                  f"BatchSizeWarmup schedule={list(schedule)}: give increasing {schedule_unit}, each once")
        self.factor, self.max_batch_size, self.schedule = factor, max_batch_size, schedule
        self.schedule_unit, self.lr_rule, self.min_readings = schedule_unit, lr_rule, min_readings
        self.sizes: Optional[BatchSizes] = None
        self.changes: list[BatchSizeChange] = []
        self._restored: Optional[dict[str, Any]] = None

    # Setup: the loader is made resizable before Lightning builds it; everything is checked before training.
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        self._source, original = source, source.train_dataloader
        self._pending: list[tuple[int, int]] = []  # (first batch index, per-device size) not trained yet

        def train_dataloader() -> Any:
            return resizable(original(), self._sizes_for)

        source.train_dataloader = train_dataloader  # this instance only; put back at teardown
        self.sizes, self.changes = None, []
        # A batch-size finder runs its trials in on_fit_start, before this callback's (Lightning puts it first):
        # the warmup starts with the fit's own training, at the size the finder leaves.
        self._started = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and "train_dataloader" in vars(getattr(self, "_source", object())):
            del self._source.train_dataloader

    def _sizes_for(self, size: int) -> BatchSizes:
        if self.sizes is None:
            restored, self._restored = self._restored, None
            self.sizes = BatchSizes.from_state(restored["sizes"]) if restored else BatchSizes(size)
            self._fresh = restored is None
        elif not self._started and self._fresh:  # built again before training (a finder's trials): start there
            self.sizes.changes, self.sizes.cut_count, self.sizes.trained = [(0, size)], 0, 0
        return self.sizes

    def check_fit(self, trainer: Trainer, optimizers: list[Any], batch_size: Optional[int]) -> None:
        """Raise ``ConfigError`` where this fit cannot warm up as configured (``batch_size``: per device, where
        known). ``batchlab.preflight`` calls it before anything is written, the fit's start again."""
        if not optimizers:
            raise ConfigError("BatchSizeWarmup needs an optimizer to move the learning rate with the batch")
        if self.schedule is None and not any(isinstance(c, NoiseScaleMonitor) for c in trainer.callbacks):
            raise ConfigError("BatchSizeWarmup without a schedule follows the noise scale: add "
                              "batchlab.callbacks.NoiseScaleMonitor to the trainer's callbacks, or give a schedule")
        if batch_size is not None and self.max_batch_size is not None:
            start = batch_size * trainer.world_size
            check(self.max_batch_size >= start, f"BatchSizeWarmup max_batch_size={self.max_batch_size} is below the "
                                                f"starting global batch {start}: give a larger max_batch_size")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        size = lightning_getattr(pl_module, "batch_size") if lightning_hasattr(pl_module, "batch_size") else None
        self.check_fit(trainer, trainer.optimizers, size if isinstance(size, int) else None)
        adam = all("betas" in g for g in trainer.optimizers[0].param_groups)
        self._rule = {"auto": "sqrt" if adam else "linear"}.get(self.lr_rule, self.lr_rule)
        self._monitor = next((c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor)), None)
        self._reasons: dict[int, str] = {}
        self._readings_seen = self._readings_at_growth = 0
        self._logged_at = -1
        if self._restored is not None:
            self.changes = [BatchSizeChange(**c) for c in self._restored.get("changes", [])]
            self._reasons = {int(k): v for k, v in self._restored.get("reasons", {}).items()}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check(self.sizes is not None, "BatchSizeWarmup: the train dataloader was not built through "
                                      "train_dataloader(); pass a datamodule or define train_dataloader")
        self._started = True
        world = trainer.world_size
        start = self.sizes.current
        rows = self._rows_per_device(trainer)
        # A batch cannot hold more than a device's share of the data.
        self._max = min(self._max_batch_size(trainer) // world, rows or math.inf)
        check(self._max >= start, f"BatchSizeWarmup max_batch_size={self._max * world} is below the starting "
                                  f"global batch {start * world}: give a larger max_batch_size")
        if not self.changes:
            self.changes.append(BatchSizeChange(trainer.global_step, 0, start * world, _lr(trainer), "start"))
            self._log(trainer)
            if self.schedule is not None:
                self._plan(trainer)
        # Changes cut but not trained yet (all of a schedule's; a resumed fit's): the LR follows when they train.
        self._pending = [(first, size) for first, size in self.sizes.changes[1:] if first >= self.sizes.trained]

    def _plan(self, trainer: Trainer) -> None:
        """A fixed schedule, laid out in batches before training: each change lands exactly at its step (or the
        first step past its samples), whatever the loader prefetches."""
        accumulate, world, sizes = trainer.accumulate_grad_batches, trainer.world_size, self.sizes
        size, index, samples = sizes.current, sizes.trained, 0
        for point in self.schedule:
            if size * self.factor > self._max:
                break
            if self.schedule_unit == "steps":
                first = point * accumulate
            else:  # whole steps at the current size until the samples reach the point
                per_step = size * accumulate * world
                first = index + max(0, -(-(point - samples) // per_step)) * accumulate
            if first < index:
                continue
            samples += (first - index) * size * world
            size, index = size * self.factor, first
            sizes.changes.append((first, size))
            self._reasons[first] = f"schedule: {self.schedule_unit} {point}"

    def _max_batch_size(self, trainer: Trainer) -> int:
        if self.max_batch_size is not None:
            return self.max_batch_size
        found = [b for b in (getattr(c, "optimal_batch_size", None) for c in trainer.callbacks) if isinstance(b, int)]
        if found:  # a batch-size finder ran earlier in this fit: its limit (memory, on a GPU)
            return found[-1] * trainer.world_size
        return (self._rows_per_device(trainer) or self.sizes.current) * trainer.world_size

    @staticmethod
    def _rows_per_device(trainer: Trainer) -> Optional[int]:
        loader = trainer.train_dataloader
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
        try:
            return len(sampler)
        except TypeError:
            return None

    # Each step: the LR follows a batch of a new size; after a reading, the noise scale may grow the batch.
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._started:
            return
        index = self.sizes.trained
        while self._pending and self._pending[0][0] <= index:
            first, size = self._pending.pop(0)
            self._apply(trainer, pl_module, size, self._reasons.get(first, ""))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._started:
            return
        self.sizes.trained += 1
        if trainer.global_step % trainer.log_every_n_steps == 0 and trainer.global_step != self._logged_at:
            self._log(trainer, trainer.global_step)  # at Lightning's cadence too: a curve, not four points
        m = self._monitor
        if self.schedule is not None or len(m.readings) == self._readings_seen:
            return  # the noise scale is read on the steps it is measured, which are the same on every rank
        self._readings_seen = len(m.readings)
        # Every rank takes rank 0's decision, so that all change at the same batch.
        grow = trainer.strategy.broadcast(self._noise_says_grow(trainer), src=0)
        size = self.sizes.latest * self.factor
        if grow and size <= self._max:
            first = self.sizes.grow(size, align=trainer.accumulate_grad_batches)
            self._pending.append((first, size))
            self._readings_at_growth = len(m.readings)
            self._reasons[first] = (f"noise scale {self._decided_by:.4g} > {self.factor} x "
                                    f"{self.sizes.at(first - 1) * trainer.world_size}")

    def _noise_says_grow(self, trainer: Trainer) -> bool:
        m = self._monitor
        if self._pending or len(m.readings) - self._readings_at_growth < self.min_readings:
            return False
        b_simple = m.b_simple_since(self._readings_at_growth, margin=1.0)
        self._decided_by = b_simple
        # An infinite B_simple is a mean |G|^2 at or below zero: the gradient lost in the noise, a sign of nothing.
        return b_simple is not None and math.isfinite(b_simple) and (
            b_simple > self.factor * self.sizes.latest * trainer.world_size)

    def _apply(self, trainer: Trainer, pl_module: LightningModule, size: int, reason: str) -> None:
        ratio = size / self.sizes.at(self.sizes.trained - 1) if self.sizes.trained else 1.0
        scale = scaling.lr_factor(self._rule, ratio)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= scale
                if "initial_lr" in group:
                    group["initial_lr"] *= scale
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * scale for lr in config.scheduler.base_lrs]
        if lightning_hasattr(pl_module, "batch_size"):
            lightning_setattr(pl_module, "batch_size", size)
        world = trainer.world_size
        self.changes.append(BatchSizeChange(trainer.global_step, self.sizes.rows_trained() * world, size * world,
                                            _lr(trainer), reason))
        self._log(trainer)

    def _log(self, trainer: Trainer, step: Optional[int] = None) -> None:
        """``train/batch_size`` (global) and ``train/lr`` now, at a change's step by default."""
        c = self.changes[-1]
        self._logged_at = c.step if step is None else step
        if trainer.is_global_zero:
            metrics = {"train/batch_size": float(self.sizes.current * trainer.world_size)}
            if (lr := _lr(trainer)) is not None:
                metrics["train/lr"] = lr
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=self._logged_at)

    def state_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes.state_dict() if self.sizes else None,
                "changes": [asdict(c) for c in self.changes],
                "reasons": dict(getattr(self, "_reasons", {}))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after ``setup`` and before the loaders are built, which read this.
        self._restored = state_dict if state_dict.get("sizes") else None


def _lr(trainer: Trainer) -> Optional[float]:
    return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
