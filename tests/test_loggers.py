"""batchlab.loggers.TensorBoardLogger: what TensorBoard reads back is what Lightning's logger would have written,
the scalars just take a cheaper path (their own event file, written in the caller's thread, flushed by time)."""

import itertools

import pytest
import torch
from conftest import scalars
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from batchlab import loggers
from batchlab.loggers import TensorBoardLogger

CALLS = [
    ({"train/loss": torch.tensor(0.5), "epoch": 0}, 0),
    ({"train/loss": 0.25, "epoch": 0}, 1),
    ({"train/loss_vs_samples": 0.25}, 4),
    ({"val/r2": torch.tensor([0.75]), "val/count": 3}, 2),
]


def _log(logger, calls=CALLS) -> None:
    for metrics, step in calls:
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")


def test_scalars_read_back_exactly_as_lightnings_logger_writes_them(tmp_path):
    ours = TensorBoardLogger(tmp_path / "ours", name="run")
    theirs = LightningTensorBoardLogger(tmp_path / "theirs", name="run")
    _log(ours)
    _log(theirs)
    assert scalars(ours.log_dir) == scalars(theirs.log_dir)
    assert scalars(ours.log_dir)["train/loss"] == [(0, 0.5), (1, 0.25)]


def test_prefix_and_grouped_scalars_behave_as_in_lightning(tmp_path):
    calls = [({"loss": 1.0, "group": {"a": 1.0, "b": 2.0}}, 3)]
    ours = TensorBoardLogger(tmp_path / "ours", name="run", prefix="fold1")
    theirs = LightningTensorBoardLogger(tmp_path / "theirs", name="run", prefix="fold1")
    _log(ours, calls)
    _log(theirs, calls)
    assert scalars(ours.log_dir)["fold1-loss"] == [(3, 1.0)]
    assert set(scalars(ours.log_dir)) == set(scalars(theirs.log_dir))


def test_save_writes_hparams_once_and_flushes_only_after_flush_secs(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", flush_secs=3600)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    assert (tmp_path / "run" / "version_0" / "hparams.yaml").is_file()
    assert scalars(logger.log_dir).get("a") is None, "nothing is flushed before flush_secs"
    logger.flush()
    assert scalars(logger.log_dir)["a"] == [(0, 1.0)]
    logger.flush_secs = 0
    logger.log_metrics({"a": 2.0}, step=1)
    logger.save()
    assert scalars(logger.log_dir)["a"] == [(0, 1.0), (1, 2.0)]
    logger.finalize("success")


def test_a_second_fit_on_the_same_logger_opens_a_new_scalar_file(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    logger.log_metrics({"a": 1.0}, step=0)
    first = logger.scalar_file
    logger.finalize("success")
    logger.log_metrics({"a": 2.0}, step=1)
    assert logger.scalar_file != first
    logger.finalize("success")
    assert scalars(logger.log_dir)["a"] == [(0, 1.0), (1, 2.0)]


def test_scalar_files_of_one_process_sort_in_the_order_they_were_opened(tmp_path, monkeypatch):
    # TensorBoard reads a run's event files in name order: the tenth file of a process (the test session opens
    # hundreds) must not sort before the ninth, whatever the clock says.
    monkeypatch.setattr(loggers, "_file_ids", itertools.count(9))
    monkeypatch.setattr(loggers.time, "time", lambda: 1700000000.5)  # both files opened in the same second
    logger = TensorBoardLogger(tmp_path, name="run")
    logger.log_metrics({"a": 1.0}, step=0)
    first = logger.scalar_file
    logger.finalize("success")
    logger.log_metrics({"a": 2.0}, step=1)
    second = logger.scalar_file
    logger.finalize("success")
    assert sorted([second, first]) == [first, second]
    assert scalars(logger.log_dir)["a"] == [(0, 1.0), (1, 2.0)]


def test_values_that_are_not_scalars_get_lightnings_error(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    with pytest.raises(ValueError, match="not supported"):
        logger.log_metrics({"text": "hello"}, step=0)
