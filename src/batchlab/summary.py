"""What a run reports: the end-of-fit summary, the loss against samples seen, and printed predictions.

The ``batchlab`` command adds ``RunSummary`` to every trainer and ``PredictionPrinter`` to ``predict``'s; both work
with any LightningModule:

- ``RunSummary`` times the fit, logs the training loss against *samples seen* (``train/loss_vs_samples``, its
  step is the number of samples, so runs with different batch sizes line up in TensorBoard), logs the
  hyperparameters to TensorBoard's HParams tab against real end-of-run metrics (``hp/*``), and ends the fit
  with ``summary.json`` in the run's log directory and a short printed summary. A fit that stops early (Ctrl+C,
  SIGTERM, an error) gets its summary too, with ``interrupted: true``, what stopped it and the checkpoint saved.
- ``PredictionPrinter`` prints each input row of ``batchlab predict`` beside its prediction.

Written here because Lightning has no callback that reports throughput per sample or logs against samples
seen (its ``Timer`` only measures durations and ``ThroughputMonitor`` needs a per-batch length function and
logs per step, not a run summary).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, BatchSizeFinder
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def global_batch_size(trainer: Trainer, per_device: int) -> int:
    """Samples per optimizer step over all devices: per device x devices x nodes x accumulated batches."""
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader (or an interrupted run) sees the old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _newest_checkpoint(callback: Any) -> Optional[Path]:
    """The newest checkpoint in ``callback``'s folder, or None.

    Newest by modification time, and among equal times the one the callback saved last (ModelCheckpoint's
    ``_last_checkpoint_saved``, private in Lightning 2.6): many file systems stamp files with a clock that ticks
    every few milliseconds (or seconds), so a signal soon after an epoch's checkpoint leaves two with the same
    time, and their names do not sort by step (``epoch=10-...`` before ``epoch=9-...``).
    """
    folder = getattr(callback, "dirpath", None)
    if folder is None or not Path(folder).is_dir():
        return None
    last = getattr(callback, "_last_checkpoint_saved", None)
    last_name = Path(last).name if last else None
    saved = sorted(Path(folder).glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == last_name, p.name))
    return saved[-1] if saved else None


def global_seed() -> Optional[int]:
    """The seed ``seed_everything`` (``--seed_everything``) set for this process, if any."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` atomically; never replace an existing file (a ``-2``, ``-3``... name is used).

    Returns the path written.
    """
    path = Path(path)
    # A Trainer without a logger reports to its default_root_dir, which nothing may have made yet outside the CLI.
    path.parent.mkdir(parents=True, exist_ok=True)
    target, k = path, 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.stem}-{k}{path.suffix}")
    write_atomically(target, json.dumps(data, indent=2) + "\n")
    return target


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


class RunSummary(Callback):
    """Measure a fit and report it: ``summary.json``, a printed summary, TensorBoard's samples-seen curve and
    HParams.

    Per step it counts samples and hands each logged step's loss to the loggers. On a GPU it keeps the loss tensors
    and writes them in groups of ``log_buffer``, so that a step does not wait for the device just to log (one
    transfer per group instead of one per step). On the CPU, where reading a loss waits for nothing, each point is
    written in its own step: dozens of small tensors kept alive across steps land between the large per-step
    buffers in glibc's heap and keep it from reusing them (at 1M rows and batch 65,536 the resident set doubled).
    A module with ``logs_train_loss = False`` (batchlab's
    ``MLPRegressor(lean_step=True)``) leaves ``train/loss`` to this callback, which writes it at the steps and
    cadence Lightning would (with Lightning's ``epoch`` beside it).

    Args:
        filename: Name of the summary written into the run's log directory.
        verbose: Print the summary at the end of the fit.
        log_buffer: Logged steps kept before they are written, for a loss on a GPU; 1 writes each step's point at
            once, as happens on the CPU.
    """

    def __init__(self, filename: str = "summary.json", verbose: bool = True, log_buffer: int = 64) -> None:
        self.filename = filename
        self.verbose = verbose
        self.log_buffer = max(1, log_buffer)
        self.samples_seen = 0
        self.summary: Optional[dict[str, Any]] = None
        self._fit_start: Optional[float] = None
        self._saved_step: Optional[int] = None  # the global step of the latest checkpoint saved
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []
        self._world_size = 1  # the trainer's, from on_train_start

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fit_start = None  # set once the fit starts: an exception before then has nothing to summarise
        self._pending = []

    # Timing. Steady state is everything after the first epoch, which carries the warm-up.
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._first_epoch_end: Optional[tuple[float, int]] = None
        self._last_loss: Optional[torch.Tensor] = None
        self._last_logged_step = -1
        self._pending = []
        self.summary = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._start_step = trainer.global_step
        self._start_samples = self.samples_seen
        self._log_loss_too = not getattr(pl_module, "logs_train_loss", True)
        self._world_size = trainer.world_size  # fixed for the fit; a property chain per step otherwise

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        rows = len(first) if isinstance(first, torch.Tensor) and first.dim() else extract_batch_size(batch)
        self.samples_seen += rows * self._world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()
        step = trainer.global_step
        if (
            trainer.loggers
            and self._last_loss is not None
            and step % trainer.log_every_n_steps == 0
            and step != self._last_logged_step
        ):
            self._last_logged_step = step
            self._pending.append((step, self.samples_seen, trainer.current_epoch, self._last_loss))
            if len(self._pending) >= self.log_buffer or self._last_loss.device.type == "cpu":
                self._write_pending(trainer)

    def _write_pending(self, trainer: Trainer) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            values = [float(pending[0][3].item())]
        else:
            values = torch.stack([p[3].reshape(()) for p in pending]).float().tolist()  # one device sync per group
        for logger in trainer.loggers:
            for (step, samples, epoch, _), value in zip(pending, values):
                if self._log_loss_too:
                    # Lightning logs a step's metrics under the step count before it, with the epoch beside them.
                    logger.log_metrics({"train/loss": value, "epoch": epoch}, step=step - 1)
                logger.log_metrics({"train/loss_vs_samples": value}, step=samples)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._first_epoch_end is None:
            _sync(pl_module)
            self._first_epoch_end = (time.perf_counter(), trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_pending(trainer)
        _sync(pl_module)
        self._train_end = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.summary = self._summarise(trainer, pl_module)
        log_hparams(trainer, self._hparams(trainer, pl_module), metrics=self._hp_metrics())
        self._report(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Summarise a fit that stopped early; ``finish_interrupted`` writes the summary once the checkpoint exists.

        Lightning calls this hook before its checkpoint callbacks save and then ends the fit without
        ``on_fit_end``. Nothing here may wait for the other ranks: they need not all reach this hook.
        """
        self._write_pending(trainer)
        if trainer.state.fn != TrainerFn.FITTING or self._fit_start is None:
            return
        self.summary = self._summarise(trainer, pl_module)
        self.summary["stopped_by"] = stop_cause(exception)
        log_hparams(trainer, self._hparams(trainer, pl_module), metrics=self._hp_metrics())

    @rank_zero_only
    def finish_interrupted(self, trainer: Trainer) -> Optional[dict[str, Any]]:
        """Write the summary of a fit that stopped early, naming the checkpoint to resume from and its step;
        return it.

        Call after the fit has ended (``BatchlabTrainer.fit`` does): the checkpoint is saved by then. It is the
        newest in the checkpoint folder, which holds only this run's (``batchlab.preflight``): the one saved on the
        interruption, or, where none could be (under DDP), the last epoch's.
        """
        s = self.summary
        if s is None or not s.get("interrupted"):
            return None
        s["checkpoint"], s["checkpoint_step"] = None, None
        newest = _newest_checkpoint(trainer.checkpoint_callback)
        if newest is not None:
            s["checkpoint"], s["checkpoint_step"] = str(newest), self._saved_step
        if s["log_dir"] is not None:
            s["summary_path"] = str(write_json(Path(s["log_dir"]) / self.filename, s))
        return s

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved_step = checkpoint.get("global_step")

    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = state_dict.get("samples_seen", 0)

    def _summarise(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
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
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and not k.startswith("train/")
        }
        summary: dict[str, Any] = {
            "batch_size": per_device,
            "global_batch_size": global_batch_size(trainer, per_device) if per_device else None,
            "devices": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "samples_seen": self.samples_seen,
            "train_loss": float(self._last_loss) if self._last_loss is not None else None,
            "metrics": metrics,
            "wall_s": wall_s,
            "fit_s": now - self._fit_start,
            "step_s": step_s,
            "samples_per_s": samples / wall_s if wall_s > 0 else None,
            "device": device_name(pl_module.device),
            "seed": global_seed(),
            "predictions": self._predict(trainer, pl_module),
            "checkpoint": getattr(trainer.checkpoint_callback, "last_model_path", None)
            or getattr(trainer.checkpoint_callback, "best_model_path", None)
            or None,
            "log_dir": run_dir(trainer),
            "interrupted": trainer.interrupted,
        }
        search = _batch_size_search(trainer)
        if search is not None:
            summary["batch_size_initial"] = search["batch_size_initial"]
            summary["batch_size_search"] = search
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
        s = self.summary or {}
        extra = dict(global_batch_size=s.get("global_batch_size"), devices=s.get("devices"), seed=s.get("seed"))
        if "batch_size_initial" in s:
            extra["batch_size_initial"] = s["batch_size_initial"]
        return run_hparams(trainer, pl_module, **extra)

    def _hp_metrics(self) -> dict[str, float]:
        s = self.summary or {}
        out = {"hp/train_loss": s.get("train_loss"), "hp/samples_per_s": s.get("samples_per_s")}
        out.update({"hp/" + k.replace("/", "_"): v for k, v in s.get("metrics", {}).items()})
        return {k: v for k, v in out.items() if v is not None}

    @rank_zero_only
    def _report(self, trainer: Trainer) -> None:
        s = self.summary
        assert s is not None
        if s["log_dir"] is not None:
            written = write_json(Path(s["log_dir"]) / self.filename, s)
            s["summary_path"] = str(written)
        if self.verbose:
            print(format_summary(s))


def format_summary(s: dict[str, Any]) -> str:
    """The human summary printed at the end of ``batchlab fit``."""
    lines = ["", "batchlab fit summary"]
    lines.append(
        f"  device        {s['device']}  ({s['devices']} device(s) x {s['num_nodes']} node(s))"
    )
    lines.append(
        f"  batch size    {s['batch_size']} per device, {s['global_batch_size']} global"
        + (f" (x{s['accumulate_grad_batches']} accumulated)" if s["accumulate_grad_batches"] > 1 else "")
    )
    if "batch_size_initial" in s:
        search = s["batch_size_search"]
        lines.append(
            f"  batch search  from {s['batch_size_initial']} to {s['batch_size']} "
            f"({search['mode']}, stopped because {search['stopped_because']})"
        )
    lines.append(f"  trained       {s['epochs']} epochs, {s['steps']} steps, {s['samples_seen']} samples")
    step_ms = f", {s['step_s'] * 1e3:.3f} ms/step steady" if s.get("step_s") else ""
    rate = f"{s['samples_per_s']:,.0f} samples/s" if s.get("samples_per_s") else "n/a"
    lines.append(f"  time          {s['wall_s']:.3f} s training, {rate}{step_ms}")
    if s.get("train_loss") is not None:
        lines.append(f"  train loss    {s['train_loss']:.6g} (last step)")
    for k, v in sorted(s.get("metrics", {}).items()):
        lines.append(f"  {k:<13} {v:.6g}")
    if s.get("predictions"):
        for x, y in zip(s["predictions"]["x"], s["predictions"]["y"]):
            lines.append(f"  predict       {_fmt_row(x)} -> {_fmt_row(y)}")
    if s.get("interrupted"):
        lines.append(f"  interrupted   by {s.get('stopped_by', 'an error')}: the run stopped early")
    if s.get("checkpoint"):
        lines.append(f"  checkpoint    {s['checkpoint']}")
    if s.get("summary_path"):
        lines.append(f"  summary       {s['summary_path']}")
    if s.get("log_dir"):
        lines.append(f"  tensorboard   tensorboard --logdir {s['log_dir']}")
    return "\n".join(lines)


class PredictionPrinter(BasePredictionWriter):
    """Collect every input row of ``batchlab predict`` with its prediction; ``lines()`` formats them as
    ``[10, 11] -> [20.73]`` (the CLI prints them once the progress bar is done)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[tuple[Any, Any]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(prediction, torch.Tensor) and isinstance(x, torch.Tensor):
            self.rows.extend(zip(x.tolist(), prediction.tolist()))
        else:
            self.rows.append((None, prediction))

    def lines(self) -> list[str]:
        return [f"{_fmt_row(x)} -> {_fmt_row(y)}" if x is not None else str(y) for x, y in self.rows]


def stop_cause(exception: BaseException) -> str:
    """What stopped a fit: ``SIGINT`` (Ctrl+C, which Python raises as KeyboardInterrupt), ``SIGTERM`` (Lightning's
    signal handler turns it into SIGTERMException at the next step), or the error's type."""
    if isinstance(exception, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(exception, SIGTERMException):
        return "SIGTERM"
    return type(exception).__name__


def _batch_size_search(trainer: Trainer) -> Optional[dict[str, Any]]:
    """What a batch-size search in this fit found (``batchlab.tune.BatchSizeSearch.result``), if one ran."""
    for callback in trainer.callbacks:
        if isinstance(callback, BatchSizeFinder) and getattr(callback, "result", None):
            return callback.result
    return None


def _fmt_row(values: Any) -> str:
    if isinstance(values, (list, tuple)):
        return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"
    return f"{values:.6g}"


def _sync(pl_module: LightningModule) -> None:
    """Wait for the device, so that a timestamp taken next covers the work queued before it (GPU only)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)

