"""What a fit reports: the end-of-fit summary, the loss against samples seen, and printed predictions.

The ``batchlab`` command adds ``RunSummary`` to every trainer and ``PredictionPrinter`` to ``predict``'s; both work
with any LightningModule:

- ``RunSummary`` times the fit, logs the training loss against *samples seen* (``train/loss_vs_samples``, its
  step is the number of samples, so runs with different batch sizes line up in TensorBoard), logs the
  hyperparameters to TensorBoard's HParams tab against real end-of-run metrics (``hp/*``), and ends the fit
  with a ``FitSummary``: ``summary.json`` in the run's folder and the printed summary. A fit that stops early
  (Ctrl+C, SIGTERM, an error) gets its summary too, with ``interrupted: true``, what stopped it and the
  checkpoint saved.
- ``PredictionPrinter`` prints each input row of ``batchlab predict`` beside its prediction.

Written here because Lightning has no callback that reports throughput per sample or logs against samples
seen (its ``Timer`` only measures durations and ``ThroughputMonitor`` needs a per-batch length function and
logs per step, not a run summary).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

from batchlab.files import write_json
from batchlab.runs import device_name, global_batch_size, global_seed, log_hparams, run_dir, run_hparams
from batchlab.callbacks import BatchSizeChange, BatchSizeWarmup, NoiseReading, NoiseScaleMonitor
from batchlab.signals import signal_of
from batchlab.tune import BatchSizeSearch
from batchlab.tune_result import TuneResult


@dataclass
class FitSummary:
    """One fit, as ``summary.json`` holds it and ``batchlab fit`` prints it."""

    batch_size: Optional[int]
    global_batch_size: Optional[int]
    devices: int
    num_nodes: int
    accumulate_grad_batches: int
    epochs: int
    steps: int
    samples_seen: int
    train_loss: Optional[float]
    metrics: dict[str, float]
    wall_s: float
    fit_s: float
    step_s: Optional[float]
    samples_per_s: Optional[float]
    device: str
    seed: Optional[int]
    predictions: Optional[dict[str, list]]
    checkpoint: Optional[str]
    log_dir: Optional[str]
    interrupted: bool
    stopped_by: Optional[str] = None
    checkpoint_step: Optional[int] = None
    summary_path: Optional[str] = None
    # Where a batch-size search ran at the start of the fit: the size it started from, and what it found.
    batch_size_initial: Optional[int] = None
    batch_size_search: Optional[TuneResult] = field(default=None)
    # Where a BatchSizeWarmup ran: each global batch size it trained at, from which step, and why.
    batch_size_schedule: Optional[list[BatchSizeChange]] = None
    # Where a NoiseScaleMonitor ran: its last reading (the averages at that step) and how many it made.
    noise_scale: Optional[NoiseReading] = None
    noise_scale_readings: int = 0


class RunSummary(Callback):
    """Measure a fit and report it: ``summary.json``, a printed summary, TensorBoard's samples-seen curve and
    HParams.

    Args:
        filename: Name of the summary written into the run's log directory.
        verbose: Print the summary at the end of the fit.
    """

    def __init__(self, filename: str = "summary.json", verbose: bool = True) -> None:
        self.filename = filename
        self.verbose = verbose
        self.samples_seen = 0
        self.summary: Optional[FitSummary] = None
        self._fit_start: Optional[float] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fit_start = None  # set once the fit starts: an exception before then has nothing to summarise

    # Timing. Steady state is everything after the first epoch, which carries the warm-up.
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._first_epoch_end: Optional[tuple[float, int]] = None
        self._last_loss: Optional[torch.Tensor] = None
        self._last_logged_step = -1
        self.summary = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._start_step = trainer.global_step
        self._start_samples = self.samples_seen

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.samples_seen += extract_batch_size(batch) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()
        step = trainer.global_step
        # At Lightning's own logging cadence, beside its ``train/loss``.
        if trainer.loggers and self._last_loss is not None and step % trainer.log_every_n_steps == 0 and (
            step != self._last_logged_step
        ):
            self._last_logged_step = step
            value = float(self._last_loss)
            for logger in trainer.loggers:
                logger.log_metrics({"train/loss_vs_samples": value}, step=self.samples_seen)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._first_epoch_end is None:
            _sync(pl_module)
            self._first_epoch_end = (time.perf_counter(), trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _sync(pl_module)
        self._train_end = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.summary = self._summarise(trainer, pl_module)
        log_hparams(trainer, self._hparams(trainer, pl_module), metrics=self._hp_metrics())
        self._report(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Summarise a fit that stopped early; ``finish_interrupted`` writes the summary once the checkpoint exists.

        Lightning calls this hook before its checkpoint callbacks save (it orders them last) and then ends the fit
        without ``on_fit_end``. Nothing here may wait for the other ranks: they need not all reach this hook.
        """
        if trainer.state.fn != TrainerFn.FITTING or self._fit_start is None:
            return
        self.summary = self._summarise(trainer, pl_module)
        self.summary.stopped_by = signal_of(exception) or type(exception).__name__
        log_hparams(trainer, self._hparams(trainer, pl_module), metrics=self._hp_metrics())

    @rank_zero_only
    def finish_interrupted(self, trainer: Trainer) -> Optional[FitSummary]:
        """Write the summary of a fit that stopped early, naming the checkpoint to resume from and its step;
        return it.

        Call after the fit has ended (``BatchlabTrainer.fit`` does): the checkpoint is saved by then. It is the
        checkpoint of the latest step in the checkpoint folder, which holds only this run's (``batchlab.preflight``):
        the one saved on the interruption, or, where none could be (under DDP), the last one saved before. The step
        is read from the file itself: with a monitored ``save_top_k``, the best checkpoint is not the latest, and
        file times can tie (coarse file-system clocks).
        """
        s = self.summary
        if s is None or not s.interrupted:
            return None
        steps = {path: _saved_step(path) for path in _checkpoints(trainer.checkpoint_callback)}
        latest = max((p for p in steps if steps[p] is not None), key=lambda p: (steps[p], p.stat().st_mtime_ns),
                     default=None)
        s.checkpoint = str(latest) if latest else None
        s.checkpoint_step = steps[latest] if latest else None
        if s.log_dir is not None:
            s.summary_path = str(write_json(Path(s.log_dir) / self.filename, s))
        return s

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = state_dict.get("samples_seen", 0)

    def _summarise(self, trainer: Trainer, pl_module: LightningModule) -> FitSummary:
        now = time.perf_counter()
        train_end = getattr(self, "_train_end", now)
        wall_s = train_end - getattr(self, "_train_start", train_end)
        steps = trainer.global_step - getattr(self, "_start_step", 0)
        samples = self.samples_seen - getattr(self, "_start_samples", 0)
        if self._first_epoch_end is not None and trainer.global_step > self._first_epoch_end[1]:
            t0, s0 = self._first_epoch_end
            step_s = (train_end - t0) / (trainer.global_step - s0)
        else:
            step_s = wall_s / steps if steps else None
        per_device = lightning_getattr(pl_module, "batch_size") if lightning_hasattr(pl_module, "batch_size") else None
        checkpoint = trainer.checkpoint_callback
        summary = FitSummary(
            batch_size=per_device,
            global_batch_size=global_batch_size(trainer, per_device) if per_device else None,
            devices=trainer.world_size,
            num_nodes=trainer.num_nodes,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            epochs=trainer.current_epoch,
            steps=trainer.global_step,
            samples_seen=self.samples_seen,
            train_loss=float(self._last_loss) if self._last_loss is not None else None,
            metrics={k: float(v) for k, v in trainer.callback_metrics.items()
                     if v.numel() == 1 and not k.startswith("train/")},
            wall_s=wall_s,
            fit_s=now - self._fit_start,
            step_s=step_s,
            samples_per_s=samples / wall_s if wall_s > 0 else None,
            device=device_name(pl_module.device),
            seed=global_seed(),
            predictions=self._predict(trainer, pl_module),
            checkpoint=getattr(checkpoint, "last_model_path", None) or getattr(checkpoint, "best_model_path", None)
            or None,
            log_dir=run_dir(trainer),
            interrupted=trainer.interrupted,
        )
        search = next((c.result for c in trainer.callbacks if isinstance(c, BatchSizeSearch) and c.result), None)
        if search is not None:  # a search ran at the start of this fit
            summary.batch_size_initial = search.batch_size_initial
            summary.batch_size_search = search
        warmup = next((c for c in trainer.callbacks if isinstance(c, BatchSizeWarmup)), None)
        if warmup is not None and warmup.changes:
            summary.batch_size_schedule = list(warmup.changes)
        monitor = next((c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor)), None)
        if monitor is not None and monitor.readings:
            summary.noise_scale, summary.noise_scale_readings = monitor.readings[-1], len(monitor.readings)
        return summary

    @staticmethod
    def _predict(trainer: Trainer, pl_module: LightningModule) -> Optional[dict[str, list]]:
        x = getattr(trainer.datamodule, "predict_x", None)
        if not isinstance(x, torch.Tensor):
            return None
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            y = pl_module(x.to(pl_module.device))
        pl_module.train(was_training)
        return {"x": x.tolist(), "y": y.cpu().tolist()}

    def _hparams(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        s = self.summary
        extra: dict[str, Any] = dict(global_batch_size=s.global_batch_size, devices=s.devices, seed=s.seed)
        if s.batch_size_initial is not None:
            extra["batch_size_initial"] = s.batch_size_initial
        return run_hparams(trainer, pl_module, **extra)

    def _hp_metrics(self) -> dict[str, float]:
        s = self.summary
        out = {"hp/train_loss": s.train_loss, "hp/samples_per_s": s.samples_per_s}
        out.update({"hp/" + k.replace("/", "_"): v for k, v in s.metrics.items()})
        return {k: v for k, v in out.items() if v is not None}

    @rank_zero_only
    def _report(self, trainer: Trainer) -> None:
        s = self.summary
        if s.log_dir is not None:
            s.summary_path = str(write_json(Path(s.log_dir) / self.filename, s))
        if self.verbose:
            print(format_summary(s))


def format_summary(s: FitSummary) -> str:
    """The human summary printed at the end of ``batchlab fit``."""
    lines = ["", "batchlab fit summary", f"  device        {s.device}  ({s.devices} device(s) x {s.num_nodes} node(s))"]
    lines.append(
        f"  batch size    {s.batch_size} per device, {s.global_batch_size} global"
        + (f" (x{s.accumulate_grad_batches} accumulated)" if s.accumulate_grad_batches > 1 else "")
    )
    if s.batch_size_search is not None:
        search = s.batch_size_search
        lines.append(f"  batch search  from {s.batch_size_initial} to {s.batch_size} "
                     f"({search.mode}, stopped because {search.stopped_because})")
    if s.batch_size_schedule and len(s.batch_size_schedule) > 1:
        grown = " -> ".join(f"{c.batch_size} (step {c.step})" for c in s.batch_size_schedule[1:])
        lines.append(f"  batch warmup  {s.batch_size_schedule[0].batch_size} -> {grown} global")
    if s.noise_scale is not None:
        n = s.noise_scale
        adam = f", {n.b_simple_adam:.4g} preconditioned" if n.b_simple_adam is not None else ""
        lines.append(f"  noise scale   B_simple {n.b_simple:.4g}{adam} at step {n.step} ({n.method}, "
                     f"{s.noise_scale_readings} readings)")
    lines.append(f"  trained       {s.epochs} epochs, {s.steps} steps, {s.samples_seen} samples")
    step_ms = f", {s.step_s * 1e3:.3f} ms/step steady" if s.step_s else ""
    rate = f"{s.samples_per_s:,.0f} samples/s" if s.samples_per_s else "n/a"
    lines.append(f"  time          {s.wall_s:.3f} s training, {rate}{step_ms}")
    if s.train_loss is not None:
        lines.append(f"  train loss    {s.train_loss:.6g} (last step)")
    for k, v in sorted(s.metrics.items()):
        lines.append(f"  {k:<13} {v:.6g}")
    if s.predictions:
        for x, y in zip(s.predictions["x"], s.predictions["y"]):
            lines.append(f"  predict       {_fmt_row(x)} -> {_fmt_row(y)}")
    if s.interrupted:
        lines.append(f"  interrupted   by {s.stopped_by or 'an error'}: the run stopped early")
    if s.checkpoint:
        lines.append(f"  checkpoint    {s.checkpoint}")
    if s.summary_path:
        lines.append(f"  summary       {s.summary_path}")
    if s.log_dir:
        lines.append(f"  tensorboard   tensorboard --logdir {s.log_dir}")
    return "\n".join(lines)


class PredictionPrinter(BasePredictionWriter):
    """Collect every input row of ``batchlab predict`` with its prediction; ``lines()`` formats them as
    ``[10, 11] -> [20.73]`` (the CLI prints them once the progress bar is done)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[tuple[Any, Any]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(prediction, torch.Tensor) and isinstance(x, torch.Tensor):
            self.rows.extend(zip(x.tolist(), prediction.tolist()))
        else:
            self.rows.append((None, prediction))

    def lines(self) -> list[str]:
        return [f"{_fmt_row(x)} -> {_fmt_row(y)}" if x is not None else str(y) for x, y in self.rows]


def _saved_step(path: Path) -> Optional[int]:
    """The global step a checkpoint was saved at; None for a file that is not a readable checkpoint. Memory-mapped:
    the tensors are not read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - any file that cannot tell its step is not one to resume from
        return None


def _checkpoints(callback: Any) -> list[Path]:
    folder = getattr(callback, "dirpath", None)
    return list(Path(folder).glob("*.ckpt")) if folder is not None and Path(folder).is_dir() else []


def _fmt_row(values: Any) -> str:
    if isinstance(values, (list, tuple)):
        return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
    return f"{values:.6g}"


def _sync(pl_module: LightningModule) -> None:
    """Wait for the device, so that a timestamp taken next covers the work queued before it (GPU only)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
