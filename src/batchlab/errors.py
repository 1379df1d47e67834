"""The exceptions batchlab raises for bad user input and for a run stopped by a signal.

Constructors and commands raise ``ConfigError`` with a message that names the bad value and what is allowed;
``batchlab.cli.main`` prints it as a single line and exits with status 2, without a traceback. It subclasses
``ValueError`` so that code using batchlab as a library can catch it the usual way.

Lightning logs lines (``Seed set to 0``, ``GPU available: ...``) and may warn at start-up, before batchlab has
checked all of a command's input; ``main`` holds them (``StartupLines``) until the command starts running, so that
bad input ends in its one line alone.

``RunInterrupted`` ends a fit stopped by SIGINT or SIGTERM once its checkpoint and summary are saved; ``main``
prints its message as one line and exits with the shell's status for the signal (130, 143).
"""

from __future__ import annotations

import logging
import signal
import warnings
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-given value is out of range, of the wrong shape or otherwise unusable."""


def check(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


class RunInterrupted(Exception):
    """A fit stopped by a signal, after saving its checkpoint and summary.

    Args:
        signame: ``SIGINT`` or ``SIGTERM``.
        message: The line to print (None on ranks other than 0, which print nothing).
        summary: The run's summary as written to summary.json, if this rank wrote it.
    """

    def __init__(self, signame: str, message: Optional[str], summary: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message or f"interrupted by {signame}")
        self.signame = signame
        self.message = message
        self.summary = summary
        # The shell's convention for a process ended by a signal: 128 + its number.
        self.exit_code = 128 + int(getattr(signal, signame))


def signal_of(exc: BaseException) -> Optional[str]:
    """The signal behind the exception Lightning ends an interrupted fit with, if a signal was the cause:
    ``SIGTERMException`` after SIGTERM, ``sys.exit(1)`` raised while handling the KeyboardInterrupt of Ctrl+C."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)
    ):
        return "SIGINT"
    return None


class StartupLines(logging.Handler):
    """Holds what Lightning says at start-up, the records of its loggers and any warning, from ``hold()`` until
    ``show()``, which prints them in order (and lets later ones through) as they would have been printed, or
    ``drop()``, which discards them. Outside ``hold()`` both do nothing, so that code used as a library can call
    ``show()`` where a command starts running."""

    LOGGERS = ("lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []  # log records, and warnings as showwarning's arguments
        self.saved: Optional[list[tuple[logging.Logger, list[logging.Handler], bool]]] = None

    def hold(self) -> None:
        if self.saved is not None:
            return
        self.saved = []
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers, logger.propagate = [self], False
        self.showwarning = warnings.showwarning
        warnings.showwarning = self._hold_warning

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)

    def _hold_warning(self, *args: Any) -> None:
        if self.saved is None:  # put back by a catch_warnings() that began while holding: nothing holds now
            self.showwarning(*args)
        else:
            self.held.append(args)

    def show(self) -> None:
        for item in self._restore():
            if isinstance(item, logging.LogRecord):
                # From the top logger: the record already passed the filters of the one it was logged on.
                logging.getLogger(next(n for n in self.LOGGERS if item.name.startswith(n))).handle(item)
            else:
                warnings.showwarning(*item)

    def drop(self) -> None:
        self._restore()

    def _restore(self) -> list[Any]:
        if self.saved is None:
            return []
        for logger, handlers, propagate in self.saved:
            logger.handlers, logger.propagate = handlers, propagate
        if warnings.showwarning == self._hold_warning:  # unless something replaced it since, for its own ends
            warnings.showwarning = self.showwarning
        self.saved = None
        held, self.held = self.held, []
        return held


STARTUP_LINES = StartupLines()
