"""Signals: Ctrl+C (SIGINT) and SIGTERM stop a fit or a study cleanly, and under DDP every rank stops after the
same training step, or none does.

``RunInterrupted`` ends a fit or a study stopped by a signal once what it had finished is saved; ``batchlab.cli.main``
prints its message as one line and exits with the shell's status for the signal (130, 143). ``signal_of`` tells
which signal is behind the exception Lightning ends an interrupted fit with.

``batchlab fit`` adds ``StopTogether`` to its Trainer when it runs on several processes; ``batchlab study`` adds a
subclass to each of its fits. On one process neither is used: Lightning's own handling is right there.

Why batchlab needs its own: a signal reaches the ranks at different moments (a terminal's Ctrl+C reaches all of
them, a scheduler's SIGTERM perhaps only the first), and ranks that stop at different steps wait for ever on each
other's collectives. Lightning's SIGTERM handler also runs a collective inside the signal handler itself, out of
step with the other ranks, which hangs (Lightning issue #20806). So, while it trains, this callback takes both
signals, only notes them, and at the end of every step the ranks agree (one all-reduce of a flag) whether any of
them had one. When they do, every rank raises what Lightning raises for that signal, at the same step: Lightning
then runs its ``on_exception`` hooks (a checkpoint of that step: every rank is at the same point, so saving it
works) and batchlab reports the run as interrupted.

``noting_signals`` installs the callback's handler from before Lightning starts the other processes, so that a
signal during the start is noted too (by default it would kill the first process and leave the others waiting
for it). What remains: Lightning installs its own SIGTERM handler after ``on_fit_start``, and no hook runs
between that and ``on_train_start`` (or ``on_validation_start``), where this callback takes the signal back. A SIGTERM in that short window
(two barriers and the data loaders' creation) still meets Lightning's handler. Blocking the signal there is no
cure: a process-directed signal goes to any thread that does not block it, and torch starts threads at import.
A signal after the last step is noted but changes nothing: the fit is ending anyway.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """A fit or a study stopped by a signal, after saving what it had finished.

    Args:
        signame: ``SIGINT`` or ``SIGTERM``.
        message: The line to print (None on ranks other than 0, which print nothing).
        summary: The fit's summary as written to summary.json, if this rank wrote it.
    """

    def __init__(self, signame: str, message: Optional[str], summary: Optional[Any] = None) -> None:
        super().__init__(message or f"interrupted by {signame}")
        self.signame = signame
        self.message = message
        self.summary = summary
        # The shell's convention for a process ended by a signal: 128 + its number.
        self.exit_code = 128 + int(getattr(signal, signame))


def signal_of(exc: BaseException) -> Optional[str]:
    """The signal behind the exception Lightning ends an interrupted fit with, if a signal was the cause:
    ``SIGTERMException`` after SIGTERM, ``sys.exit(1)`` raised while handling the KeyboardInterrupt of Ctrl+C."""
    if isinstance(exc, SIGTERMException):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)
    ):
        return "SIGINT"
    return None


@contextmanager
def noting_signals(handler: Optional[Callable[[int, Any], None]]) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` inside the block (nothing changes for None, or off the main thread,
    where Python cannot set handlers); the previous handlers come back after it."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def agreed_signal(strategy: Strategy, own: Optional[str]) -> Optional[str]:
    """The ranks' joint answer to "did a signal come?" (a collective: every rank must ask at the same point): None
    if no rank had one, else the signal rank 0 had, or this rank's own (a scheduler may signal one rank only)."""
    if not strategy.reduce_boolean_decision(own is not None, all=False):
        return None
    return strategy.broadcast(own, src=0) or own or "SIGTERM"


class StopTogether(Callback):
    """Under DDP, a signal to any rank stops every rank after the same training step (see the module's docstring).

    Args:
        checkpoints: Checkpoint callbacks to save on the agreed stop. They must not save on every exception under
            DDP: an error on one rank would leave the others waiting in the save.
    """

    def __init__(self, checkpoints: Sequence[ModelCheckpoint] = ()) -> None:
        self.signame: Optional[str] = None
        self.checkpoints = list(checkpoints)

    def handle(self, signum: int, frame: Any) -> None:
        self.signame = signal.Signals(signum).name

    def own_signal(self) -> Optional[str]:
        """The signal this rank had, if any."""
        return self.signame

    def stop(self, trainer: Trainer, signame: str) -> None:
        """What every rank does once they agree: raise what Lightning raises for the signal."""
        for callback in self.checkpoints:
            callback.save_on_exception = True  # every rank is at this same step: the save can gather them
        raise KeyboardInterrupt if signame == "SIGINT" else SIGTERMException()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_signals()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_signals()  # a sanity check or a plain ``validate`` comes before any training

    def _take_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:  # Lightning puts the previous handlers back when the fit ends
                signal.signal(sig, self.handle)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        signame = agreed_signal(trainer.strategy, self.own_signal())
        if signame is not None:
            self.stop(trainer, signame)
