"""Throughput: the steady-state time per optimizer step t(B) of a real Lightning fit at every batch size of the
grid, which the study fits by alpha + beta B, and uses made non-decreasing in B (``monotone``); where a step is
long, fewer steps are timed (``--throughput_seconds``). Each round of each batch size is one measurement in the
study's folder (``throughput/bs<B>-round<R>.json``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from batchlab.study.results import StepTiming, Throughput

if TYPE_CHECKING:
    from batchlab.study.runner import Study


class StepTimer(Callback):
    """Times optimizer steps after a warm-up, from one ``on_train_batch_end`` to the next (the whole step: data,
    forward, backward, optimizer, hooks), synchronising the GPU so that queued work is counted.

    Args:
        warmup: Steps left out of the timing (the first, timed from the start of training, always is).
        seconds: Where steps are long, fewer of them: the warm-up ends once it has taken this long (from the start
            of training), and the fit stops once at least 3 timed steps add up to this. A step of a large model at
            a large batch takes seconds, and its time varies far less than a step of milliseconds, so a few of
            them are enough.
    """

    def __init__(self, warmup: int, seconds: float = math.inf) -> None:
        self.warmup, self.seconds = warmup, seconds
        self.times: list[float] = []
        self._last: Optional[float] = None
        self._warming, self._warm_s = True, 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None:
            step_s = now - self._last
            if self._warming and (trainer.global_step > self.warmup or self._warm_s >= self.seconds):
                self._warming = False
            if self._warming:
                self._warm_s += step_s
            else:
                self.times.append(step_s)
                if len(self.times) >= 3 and sum(self.times) >= self.seconds:
                    trainer.should_stop = True
        self._last = now


def measure_throughput(study: Study, grid: list[int]) -> list[Throughput]:
    """Time per step for every B, in ``throughput_rounds`` interleaved passes over the grid, keeping each B's
    fastest pass: on a shared machine a burst of other work then spoils one pass of a few B, not the fit."""
    rounds: dict[int, list[float]] = {b: [] for b in grid}
    for r in range(study.settings.throughput_rounds):
        for b in grid:
            rounds[b].append(_time_steps(study, b, r).step_s)
    return [Throughput(batch_size=b, step_s=min(t), samples_per_s=b / min(t), rounds_s=t) for b, t in rounds.items()]


def _time_steps(study: Study, batch_size: int, round_: int) -> StepTiming:
    def measure() -> StepTiming:
        s = study.settings
        timer = StepTimer(s.warmup_steps, s.throughput_seconds)
        study.fitter.fit(batch_size, study.centre_lr(batch_size), [timer], s.warmup_steps + s.throughput_steps + 1,
                         None)
        times = sorted(timer.times)
        # A low quantile, not the mean: other work on the machine only ever adds time to a step.
        return StepTiming(batch_size=batch_size, step_s=times[len(times) // 5], median_step_s=times[len(times) // 2],
                          steps_timed=len(times))

    timing = study.folder.measured(f"throughput/bs{batch_size}-round{round_}", measure, StepTiming.from_json)
    study.tick()
    return timing


def monotone(throughput: list[Throughput]) -> list[Throughput]:
    """The step times made non-decreasing in B, as the search and the answer use them: each B's time is the least
    measured at it or at any larger B. A larger batch does at least the work of a smaller one per step, and other
    work on a shared machine only ever adds time (a 2-core VM runs whole seconds at 1.5-2x the step time of the
    next), so a larger B measured faster bounds the smaller B's true time more tightly than its own spoilt rounds;
    pooling the violators instead would let one slow stretch raise every larger B with it and move the band. Each
    keeps its measured rounds (``rounds_s``)."""
    out: list[Throughput] = []
    least = math.inf
    for t in sorted(throughput, key=lambda t: t.batch_size, reverse=True):
        if t.step_s <= least:  # in order already: kept exactly as measured
            least = t.step_s
            out.append(t)
        else:
            out.append(dataclasses.replace(t, step_s=least, samples_per_s=t.batch_size / least))
    return sorted(out, key=lambda t: t.batch_size)
