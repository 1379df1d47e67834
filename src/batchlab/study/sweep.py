"""One trial towards the target, the unit every search of the study is made of: ``run_trial(study, B, factor,
seed, max_steps)`` trains from the initial weights of ``seed`` at batch size B and the LR ``factor`` x the scaling
rule's centre at B, until the monitored validation metric reaches the target, and records how it ended. Each
trial is one measurement in the study's folder (``trials/bs<B>-lr<LR>-seed<S>.json``), so a rerun repeats none.

``best_trial`` picks the fewest steps among trials; ``is_worse`` says whether a trial lost to another (what a
bracketed best LR needs on each side).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Optional

from lightning.pytorch.callbacks import EarlyStopping

from batchlab.study.fitting import CurveRecorder
from batchlab.study.results import Status, Trial
from batchlab.study.settings import StudySettings

if TYPE_CHECKING:
    from batchlab.study.runner import Study


def run_trial(study: Study, batch_size: int, factor: float, seed: int, max_steps: int,
              stopped_as: Status = "budget") -> Trial:
    """The trial at (B, LR factor, seed), run now or read back. ``max_steps`` is its budget; a trial that ends
    at it without reaching the target gets ``stopped_as`` (``budget``, or ``pruned``/``slow`` where the budget was
    cut short because the trial could no longer win, see ``batchlab.study.search``)."""
    lr = study.centre_lr(batch_size) * factor
    trial = study.folder.measured(
        f"trials/bs{batch_size}-lr{lr:.6g}-seed{seed}",
        lambda: _run_trial(study, batch_size, lr, factor, seed, max_steps, stopped_as), Trial.from_json)
    study.tick()
    return trial


def best_trial(trials: list[Trial]) -> Optional[Trial]:
    """The trial that reached the target in the fewest steps; among equal steps the one tried first (factor nearest
    1), which a later trial at the same step count cannot beat. Not the shorter wall time: at one batch size and
    step count that differs only by the machine's noise, and the answer must not."""
    reached = [t for t in trials if t.reached]
    return min(reached, key=lambda t: (t.steps, abs(math.log(t.lr_factor)), t.lr_factor)) if reached else None


def is_worse(trial: Trial, best: Trial) -> bool:
    """Whether ``trial`` did no better than ``best``: more steps, the same (a flat optimum: the steps are then as
    good as measurable), or no target at all within a budget at least the best's steps."""
    if trial.reached:
        return trial.steps >= best.steps
    return trial.status in ("diverged", "stalled") or trial.max_steps >= best.steps


def _run_trial(study: Study, batch_size: int, lr: float, factor: float, seed: int, max_steps: int,
               stopped_as: Status) -> Trial:
    s = study.settings
    recorder = CurveRecorder(s.monitor)
    stopper = EarlyStopping(s.monitor, mode=s.mode, stopping_threshold=s.target, check_finite=True,
                            patience=s.patience or 10**9, verbose=False)
    start = time.perf_counter()
    _, trainer = study.fitter.fit(batch_size, lr, [recorder, stopper], max_steps, s.check_every, seed=seed)
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
    else:
        status = stopped_as
    finite = [v for v in values if math.isfinite(v)]
    best = (min(finite) if s.mode == "min" else max(finite)) if finite else None
    return Trial(
        batch_size=batch_size, lr=lr, lr_factor=factor, seed=seed, status=status,
        steps=reached.step if reached else None, samples=reached.samples if reached else None,
        seconds_to_target=reached.seconds if reached else None,
        steps_run=trainer.global_step, max_steps=max_steps, wall_s=wall,
        best_value=best, final_value=values[-1] if values else None, curve=recorder.curve,
    )


def _reaches(settings: StudySettings, value: float) -> bool:
    target = settings.target
    return math.isfinite(value) and (value <= target if settings.mode == "min" else value >= target)
