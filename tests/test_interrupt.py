"""A fit stopped by a real SIGINT (Ctrl+C) or SIGTERM, sent to ``batchlab fit`` running as a subprocess: it stops
without a traceback, says in one line where its checkpoint is, exits with the shell's status for the signal,
writes a summary marked interrupted, and ``--ckpt_path`` resumes from the saved step to the end. Under DDP, Ctrl+C
(every rank) or a SIGTERM to the first process alone stops every rank after the same step (``batchlab.signals``),
and the run resumes from that step."""

import contextlib
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
from conftest import QUIET, SEED, command, command_env, load_summary, run_command, run_dirs, scalars, snapshot
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from batchlab.cli import make_cli
from batchlab.data import ToyRegressionData
from batchlab.model import MLPRegressor
from batchlab.signals import StopTogether
from batchlab.summary import RunSummary

DATA = ["--data.n_samples", "512", "--data.batch_size", "32"]
STEPS_PER_EPOCH = 512 // 32
PAST_FIRST_EPOCH = STEPS_PER_EPOCH + 4  # the signal is sent once the fit has trained this many steps


def _sigint_as_default():
    # A process started in the background by a non-interactive shell ignores SIGINT, and Python keeps it ignored;
    # the test must not depend on how pytest itself was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_a_fit(tmp_path, signum, *args, group=False):
    """Start a fit with (practically) no end, wait until it has saved an epoch's checkpoint and trained a few steps
    past it, send ``signum`` (with ``group``, to its whole process group, as Ctrl+C in a terminal does)."""
    marker = tmp_path / "past-first-epoch"
    proc = subprocess.Popen(
        command("fit", "-c", SEED, *QUIET, *DATA, "--trainer.max_epochs", "100000", *args,
                "--trainer.callbacks+=probes.MarkStep", f"--trainer.callbacks.step={PAST_FIRST_EPOCH}",
                f"--trainer.callbacks.path={marker}"),
        cwd=tmp_path, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_default, start_new_session=group,
    )
    try:
        # Wait for the step itself, not a fixed time: on a loaded machine the fit may not have moved in 0.3 s.
        deadline = time.monotonic() + 120
        while not (marker.exists() and list(tmp_path.glob("runs/seed/version_0/checkpoints/*.ckpt"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_fit_cleanly_and_its_checkpoint_resumes_to_the_end(batchlab, tmp_path, signum):
    code, out, err = _interrupt_a_fit(tmp_path, signum)
    name = signal.Signals(signum).name

    assert code == 128 + signum, err[-2000:]
    assert "Traceback" not in err + out
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"batchlab: interrupted by {name} at epoch "), last
    (first,) = run_dirs(tmp_path)
    summary = load_summary(first)
    assert summary["interrupted"] is True and summary["stopped_by"] == name
    assert f"interrupted   by {name}" in out
    ckpt = summary["checkpoint"]
    # On one device the checkpoint is saved at the step the signal stopped the fit.
    assert summary["checkpoint_step"] == summary["steps"] > STEPS_PER_EPOCH  # past the first epoch: mid-run
    assert last == (f"batchlab: interrupted by {name} at epoch {summary['epochs']}, step {summary['steps']}; "
                    f"resume from step {summary['steps']} with --ckpt_path {ckpt}")
    saved = torch.load(tmp_path / ckpt, weights_only=False)
    assert saved["global_step"] == summary["steps"]

    before = snapshot(first)
    end = summary["epochs"] + 2
    result = batchlab("fit", "-c", SEED, *QUIET, *DATA, "--trainer.max_epochs", str(end), "--ckpt_path", ckpt)
    assert result.code == 0, result.err
    _, resumed = run_dirs(tmp_path)
    assert snapshot(first) == before
    resumed_summary = load_summary(resumed)
    assert resumed_summary["interrupted"] is False and resumed_summary["steps"] == end * STEPS_PER_EPOCH
    # One loss point per step (log_every_n_steps is 1): the resumed run trained only the steps that were left.
    assert len(scalars(resumed)["train/loss"]) == end * STEPS_PER_EPOCH - saved["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "group"), [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["Ctrl+C to every rank", "SIGTERM to rank 0 alone"])
def test_a_signal_stops_every_rank_of_a_ddp_fit_at_one_step_and_it_resumes_from_there(tmp_path, signum, group):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    per_epoch = STEPS_PER_EPOCH // 2  # each rank takes half of every epoch
    code, out, err = _interrupt_a_fit(tmp_path, signum, *ddp, group=group)
    name = signal.Signals(signum).name

    assert code == 128 + signum, err[-3000:]
    assert "Traceback" not in err + out
    (first,) = run_dirs(tmp_path)
    summary = load_summary(first)
    assert summary["interrupted"] is True and summary["stopped_by"] == name
    # The ranks agreed on the step, so the checkpoint is of the step reached, past the first epoch.
    assert summary["checkpoint_step"] == summary["steps"] > per_epoch
    assert err.strip().splitlines()[-1] == (
        f"batchlab: interrupted by {name} at epoch {summary['epochs']}, step {summary['steps']}; "
        f"resume from step {summary['steps']} with --ckpt_path {summary['checkpoint']}")
    assert out.count("batchlab fit summary") == 1
    assert torch.load(tmp_path / summary["checkpoint"], weights_only=False)["global_step"] == summary["steps"]

    end = summary["steps"] // per_epoch + 2
    proc = run_command(tmp_path, "fit", "-c", SEED, *QUIET, *DATA, *ddp, "--trainer.max_epochs", str(end),
                       "--ckpt_path", summary["checkpoint"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, resumed = run_dirs(tmp_path)
    assert load_summary(resumed)["steps"] == end * per_epoch
    assert len(scalars(resumed)["train/loss"]) == end * per_epoch - summary["steps"]


class _InterruptAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_the_checkpoint_named_is_the_one_saved_last_even_where_file_times_tie(tmp_path):
    """Many file systems stamp files with a clock that ticks every few milliseconds, or seconds: a signal soon after
    an epoch's checkpoint leaves two checkpoints with one modification time, and their names do not sort by step."""
    summary = RunSummary(verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_exception=True)
    trainer = Trainer(max_epochs=20, logger=False, callbacks=[summary, checkpoint, _InterruptAt(42)],
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu")
    with pytest.raises(SystemExit):  # Lightning's end of a fit stopped by Ctrl+C
        trainer.fit(MLPRegressor(), ToyRegressionData(n_samples=16, batch_size=4))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch=10-step=42.ckpt", "epoch=9-step=40.ckpt"]
    for name in files:  # the same modification time, as a coarse file-system clock gives
        os.utime(tmp_path / "ckpt" / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    result = summary.finish_interrupted(trainer)
    assert (tmp_path / "summary.json").is_file()
    assert result.checkpoint_step == result.steps == 42
    assert result.checkpoint == str(tmp_path / "ckpt" / "epoch=10-step=42.ckpt")
    assert torch.load(result.checkpoint, weights_only=False)["global_step"] == 42


def test_the_checkpoint_named_is_the_latest_step_not_the_best_of_a_monitored_top_k(tmp_path):
    """A configured, monitored ModelCheckpoint that does not save on the interruption keeps its best checkpoints,
    and its best_model_path is no resume point: the checkpoint named, and its step, are the latest saved."""
    summary = RunSummary(verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", mode="max", save_top_k=3)
    trainer = Trainer(max_epochs=20, logger=False, callbacks=[summary, checkpoint, _InterruptAt(42)],
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu")
    with pytest.raises(SystemExit):
        trainer.fit(MLPRegressor(), ToyRegressionData(n_samples=16, batch_size=4))
    steps = {p: torch.load(p, weights_only=False)["global_step"] for p in (tmp_path / "ckpt").glob("*.ckpt")}
    latest = max(steps, key=steps.get)
    assert Path(checkpoint.best_model_path) != latest, "the case where the best is not the latest"
    result = summary.finish_interrupted(trainer)
    assert result.checkpoint == str(latest) and result.checkpoint_step == steps[latest]


def test_only_batchlabs_own_checkpoint_saves_on_interruption_and_only_on_one_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["batchlab"])

    def checkpoint(*args):
        return make_cli(["-c", SEED, *QUIET, *args], run=False).trainer.checkpoint_callback

    assert checkpoint().save_on_exception is True
    configured = checkpoint("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.filename=mine")
    assert configured.filename == "mine" and configured.save_on_exception is False
    trainer = make_cli(["-c", SEED, *QUIET, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                        "--trainer.accelerator", "cpu"], run=False).trainer
    # Under DDP it saves only once StopTogether has stopped every rank at one step, not on any rank's error.
    assert trainer.checkpoint_callback.save_on_exception is False
    (together,) = [c for c in trainer.callbacks if isinstance(c, StopTogether)]
    assert together.checkpoints == [trainer.checkpoint_callback]


def test_stop_together_raises_what_lightning_raises_for_the_signal_and_only_then_saves():
    """The agreement itself is collective (tested under DDP above); on one process the ranks' answer is this one's."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    checkpoint = ModelCheckpoint(save_on_exception=False)
    together = StopTogether(checkpoints=[checkpoint])
    together.on_train_batch_end(trainer, None)  # no signal: nothing happens
    assert checkpoint.save_on_exception is False
    together.handle(signal.SIGTERM, None)
    with pytest.raises(SIGTERMException):
        together.on_train_batch_end(trainer, None)
    assert checkpoint.save_on_exception is True
    ctrl_c = StopTogether()
    ctrl_c.handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        ctrl_c.on_train_batch_end(trainer, None)
