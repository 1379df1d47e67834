"""The options of a batch-size study, declared once: ``StudySettings``.

``batchlab study``'s flags and ``configs/study.yaml``'s keys are these fields: ``BatchlabTrainer.study`` forwards
its keyword arguments to this class, and jsonargparse builds the flags, their help (from ``Args:`` below), their
defaults and their type checks from it. ``batchlab.run_study`` takes the same names as keyword arguments. The types
say what each value may be (``check_arguments`` applies them to values given from Python); what no type can say is
checked in ``__post_init__``. The seed is not a setting: every fit of a study starts from the run's seed
(``--seed_everything``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

from batchlab.errors import FiniteFloat, NonNegativeInt, PositiveFloat, PositiveInt, check, check_arguments

# Settings that say where and how to run, not what is measured: a rerun may change them.
NOT_IN_FINGERPRINT = ("quick", "out", "fresh")
# Settings added after folder format 2, fingerprinted only where they differ from their defaults, so that a folder
# made before them (which measured as their defaults do) keeps matching.
ADDED_SINCE_FORMAT_2 = ("throughput_seconds",)


@dataclass
class StudySettings:
    """What a study measures, and where it keeps what it measured.

    Args:
        target: Value of ``monitor`` to reach (required unless ``quick``); keep it above the noise floor.
        monitor: Validation metric the model logs.
        mode: ``min`` (reach at or below the target) or ``max``.
        grid: Batch sizes to measure, global under DDP (B / devices per device); default: powers of two from 1
            (from the number of devices under DDP) to the training set size (and, on one GPU, the largest
            that fits in memory). 2 and 32 are always added where the data allows.
        max_batch_size: Cap on the default grid.
        lr_rule: How the LR grid is centred at each B from ``base_lr`` at ``base_batch_size``: ``none``
            (the same LR), ``linear`` (LR x B / base) or ``sqrt``. A fixed LR: ``none`` with
            ``lr_factors [1]`` and ``lr_extend 0``.
        base_lr: LR the rule starts from; default: the model's ``lr`` (or ``learning_rate``).
        base_batch_size: Batch size of ``base_lr``; default: the configured batch size (times the devices).
        lr_factors: LRs tried first at each B, as multiples of its start: the rule's centre at the first B, then
            the best LR of the nearest B already searched, moved by the rule (the ridge).
        lr_extend: Cap on the extra LRs tried beyond an edge, each way, while the best LR sits at that edge (it is
            then not bracketed, and reported so).
        seeds: Seeds of each deciding trial (the best LR at every B that may enter the band): the study's own and
            ``seeds - 1`` more (each with its own initial weights and data order), whose spread the band allows for.
        stop_regret: A trial stops once its time exceeds this multiple of the best time to target so far: it
            cannot enter the band. The band's edge must stay below it.
        max_steps: Step budget of one trial.
        check_every: Validate every this many optimizer steps; steps to target are multiples of it.
        patience: Validations without improvement after which a trial is abandoned as stalled (0: never).
        warmup_steps: Steps excluded from the timing of each throughput run.
        throughput_steps: Steps timed per batch size in each round.
        throughput_rounds: Passes over the grid; each B keeps its fastest (robust to a busy machine).
        throughput_seconds: Where steps are long, fewer of them: a throughput run's warm-up ends once it has taken
            this many seconds, and its timing once its timed steps (at least 3) add up to this many.
        gns_batch_size: Batch size of the gradient-noise estimates (large is better); default min(1024, data).
        gns_points: Points of the reference run at which the noise scale is measured (at least 2).
        gns_steps: Length of the reference run (it stops earlier at the target).
        gns_batches: Batches averaged at each point.
        quick: Skip the steps-to-target sweep: recommend sqrt(B_simple alpha / beta) in seconds.
        out: The study's folder; rerunning with the same configuration resumes it.
        fresh: Start a new study in a new folder beside ``out`` instead of resuming.
    """

    target: Optional[FiniteFloat] = None
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    grid: Optional[list[PositiveInt]] = None
    max_batch_size: Optional[PositiveInt] = None
    lr_rule: Literal["none", "linear", "sqrt"] = "sqrt"
    base_lr: Optional[PositiveFloat] = None
    base_batch_size: Optional[PositiveInt] = None
    lr_factors: list[PositiveFloat] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    lr_extend: NonNegativeInt = 3
    seeds: PositiveInt = 3
    stop_regret: PositiveFloat = 2.0
    max_steps: PositiveInt = 2000
    check_every: PositiveInt = 5
    patience: NonNegativeInt = 50
    warmup_steps: PositiveInt = 5
    throughput_steps: PositiveInt = 10
    throughput_rounds: PositiveInt = 3
    throughput_seconds: PositiveFloat = 0.5
    gns_batch_size: Optional[PositiveInt] = None
    gns_points: PositiveInt = 8
    gns_steps: PositiveInt = 200
    gns_batches: PositiveInt = 4
    quick: bool = False
    out: str = "studies/study"
    fresh: bool = False

    def __post_init__(self) -> None:
        check_arguments(type(self), {f.name: getattr(self, f.name) for f in fields(self)})
        if not self.quick:
            check(self.target is not None, "--target is required for a full study: the value of --monitor to "
                                           "reach (or use --quick, which needs none)")
        check(self.grid is None or len(self.grid) > 0, "grid=[] is not allowed: give at least one batch size")
        check(len(self.lr_factors) > 0,
              f"lr_factors={list(self.lr_factors)} is not allowed: use positive numbers, e.g. [0.5, 1, 2]")
        check(self.stop_regret > 1.1, f"stop_regret={self.stop_regret} is not allowed: use a number above 1.1 (the "
                                      "band reaches 10% above the best time)")
        check(self.gns_points >= 2, f"gns_points={self.gns_points} is not allowed: use an integer >= 2")

    def fingerprint(self, seed: int) -> dict[str, Any]:
        """What the study measures, as its folder's ``study.json`` records it: the settings less where and how to
        run, and the seed every fit starts from."""
        defaults = {f.name: f.default for f in fields(self)}
        return {**{k: v for k, v in asdict(self).items() if k not in NOT_IN_FINGERPRINT
                   and not (k in ADDED_SINCE_FORMAT_2 and v == defaults[k])}, "seed": seed}
