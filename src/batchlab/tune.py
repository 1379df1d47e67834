"""Lightning's batch-size finder, made honest: every trial recorded, the reason the search stopped, never a size
that never ran, and the random state restored so that the search changes nothing but the batch size.

Used three ways:

- ``batchlab tune -c configs/seed.yaml [--mode binsearch --max_val 4096 ...]`` searches, prints the size found
  and why the search stopped (``out_of_memory``, ``dataset_size``, ``max_val`` or ``max_trials``), writes
  ``tune.json`` into the run's folder and logs the size found to the run's TensorBoard HParams;
- ``batchlab fit -c configs/seed.yaml -c configs/find_batch_size.yaml`` searches, then trains with the size
  found; ``summary.json``, ``hparams.yaml`` and TensorBoard's HParams show the size trained with and the one the
  search started from;
- from Python, ``find_batch_size(model, datamodule, mode="binsearch", accelerator="cpu")`` returns the
  ``TuneResult``; ``BatchSizeSearch`` is a drop-in for Lightning's ``BatchSizeFinder`` (same arguments, any
  Trainer method, ``Tuner.scale_batch_size`` included) with the result in its ``result``.

The search itself is Lightning's. ``batchlab.trials.TrialObserver`` sees its trials through the LightningModule's
own hooks; what they do not show is recovered from Lightning's answer (``_with_unseen_trial``). Lightning's finder
returns ``max_val``, or in power mode the double of the last size below it, without running it; batchlab takes
the largest size that trained instead, and applies ``binsearch``'s margin to that itself. Lightning restores the
weights after the search but not the random state, so a fit after a search would otherwise shuffle differently
from the same fit without one. Lightning's chatter between trials is hidden unless ``--verbose``.
"""

from __future__ import annotations

import inspect
import random
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr

from batchlab._lightning import rebuild_dataloaders, stop_after_search
from batchlab.errors import ConfigError, Fraction, NonNegativeInt, PositiveInt, check, check_arguments
from batchlab.quiet import noise_dropped, quiet_lightning
from batchlab.runs import device_name, log_hparams, run_hparams
from batchlab.trials import Trial, TrialObserver, dataset_size
from batchlab.tune_result import POWER_CAP, TuneResult, format_tune, search_metrics, stop_reason, write_tune

__all__ = ["BatchSizeSearch", "TuneResult", "check_not_distributed", "find_batch_size", "format_tune", "run_tune",
           "write_tune"]


class BatchSizeSearch(BatchSizeFinder):
    """Lightning's ``BatchSizeFinder`` that records its trials and why it stopped, never reports a size that never
    ran, restores the random state after the search, and keeps the batch size it started from. Lightning's own
    lines between the trials are hidden unless ``batchlab.quiet.set_verbose(True)`` (``--verbose``).

    Args:
        mode: ``power`` doubles the batch size until a trial runs out of memory or a cap is reached; ``binsearch``
            then bisects between the last size that fitted and the first that did not.
        steps_per_trial: Training steps run at each size (batches under validate, test and predict).
        init_val: First batch size tried (the configured one where it already covers the data, as in Lightning).
        max_trials: Most trials (``binsearch`` counts those that fit, and always runs one); 0 with ``power``
            tries nothing and keeps ``init_val``, untried.
        batch_arg_name: Attribute that holds the batch size, on the model, its ``hparams`` or the datamodule.
        margin: Fraction taken off the size ``binsearch`` finds, as a safety buffer.
        max_val: Cap of the search (on a CPU, where nothing runs out of memory, what ends it): Lightning stops
            before running it, so every size tried is below it.
    """

    def __init__(
        self,
        mode: Literal["power", "binsearch"] = "power",
        steps_per_trial: PositiveInt = 3,
        init_val: PositiveInt = 2,
        max_trials: NonNegativeInt = 25,
        batch_arg_name: str = "batch_size",
        margin: Fraction = 0.05,
        max_val: PositiveInt = 8192,
    ) -> None:
        mode = mode.lower() if isinstance(mode, str) else mode  # as Lightning's finder takes it
        # steps_per_trial=0 is refused too: Lightning's loop would stop before a step, and every trial "fit".
        check_arguments(BatchSizeSearch.__init__, {
            "mode": mode, "steps_per_trial": steps_per_trial, "init_val": init_val, "max_trials": max_trials,
            "batch_arg_name": batch_arg_name, "margin": margin, "max_val": max_val})
        check(init_val < max_val, f"init_val={init_val} is not below max_val={max_val}: Lightning would stop before "
                                  "its first trial and return init_val untried; use init_val < max_val")
        check(
            mode == "binsearch" or max_val <= POWER_CAP,
            f"max_val={max_val} is not allowed with mode='power': Lightning's power search stops at {POWER_CAP} "
            "whatever max_val says; use --mode binsearch --margin 0 to search further",
        )
        # Lightning's own search runs without a margin: batchlab takes it off the largest size that trained.
        super().__init__(mode, steps_per_trial, init_val, max_trials, batch_arg_name, 0.0, max_val)
        self.mode, self.steps_per_trial, self.init_val = mode, steps_per_trial, init_val
        self.max_trials, self.batch_arg_name, self.margin, self.max_val = max_trials, batch_arg_name, margin, max_val
        self.result: Optional[TuneResult] = None

    def check_holder(self, model: LightningModule, datamodule: Any) -> None:
        """Refuse a ``batch_arg_name`` that neither the model nor the data holds, before any fit starts (Lightning
        finds it only once the fit is under way, its run folder written)."""
        holders = [obj for obj in (model, datamodule) if obj is not None]
        check(any(hasattr(obj, self.batch_arg_name) or self.batch_arg_name in (getattr(obj, "hparams", None) or {})
                  for obj in holders),
              f"batch_arg_name={self.batch_arg_name!r} is not allowed: neither "
              f"{' nor '.join(type(obj).__name__ for obj in holders)} has an attribute or hparam of that name; name "
              "the one that holds the batch size")

    def scale_batch_size(self, trainer: Trainer, pl_module: LightningModule) -> None:
        initial = lightning_getattr(pl_module, self.batch_arg_name)
        rng = _rng_state()
        observer = TrialObserver(trainer, pl_module, self.batch_arg_name)
        self.result, self.optimal_batch_size = None, None
        stopped: Optional[BaseException] = None
        try:
            with quiet_lightning(), observer:
                super().scale_batch_size(trainer, pl_module)
        except BaseException as exc:  # re-raised below, once the random state is back and the result made
            stopped = exc
        _set_rng_state(rng)
        # Lightning sets its answer once the search is done, before it stops a run that only searches: an error
        # raised without one came from inside the search (or fast_dev_run skipped it: no answer, nothing ran).
        if self.optimal_batch_size is not None:
            self.result = self._conclude(trainer, pl_module, observer.trials, initial)
            sizes = {self.batch_arg_name: self.result.batch_size, "batch_size_initial": initial}
            if stopped is not None:
                # Nothing else reports this run, so its HParams session is the search's, against what the search
                # measured (TensorBoard writes no session without a metric). Logged here, before Lightning closes
                # the logger on its way out.
                log_hparams(trainer, run_hparams(trainer, pl_module, **sizes), metrics=search_metrics(self.result))
            else:
                # A fit follows: RunSummary logs its session at the end, against the fit's metrics; until then
                # the logger and hparams.yaml hold the size found instead of the configured one.
                log_hparams(trainer, sizes)
        if stopped is not None:
            raise stopped

    def _conclude(self, trainer: Trainer, pl_module: LightningModule, seen: list[Trial], initial: Any) -> TuneResult:
        """The result, from the trials and Lightning's answer; the size found replaces Lightning's answer in the
        batch-size attribute and in the running loop's dataloaders where the two differ."""
        answer = self.optimal_batch_size
        trials = self._with_unseen_trial(seen, answer)
        trained = [t.batch_size for t in trials if t.trained]
        # Nothing trained (every trial out of memory, or max_trials=0): Lightning's answer, nothing better to go on.
        base = max(trained, default=answer)
        found = base
        if self.mode == "binsearch" and self.margin > 0:
            found = max(1, int(base * (1 - self.margin)))  # Lightning's own margin arithmetic
        self.optimal_batch_size = found
        if found != answer:
            lightning_setattr(pl_module, self.batch_arg_name, found)
            rebuild_dataloaders(trainer)
        stage = trainer.state.fn.value if trainer.state.fn else "fit"
        size = dataset_size(trainer, stage)
        return TuneResult(
            batch_size=found,
            effective_batch_size=min(found, size) if size else found,
            batch_size_initial=initial,
            mode=self.mode, steps_per_trial=self.steps_per_trial, init_val=self.init_val,
            max_trials=self.max_trials, max_val=self.max_val, margin=self.margin,
            batch_arg_name=self.batch_arg_name, stage=stage,
            stopped_because=stop_reason(trials, self.mode, self.max_trials, size),
            trials=trials,
            largest_ok=max(trained, default=None),
            found_was_tried=found in {t.batch_size for t in trials},
            before_margin=base if found != base else None,
            untried_corrected_from=answer if trained and answer != base else None,
            dataset_size=size,
            device=device_name(pl_module.device),
            memory_limited=any(not t.ok for t in trials),
        )

    def _with_unseen_trial(self, seen: list[Trial], answer: int) -> list[Trial]:
        """``seen``, plus the trial Lightning ran at ``answer`` where its loop returned before any hook.

        A loop whose loader holds no batch (``drop_last`` and a batch above the data) returns at once; Lightning
        counts that trial a success and, its batch covering the data, ends the search on it. Nothing else leaves
        Lightning's answer unseen after trials that all fitted, with trials to spare, and below ``max_val``
        (Lightning returns a size at or above it without running it).
        """
        allowed = self.max_trials if self.mode == "power" else max(1, self.max_trials)
        unseen = answer not in {t.batch_size for t in seen} and all(t.ok for t in seen)
        if unseen and answer < self.max_val and len(seen) < allowed:
            return [*seen, Trial(answer, ok=True, steps=0)]
        return seen


def check_not_distributed(trainer: Trainer) -> None:
    """Lightning's finder refuses distributed strategies; say so before any process is launched."""
    if not isinstance(trainer.strategy, ParallelStrategy):
        return
    kind = type(trainer.strategy).__name__
    # What the user wrote (``ddp_spawn``, or ``auto`` that became DDP on two devices) where batchlab's Trainer kept it.
    passed = getattr(trainer, "init_kwargs", {}).get("strategy")
    strategy = f"{passed!r} ({kind}, " if isinstance(passed, str) else f"{kind} ("
    raise ConfigError(
        f"the batch-size finder does not run under strategy={strategy}devices={trainer.num_devices}, "
        f"num_nodes={trainer.num_nodes}): Lightning refuses distributed strategies; search on one device "
        "(--trainer.devices 1 --trainer.strategy auto) and scale the result"
    )


def run_tune(trainer: Trainer, model: LightningModule, datamodule: Any, finder: BatchSizeSearch) -> TuneResult:
    """Search with ``finder`` and stop, as ``lightning.pytorch.tuner.Tuner.scale_batch_size`` does (Tuner builds
    its own finder, so this repeats its few lines with ours)."""
    check_not_distributed(trainer)
    check(not trainer.fast_dev_run, f"trainer.fast_dev_run={trainer.fast_dev_run!r} is not allowed with the batch-size "
                                    "search: Lightning's finder skips itself under it; leave fast_dev_run off")
    finder.check_holder(model, datamodule)
    stop_after_search(finder)
    trainer.callbacks = [finder] + [c for c in trainer.callbacks if not isinstance(c, BatchSizeFinder)]
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        trainer.callbacks = [c for c in trainer.callbacks if c is not finder]
    if finder.result is None:
        raise ConfigError("the batch-size search did not run")
    return finder.result


# A search from Python leaves nothing behind and runs on one device, unless told otherwise.
# The search ends the fit (stop_after_search): max_epochs only keeps Lightning from warning that it is unset.
SEARCH_TRAINER = {"devices": 1, "max_epochs": 1, "logger": False, "enable_checkpointing": False,
                  "enable_model_summary": False, "enable_progress_bar": False}


def find_batch_size(model: LightningModule, datamodule: Any = None, **options: Any) -> TuneResult:
    """Search the largest batch size that fits: ``options`` are ``BatchSizeSearch``'s and the Trainer's keyword
    arguments (on a Trainer without logger, checkpoints or progress bar, on one device, unless they say otherwise).

        result = find_batch_size(model, datamodule, mode="binsearch", max_val=4096, accelerator="cpu")
        result.batch_size, result.stopped_because, result.trials
    """
    finder_names = inspect.signature(BatchSizeSearch).parameters
    trainer_names = inspect.signature(Trainer).parameters
    unknown = next((k for k in options if k not in finder_names and k not in trainer_names), None)
    if unknown is not None:
        raise ConfigError(f"{unknown}={options[unknown]!r} is not allowed: use an argument of "
                          "batchlab.tune.BatchSizeSearch or of lightning.pytorch.Trainer")
    finder = BatchSizeSearch(**{k: v for k, v in options.items() if k in finder_names})
    with noise_dropped():
        trainer = Trainer(**{**SEARCH_TRAINER, **{k: v for k, v in options.items() if k in trainer_names}})
        return run_tune(trainer, model, datamodule, finder)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
