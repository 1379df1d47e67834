"""batchlab's TensorBoard logger: Lightning's ``TensorBoardLogger`` with scalars written at a fraction of the cost.

Used by ``configs/seed.yaml`` (``trainer.logger.class_path: batchlab.loggers.TensorBoardLogger``) and by anything
else that builds a Trainer; every argument of Lightning's logger works the same, plus ``flush_secs``.

Why it exists: at the seed's cadence (a loss point every step, a step of a few hundred microseconds) Lightning's
logger costs more than the training itself. Lightning calls ``logger.save()`` after every logged step, and its
``save`` flushes the ``SummaryWriter``, which waits for the writer thread; each scalar then goes through
``SummaryWriter.add_scalar``, a queue hand-off to that thread, which frames the record with a pure-Python CRC
while holding the GIL. On a small machine that thread ping-pong costs 50-100 us per scalar.

Here the scalars of one ``log_metrics`` call become one event, written synchronously into an event file of the
logger's own in the same run folder (TensorBoard reads every ``*tfevents*`` file of a run), and the files are
flushed every ``flush_secs`` and at the end. Everything else (hyperparameters, graphs, whatever a user writes to
``logger.experiment``) still goes through the ``SummaryWriter``. Remote ``save_dir`` (``s3://...``) falls back to
Lightning's path.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from itertools import count
from typing import Any, Optional, Union

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter
from torch import Tensor

_file_ids = count()


class ScalarEventFile:
    """An append-only TensorBoard event file of scalar summaries, written in the caller's thread.

    Args:
        log_dir: Folder of the run; created if missing.
        suffix: Appended to the file name, after TensorBoard's ``events.out.tfevents.<time>.<host>.<pid>.<n>``.
    """

    def __init__(self, log_dir: str, suffix: str = ".scalars") -> None:
        os.makedirs(log_dir, exist_ok=True)
        # TensorBoard reads a run's event files in name order and keeps the points of a tag in the order read, so
        # the names must sort in the order the files were opened: the counter is zero-padded ("...10" would sort
        # before "...9" when two files of one process open in the same second).
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids):06d}"
        name = f"events.out.tfevents.{stamp}"
        self.path = os.path.join(log_dir, name + suffix)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._records = RecordWriter(self._file)
        # Every event file opens with its format version, as TensorBoard's own writer does.
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._file.flush()

    def add_scalars(self, values: Mapping[str, float], step: int, wall_time: Optional[float] = None) -> None:
        """Write ``values`` (tag -> number) as one event at ``step``."""
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._write(Event(wall_time=time.time() if wall_time is None else wall_time, step=step, summary=summary))

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, with cheap scalars and time-based flushing.

    Takes every argument of ``lightning.pytorch.loggers.TensorBoardLogger`` (``save_dir``, ``name``, ``version``,
    ``default_hp_metric``, ``prefix``, ...; other keyword arguments go to the ``SummaryWriter``).

    Args:
        save_dir: Folder that holds ``name/version_N``.
        name: Experiment name, the folder under ``save_dir``.
        version: Version folder; None takes the next free ``version_N``.
        log_graph: Add the model graph to TensorBoard.
        default_hp_metric: Log a placeholder ``hp_metric`` (batchlab's configs turn it off and log real metrics).
        prefix: Prefix of every metric name.
        sub_dir: Sub-folder of the version folder for the event files.
        flush_secs: Longest time, in seconds, that logged scalars wait in memory before reaching the disk (also
            handed to the ``SummaryWriter``). Lightning flushes after every logged step; at a loss point per step
            that wait dominated the step.
    """

    def __init__(
        self,
        save_dir: Union[str, os.PathLike],
        name: Optional[str] = "lightning_logs",
        version: Optional[Union[int, str]] = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: Optional[Union[str, os.PathLike]] = None,
        flush_secs: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir, name, version, log_graph, default_hp_metric, prefix, sub_dir, flush_secs=flush_secs, **kwargs
        )
        self.flush_secs = flush_secs
        self.metric_prefix = prefix
        self._scalars: Optional[ScalarEventFile] = None
        self._last_flush = time.monotonic()
        self._hparams_file_written = False
        # save_dir and name are fixed from here on; log_metrics asks once per scalar.
        self._is_local = "://" not in str(self.root_dir)

    @property
    def scalar_file(self) -> Optional[str]:
        """Path of the event file that holds the scalars (None before the first one, or for a remote save_dir)."""
        return self._scalars.path if self._scalars is not None else None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        values: dict[str, float] = {}
        rest: dict[str, Any] = {}
        for k, v in metrics.items():
            key = f"{self.metric_prefix}{self.LOGGER_JOIN_CHAR}{k}" if self.metric_prefix else k
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and self._is_local:
                values[key] = float(v)
            else:
                rest[k] = v
        if values:
            if self._scalars is None:
                self._scalars = ScalarEventFile(self.log_dir)
            self._scalars.add_scalars(values, 0 if step is None else int(step))
        if rest:
            # Dicts (grouped scalars) and anything unusual: Lightning's own path and its error messages.
            super().log_metrics(rest, step)

    @rank_zero_only
    def save(self) -> None:
        if not self._is_local:
            super().save()
            return
        # Lightning calls this after every logged step. Write hparams.yaml the first time, as Lightning's save
        # does, and flush only once ``flush_secs`` have passed instead of waiting on the writer thread every step.
        if not self._hparams_file_written:
            self._write_hparams_file()
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def _write_hparams_file(self) -> None:
        dir_path = self.log_dir
        if os.path.isdir(dir_path):
            hparams_file = os.path.join(dir_path, self.NAME_HPARAMS_FILE)
            if not os.path.isfile(hparams_file):
                save_hparams_to_yaml(hparams_file, self.hparams)
            self._hparams_file_written = True

    def _summary_writer(self) -> Any:
        # The SummaryWriter if it was created; reading ``experiment`` would create one just to flush it.
        return getattr(self, "_experiment", None)

    @rank_zero_only
    def flush(self) -> None:
        """Put everything logged so far on disk."""
        if self._scalars is not None:
            self._scalars.flush()
        if self._summary_writer() is not None:
            self._summary_writer().flush()
        self._last_flush = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None  # a later fit on the same logger opens a new file
        self._hparams_file_written = False
        super().finalize(status)
