"""How sure a study is of its answer: the spread of steps to target between seeds, and the band it allows.

Steps to target are noisy: at one batch size and LR, other initial weights and another data order can take twice
or half the steps. The study repeats each deciding trial (the best LR at every batch size that may enter the
band) with ``--seeds`` seeds; ``estimates`` summarises each batch size's runs in log space (steps are positive
and their spread is relative), seed by seed (a seed's luck is shared by every B), with one spread for all batch
sizes (a few seeds per B give too rough a spread each), and ``band`` is the contiguous range of batch sizes
around the best whose time to target is within 10% of the best's, within one standard error of that spread.

A run that did not reach the target counts at its budget: a lower bound, so a B whose seeds fail looks better than
it is only as far as its budget allows, and the study reports it (``steps_by_seed`` holds null there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from batchlab.study.results import Trial

TOLERANCE = 0.10  # the band: within 10% of the best time to target
Z = 1.0  # within one standard error


@dataclass
class Estimate:
    """Steps to target at one batch size and its best LR over its seeds, in log space, each seed's own effect
    taken out (``estimates``)."""

    batch_size: int
    steps_by_seed: list[Optional[int]]
    log_steps: float  # the mean over its seeds of log(steps) less each seed's effect
    n: int
    sd: Optional[float]  # the standard deviation of those seed-adjusted log(steps); None with one run

    @property
    def steps(self) -> float:
        """The geometric mean of the steps (for a B run from every seed, exactly that)."""
        return math.exp(self.log_steps)


def _log_steps(t: Trial) -> float:
    return math.log(t.steps if t.reached else max(t.steps_run, t.max_steps, 1))


def estimates(runs: dict[int, list[Trial]], seeds: list[int]) -> tuple[dict[int, Estimate], Optional[float]]:
    """Each batch size's estimate from its runs at the best LR, and the spread: the standard deviation of
    log(steps) between seeds at one B.

    The seeds' runs are paired: a seed's initial weights are the same at every B, and their luck moves all its
    batch sizes together (one slow seed took 1.5-3x the others' steps at every B of the default study). So the
    batch sizes run from every seed give each seed's effect (its mean log(steps) over them, less the grand mean),
    which is taken out of every run; the spread is what remains, the residual of that two-way (B x seed) additive
    model, pooled over the batch sizes. That is the noise in a comparison of batch sizes, far below the seeds'
    raw spread. With fewer than two such batch sizes, seed effects are not taken out, and the spread is the raw
    one, pooled; with one seed there is none.
    """
    logs = {b: {t.seed: _log_steps(t) for t in ts} for b, ts in runs.items() if ts}
    full = [b for b, y in logs.items() if all(k in y for k in seeds)]
    effect = {k: 0.0 for k in seeds}
    spread: Optional[float] = None
    if len(seeds) > 1 and len(full) > 1:
        grand = sum(logs[b][k] for b in full for k in seeds) / (len(full) * len(seeds))
        effect = {k: sum(logs[b][k] for b in full) / len(full) - grand for k in seeds}
        means = {b: sum(logs[b].values()) / len(seeds) for b in full}
        residual = sum((logs[b][k] - means[b] - effect[k]) ** 2 for b in full for k in seeds)
        spread = math.sqrt(residual / ((len(full) - 1) * (len(seeds) - 1)))
    out = {}
    for b, y in logs.items():
        adjusted = [v - effect.get(k, 0.0) for k, v in y.items()]
        mean = sum(adjusted) / len(adjusted)
        sd = math.sqrt(sum((x - mean) ** 2 for x in adjusted) / (len(adjusted) - 1)) if len(adjusted) > 1 else None
        out[b] = Estimate(b, [t.steps if t.reached else None for t in runs[b]], mean, len(adjusted), sd)
    if spread is None:
        dof = sum(e.n - 1 for e in out.values() if e.sd is not None)
        if dof:
            spread = math.sqrt(sum((e.n - 1) * e.sd**2 for e in out.values() if e.sd is not None) / dof)
    return out, spread


def non_increasing(log_steps: dict[int, float], weights: dict[int, float]) -> dict[int, tuple[float, float]]:
    """The closest non-increasing sequence in B to ``log_steps`` in weighted least squares (pooled adjacent
    violators): with a tuned LR steps to target do not grow with B (Shallue et al. 2019), so a B whose measured
    steps exceed a smaller B's after the consistency step is noise, and is pooled with its neighbours. Returns
    each B's value and the weight of its pool (the runs behind it)."""
    blocks: list[tuple[list[int], float, float]] = []  # (batch sizes, weighted mean, weight)
    for b in sorted(log_steps):
        blocks.append(([b], log_steps[b], weights[b]))
        while len(blocks) > 1 and blocks[-2][1] < blocks[-1][1]:
            (bs1, m1, w1), (bs2, m2, w2) = blocks.pop(-2), blocks.pop()
            blocks.append((bs1 + bs2, (m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2))
    return {b: (m, w) for bs, m, w in blocks for b in bs}


def standard_error(e: Estimate, spread: Optional[float]) -> float:
    """The standard error of a batch size's mean log(steps); 0 where no spread was measured (``--seeds 1``)."""
    return (spread or 0.0) / math.sqrt(e.n)


def regret_interval(log_t: float, se: float, log_t_best: float, se_best: float) -> tuple[float, float, float]:
    """A batch size's regret T(B) / T(best) and its range one standard error (of the difference) either way."""
    diff, err = log_t - log_t_best, math.hypot(se, se_best)
    return math.exp(diff), math.exp(diff - err), math.exp(diff + err)


def in_band(log_t: float, se: float, log_t_best: float, se_best: float) -> bool:
    """Whether a time to target is within 10% of the best's, within one standard error of their difference."""
    return log_t - log_t_best <= math.log1p(TOLERANCE) + Z * math.hypot(se, se_best)


def band(grid: list[int], log_t: dict[int, float], se: dict[int, float], best: int) -> list[int]:
    """The contiguous batch sizes of ``grid`` around ``best`` that are ``in_band``; a batch size without an estimate
    (it never reached the target, or was stopped as too slow) ends the band on its side."""
    ordered = sorted(grid)
    i = ordered.index(best)
    inside = [best]
    for step in (-1, 1):
        j = i + step
        while 0 <= j < len(ordered):
            b = ordered[j]
            if b not in log_t or not in_band(log_t[b], se[b], log_t[best], se[best]):
                break
            inside.append(b)
            j += step
    return sorted(inside)


def span(band_: list[int]) -> str:
    """The band as a range of the grid: 64..256, or 256 alone."""
    return f"{band_[0]}..{band_[-1]}" if len(band_) > 1 else str(band_[0])


def middle(band_: list[int], log_t: dict[int, float]) -> int:
    """The band's geometric middle: of its batch sizes, the one nearest sqrt(smallest x largest) in log B, the
    faster of two equally near. Every B of the band is as fast as the best within the noise, so which is fastest
    changes from seed to seed and run to run (the default study's plateau spans 32..4096 at 1.0-1.2x); its middle
    is the point farthest from both edges, so the one another measurement's band most likely holds too."""
    centre = (math.log(band_[0]) + math.log(band_[-1])) / 2
    return min(band_, key=lambda b: (round(abs(math.log(b) - centre), 9), log_t[b], b))
