"""From a study's measurements to its answer: t(B) = alpha + beta B fitted to the throughput; per batch size the
steps to target over seeds and the time to target T(B) = S(B) t(B); the band (``batchlab.study.band``); the
recommendation, the band's middle (``band.middle``: on a plateau of B that are all as fast within the noise, the
fastest is a coin toss between its ends, and the middle is the point another seed's band most likely holds too); S(B) = S_min (1 + B_crit / B) fitted in log space to the
steps, weighted by their standard errors; and the study's cost. A quick study recommends sqrt(B_simple alpha /
beta) from the noise scale and the throughput alone. The fits themselves are ``batchlab.scaling``'s.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from batchlab import scaling
from batchlab.study import band
from batchlab.study.results import BatchSizeResult, NoiseScale, ScalingFitResult, StudyCost, StudyResult, Throughput
from batchlab.study.search import Searcher

if TYPE_CHECKING:
    from batchlab.study.runner import Study


def summarise(study: Study, grid: list[int], n_train: int, memory_max: Optional[int],
              throughput: list[Throughput], noise: NoiseScale, searcher: Optional[Searcher]) -> StudyResult:
    """Fit and recommend: everything ``summary.json`` holds, and the measurements behind it."""
    s = study.settings
    fit_t = scaling.fit_throughput([t.batch_size for t in throughput], [t.step_s for t in throughput])
    b_star_quick = quick_b_star(noise, fit_t)
    quick_b = scaling.nearest_in_grid(b_star_quick, grid) if not math.isnan(b_star_quick) else None
    result = StudyResult(
        quick=s.quick, target=s.target, monitor=s.monitor, mode=s.mode, grid=grid, train_samples=n_train,
        device=study.device, world_size=study.fitter.ranks.world_size, memory_max_batch_size=memory_max,
        memory_bound=memory_max is not None, alpha_s=fit_t.alpha, beta_s=fit_t.beta,
        b_simple=noise.b_simple, b_simple_method=noise.method, b_simple_ranks=noise.b_simple_ranks,
        b_simple_steps=noise.averaged_steps, reference_diverged_at=noise.reference_diverged_at,
        quick_b_star=b_star_quick, quick_recommended_batch_size=quick_b,
        lr_rule=s.lr_rule, base_lr=study.base_lr, base_batch_size=study.base_batch_size, folder=study.folder.root,
        batch_sizes=[BatchSizeResult(t.batch_size, t.step_s, t.samples_per_s) for t in throughput],
        recommended_batch_size=quick_b, recommended_lr=study.centre_lr(quick_b) if quick_b else None,
        recommended_by="quick: sqrt(B_simple * alpha / beta), nearest grid batch size; LR from the scaling rule, "
                       "not tuned",
        trials=searcher.order if searcher else [], noise_scale=noise, b_simple_method_reason=noise.method_reason,
        b_simple_preconditioner=noise.preconditioner,
    )
    if searcher is not None:
        result.seeds = list(study.seeds)
        _recommend_from_searches(result, throughput, searcher, fit_t)
    result.cost = _cost(study, result, noise)
    return result


def quick_b_star(noise: NoiseScale, fit_t: scaling.ThroughputFit) -> float:
    # A null noise scale is an infinite one: the mean gradient was lost in the noise (scaling.b_simple).
    return scaling.optimal_batch_size(math.inf if noise.b_simple is None else noise.b_simple, fit_t)


def _recommend_from_searches(result: StudyResult, throughput: list[Throughput], searcher: Searcher,
                             fit_t: scaling.ThroughputFit) -> None:
    """A full study's answer: each batch size's estimate over seeds, the band, the S(B) fit, the recommendation."""
    step_s = {t.batch_size: t.step_s for t in throughput}
    cap = searcher.study.settings.lr_extend
    estimates, spread = searcher.estimates()
    result.spread = spread
    per_b = {}
    for b in result.grid:
        here = searcher.searches[b]
        entry = BatchSizeResult(batch_size=b, step_s=step_s[b], samples_per_s=b / step_s[b],
                                lr_trials=len(here.trials), re_searched=here.re_searched,
                                inconsistent=here.inconsistent)
        best, e = here.chosen, estimates.get(b)
        if best and e:
            entry.steps, entry.samples, entry.lr = e.steps, e.steps * b, best.lr
            entry.seeds_failed = here.failed()
            entry.time_to_target_s, entry.trial_wall_s = e.steps * step_s[b], best.wall_s
            entry.steps_by_seed, entry.spread = e.steps_by_seed, e.sd
            entry.unbracketed_reason = here.unbracketed_reason(cap)
            entry.bracketed = entry.unbracketed_reason is None
            entry.lr_at_edge = here.edge()
        else:
            entry.never_reached = sorted({t.status for t in here.trials})
        per_b[b] = entry
    result.batch_sizes = list(per_b.values())
    # A B where some seed failed at the chosen LR has no steps to target to speak of: its estimate counts failures
    # at their budget, a lower bound, and is shown but decides nothing.
    reached = [e for e in result.batch_sizes if e.time_to_target_s is not None and not e.seeds_failed]
    best_value = [t.best_value for t in result.trials if t.best_value is not None]
    if best_value:
        result.best_value_reached = min(best_value) if result.mode == "min" else max(best_value)
        result.target_note = _target_note(result)
    if not reached:
        result.recommended_batch_size = result.recommended_lr = None
        result.recommended_by = ("nothing reached the target: raise --max_steps, widen --lr_factors or loosen "
                                 "--target")
        return
    # The answer's steps: made non-increasing in B, each pool of batch sizes as sure as its runs together.
    consistent = band.non_increasing({e.batch_size: math.log(e.steps) for e in reached},
                                     {e.batch_size: estimates[e.batch_size].n for e in reached})
    for e in reached:
        e.measured_steps = e.steps
        e.steps = math.exp(consistent[e.batch_size][0])
        e.samples, e.time_to_target_s = e.steps * e.batch_size, e.steps * e.step_s
    log_t = {e.batch_size: math.log(e.time_to_target_s) for e in reached}
    se = {b: (spread or 0.0) / math.sqrt(consistent[b][1]) for b in log_t}
    best = min(reached, key=lambda e: (log_t[e.batch_size], e.batch_size))
    b0 = best.batch_size
    for e in reached:
        e.regret, e.regret_low, e.regret_high = band.regret_interval(log_t[e.batch_size], se[e.batch_size],
                                                                     log_t[b0], se[b0])
        e.measured_regret = e.measured_steps * e.step_s / best.time_to_target_s
    result.within_10_percent = band.band(result.grid, log_t, se, b0)
    chosen = per_b[band.middle(result.within_10_percent, log_t)]
    result.recommended_batch_size, result.recommended_lr = chosen.batch_size, chosen.lr
    result.recommended_by = (
        f"the middle of the band (B={band.span(result.within_10_percent)}), whose every B reaches the target within 10% "
        f"of the least estimated time to target (B={b0}) within the noise: the point least likely to leave the band "
        f"when measured again; time S(B) x t(B), steps the geometric mean over {len(result.seeds)} seed(s), made "
        "non-increasing in B")
    result.time_to_target_s = chosen.time_to_target_s
    result.lr_at_edge = [e.batch_size for e in reached if e.lr_at_edge]
    result.unbracketed = [e.batch_size for e in reached if not e.bracketed]
    result.re_searched = [e.batch_size for e in result.batch_sizes if e.re_searched]
    result.inconsistent = [e.batch_size for e in result.batch_sizes if e.inconsistent]
    result.regret = {e.batch_size: e.regret for e in result.batch_sizes}
    quick = per_b.get(result.quick_recommended_batch_size) if result.quick_recommended_batch_size else None
    result.quick_regret = quick.regret if quick else None
    # Weighted by the standard errors where the seeds measured a spread; with one seed, equally.
    errors = [max(band.standard_error(estimates[e.batch_size], spread), 1e-3) for e in reached] if spread else None
    fit = scaling.fit_steps_log([e.batch_size for e in reached], [e.measured_steps for e in reached], errors)
    if fit is not None:
        result.fit = _describe(fit, [e.batch_size for e in reached])
        result.s_min, result.e_min, result.b_crit = fit.s_min, fit.e_min, fit.b_crit
        result.model_b_star = scaling.optimal_batch_size(fit.b_crit, fit_t)
        for e in reached:
            e.fitted_steps = fit.steps(e.batch_size)
            e.fitted_regret = e.fitted_steps * e.step_s / result.time_to_target_s


def _describe(fit: scaling.LogScalingFit, measured: list[int]) -> ScalingFitResult:
    """Whether the fitted S(B) describes the points, and so whether its B_crit is a finding."""
    # Within the noise: chi^2 per degree of freedom near 1 (4 leaves room for a spread measured from few seeds);
    # with no spread measured, the points within 20% of the fit.
    describes = fit.chi2_per_dof <= 4.0 if fit.chi2_per_dof is not None else fit.rms <= math.log(1.2)
    worst = max(fit.residuals, key=lambda r: abs(r)) if fit.residuals else 0.0
    if not describes:
        quality = f"chi2/dof {fit.chi2_per_dof:.3g}" if fit.chi2_per_dof is not None else f"rms {fit.rms:.3g}"
        note = (f"the model does not describe the points ({quality}, worst point {math.exp(worst):.3g}x the "
                "fit): B_crit is not a finding")
    elif not min(measured) <= fit.b_crit <= max(measured):
        note = (f"B_crit lies outside the batch sizes that reached the target ({min(measured)} to {max(measured)}): "
                "the points do not pin it down")
    else:
        note = "the model describes the points within their noise"
    return ScalingFitResult(fit.s_min, fit.e_min, fit.b_crit, fit.rms, fit.chi2_per_dof, describes, note)


def _target_note(result: StudyResult) -> str:
    best, target = result.best_value_reached, result.target
    below = "below" if result.mode == "min" else "above"
    if best is None or target is None:
        return ""
    return (f"the best {result.monitor} any trial reached was {best:.4g} (target {target:.4g}); a target closer "
            f"to the best the data allows makes steps to target noisier, one {below} it unreachable")


def _cost(study: Study, result: StudyResult, noise: NoiseScale) -> StudyCost:
    """What the study's measurements spent (as recorded with each of them), and each as a multiple of one run to
    target at the recommendation."""
    spent = study.folder.spent.values()
    # The noise estimates differentiate gns_batches batches of estimate_batch_size at every point, outside a fit.
    estimates = len(noise.points) * noise.batches_per_point * noise.estimate_batch_size
    cost = StudyCost(samples=sum(x.samples for x in spent) + estimates, steps=sum(x.steps for x in spent),
                     wall_s=sum(x.wall_s for x in spent), trials=len(result.trials),
                     fits=sum(x.fits for x in spent))
    rec = next((e for e in result.batch_sizes if e.batch_size == result.recommended_batch_size and e.steps), None)
    if rec is not None and not result.quick:
        cost.samples_x = cost.samples / (rec.steps * rec.batch_size)
        cost.steps_x = cost.steps / rec.steps
        cost.wall_x = cost.wall_s / rec.time_to_target_s
    return cost

