"""Lightning's batch-size finder, made honest: every trial recorded, the reason the search stopped, and the
random state restored so that the search changes nothing but the batch size.

Used two ways:

- ``batchlab tune -c configs/seed.yaml [--mode binsearch --max_val 4096 ...]`` searches, prints the size found
  and why the search stopped (``out_of_memory``, ``dataset_size``, ``max_val`` or ``max_trials``), writes
  ``tune.json`` into the run's folder and logs the size found to the run's TensorBoard HParams;
- ``batchlab fit -c configs/seed.yaml -c configs/find_batch_size.yaml`` searches, then trains with the size
  found; ``summary.json``, ``hparams.yaml`` and TensorBoard's HParams show the size trained with and the one the
  search started from.

The search itself is Lightning's ``BatchSizeFinder``. Lightning removes every callback and logger while it runs
its trials and reports them only as log lines, so ``TrialRecorder`` reads those lines (the one place batchlab
depends on their wording; the tests pin it). The last of them, said before Lightning builds the fit's dataloaders,
is also where an answer that never ran is replaced by one that did. Lightning restores the weights after the
search but not the random state, so a fit after a search would otherwise shuffle differently from the same fit
without one.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.exceptions import _TunerExitException  # private: see run_tune
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr

from batchlab.errors import ConfigError, check
from batchlab._lightning import rebuild_dataloaders, stop_after_search
from batchlab.files import write_json
from batchlab.runs import device_name, log_hparams, run_hparams

STOP_REASONS = ("out_of_memory", "dataset_size", "max_val", "max_trials")

# Lightning 2.6's messages, in lightning/pytorch/tuner/batch_size_scaling.py.
_TRIED = re.compile(r"Batch size (\d+) (succeeded|failed), trying batch size (\d+)")
_DATASET = re.compile(r"The batch size (\d+) is greater or equal than the length of your dataset: (\d+)")
_MAX_VAL = re.compile(r"Reached the maximum batch size limit of (\d+)")
_MARGIN = re.compile(r"reducing batch size from (\d+) to (\d+)")
_CAPPED = re.compile(r"Batch size (\d+) exceeds max_val limit (\d+), capping at")
# Lightning 2.6's power search doubles through a helper called without max_val, which then caps at this.
POWER_CAP = 8192
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.tuner.batch_size_scaling")


class TrialRecorder(logging.Handler):
    """Collects the finder's trials from its log lines, with the peak device memory of each on a GPU."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(logging.INFO)
        self.device = device
        self.trials: list[dict[str, Any]] = []
        self.dataset_size: Optional[int] = None
        self.hit_max_val = False
        self.before_margin: Optional[int] = None
        self._pending: Optional[int] = None
        self._from_dataset_message: set[int] = set()  # indices of trials recorded from the dataset message

    def __enter__(self) -> TrialRecorder:
        self._levels = []
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            self._levels.append(logger.level)
            logger.setLevel(logging.INFO)  # the trials must be seen even where the user quietened Lightning
            logger.addHandler(self)
        self._reset_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, level in zip(_LOGGERS, self._levels):
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if m := _TRIED.search(message):
            size, ok, following = int(m.group(1)), m.group(2) == "succeeded", int(m.group(3))
            self._trial(size, ok)
            # "trying" the size just run means the cap stopped the doubling: nothing more will run.
            self._pending = following if ok and following != size else None
        elif m := _DATASET.search(message):
            # Said after a successful trial at that size, instead of "succeeded, trying ...", and once before any
            # trial when the configured batch size already covers the data (``finish`` drops that one).
            self._from_dataset_message.add(len(self.trials))
            self._trial(int(m.group(1)), True)
            self.dataset_size = int(m.group(2))
            self._pending = None
        elif _MAX_VAL.search(message) or _CAPPED.search(message):
            # Said before trying the capped size, which is then never tried.
            self.hit_max_val = True
            self._pending = None
        elif m := _MARGIN.search(message):
            self.before_margin = int(m.group(1))

    def finish(self) -> None:
        """Record the last trial, which Lightning runs without a message when it ends on ``max_trials``, and drop
        the dataset message said before any trial (a real trial is never followed by another of its size)."""
        if self._pending is not None:
            self._trial(self._pending, True)
            self._pending = None
        self.trials = [
            t for i, t in enumerate(self.trials)
            if not (i in self._from_dataset_message and i + 1 < len(self.trials)
                    and self.trials[i + 1]["batch_size"] == t["batch_size"])
        ]

    def _trial(self, batch_size: int, ok: bool) -> None:
        trial: dict[str, Any] = {"batch_size": batch_size, "ok": ok}
        if self.device.type == "cuda":
            trial["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self._reset_peak()
        self.trials.append(trial)

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def stop_reason(trials: list[dict[str, Any]], dataset_size: Optional[int], hit_max_val: bool) -> str:
    """Why the search ended: a failed trial means memory set the limit; otherwise the first cap reached."""
    if any(not t["ok"] for t in trials):
        return "out_of_memory"
    if dataset_size is not None:
        return "dataset_size"
    if hit_max_val:
        return "max_val"
    return "max_trials"


class BatchSizeSearch(BatchSizeFinder):
    """Lightning's ``BatchSizeFinder`` that records its trials and why it stopped, restores the random state
    after the search, and records the batch size it started from next to the one it found.

    Args:
        mode: ``power`` doubles until a cap or an out-of-memory error; ``binsearch`` then bisects.
        steps_per_trial: Training steps run at each batch size tried.
        init_val: First batch size tried.
        max_trials: Most batch sizes tried.
        max_val: Cap of the search (on a CPU, where nothing runs out of memory, what ends it): Lightning stops
            before running it, so every size tried is below it.
        margin: Fraction taken off the size found by ``binsearch``, as a safety buffer.
    """

    def __init__(
        self,
        mode: Literal["power", "binsearch"] = "power",
        steps_per_trial: int = 3,
        init_val: int = 2,
        max_trials: int = 25,
        max_val: int = 8192,
        margin: float = 0.05,
    ) -> None:
        check(mode in ("power", "binsearch"), f"mode={mode!r} is not allowed: use 'power' or 'binsearch'")
        for name, value in (("steps_per_trial", steps_per_trial), ("init_val", init_val),
                            ("max_trials", max_trials), ("max_val", max_val)):
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name}={value!r} is not allowed: use a positive integer",
            )
        check(init_val < max_val, f"init_val={init_val} is not below max_val={max_val}: use init_val < max_val")
        check(
            mode == "binsearch" or max_val <= POWER_CAP,
            f"max_val={max_val} is not allowed with mode='power': Lightning's power search stops at {POWER_CAP} "
            "whatever max_val says; use --mode binsearch --margin 0 to search further",
        )
        check(0 <= margin < 1, f"margin={margin} is not allowed: use a number in [0, 1)")
        super().__init__(mode, steps_per_trial, init_val, max_trials, "batch_size", margin, max_val)
        self.settings = {"mode": mode, "steps_per_trial": steps_per_trial, "init_val": init_val,
                         "max_trials": max_trials, "max_val": max_val, "margin": margin}
        self.result: Optional[dict[str, Any]] = None
        self.before_margin: Optional[int] = None
        self.untried_corrected_from: Optional[int] = None

    def scale_batch_size(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_not_distributed(trainer)
        initial = lightning_getattr(pl_module, "batch_size")
        self.before_margin = self.untried_corrected_from = None
        rng = _rng_state()
        recorder = TrialRecorder(pl_module.device)
        ends_the_run = False
        try:
            with recorder:
                try:
                    super().scale_batch_size(trainer, pl_module)
                except _TunerExitException:  # the search ended and `batchlab tune` stops here
                    ends_the_run = True
                    self._finish(trainer, pl_module, recorder, rebuild=False)
                    raise
                self._finish(trainer, pl_module, recorder, rebuild=True)
        finally:
            _set_rng_state(rng)
            self.result = self._describe(trainer, pl_module, initial, recorder)
            sizes = {"batch_size": self.result["batch_size"], "batch_size_initial": initial}
            if ends_the_run:
                # Nothing else reports this run, so its HParams session is the search's, against what the search
                # measured (TensorBoard writes no session without a metric). Logged here, before Lightning closes
                # the logger on its way out of the fit.
                log_hparams(trainer, run_hparams(trainer, pl_module, **sizes), metrics=search_metrics(self.result))
            else:
                # A fit follows: RunSummary logs its session at the end, against the fit's metrics; until then
                # the logger and hparams.yaml hold the size found instead of the configured one.
                log_hparams(trainer, sizes)

    def _finish(self, trainer: Trainer, pl_module: LightningModule, recorder: TrialRecorder, rebuild: bool) -> None:
        """Complete the trial list and never recommend a size that was never tried.

        Lightning's finder never runs ``max_val`` itself (it stops when the next size reaches it) yet returns it, or
        in power mode the double of the last size below it, and ``binsearch`` then takes the margin off that. A
        size that never ran is not known to fit, so the found size is then based on the largest size that ran. Where
        a fit follows (``rebuild``), its dataloaders, which Lightning built at its own answer, are built again.
        """
        recorder.finish()
        if _drops_last(trainer) and recorder.dataset_size:
            # With drop_last a batch above the data is no batch at all: Lightning counts that trial a success, but
            # it trained nothing, and a fit at that size would train nothing either.
            for t in recorder.trials:
                if t["batch_size"] > recorder.dataset_size:
                    t["no_batch"] = True
        returned = self.optimal_batch_size
        found = self._tried_size(recorder, returned)
        self.optimal_batch_size = found
        if found != returned:
            lightning_setattr(pl_module, "batch_size", found)
            if rebuild:
                rebuild_dataloaders(trainer)

    def _tried_size(self, recorder: TrialRecorder, returned: Optional[int]) -> Optional[int]:
        """The size found from Lightning's answer ``returned``: its own, or one based on the largest that ran."""
        self.before_margin = recorder.before_margin
        answer = recorder.before_margin or returned  # Lightning's answer before its margin
        ran = {t["batch_size"] for t in recorder.trials if _trained(t)}
        base = max((s for s in ran if answer is not None and s <= answer), default=None)
        if answer is None or answer in ran or base is None:
            return returned  # its answer ran, or none did (all out of memory): nothing to fall back on
        self.untried_corrected_from, self.before_margin = answer, None
        margin = self.settings["margin"]
        if self.settings["mode"] != "binsearch" or margin == 0:
            return base
        # Lightning's own margin arithmetic (batch_size_scaling._run_binsearch_scaling), on the size that ran.
        found = max(1, int(base * (1 - margin)))
        self.before_margin = base if found != base else None
        return found

    def _describe(
        self, trainer: Trainer, pl_module: LightningModule, initial: int, recorder: TrialRecorder
    ) -> dict[str, Any]:
        found = self.optimal_batch_size or lightning_getattr(pl_module, "batch_size")
        trials = recorder.trials
        tried = {t["batch_size"] for t in trials}
        dataset_size = recorder.dataset_size
        effective = min(found, dataset_size) if dataset_size else found
        return {
            "batch_size": found,
            "effective_batch_size": effective,
            "batch_size_initial": initial,
            **self.settings,
            "stopped_because": stop_reason(trials, dataset_size, recorder.hit_max_val),
            "trials": trials,
            "largest_ok": max((t["batch_size"] for t in trials if _trained(t)), default=None),
            "found_was_tried": found in tried,
            "before_margin": self.before_margin,
            "untried_corrected_from": self.untried_corrected_from,
            "dataset_size": dataset_size,
            "device": device_name(pl_module.device),
            "memory_limited": any(not t["ok"] for t in trials),
        }


def _trained(trial: dict[str, Any]) -> bool:
    """A trial that ran its steps: not out of memory, and not a drop_last batch above the data (no batch at all)."""
    return trial["ok"] and not trial.get("no_batch")


def _drops_last(trainer: Trainer) -> bool:
    """Whether the training loader the search ran with drops its last, smaller batch (a DataLoader's or batchlab's
    ``drop_last``; False for loaders without one)."""
    return bool(getattr(trainer.train_dataloader, "drop_last", False))


def search_metrics(result: dict[str, Any]) -> dict[str, float]:
    """What a search measured, as the metrics of its TensorBoard HParams session."""
    metrics = {"hp/largest_batch_tried": result["largest_ok"], "hp/trials": len(result["trials"])}
    ran = [t for t in result["trials"] if t["ok"] and t["batch_size"] == result["largest_ok"]]
    if ran and "peak_memory_bytes" in ran[-1]:
        metrics["hp/peak_memory_mib"] = ran[-1]["peak_memory_bytes"] / 2**20
    return {k: v for k, v in metrics.items() if v is not None}


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


def format_tune(result: dict[str, Any], path: Optional[Path] = None) -> str:
    """The lines ``batchlab tune`` prints."""
    found, reason = result["batch_size"], result["stopped_because"]
    why = {
        "out_of_memory": "a larger batch ran out of device memory",
        "dataset_size": f"the batch covers all {result['dataset_size']} training samples",
        "max_val": f"it reached max_val={result['max_val']}",
        "max_trials": f"it used all max_trials={result['max_trials']} trials",
    }[reason]
    start = result["trials"][0]["batch_size"] if result["trials"] else result["batch_size_initial"]
    lines = ["", "batchlab tune", f"  batch size found   {found} (--mode {result['mode']}, starting at {start})",
             f"  stopped because    {reason}: {why}"]
    if result["effective_batch_size"] != found:
        lines.append(
            f"  effective          {result['effective_batch_size']}: a batch of {found} holds all "
            f"{result['dataset_size']} samples"
        )
    for t in result["trials"]:
        memory = f", peak {t['peak_memory_bytes'] / 2**20:,.0f} MiB" if "peak_memory_bytes" in t else ""
        state = "out of memory" if not t["ok"] else "ran no batch (drop_last)" if t.get("no_batch") else "ok"
        lines.append(f"  trial              {t['batch_size']:>8} {state}{memory}")
    corrected, max_val, largest = result.get("untried_corrected_from"), result["max_val"], result["largest_ok"]
    base = result["before_margin"] or found
    if corrected and any(t.get("no_batch") and t["batch_size"] == corrected for t in result["trials"]):
        lines.append(
            f"  no batch           Lightning's finder returned {corrected}, above the {result['dataset_size']} "
            f"training samples, which drop_last leaves without a batch; {base}, the largest size that trained, "
            "is used instead"
        )
    elif corrected:
        why = ("it stops before max_val" if corrected == max_val
               else f"above max_val={max_val}" if corrected > max_val else "")
        lines.append(
            f"  untried            Lightning's finder returned {corrected} but never tried it"
            + (f" ({why})" if why else "") + f"; {base}, the largest size tried, is used instead"
        )
        if corrected == max_val:
            raise_it = "--max_val above it" if result["mode"] == "binsearch" or max_val < POWER_CAP else (
                "--max_val above it with --mode binsearch --margin 0")
            lines.append(f"                     to have {max_val} tried, raise {raise_it}")
    if result["before_margin"]:
        lines.append(
            f"  margin             {result['before_margin']} less the {result['margin']:.0%} margin gives {found}"
        )
    elif not result["found_was_tried"]:
        ran = f"the largest size tried was {largest}" if largest else "no size tried ran"
        lines.append(f"  untried            {found} itself was never tried: {ran}")
    lines.append(f"  device             {result['device']}")
    if not result["memory_limited"]:
        where = "on a CPU nothing runs out of memory" if result["device"] == "cpu" else "nothing ran out of memory"
        lines.append(
            f"  memory             did not limit this search ({where}); the largest batch tried was {largest}"
        )
        lines.append("  next               for a batch size worth training with, run `batchlab study`")
    if path is not None:
        lines.append(f"  written            {path}")
    return "\n".join(lines)


def write_tune(result: dict[str, Any], log_dir: str) -> Path:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return write_json(Path(log_dir) / "tune.json", result)


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


def run_tune(trainer: Trainer, model: LightningModule, datamodule: Any, finder: BatchSizeSearch) -> dict[str, Any]:
    """Search with ``finder`` and stop, as ``lightning.pytorch.tuner.Tuner.scale_batch_size`` does.

    Tuner builds its own finder, so this repeats its few lines with ours. The two private names used here and in
    ``BatchSizeSearch`` (``_early_exit`` and ``_TunerExitException``) are how Lightning's own Tuner stops a fit
    after the search; no public hook does it.
    """
    check_not_distributed(trainer)
    stop_after_search(finder)
    trainer.callbacks = [finder] + [c for c in trainer.callbacks if not isinstance(c, BatchSizeFinder)]
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        trainer.callbacks = [c for c in trainer.callbacks if c is not finder]
    if finder.result is None:
        raise ConfigError("the batch-size search did not run")
    return finder.result
