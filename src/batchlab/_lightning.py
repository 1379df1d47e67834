"""Every use of Lightning's private API in batchlab, each the only way to do what it does, each pinned by a test
in ``tests/test_lightning_private.py`` that fails loudly if Lightning changes it.

- ``stop_after_search(finder)``: a ``BatchSizeFinder`` ends the run after its search when its ``_early_exit``
  flag is set, which is how Lightning's own ``Tuner.scale_batch_size`` uses it; ``batchlab tune`` does the same.
- ``rebuild_dataloaders(trainer)``: Lightning's between-trial reset of the running loop's dataloaders. A fit
  that follows a corrected search (the size Lightning returned never ran) needs its loaders built again at the
  corrected size, in the middle of ``on_fit_start``, and Lightning has no public way to do it.
- ``runs_fits_in_this_process(strategy)``: whether DDP ranks are lasting processes (launched by re-running the
  command, torchrun or SLURM) or spawned ones that end with each fit; Lightning says so only through its
  launcher's class.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BatchSizeFinder
from lightning.pytorch.strategies import DDPStrategy, Strategy


def stop_after_search(finder: BatchSizeFinder) -> None:
    """Make ``finder`` end the fit once its search is done, as ``Tuner.scale_batch_size`` does."""
    finder._early_exit = True


def rebuild_dataloaders(trainer: Trainer) -> None:
    """Build the running loop's dataloaders again, so that they read the batch size set since they were built."""
    from lightning.pytorch.tuner.batch_size_scaling import _reset_dataloaders

    _reset_dataloaders(trainer)


def runs_fits_in_this_process(strategy: Strategy) -> bool:
    """Whether each rank runs the fits in its own, lasting process, as a study's sequence of fits needs; spawned
    ranks (``ddp_spawn``) end with each fit."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    return isinstance(strategy, DDPStrategy) and (
        strategy.launcher is None or isinstance(strategy.launcher, _SubprocessScriptLauncher)
    )
