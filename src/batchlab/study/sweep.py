"""Steps to target: the LR sweep at each batch size. From the same initial weights, at a few learning rates
centred by the scaling rule (``--lr_rule``), each trial trains until the monitored validation metric reaches the
target, and the best LR per batch size is kept. While the best LR sits at an edge of those tried, up to
``--lr_extend`` more are tried beyond it. Each trial is one measurement in the study's folder
(``trials/bs<B>-lr<LR>.json``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Literal, Optional

from lightning.pytorch.callbacks import EarlyStopping

from batchlab.study.fitting import CurveRecorder
from batchlab.study.results import Status, Trial
from batchlab.study.settings import StudySettings

if TYPE_CHECKING:
    from batchlab.study.runner import Study


def sweep(study: Study, batch_size: int) -> list[Trial]:
    """Trials at one batch size: the LR factors nearest 1 first (so later ones are bounded by a good result),
    then, while the best LR sits at an edge of the grid, up to ``lr_extend`` more beyond it."""
    s = study.settings
    factors = sorted(set(s.lr_factors), key=lambda f: (abs(math.log(f)), f))
    ratio = _grid_ratio(s.lr_factors)
    results: list[Trial] = []
    extended = {"up": 0, "down": 0}
    while factors:
        factor = factors.pop(0)
        best = best_trial(results)
        budget = min(s.max_steps, best.steps) if best else s.max_steps
        results.append(_trial(study, batch_size, factor, budget))
        if not factors:
            direction = extend_direction(results)
            if direction and extended[direction] < s.lr_extend:
                extended[direction] += 1
                edge = max(r.lr_factor for r in results) if direction == "up" else min(r.lr_factor for r in results)
                factors.append(edge * ratio if direction == "up" else edge / ratio)
                study.add_to_total(1)
    return results


def best_trial(trials: list[Trial]) -> Optional[Trial]:
    """The trial that reached the target in the fewest steps; among equal steps the one tried first (factor nearest
    1, the sweep's order), which a later trial at the same step count cannot beat. Not the shorter wall time: at one
    batch size and step count that differs only by the machine's noise, and the answer must not."""
    reached = [t for t in trials if t.reached]
    return min(reached, key=lambda t: (t.steps, abs(math.log(t.lr_factor)), t.lr_factor)) if reached else None


def extend_direction(trials: list[Trial]) -> Optional[Literal["up", "down"]]:
    """Where to try one more LR: beyond the edge that holds the best result. With no result, a too-high LR shows
    as instability (divergence, or a trial that stalls or dies) and a too-low one as steady progress that runs
    out of steps: go down if even the lowest LR was unstable, up if every LR just ran out of steps."""
    by_factor = sorted(trials, key=lambda t: t.lr_factor)
    low, high = by_factor[0], by_factor[-1]
    if len(by_factor) < 2:
        return None
    best = best_trial(trials)
    if best is not None:
        if best is high and high.status != "diverged":
            return "up"
        return "down" if best is low else None
    if low.status in ("diverged", "stalled"):
        return "down"
    if all(t.status in ("budget", "pruned") for t in by_factor):
        return "up"
    return None


def _grid_ratio(factors: list[float]) -> float:
    ordered = sorted(set(factors))
    if len(ordered) < 2:
        return 2.0
    return min(b / a for a, b in zip(ordered, ordered[1:]))


def _trial(study: Study, batch_size: int, factor: float, max_steps: int) -> Trial:
    lr = study.centre_lr(batch_size) * factor
    trial = study.folder.measured(f"trials/bs{batch_size}-lr{lr:.6g}",
                                  lambda: _run_trial(study, batch_size, lr, factor, max_steps), Trial.from_json)
    study.tick()
    return trial


def _run_trial(study: Study, batch_size: int, lr: float, factor: float, max_steps: int) -> Trial:
    s = study.settings
    recorder = CurveRecorder(s.monitor)
    stopper = EarlyStopping(s.monitor, mode=s.mode, stopping_threshold=s.target, check_finite=True,
                            patience=s.patience or 10**9, verbose=False)
    start = time.perf_counter()
    _, trainer = study.fitter.fit(batch_size, lr, [recorder, stopper], max_steps, s.check_every)
    wall = time.perf_counter() - start
    reached = next((p for p in recorder.curve if _reaches(s, p.value)), None)
    values = [p.value for p in recorder.curve]
    status: Status
    if reached is not None:
        status = "reached"
    elif recorder.diverged_at is not None or any(not math.isfinite(v) for v in values):
        status = "diverged"
    elif trainer.global_step < max_steps:
        status = "stalled"  # no improvement in `patience` validations: abandoned early
    elif max_steps < s.max_steps:
        status = "pruned"  # stopped at the step count of a better LR at this batch size: it cannot win
    else:
        status = "budget"
    finite = [v for v in values if math.isfinite(v)]
    best = (min(finite) if s.mode == "min" else max(finite)) if finite else None
    return Trial(
        batch_size=batch_size, lr=lr, lr_factor=factor, status=status,
        steps=reached.step if reached else None, samples=reached.samples if reached else None,
        seconds_to_target=reached.seconds if reached else None,
        steps_run=trainer.global_step, max_steps=max_steps, wall_s=wall,
        best_value=best, final_value=values[-1] if values else None, curve=recorder.curve,
    )


def _reaches(settings: StudySettings, value: float) -> bool:
    target = settings.target
    return math.isfinite(value) and (value <= target if settings.mode == "min" else value >= target)
