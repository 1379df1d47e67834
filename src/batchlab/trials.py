"""The trials of a batch-size search, seen as they run: ``TrialObserver`` and the ``Trial`` it records for each.

Used by ``batchlab.tune.BatchSizeSearch`` around Lightning's search::

    with TrialObserver(trainer, pl_module, "batch_size") as observer:
        ...  # Lightning's search
    observer.trials  # [Trial(batch_size=2, ok=True, steps=3, peak_memory_bytes=None), ...]

Lightning runs each trial as one run of the stage's loop (the fit loop, or the evaluation loop under validate, test
and predict) and calls the LightningModule's own hooks around it, even though it removes every callback while it
searches. The observer wraps the module's start and end hooks of the running stage for the search only: a trial
starts at the size the batch-size attribute holds, ends at the end hook, and one that started and never ended
failed. Lightning carries on after a failed trial only when the error was an out-of-memory one (it re-raises any
other), so such a trial ran out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.parsing import lightning_getattr

# The module's hooks around one run of each stage's loop (``trainer.state.fn``).
STAGE_HOOKS = {
    "fit": ("on_train_start", "on_train_end"),
    "validate": ("on_validation_start", "on_validation_end"),
    "test": ("on_test_start", "on_test_end"),
    "predict": ("on_predict_start", "on_predict_end"),
}


@dataclass
class Trial:
    """One batch size the search ran.

    ``steps`` counts the optimizer steps a fit's trial trained (batches under validate, test and predict): 0 for a
    trial whose loader held no batch at all (``drop_last`` and a batch above the data), which Lightning counts a
    success; None for one that ran out of memory part-way. ``peak_memory_bytes`` is measured on a GPU only.
    """

    batch_size: int
    ok: bool
    steps: Optional[int]
    peak_memory_bytes: Optional[int] = None

    @property
    def trained(self) -> bool:
        """Ran its steps: a size known to fit."""
        return self.ok and bool(self.steps)


class TrialObserver:
    """Records each trial of the search run inside its ``with`` block, from the LightningModule's own hooks."""

    def __init__(self, trainer: Trainer, pl_module: LightningModule, batch_arg_name: str) -> None:
        self.trainer, self.pl_module, self.batch_arg_name = trainer, pl_module, batch_arg_name
        self.stage = trainer.state.fn.value if trainer.state.fn else "fit"
        self.trials: list[Trial] = []
        self._open: Optional[Trial] = None
        self._first_step = 0
        self._saved: list[tuple[str, Any]] = []

    def __enter__(self) -> TrialObserver:
        start, end = STAGE_HOOKS[self.stage]
        for name, note in ((start, self._started), (end, self._ended)):
            self._saved.append((name, self.pl_module.__dict__.get(name)))
            setattr(self.pl_module, name, _after(getattr(self.pl_module, name), note, first=name == start))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close(ok=False)  # started, never ended: Lightning's search ended on its failure
        for name, own in reversed(self._saved):
            if own is None:
                delattr(self.pl_module, name)  # the class's hook shows through again
            else:
                setattr(self.pl_module, name, own)
        self._saved = []

    def _started(self) -> None:
        self._close(ok=False)  # the previous trial never reached its end hook
        device = self.pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._first_step = self.trainer.global_step
        self._open = Trial(int(lightning_getattr(self.pl_module, self.batch_arg_name)), ok=True, steps=None)

    def _ended(self) -> None:
        if self._open is not None:
            self._open.steps = self._steps()
        self._close(ok=True)

    def _steps(self) -> int:
        if self.stage == "fit":
            return self.trainer.global_step - self._first_step
        prefix = self.trainer.state.stage.dataloader_prefix
        return int(sum(getattr(self.trainer, f"num_{prefix}_batches")))

    def _close(self, ok: bool) -> None:
        trial, self._open = self._open, None
        if trial is None:
            return
        trial.ok = ok
        device = self.pl_module.device
        if device.type == "cuda":
            trial.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        self.trials.append(trial)


def _after(hook: Callable[..., Any], note: Callable[[], None], first: bool) -> Callable[..., Any]:
    """``hook`` with ``note()`` called before it (``first``) or after it."""

    def observed(*args: Any, **kwargs: Any) -> Any:
        if first:
            note()
        out = hook(*args, **kwargs)
        if not first:
            note()
        return out

    return observed


def dataset_size(trainer: Trainer, stage: str) -> Optional[int]:
    """Samples in the data the search ran on, as Lightning's search measures it (the length of the running stage's
    loaders' datasets, the largest where there are several); None for iterable-style data."""
    loaders = {"fit": trainer.train_dataloader, "validate": trainer.val_dataloaders,
               "test": trainer.test_dataloaders, "predict": trainer.predict_dataloaders}[stage]
    if loaders is None:
        return None
    lengths = [n for dl in CombinedLoader(loaders).flattened if (n := sized_len(getattr(dl, "dataset", None)))]
    return max(lengths, default=None)
