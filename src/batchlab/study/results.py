"""What a batch-size study measures and concludes, as dataclasses: what ``run_study`` returns, what the report
reads and, through ``batchlab.files.jsonable``, what the study's JSON files hold.

- ``StepTiming``: one timed run of one batch size (``throughput/bs<B>-round<R>.json``); ``Throughput``: a batch
  size's time per step, the fastest of its rounds;
- ``CurvePoint`` and ``Trial``: one fit towards the target at one batch size and LR (``trials/bs<B>-lr<LR>.json``);
- ``NoisePoint`` and ``NoiseScale``: the gradient noise scale along the reference run (``gns.json``);
- ``BatchSizeResult`` and ``StudyResult``: the fits and the recommendation (``summary.json``, or ``quick.json``).

A field marked ``json_if`` is written only where the result has it (a full study's fits, the DDP ranks' own
noise estimate), so that the files hold the keys they always held. ``from_json`` reads a measurement back from
its file: a study keeps each measurement as stored (non-finite numbers as null), so that a resumed study computes
from the same values as the first run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

Status = Literal["reached", "budget", "pruned", "stalled", "diverged"]


def _only_if(predicate: Any) -> Any:
    return field(default=None, metadata={"json_if": predicate})


@dataclass
class StepTiming:
    """One throughput run: the time per optimizer step of a short fit at one batch size."""

    batch_size: int
    step_s: float  # a low quantile of the timed steps: other work on the machine only ever adds time
    median_step_s: float
    steps_timed: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepTiming:
        return cls(**data)


@dataclass
class Throughput:
    """A batch size's time per step: its fastest round (``rounds_s``, in the order run)."""

    batch_size: int
    step_s: float
    samples_per_s: float
    rounds_s: list[float]


@dataclass
class CurvePoint:
    """The monitored metric at one validation of a fit (``value`` null where it was not finite)."""

    step: int
    samples: int
    seconds: float
    value: Optional[float]


@dataclass
class Trial:
    """One fit towards the target at one batch size and LR, and how it ended."""

    batch_size: int
    lr: float
    lr_factor: float
    status: Status
    steps: Optional[int]  # to the target, where it was reached
    samples: Optional[int]
    seconds_to_target: Optional[float]
    steps_run: int
    max_steps: int
    wall_s: float
    best_value: Optional[float]
    final_value: Optional[float]
    curve: list[CurvePoint]

    @property
    def reached(self) -> bool:
        return self.status == "reached"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trial:
        return cls(**{**data, "curve": [CurvePoint(**p) for p in data["curve"]]})


@dataclass
class NoisePoint:
    """The noise estimates at one point of the reference run, averaged over the point's batches; under DDP with
    per-example gradients, the ranks' own estimate beside them (``ranks_*``)."""

    step: int
    samples_seen: int
    value: Optional[float]
    g2: Optional[float]
    trace: Optional[float]
    b_simple: Optional[float]
    ranks_g2: Optional[float] = _only_if(lambda p: p.ranks_g2 is not None)
    ranks_trace: Optional[float] = _only_if(lambda p: p.ranks_g2 is not None)
    ranks_b_simple: Optional[float] = _only_if(lambda p: p.ranks_g2 is not None)
    b_simple_ema: Optional[float] = None


@dataclass
class NoiseScale:
    """The gradient noise scale B_simple along a reference run, and how it was measured."""

    b_simple: Optional[float]  # null where it is infinite: the mean gradient lost in the noise
    method: str  # per_example, two_batch or (under DDP) ranks
    reference_batch_size: int
    reference_lr: float
    estimate_batch_size: int
    batches_per_point: int
    averaged_steps: list[int]
    reference_diverged_at: Optional[int]
    points: list[NoisePoint]
    # Under DDP: one rank's share of the estimate's batch, and the estimate from the ranks' gradient norms alone.
    rank_batch_size: Optional[int] = _only_if(lambda n: n.rank_batch_size is not None)
    b_simple_ranks: Optional[float] = _only_if(lambda n: n.rank_batch_size is not None)

    @property
    def has_rank_estimate(self) -> bool:
        """Whether the ranks' estimate stands beside the study's (DDP with per-example gradients)."""
        return self.rank_batch_size is not None and self.method != "ranks"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NoiseScale:
        return cls(**{**data, "points": [NoisePoint(**p) for p in data["points"]]})


def _swept(entry: BatchSizeResult) -> bool:
    return entry.steps is not None or entry.never_reached is not None


@dataclass
class BatchSizeResult:
    """One batch size: its speed and, in a full study, its best trial's steps and time to the target."""

    batch_size: int
    step_s: float
    samples_per_s: float
    steps: Optional[int] = _only_if(_swept)
    samples: Optional[int] = _only_if(_swept)
    lr: Optional[float] = _only_if(_swept)
    time_to_target_s: Optional[float] = _only_if(_swept)
    trial_wall_s: Optional[float] = _only_if(lambda e: e.reached)
    # Where the best LR still sat at an edge of those tried (up or down): a better one may lie beyond it, and the
    # steps (so B_crit and the answer) would then be too high at this B.
    lr_at_edge: Optional[Literal["up", "down"]] = _only_if(lambda e: e.reached)
    never_reached: Optional[list[Status]] = _only_if(lambda e: e.never_reached is not None)
    regret: Optional[float] = _only_if(_swept)  # time to target over the best's

    @property
    def reached(self) -> bool:
        return self.steps is not None


def _full(result: StudyResult) -> bool:
    return not result.quick


def _reached(result: StudyResult) -> bool:
    return result.time_to_target_s is not None


_NOT_IN_SUMMARY = {"json_if": lambda result: False}


@dataclass
class StudyResult:
    """A whole study: the recommendation, the fits behind it and the measurements (``summary.json`` holds all
    but ``trials`` and ``noise_scale``, which have their own files)."""

    quick: bool
    target: Optional[float]
    monitor: str
    mode: str
    grid: list[int]
    train_samples: int
    device: str
    world_size: int
    memory_max_batch_size: Optional[int]
    memory_bound: bool
    alpha_s: float  # t(B) = alpha + beta B
    beta_s: float
    b_simple: Optional[float]
    b_simple_method: str
    b_simple_ranks: Optional[float]
    b_simple_steps: list[int]
    reference_diverged_at: Optional[int]
    quick_b_star: float  # sqrt(B_simple alpha / beta)
    quick_recommended_batch_size: Optional[int]
    lr_rule: str
    base_lr: float
    base_batch_size: int
    folder: Path
    batch_sizes: list[BatchSizeResult]
    recommended_batch_size: Optional[int]
    recommended_lr: Optional[float]
    recommended_by: str
    trials: list[Trial] = field(metadata=_NOT_IN_SUMMARY)  # in the order run: by batch size, then by LR tried
    noise_scale: NoiseScale = field(metadata=_NOT_IN_SUMMARY)
    s_min: Optional[float] = _only_if(_full)  # S(B) = S_min (1 + B_crit / B)
    e_min: Optional[float] = _only_if(_full)
    b_crit: Optional[float] = _only_if(_full)
    model_b_star: Optional[float] = _only_if(_full)  # sqrt(B_crit alpha / beta)
    time_to_target_s: Optional[float] = _only_if(_reached)
    within_10_percent: list[int] = field(default_factory=list, metadata={"json_if": _full})
    lr_at_edge: list[int] = field(default_factory=list, metadata={"json_if": _full})
    regret: Optional[dict[int, Optional[float]]] = _only_if(_reached)
    quick_regret: Optional[float] = _only_if(_full)
