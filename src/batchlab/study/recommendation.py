"""From a study's measurements to its answer: t(B) = alpha + beta B fitted to the throughput, S(B) = S_min
(1 + B_crit / B) to the steps to target, and the recommended batch size, the one with the least measured time to
target T(B) = S(B) t(B) (or, in a quick study, sqrt(B_simple alpha / beta) from the noise scale and the
throughput alone). The fits themselves are ``batchlab.scaling``'s.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from batchlab import scaling
from batchlab.study.results import BatchSizeResult, NoiseScale, StudyResult, Throughput, Trial
from batchlab.study.sweep import best_trial, extend_direction

if TYPE_CHECKING:
    from batchlab.study.runner import Study


def summarise(study: Study, grid: list[int], n_train: int, memory_max: Optional[int],
              throughput: list[Throughput], noise: NoiseScale, sweeps: dict[int, list[Trial]]) -> StudyResult:
    """Fit and recommend: everything ``summary.json`` holds, and the measurements behind it."""
    s = study.settings
    fit_t = scaling.fit_throughput([t.batch_size for t in throughput], [t.step_s for t in throughput])
    # A null noise scale is an infinite one: the mean gradient was lost in the noise (scaling.b_simple).
    b_star_quick = scaling.optimal_batch_size(math.inf if noise.b_simple is None else noise.b_simple, fit_t)
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
        trials=[t for b in grid for t in sweeps.get(b, [])], noise_scale=noise,
    )
    if not s.quick:
        _recommend_from_sweeps(result, throughput, sweeps, fit_t)
    return result


def _recommend_from_sweeps(result: StudyResult, throughput: list[Throughput], sweeps: dict[int, list[Trial]],
                           fit_t: scaling.ThroughputFit) -> None:
    """A full study's answer: each batch size's best trial, the S(B) fit and the least time to target."""
    step_s = {t.batch_size: t.step_s for t in throughput}
    per_b = {}
    for b in result.grid:
        best = best_trial(sweeps[b])
        entry = BatchSizeResult(batch_size=b, step_s=step_s[b], samples_per_s=b / step_s[b])
        if best:
            entry.steps, entry.samples, entry.lr = best.steps, best.samples, best.lr
            entry.time_to_target_s, entry.trial_wall_s = best.steps * step_s[b], best.wall_s
            # Still at an edge once --lr_extend ran out: a better LR may lie beyond it.
            entry.lr_at_edge = extend_direction(sweeps[b])
        else:
            entry.never_reached = sorted({t.status for t in sweeps[b]})
        per_b[b] = entry
    result.batch_sizes = list(per_b.values())
    reached = [e for e in result.batch_sizes if e.time_to_target_s is not None]
    fit_s = scaling.fit_steps([e.batch_size for e in reached], [e.steps for e in reached])
    if fit_s:
        result.s_min, result.e_min, result.b_crit = fit_s.s_min, fit_s.e_min, fit_s.b_crit
        result.model_b_star = scaling.optimal_batch_size(fit_s.b_crit, fit_t)
    if not reached:
        result.recommended_batch_size = result.recommended_lr = None
        result.recommended_by = "nothing reached the target: raise --max_steps, widen --lr_factors or loosen --target"
        return
    best = min(reached, key=lambda e: e.time_to_target_s)
    t_best = best.time_to_target_s
    for e in result.batch_sizes:
        e.regret = e.time_to_target_s / t_best if e.time_to_target_s is not None else None
    quick_entry = per_b.get(result.quick_recommended_batch_size) if result.quick_recommended_batch_size else None
    result.recommended_batch_size, result.recommended_lr = best.batch_size, best.lr
    result.recommended_by = "least measured time to target, S(B) x t(B)"
    result.time_to_target_s = t_best
    result.within_10_percent = [e.batch_size for e in result.batch_sizes if e.regret is not None and e.regret <= 1.1]
    result.lr_at_edge = [e.batch_size for e in result.batch_sizes if e.lr_at_edge]
    result.regret = {e.batch_size: e.regret for e in result.batch_sizes}
    result.quick_regret = quick_entry.regret if quick_entry else None
