"""Lightning's output, in one place: what batchlab holds back, hides or drops, and ``--verbose``, which shows it.

- ``STARTUP_LINES`` holds what Lightning says at start-up (``Seed set to 0``, ``GPU available: ...``, warnings)
  from the moment ``batchlab.cli.main`` starts until the command has passed its checks and runs
  (``STARTUP_LINES.show()``), so that bad input ends in its one line alone (``STARTUP_LINES.drop()``). Outside a
  hold both do nothing, so library code may call ``show()`` where a command starts running.
- ``quiet_lightning()`` hides the per-fit chatter of the many short fits a study makes and of the batch-size
  finder's trials (device lines, "`Trainer.fit` stopped: `max_steps=3` reached", checkpoint restore lines, the
  restore's ``weights_only`` warning), unless ``--verbose`` (``set_verbose(True)``) asked for everything; so
  does ``drop_noise()``'s filter for the one restore line a fit says after its search.
- ``drop_noise()`` drops, for the whole command, what never says anything about the run: advertising tips,
  warnings about Lightning's own internals, an empty validation set's warning (no validation split is the
  notebook's setting).

These filters match message text only to decide what is displayed; nothing batchlab computes depends on it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from lightning.pytorch.utilities.warnings import PossibleUserWarning

LOGGERS = ("lightning.pytorch", "lightning.fabric")
_verbose = False


def set_verbose(verbose: bool) -> None:
    """Show Lightning's chatter inside ``quiet_lightning()`` blocks too (``--verbose``)."""
    global _verbose
    _verbose = bool(verbose)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's INFO lines and its routine warnings inside the block (unless ``--verbose``)."""
    if _verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)
        warnings.filterwarnings("ignore", message=".*self.log.*trainer.*reference is not registered")
        warnings.filterwarnings("ignore", message=".*larger than the .* training samples")
        warnings.filterwarnings("ignore", message=".*weights_only")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def _not_a_search_leftover(record: logging.LogRecord) -> bool:
    # A fit that searched first says, once the search is over, that it restored the search's temporary checkpoint
    # (deleted by then): the finder's chatter, said after its trials.
    return _verbose or ".scale_batch_size_" not in str(record.msg)


# Warnings that never say anything about the run: about Lightning's own internals, an empty validation set (no
# validation split is the notebook's setting), and the CLI being handed the command line main() has read (and
# amended: --quick, default classes) itself.
_NOISE = ("Total length of .* across ranks is zero", r".*isinstance\(treespec, LeafSpec\)",
          "Couldn't infer the batch indices", "LightningCLI's args parameter is intended")


def drop_noise() -> None:
    """Drop, for the rest of the process, Lightning's output that says nothing about the run (the command's
    choice; the Python API uses ``noise_dropped``, which leaves the caller's warning filters as they were)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for keep in (_not_a_tip, _not_a_search_leftover):
        if keep not in rank_zero.filters:  # once, however many commands a process runs
            rank_zero.addFilter(keep)
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)


@contextmanager
def noise_dropped() -> Iterator[None]:
    """``drop_noise()`` inside the block only."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    added = [keep for keep in (_not_a_tip, _not_a_search_leftover) if keep not in rank_zero.filters]
    with warnings.catch_warnings():
        for keep in added:
            rank_zero.addFilter(keep)
        for message in _NOISE:
            warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            for keep in added:
                rank_zero.removeFilter(keep)


class StartupLines(logging.Handler):
    """Holds the records of Lightning's loggers and any warning, from ``hold()`` until ``show()``, which prints them
    in order (and lets later ones through) as they would have been printed, or ``drop()``, which discards them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []  # log records, and warnings as showwarning's arguments
        self.saved: Optional[list[tuple[logging.Logger, list[logging.Handler], bool]]] = None

    def hold(self) -> None:
        if self.saved is not None:
            return
        self.saved = []
        for name in LOGGERS:
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
                logging.getLogger(next(n for n in LOGGERS if item.name.startswith(n))).handle(item)
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
