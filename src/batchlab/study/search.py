"""Steps to target at every batch size: the LR search, the seeds of the deciding trials and the consistency step.

``search_all(study, grid, step_s, start)`` runs, in order:

1. **The LR search at each B**, from ``start`` (the quick answer's B) outwards, so that a good time to target is
   known early. Each B starts from the ridge: the best LR of the nearest B already searched, moved by the scaling
   rule (``--lr_rule``; in the rule's own factor that is the same factor), the first B from the rule's centre.
   The ``--lr_factors`` around that start run first; then, while the best LR has no worse LR run on one side
   (it is not *bracketed*), one more beyond that edge, up to ``--lr_extend`` each way (the cap; a B that hits it is
   reported as unbracketed, with the reason).
2. **Seeds.** The best LR of every B that may enter the band (time to target within ``Searcher.reach`` of the
   best: ``--stop_regret``, narrowed to the band's edge once the seeds show their spread) runs again from
   ``--seeds - 1`` other seeds: their spread is the study's uncertainty (``batchlab.study.band``).
3. **Consistency.** With a tuned LR, steps to target do not grow with B (Shallue et al. 2019). A B whose steps
   exceed a smaller B's by more than twice the standard error of the difference gets LRs around its neighbours'
   best ones; a violation that remains is flagged (``inconsistent``).

Compute goes where the answer is decided: a trial stops at the steps of the best LR so far at its B (it can no
longer win there: ``pruned``), and once its time passes ``--stop_regret`` x the best time to target so far (it
cannot enter the band: ``slow``). So LRs that lost at a neighbouring B are tried again only as far as they could
still win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

from batchlab.study import band
from batchlab.study.results import Status, Trial
from batchlab.study.sweep import best_trial, is_worse, run_trial

if TYPE_CHECKING:
    from batchlab.study.runner import Study

Side = Literal["up", "down"]
ROBUST_REGRET = 1.25  # a best LR this close to the best time so far has its neighbours run from every seed


@dataclass
class BatchSizeSearch:
    """Everything tried at one batch size."""

    batch_size: int
    trials: list[Trial] = field(default_factory=list)  # the study's seed, in the order run
    repeats: list[Trial] = field(default_factory=list)  # the best LR from the other seeds
    extended: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    re_searched: bool = False
    inconsistent: bool = False
    # The LR the answer uses, where the seeds overruled the study's seed (``Searcher.repeat_deciding``).
    chosen_lr: Optional[float] = None

    @property
    def best(self) -> Optional[Trial]:
        return best_trial(self.trials)

    @property
    def chosen(self) -> Optional[Trial]:
        """The study seed's trial at the LR the answer uses: its best, unless other seeds failed there."""
        return next((t for t in self.trials if t.lr == self.chosen_lr), None) or self.best

    def runs(self, lr: Optional[float] = None) -> list[Trial]:
        """The runs at ``lr`` (default: the chosen LR), the study's seed first."""
        first = self.chosen if lr is None else next((t for t in self.trials if t.lr == lr), None)
        return [first, *(t for t in self.repeats if t.lr == first.lr)] if first else []

    def failed(self, lr: Optional[float] = None) -> int:
        """How many of the runs at ``lr`` failed: diverged, stalled, ran their whole ``--max_steps`` or passed their
        seed's time cut (not those pruned because another LR had already won)."""
        return sum(t.status in ("diverged", "stalled", "budget", "slow") for t in self.runs(lr))

    def open_side(self) -> Optional[Side]:
        """The side of the best LR on which no worse LR ran (None: bracketed); without a best, where to look:
        down if even the lowest LR was unstable, up if every LR just ran out of steps or time."""
        best = self.best
        if best is None:
            by_factor = sorted(self.trials, key=lambda t: t.lr_factor)
            if by_factor[0].status in ("diverged", "stalled"):
                return "down"
            ran_out: tuple[Status, ...] = ("budget", "pruned", "slow")
            return "up" if all(t.status in ran_out for t in by_factor) else None
        above = [t for t in self.trials if t.lr_factor > best.lr_factor]
        below = [t for t in self.trials if t.lr_factor < best.lr_factor]
        if not any(is_worse(t, best) for t in above):
            return "up"
        if not any(is_worse(t, best) for t in below):
            return "down"
        return None

    def unbracketed_reason(self, cap: int) -> Optional[str]:
        side = self.open_side() if self.best else None
        if side is None:
            return None
        if any(t.status == "slow" for t in self.trials):
            return f"slow: LRs {side} of the best were stopped for time, so cannot enter the band"
        return f"cap: --lr_extend {cap} more LRs tried {side}ward, the best still at that edge"

    def edge(self) -> Optional[Side]:
        """The edge of the LRs tried that the chosen LR (the one the answer uses) sits at, if any."""
        best = self.chosen
        if best is None or len(self.trials) < 2:
            return None
        factors = [t.lr_factor for t in self.trials]
        return "up" if best.lr_factor == max(factors) else "down" if best.lr_factor == min(factors) else None


class Searcher:
    """The study's searches, in the order they ran; ``search_all`` runs them."""

    def __init__(self, study: Study, grid: list[int], step_s: dict[int, float]) -> None:
        self.study, self.grid, self.step_s = study, sorted(grid), step_s
        s = study.settings
        self.factors = sorted(set(s.lr_factors), key=lambda f: (abs(math.log(f)), f))
        ordered = sorted(set(s.lr_factors))
        self.ratio = min((b / a for a, b in zip(ordered, ordered[1:])), default=2.0)
        self.searches: dict[int, BatchSizeSearch] = {}
        self.order: list[Trial] = []  # every trial, as run

    def best_time(self) -> Optional[float]:
        """The best time to target so far, at the study's seed."""
        times = [x.best.steps * self.step_s[b] for b, x in self.searches.items() if x.best]
        return min(times, default=None)

    def _trial(self, b: int, factor: float, seed: Optional[int] = None, budget: Optional[int] = None,
               stopped_as: Status = "budget") -> Trial:
        """One trial at ``b``: from the study's seed with the search's budget (pruned at this B's best so far, and
        cut for time), or from another ``seed`` at ``budget`` (or the whole ``--max_steps``), stopped there as
        ``stopped_as``."""
        s, here = self.study.settings, self.searches[b]
        if budget is None or budget >= s.max_steps:
            stopped_as = "budget"
        budget = min(budget or s.max_steps, s.max_steps)
        best = here.best
        if seed is None and best is not None and best.steps < budget:
            budget, stopped_as = best.steps, "pruned"
        t_best = self.best_time()
        if seed is None and t_best is not None:
            cut = int(s.stop_regret * t_best / self.step_s[b] / s.check_every) * s.check_every
            if cut < budget:
                budget, stopped_as = max(cut, s.check_every), "slow"
        trial = run_trial(self.study, b, factor, self.study.seed if seed is None else seed, budget, stopped_as)
        (here.trials if seed is None else here.repeats).append(trial)
        self.order.append(trial)
        return trial

    def _tried(self, b: int, factor: float) -> bool:
        return any(math.isclose(t.lr_factor, factor, rel_tol=1e-9) for t in self.searches[b].trials)

    def ridge(self, b: int) -> float:
        """The start factor at ``b``: the best factor of the nearest B searched (the rule moves the LR with B, so
        the same factor is the neighbour's best LR moved by the rule), or the rule's centre (1)."""
        done = [x for x in self.searches.values() if x.best and x.batch_size != b]
        if not done:
            return 1.0
        nearest = min(done, key=lambda x: (abs(math.log(x.batch_size / b)), x.batch_size))
        return nearest.best.lr_factor

    def search(self, b: int, candidates: list[float], count_all: bool = False) -> None:
        """Try ``candidates`` (those not tried yet) at ``b``, then extend beyond the open edge up to the cap."""
        s, here = self.study.settings, self.searches.setdefault(b, BatchSizeSearch(b))
        queue = [f for f in candidates if not self._tried(b, f)]
        if self._long_shot(b):
            queue = queue[:1]
        if count_all:
            self.study.add_to_total(len(queue))
        while queue:
            self._trial(b, queue.pop(0))
            if queue:
                continue
            if all(t.status == "slow" for t in here.trials):
                break  # no LR tried reached the target in the time that could enter the band: none is sought
            side = here.open_side()
            if side is not None and here.extended[side] < s.lr_extend:
                here.extended[side] += 1
                factors = [t.lr_factor for t in here.trials]
                queue.append(max(factors) * self.ratio if side == "up" else min(factors) / self.ratio)
                self.study.add_to_total(1)

    def _long_shot(self, b: int) -> bool:
        """Whether B could enter the band only in fewer steps than any B has taken so far (its time per step is
        too long for more): one LR is tried there, not the whole set, since steps to target shrink with B only
        towards a floor (S_min) that the plateau already shows."""
        t_best, s = self.best_time(), self.study.settings
        fewest = min((x.best.steps for x in self.searches.values() if x.best), default=None)
        return t_best is not None and fewest is not None and s.stop_regret * t_best / self.step_s[b] < fewest

    def repeat_deciding(self) -> None:
        """Run every deciding best LR from the other seeds (those not run yet), and let the seeds choose the LR.

        One seed's initial weights can favour an LR that others do not: a lucky start reaches the target at a
        tenth of the LR the rest need, or an LR at the edge of stability wins by one validation interval and then
        stalls from other starts. So where the best could be the answer (time to target within ``ROBUST_REGRET``
        of the best so far), or some seed failed at it, its neighbours at the study's seed (the nearest LR on each
        side that did not diverge) run from the other seeds too, each stopped at twice that seed's steps at the
        best LR, and the answer uses the LR that fails least, then has the fewest steps (geometric mean)."""
        t_best = self.best_time()
        # The fastest first, so that each seed soon knows its own best time, at which its later runs are cut.
        for b, here in sorted(self.searches.items(), key=lambda x: self._time(x[1])):
            best = here.best
            if best is None or best.steps * self.step_s[b] > self.reach() * t_best:
                continue
            here.chosen_lr = None
            self._repeat(here, best)
            if best.steps * self.step_s[b] > ROBUST_REGRET * t_best and not here.failed(best.lr):
                continue
            candidates = [best]
            for side in (-1, 1):
                beside = [t for t in here.trials if (t.lr - best.lr) * side > 0 and t.status != "diverged"]
                if beside:
                    near = min(beside, key=lambda t: abs(t.lr - best.lr))
                    self._repeat(here, near, against=best)
                    candidates.append(near)
            here.chosen_lr = min(candidates, key=lambda t: (here.failed(t.lr), _mean_log_steps(here.runs(t.lr)),
                                                            abs(math.log(t.lr / best.lr)))).lr

    def reach(self) -> float:
        """How far above the best time to target a B may be at the study's seed and still enter the band: at
        most ``--stop_regret``, and once the seeds have measured a spread, the band's edge (10% plus one standard
        error of a difference of means over the seeds) plus two spreads for that one seed's own noise. Beyond it
        a B cannot enter the band, and its repeats would spend samples (at large B, most of the study's) on a
        question already answered."""
        cap = self.study.settings.stop_regret
        _, spread = self.estimates()
        if spread is None or len(self.study.seeds) < 2:
            return cap
        n = len(self.study.seeds)
        return min(cap, (1 + band.TOLERANCE) * math.exp(spread * (band.Z * math.sqrt(2 / n) + 2)))

    def _time(self, here: BatchSizeSearch) -> float:
        return here.best.steps * self.step_s[here.batch_size] if here.best else math.inf

    def _repeat(self, here: BatchSizeSearch, trial: Trial, against: Optional[Trial] = None) -> None:
        """``trial``'s LR from the other seeds, each stopped once its time passes ``--stop_regret`` x that seed's
        best time so far (a seed's luck is shared by every B) and, with ``against``, at twice that seed's steps
        at ``against``'s LR."""
        s = self.study.settings
        for seed in self.study.seeds[1:]:
            if any(t.lr == trial.lr and t.seed == seed for t in here.repeats):
                continue
            # Past that seed's time cut this B cannot enter that seed's band ("slow", a failure here); past twice
            # the rival's steps the LR cannot win ("pruned").
            budget, stopped_as = s.max_steps, "budget"
            own = [t.steps * self.step_s[t.batch_size] for x in self.searches.values() for t in x.repeats
                   if t.seed == seed and t.reached]
            if own:
                cut = max(s.check_every, int(s.stop_regret * min(own) / self.step_s[here.batch_size]
                                             / s.check_every) * s.check_every)
                budget, stopped_as = (cut, "slow") if cut < budget else (budget, stopped_as)
            if against is not None:
                rival = next((t for t in here.repeats if t.lr == against.lr and t.seed == seed and t.reached), None)
                if rival and 2 * rival.steps < budget:
                    budget, stopped_as = 2 * rival.steps, "pruned"
            self.study.add_to_total(1)
            self._trial(here.batch_size, trial.lr_factor, seed, budget, stopped_as)

    def estimates(self) -> tuple[dict[int, band.Estimate], Optional[float]]:
        """Every B's steps to target over its seeds, and the spread (``batchlab.study.band.estimates``)."""
        return band.estimates({b: x.runs() for b, x in self.searches.items() if x.best}, self.study.seeds)

    def violations(self) -> list[int]:
        """The B whose steps exceed a smaller B's beyond the noise (twice the standard error of the difference,
        plus one validation interval, the resolution of steps to target)."""
        est, spread = self.estimates()
        out = []
        for b, e in sorted(est.items()):
            for smaller in (x for x in est.values() if x.batch_size < b):
                tolerance = (2 * math.hypot(band.standard_error(e, spread), band.standard_error(smaller, spread))
                             + math.log1p(self.study.settings.check_every / smaller.steps))
                if e.log_steps - smaller.log_steps > tolerance:
                    out.append(b)
                    break
        return out

    def make_consistent(self) -> None:
        """Re-search each violating B once around its neighbours' best LRs; flag what remains."""
        while True:
            todo = [b for b in self.violations() if not self.searches[b].re_searched]
            if not todo:
                break
            for b in todo:
                here = self.searches[b]
                here.re_searched = True
                neighbours = [self.searches[n] for n in self._adjacent(b) if self.searches[n].best]
                candidates = []
                for n in neighbours:
                    f = n.best.lr_factor
                    candidates += [f, f / self.ratio, f * self.ratio]
                self.search(b, candidates, count_all=True)
            self.repeat_deciding()
        for b in self.violations():
            self.searches[b].inconsistent = True

    def _adjacent(self, b: int) -> list[int]:
        i = self.grid.index(b)
        return [self.grid[j] for j in (i - 1, i + 1) if 0 <= j < len(self.grid) and self.grid[j] in self.searches]


def _mean_log_steps(runs: list[Trial]) -> float:
    """The mean log(steps) of runs, one stopped early counted at its budget (a lower bound)."""
    return sum(math.log(t.steps if t.reached else max(t.max_steps, 1)) for t in runs) / len(runs)


def search_all(study: Study, grid: list[int], step_s: dict[int, float], start: int) -> Searcher:
    """Search every B of ``grid`` outwards from ``start``, repeat the deciding trials, make the answer consistent."""
    searcher = Searcher(study, grid, step_s)
    for b in sorted(grid, key=lambda b: (abs(math.log(b / start)), b)):
        ridge = searcher.ridge(b)
        searcher.search(b, [ridge * f for f in searcher.factors])
    searcher.repeat_deciding()
    searcher.make_consistent()
    return searcher
