"""The exceptions batchlab raises for bad user input and for a run stopped by a signal.

Constructors and commands raise ``ConfigError`` with a message that names the bad value and what is allowed;
``batchlab.cli.main`` prints it as a single line and exits with status 2, without a traceback. It subclasses
``ValueError`` so that code using batchlab as a library can catch it the usual way.

``RunInterrupted`` ends a fit stopped by SIGINT or SIGTERM once its checkpoint and summary are saved; ``main``
prints its message as one line and exits with the shell's status for the signal (130, 143).
"""

from __future__ import annotations

import signal
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
