"""The study's search and its answer on crafted worlds, without training: each trial's steps to target come from a
known S(B, lr, seed), so bracketing, the ridge, the consistency re-search, the seeds' spread and the band can be
checked against what is true."""

import math
from types import SimpleNamespace

import pytest

from batchlab.study import band, search
from batchlab.study.results import Trial
from batchlab.study.settings import StudySettings


def _trial(b, factor, seed, status, steps, max_steps):
    return Trial(batch_size=b, lr=1e-3 * factor, lr_factor=factor, seed=seed, status=status, steps=steps,
                 samples=steps * b if steps else None, seconds_to_target=None, steps_run=steps or max_steps,
                 max_steps=max_steps, wall_s=0.0, best_value=None, final_value=None, curve=[])


class World:
    """A known S(B, lr, seed): steps to target at each B's best factor ``optimum(B)`` are ``floor(B)``, growing by
    ``width`` per factor of 2 away from it, diverging beyond 4x the best; each seed multiplies by its own luck."""

    def __init__(self, optimum, floor=lambda b: 100 * (1 + 8 / b), width=0.3, luck=None, special=None):
        self.optimum, self.floor, self.width = optimum, floor, width
        self.luck = luck or {}
        self.special = special or {}  # (B, factor) -> steps: a crafted point
        self.calls = []

    def steps(self, b, factor, seed):
        if (b, factor) in self.special:
            return self.special[(b, factor)] * self.luck.get(seed, 1.0)
        off = math.log2(factor / self.optimum(b))
        if off > 2:
            return None  # diverged
        return self.floor(b) * math.exp(self.width * off**2) * self.luck.get(seed, 1.0)

    def run_trial(self, study, b, factor, seed, max_steps, stopped_as):
        self.calls.append((b, factor, seed))
        steps = self.steps(b, factor, seed)
        if steps is None:
            return _trial(b, factor, seed, "diverged", None, max_steps)
        steps = 5 * math.ceil(steps / 5)  # validated every 5 steps
        if steps > max_steps:
            return _trial(b, factor, seed, stopped_as, None, max_steps)
        return _trial(b, factor, seed, "reached", steps, max_steps)


def _searcher(monkeypatch, world, grid, seeds=(0,), **settings):
    monkeypatch.setattr(search, "run_trial", world.run_trial)
    s = StudySettings(target=1.0, seeds=len(seeds), **settings)
    study = SimpleNamespace(settings=s, seed=seeds[0], seeds=list(seeds), add_to_total=lambda n: None)
    return search.Searcher(study, grid, {b: 1e-3 for b in grid})  # the same time per step at every B


def test_a_best_lr_far_above_the_rule_is_found_and_bracketed(monkeypatch):
    world = World(optimum=lambda b: 8.0)
    searcher = _searcher(monkeypatch, world, [16], lr_factors=[0.5, 1.0, 2.0], lr_extend=3)
    searcher.search(16, [1.0, 0.5, 2.0])
    here = searcher.searches[16]
    assert here.best.lr_factor == 8.0 and here.open_side() is None and here.unbracketed_reason(3) is None
    assert sorted(t.lr_factor for t in here.trials) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], "one LR past the best"


def test_a_search_that_hits_the_cap_says_so(monkeypatch):
    world = World(optimum=lambda b: 64.0, width=0.1)
    searcher = _searcher(monkeypatch, world, [16], lr_factors=[0.5, 1.0, 2.0], lr_extend=2)
    searcher.search(16, [1.0, 0.5, 2.0])
    here = searcher.searches[16]
    assert here.best.lr_factor == 8.0 and here.open_side() == "up" and here.extended == {"up": 2, "down": 0}
    assert here.unbracketed_reason(2).startswith("cap: --lr_extend 2")


def test_each_batch_size_starts_from_its_neighbours_best_lr(monkeypatch):
    # The best factor is 8 everywhere: after the first B, the ridge starts there and needs no extension.
    world = World(optimum=lambda b: 8.0)
    searcher = _searcher(monkeypatch, world, [16, 32, 64], lr_factors=[0.5, 1.0, 2.0], lr_extend=3)
    for b in (32, 16, 64):  # outwards from 32, as search_all goes from the quick answer's B
        searcher.search(b, [searcher.ridge(b) * f for f in searcher.factors])
    assert [t.lr_factor for t in searcher.searches[16].trials] == [8.0, 4.0, 16.0]
    assert [t.lr_factor for t in searcher.searches[64].trials] == [8.0, 4.0, 16.0]
    assert all(x.open_side() is None for x in searcher.searches.values())


def test_a_batch_size_slower_than_a_smaller_one_is_re_searched_around_its_neighbours_best(monkeypatch):
    # At 256 a local optimum near factor 8 brackets (4 and 16 worse), but the neighbours' best, 1, is far better.
    special = {(256, 4.0): 400, (256, 8.0): 300, (256, 16.0): 400, (256, 2.0): 450}
    world = World(optimum=lambda b: 1.0, special=special)
    # (A --stop_regret that lets 256's slow trials finish: below it they would stop as "slow", unmeasured.)
    searcher = _searcher(monkeypatch, world, [64, 128, 256], lr_factors=[0.5, 1.0, 2.0], lr_extend=3,
                         stop_regret=10.0)
    for b in (64, 128):
        searcher.search(b, [1.0, 0.5, 2.0])
    searcher.search(256, [8.0, 4.0, 16.0])
    assert searcher.searches[256].best.lr_factor == 8.0 and searcher.violations() == [256]
    searcher.make_consistent()
    here = searcher.searches[256]
    assert here.re_searched and not here.inconsistent
    assert here.best.lr_factor == 1.0 and here.best.steps == 5 * math.ceil(100 * (1 + 8 / 256) / 5)
    assert not searcher.violations() and not searcher.searches[64].re_searched


def test_a_violation_the_re_search_cannot_remove_is_flagged(monkeypatch):
    # 256 takes 300 steps at every LR near the neighbours' best: S(B) really grows there, or the search cannot tell.
    special = {(256, f): 300 for f in (0.25, 0.5, 1.0, 2.0, 4.0)}
    special[(256, 0.125)] = special[(256, 8.0)] = 600
    world = World(optimum=lambda b: 1.0, special=special)
    # (A --stop_regret that lets 256's slow trials finish: below it they would stop as "slow", unmeasured.)
    searcher = _searcher(monkeypatch, world, [64, 128, 256], lr_factors=[0.5, 1.0, 2.0], lr_extend=3,
                         stop_regret=10.0)
    for b in (64, 128, 256):
        searcher.search(b, [1.0, 0.5, 2.0])
    searcher.make_consistent()
    assert searcher.searches[256].re_searched and searcher.searches[256].inconsistent
    assert not searcher.searches[128].inconsistent


def test_deciding_trials_run_from_every_seed_and_the_spread_removes_each_seeds_luck(monkeypatch):
    # Seed 1000 takes 2x the steps at every B, seed 2000 half: a paired comparison sees no spread at all.
    world = World(optimum=lambda b: 1.0, floor=lambda b: 400 * (1 + 8 / b), luck={1000: 2.0, 2000: 0.5})
    searcher = _searcher(monkeypatch, world, [8, 64], seeds=(0, 1000, 2000), lr_factors=[0.5, 1.0, 2.0],
                         lr_extend=3, stop_regret=3.0, max_steps=100000)
    for b in (8, 64):
        searcher.search(b, [1.0, 0.5, 2.0])
    searcher.repeat_deciding()
    for b in (8, 64):
        runs = searcher.searches[b].runs()
        assert sorted(t.seed for t in runs) == [0, 1000, 2000] and {t.lr_factor for t in runs} == {1.0}
    estimates, spread = searcher.estimates()
    assert spread == pytest.approx(0.0, abs=0.02), "rounding to 5 steps is all that remains"
    for b, e in estimates.items():
        assert e.steps == pytest.approx(400 * (1 + 8 / b), rel=0.02)


def test_a_slow_batch_size_is_stopped_for_time_and_tried_at_one_lr_when_it_cannot_win(monkeypatch):
    world = World(optimum=lambda b: 1.0, floor=lambda b: 100.0)
    searcher = _searcher(monkeypatch, world, [8, 64], lr_factors=[0.5, 1.0, 2.0], lr_extend=3, stop_regret=2.0)
    searcher.step_s = {8: 1e-3, 64: 1e-2}  # 64 is 10x slower per step: it needs 20 steps to be within 2x
    searcher.search(8, [1.0, 0.5, 2.0])
    searcher.search(64, [1.0, 0.5, 2.0])
    here = searcher.searches[64]
    assert len(here.trials) == 1 and here.trials[0].status == "slow" and here.trials[0].max_steps == 20


# The band: a paired two-way model of log(steps) and a band that widens with the spread.

def _runs(b, steps_by_seed):
    return [_trial(b, 1.0, seed, "reached", steps, 10**6) for seed, steps in steps_by_seed.items()]


def test_the_spread_is_the_residual_of_batch_size_and_seed_effects():
    seeds = [0, 1, 2]
    # log steps = B effect + seed effect + a known residual (+e, -e, 0 at B=8; its opposite at B=64).
    e = 0.1
    mu = {8: math.log(400), 64: math.log(100)}
    luck = {0: 0.0, 1: math.log(1.5), 2: math.log(0.7)}
    resid = {8: {0: e, 1: -e, 2: 0.0}, 64: {0: -e, 1: e, 2: 0.0}}
    runs = {b: _runs(b, {k: math.exp(mu[b] + luck[k] + resid[b][k]) for k in seeds}) for b in mu}
    for ts in runs.values():  # steps are integers in a Trial; keep the exact values for this check
        for t in ts:
            t.steps = math.exp(mu[t.batch_size] + luck[t.seed] + resid[t.batch_size][t.seed])
    estimates, spread = band.estimates(runs, seeds)
    # Two-way residual: sum of squares 4 e^2 over (2 - 1)(3 - 1) = 2 degrees of freedom.
    assert spread == pytest.approx(math.sqrt(4 * e**2 / 2))
    for b in mu:
        assert estimates[b].log_steps == pytest.approx(mu[b] + sum(luck.values()) / 3)


def test_steps_are_made_non_increasing_by_pooling_neighbours():
    pooled = band.non_increasing({1: math.log(100), 2: math.log(80), 4: math.log(90), 8: math.log(70)},
                                 {1: 1, 2: 1, 4: 3, 8: 1})
    assert pooled[1] == (math.log(100), 1)
    assert pooled[2][0] == pooled[4][0] == pytest.approx((math.log(80) + 3 * math.log(90)) / 4)
    assert pooled[2][1] == pooled[4][1] == 4 and pooled[8] == (math.log(70), 1)


@pytest.mark.parametrize(
    ("se", "expected"),
    [
        (0.0, [32, 64]),  # no spread: only what is within 10% (128 is 1.15x)
        (0.05, [32, 64, 128]),  # 1.15x is within 10% plus one standard error of the difference (0.071)
        (0.5, [8, 16, 32, 64, 128]),  # 256 has no estimate (never reached): the band ends there
    ],
)
def test_the_band_widens_with_the_spread_and_stays_contiguous(se, expected):
    grid = [8, 16, 32, 64, 128, 256]
    regret = {8: 2.0, 16: 1.5, 32: 1.0, 64: 1.05, 128: 1.15}
    log_t = {b: math.log(r) for b, r in regret.items()}
    assert band.band(grid, log_t, {b: se for b in log_t}, 32) == expected
    # A B out of the band ends it on its side, even where one beyond is within the noise again.
    log_t[16] = math.log(3.0)
    assert band.band(grid, log_t, {b: se for b in log_t}, 32) == [b for b in expected if b >= 32]


def test_step_times_are_made_non_decreasing_in_b_keeping_what_was_measured():
    from batchlab.study.results import Throughput
    from batchlab.study.throughput import monotone

    measured = {8: 1.0e-3, 64: 1.2e-3, 512: 2.0e-3, 1024: 1.5e-3, 4096: 4.0e-3}  # 512 spoilt by other work
    out = monotone([Throughput(b, t, b / t, [t]) for b, t in measured.items()])
    steps = [t.step_s for t in out]
    assert steps == sorted(steps) and steps[0] == 1.0e-3 and steps[-1] == 4.0e-3
    assert steps[2] == steps[3] == 1.5e-3, "bounded by the larger B measured faster, not pooled with it"
    assert all(t.samples_per_s == pytest.approx(t.batch_size / t.step_s) for t in out)
    assert [t.rounds_s for t in out] == [[t] for t in measured.values()]
    # One slow stretch over several B does not lift the smaller B it did not touch, nor the larger B measured fast.
    slow = {8: 1.0e-3, 64: 2.1e-3, 128: 2.1e-3, 256: 2.4e-3, 512: 1.6e-3, 1024: 1.8e-3}
    out = monotone([Throughput(b, t, b / t, [t]) for b, t in slow.items()])
    assert [t.step_s for t in out] == [1.0e-3, 1.6e-3, 1.6e-3, 1.6e-3, 1.6e-3, 1.8e-3]


def test_a_batch_size_beyond_the_bands_reach_is_not_repeated_once_the_seeds_show_their_spread(monkeypatch):
    # 8 and 64 take the same time; 512 takes 1.8x at the study's seed. The seeds agree (no spread), so the band
    # reaches 1.1x: 512's repeats, the study's costliest in samples, could not change the answer.
    world = World(optimum=lambda b: 1.0, floor=lambda b: {8: 400, 64: 400, 512: 720}[b])
    searcher = _searcher(monkeypatch, world, [8, 64, 512], seeds=(0, 1000, 2000), lr_factors=[0.5, 1.0, 2.0],
                         lr_extend=3, stop_regret=3.0)
    for b in (8, 64, 512):
        searcher.search(b, [1.0, 0.5, 2.0])
    searcher.repeat_deciding()
    assert searcher.reach() == pytest.approx(1.1, abs=0.02)
    assert {t.seed for t in searcher.searches[8].repeats} == {t.seed for t in searcher.searches[64].repeats} == {
        1000, 2000}
    assert not searcher.searches[512].repeats
    assert searcher.estimates()[0][512].n == 1, "its estimate rests on the study's seed alone"


@pytest.mark.parametrize("band_, expected", [
    ([32], 32),
    ([32, 64], 64),  # equally near the middle: the faster
    ([32, 64, 128], 64),
    ([128, 256, 512, 1024, 2048, 4096], 1024),  # sqrt(128 x 4096) = 724: 512 and 1024 equally near
    ([64, 128, 256, 512, 1024, 2048], 512),
    ([32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], 512),
])
def test_the_recommendation_is_the_bands_geometric_middle_not_its_fastest_point(band_, expected):
    log_t = {b: -0.01 * i for i, b in enumerate(band_)}  # each larger B a little faster: the fastest is the top
    assert band.middle(band_, log_t) == expected


def test_the_middle_prefers_the_faster_of_two_equally_near_batch_sizes():
    assert band.middle([128, 256], {128: 0.0, 256: -0.1}) == 256
    assert band.middle([128, 256], {128: -0.1, 256: 0.0}) == 128
