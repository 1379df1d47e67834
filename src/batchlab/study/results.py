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

# reached the target; ran its whole step budget; stopped at the steps of a better LR at the same B (pruned); stopped
# once its time passed --stop_regret x the best time to target so far, so it cannot enter the band (slow); stopped
# without improvement for --patience validations (stalled); lost to non-finite values (diverged).
Status = Literal["reached", "budget", "pruned", "slow", "stalled", "diverged"]

# The layout of a study's folder; a folder of another format is refused (``batchlab.study.folder``).
FORMAT = 2


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
    """One fit towards the target at one batch size and LR, from one seed, and how it ended."""

    batch_size: int
    lr: float
    lr_factor: float  # the LR over the scaling rule's centre at this B
    seed: int
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
    # Whether the gradients were divided by Adam's sqrt(v_hat) + eps here (not at step 0, where it has no state).
    preconditioned: bool = field(default=False, metadata={"json_if": lambda p: p.preconditioned})


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
    # adam: the gradients Adam steps by, divided by sqrt(v_hat) + eps from the reference run's optimizer; none:
    # the raw gradients (any other optimizer). A folder made before this was measured raw.
    preconditioner: Literal["adam", "none"] = "none"
    # Why per-example gradients were not used, where they were tried and failed (torch.func cannot vmap the
    # model, or only through its slow fallback).
    method_reason: Optional[str] = _only_if(lambda n: n.method_reason is not None)
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
    """One batch size: its speed and, in a full study, its best LR's steps and time to the target, over seeds."""

    batch_size: int
    step_s: float
    samples_per_s: float
    # Steps to target at the best LR, as the answer uses them: the geometric mean over the seeds that ran it
    # (``steps_by_seed``, in seed order; null where a seed did not reach the target within its budget), each
    # seed's own luck taken out (``measured_steps``), then made non-increasing in B (``batchlab.study.band``).
    steps: Optional[float] = _only_if(_swept)
    measured_steps: Optional[float] = _only_if(_swept)
    samples: Optional[float] = _only_if(_swept)
    lr: Optional[float] = _only_if(_swept)
    time_to_target_s: Optional[float] = _only_if(_swept)
    trial_wall_s: Optional[float] = _only_if(lambda e: e.reached)
    steps_by_seed: Optional[list[Optional[int]]] = _only_if(_swept)
    # The standard deviation of log(steps) over this B's seeds (null with one seed); the band uses the pooled one.
    spread: Optional[float] = _only_if(_swept)
    lr_trials: Optional[int] = _only_if(_swept)  # LRs tried at this B (seed of the study)
    # Seeds that did not reach the target at the chosen LR: such a B is left out of the band and the fit.
    seeds_failed: Optional[int] = _only_if(_swept)
    # Whether a worse LR ran on each side of the best (or that side diverged); where not, why (the cap was hit,
    # or the search was cut for time) and which edge the best LR sat at.
    bracketed: Optional[bool] = _only_if(lambda e: e.reached)
    unbracketed_reason: Optional[str] = _only_if(lambda e: e.reached)
    lr_at_edge: Optional[Literal["up", "down"]] = _only_if(lambda e: e.reached)
    # The consistency step: more LRs were tried here because its steps exceeded a smaller B's beyond the noise
    # (re_searched), and whether that is still so (inconsistent).
    re_searched: Optional[bool] = _only_if(_swept)
    inconsistent: Optional[bool] = _only_if(_swept)
    never_reached: Optional[list[Status]] = _only_if(lambda e: e.never_reached is not None)
    regret: Optional[float] = _only_if(_swept)  # time to target over the best's
    measured_regret: Optional[float] = _only_if(_swept)  # the same from measured_steps
    # The regret one standard error either way, from the spread (the band uses these).
    regret_low: Optional[float] = _only_if(_swept)
    regret_high: Optional[float] = _only_if(_swept)
    fitted_steps: Optional[float] = _only_if(_swept)  # the fitted S(B)
    fitted_regret: Optional[float] = _only_if(_swept)  # S_fit(B) t(B) over the best's measured time to target

    @property
    def reached(self) -> bool:
        return self.steps is not None


@dataclass
class StudyCost:
    """What a study spent: every fit's optimizer steps and training samples, the noise estimates' samples, and the
    seconds of its measurements (summed over the runs that made them, so a resumed study counts them once), each
    also as a multiple of one run to target at the recommendation."""

    samples: int
    steps: int
    wall_s: float
    trials: int  # fits towards the target (all LRs, all seeds)
    fits: int  # every fit: throughput runs, the reference run and the trials
    samples_x: Optional[float] = None
    steps_x: Optional[float] = None
    wall_x: Optional[float] = None


@dataclass
class ScalingFitResult:
    """S(B) = S_min (1 + B_crit / B) fitted in log space, weighted by the measured spread, and how well it does."""

    s_min: float
    e_min: float
    b_crit: float
    rms_log_residual: float  # root mean square of log(measured / fitted steps)
    chi2_per_dof: Optional[float]  # residuals in units of their standard error; null with no degree of freedom
    describes: bool  # whether the model describes the points within their noise
    note: str  # what to make of B_crit


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
    trials: list[Trial] = field(metadata=_NOT_IN_SUMMARY)  # in the order run
    noise_scale: NoiseScale = field(metadata=_NOT_IN_SUMMARY)
    cost: Optional[StudyCost] = None
    b_simple_method_reason: Optional[str] = _only_if(lambda r: r.b_simple_method_reason is not None)
    b_simple_preconditioner: Literal["adam", "none"] = "none"  # as ``NoiseScale.preconditioner``
    seeds: list[int] = field(default_factory=list, metadata={"json_if": _full})
    # The pooled standard deviation of log(steps to target) between seeds at one B and LR.
    spread: Optional[float] = _only_if(_full)
    fit: Optional[ScalingFitResult] = _only_if(_full)
    s_min: Optional[float] = _only_if(_full)  # S(B) = S_min (1 + B_crit / B), as ``fit`` holds them
    e_min: Optional[float] = _only_if(_full)
    b_crit: Optional[float] = _only_if(_full)
    model_b_star: Optional[float] = _only_if(_full)  # sqrt(B_crit alpha / beta)
    time_to_target_s: Optional[float] = _only_if(_reached)
    # The band: the contiguous B around the best whose time to target is within 10% of the best's, within one
    # standard error of the spread.
    within_10_percent: list[int] = field(default_factory=list, metadata={"json_if": _full})
    lr_at_edge: list[int] = field(default_factory=list, metadata={"json_if": _full})
    unbracketed: list[int] = field(default_factory=list, metadata={"json_if": _full})
    re_searched: list[int] = field(default_factory=list, metadata={"json_if": _full})
    inconsistent: list[int] = field(default_factory=list, metadata={"json_if": _full})
    regret: Optional[dict[int, Optional[float]]] = _only_if(_reached)
    quick_regret: Optional[float] = _only_if(_full)
    # How the target relates to what the trials reached: the best value any trial reached, and its initial value.
    best_value_reached: Optional[float] = _only_if(_full)
    target_note: Optional[str] = _only_if(_full)
