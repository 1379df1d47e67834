"""What a batch-size search found, as ``TuneResult``, and how it is reported: the lines ``batchlab tune`` prints,
``tune.json`` and the metrics of the search's TensorBoard HParams session.

``batchlab.tune.BatchSizeSearch`` builds the result from the trials it saw and its own settings (``stop_reason``
says why the search ended); ``batchlab.tune.find_batch_size`` returns it, ``summary.json`` holds it under
``batch_size_search`` after a fit that searched first, and ``tune.json`` is its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from batchlab.files import write_json
from batchlab.trials import Trial

StopReason = Literal["out_of_memory", "dataset_size", "max_val", "max_trials"]
# Lightning 2.6's power search doubles through a helper called without max_val, which then caps at this.
POWER_CAP = 8192


@dataclass
class TuneResult:
    """One search: the size found, the finder's settings, every trial, and why it stopped.

    ``batch_size`` is the size found: the largest size that trained (less ``margin`` with ``binsearch``), or
    Lightning's answer where none did. ``untried_corrected_from`` is Lightning's answer where it never trained
    (it never runs ``max_val``, which it may return), ``before_margin`` the size the margin was taken off.
    ``effective_batch_size`` is what a batch holds, at most the ``dataset_size``; ``largest_ok`` the largest size
    that trained; ``stage`` the Trainer method the search ran under (``fit``, ``validate``, ``test``,
    ``predict``).
    """

    batch_size: int
    effective_batch_size: int
    batch_size_initial: Optional[int]
    mode: str
    steps_per_trial: int
    init_val: int
    max_trials: int
    max_val: int
    margin: float
    batch_arg_name: str
    stage: str
    stopped_because: StopReason
    trials: list[Trial]
    largest_ok: Optional[int]
    found_was_tried: bool
    before_margin: Optional[int]
    untried_corrected_from: Optional[int]
    dataset_size: Optional[int]
    device: str
    memory_limited: bool


def stop_reason(trials: list[Trial], mode: str, max_trials: int, dataset_size: Optional[int]) -> StopReason:
    """Why Lightning's search ended, from what it ran: a failed trial means memory set the limit; then a batch that
    covered the data, the trials allowed (``binsearch`` counts those that fit), and otherwise the cap."""
    if any(not t.ok for t in trials):
        return "out_of_memory"
    if dataset_size is not None and any(t.batch_size >= dataset_size for t in trials):
        return "dataset_size"
    counted = len(trials) if mode == "power" else sum(t.ok for t in trials)
    return "max_trials" if counted >= max_trials else "max_val"


def search_metrics(result: TuneResult) -> dict[str, float]:
    """What a search measured, as the metrics of its TensorBoard HParams session."""
    metrics = {"hp/largest_batch_tried": result.largest_ok, "hp/trials": len(result.trials)}
    ran = [t for t in result.trials if t.trained and t.batch_size == result.largest_ok]
    if ran and ran[-1].peak_memory_bytes is not None:
        metrics["hp/peak_memory_mib"] = ran[-1].peak_memory_bytes / 2**20
    return {k: v for k, v in metrics.items() if v is not None}


def write_tune(result: TuneResult, log_dir: str) -> Path:
    return write_json(Path(log_dir) / "tune.json", result)


def format_tune(result: TuneResult, path: Optional[Path] = None) -> str:
    """The lines ``batchlab tune`` prints."""
    r = result
    found, reason = r.batch_size, r.stopped_because
    why = {
        "out_of_memory": "a larger batch ran out of device memory",
        "dataset_size": f"the batch covers all {r.dataset_size} training samples",
        "max_val": f"it reached max_val={r.max_val}",
        "max_trials": f"it used all max_trials={r.max_trials} trials",
    }[reason]
    start = r.trials[0].batch_size if r.trials else r.batch_size_initial
    lines = ["", "batchlab tune", f"  batch size found   {found} (--mode {r.mode}, starting at {start})",
             f"  stopped because    {reason}: {why}"]
    if r.effective_batch_size != found:
        lines.append(f"  effective          {r.effective_batch_size}: a batch of {found} holds all "
                     f"{r.dataset_size} samples")
    for t in r.trials:
        memory = f", peak {t.peak_memory_bytes / 2**20:,.0f} MiB" if t.peak_memory_bytes is not None else ""
        state = "out of memory" if not t.ok else "ok" if t.trained else "ran no batch (drop_last)"
        lines.append(f"  trial              {t.batch_size:>8} {state}{memory}")
    lines += _corrections(r)
    lines.append(f"  device             {r.device}")
    if not r.memory_limited:
        where = "on a CPU nothing runs out of memory" if r.device == "cpu" else "nothing ran out of memory"
        lines.append(f"  memory             did not limit this search ({where}); the largest batch tried was "
                     f"{r.largest_ok}")
        lines.append("  next               for a batch size worth training with, run `batchlab study`")
    if path is not None:
        lines.append(f"  written            {path}")
    return "\n".join(lines)


def _corrections(r: TuneResult) -> list[str]:
    """How the size found differs from what Lightning's finder answered, and from the sizes tried."""
    lines = []
    corrected, base = r.untried_corrected_from, r.before_margin or r.batch_size
    if corrected and any(t.batch_size == corrected and t.ok and not t.trained for t in r.trials):
        lines.append(
            f"  no batch           Lightning's finder returned {corrected}, above the {r.dataset_size} training "
            f"samples, which drop_last leaves without a batch; {base}, the largest size that trained, is used "
            "instead"
        )
    elif corrected:
        why = ("it stops before max_val" if corrected == r.max_val
               else f"above max_val={r.max_val}" if corrected > r.max_val else "")
        lines.append(
            f"  untried            Lightning's finder returned {corrected} but never tried it"
            + (f" ({why})" if why else "") + f"; {base}, the largest size tried, is used instead"
        )
        if corrected == r.max_val:
            raise_it = "--max_val above it" if r.mode == "binsearch" or r.max_val < POWER_CAP else (
                "--max_val above it with --mode binsearch --margin 0")
            lines.append(f"                     to have {r.max_val} tried, raise {raise_it}")
    if r.before_margin:
        lines.append(f"  margin             {r.before_margin} less the {r.margin:.0%} margin gives {r.batch_size}")
    elif not r.found_was_tried:
        ran = f"the largest size tried was {r.largest_ok}" if r.largest_ok else "no size tried ran"
        lines.append(f"  untried            {r.batch_size} itself was never tried: {ran}")
    return lines
