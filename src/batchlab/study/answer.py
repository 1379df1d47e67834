"""A batch-size study's answer in words: what ``batchlab study`` prints and what ``report.md`` opens with.

- ``answer(result)``: the recommendation with its band, and what the study cost, first, because they are what a
  user came for;
- ``notes(result)``: what to make of them: how the target relates to what the trials reached, the S(B) fit and
  whether it describes the points, and the flags (unbracketed, re-searched, inconsistent, seeds failed);
- ``details(result)``: the measurements behind: the noise scale, the step time, the device;
- ``rows(result)``: one row per batch size, the cells that the printed table and the report's share.

Numbers are in ``fmt``'s 4 significant digits; counts with thousands separators.
"""

from __future__ import annotations

import math
from typing import Optional

from batchlab.study.band import span
from batchlab.study.plots import decides, fmt
from batchlab.study.results import BatchSizeResult, StudyResult


def count(n: float) -> str:
    """A large count, short: 556k, 19.2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def times(x: Optional[float]) -> str:
    """A multiple to 2 significant digits, with thousands separators: 6,700x, 41x, 1.3x."""
    if x is None or not math.isfinite(x):
        return "-"
    if x < 10:
        return f"{x:.2g}x"
    return f"{float(f'{x:.2g}'):,.0f}x"


def band_text(band: list[int]) -> str:
    """The band as a range of the grid: [64..256], or [256] alone."""
    return f"[{span(band)}]"


def answer(result: StudyResult) -> list[str]:
    """The recommendation and its band, then the cost."""
    s = result
    if s.recommended_batch_size is None:
        lines = [f"No recommendation: {s.recommended_by}."]
    elif s.quick:
        lines = [f"Recommended batch size: {s.recommended_batch_size} at lr {fmt(s.recommended_lr)} "
                 f"({s.recommended_by})."]
    else:
        seeds = len(s.seeds)
        allowing = (f"allowing for a spread of {s.spread:.2g} in log steps over {seeds} seeds" if s.spread
                    else "one seed, so no spread between seeds allowed for")
        lines = [f"Recommended batch size: {s.recommended_batch_size} at lr {fmt(s.recommended_lr)}; band "
                 f"{band_text(s.within_10_percent)} (within 10% of the best time to target, {allowing})."]
    cost = s.cost
    if cost is not None:
        spent = f"Cost: {count(cost.samples)} samples, {cost.steps:,} steps"
        if s.quick:
            # A quick study's seconds vary run to run; its samples and steps say what it is (no trials).
            lines.append(f"{spent} in {cost.fits} short fits (no steps-to-target trials).")
        else:
            multiples = (f": {times(cost.samples_x)} / {times(cost.steps_x)} / {times(cost.wall_x)} one run to "
                         "target at the recommendation (samples / steps / time)" if cost.samples_x else "")
            lines.append(f"{spent}, {cost.wall_s:.3g} s in {cost.trials} trials ({cost.fits} fits){multiples}.")
    return lines


def notes(result: StudyResult) -> list[str]:
    """The target, the fit and the flags: what the answer rests on."""
    s = result
    if s.quick:
        return []
    lines = []
    if s.target_note:
        lines.append(f"Target {s.monitor} {'<=' if s.mode == 'min' else '>='} {fmt(s.target)}: {s.target_note}.")
    lines += _fit(s)
    lines += _flags(s)
    return lines


def _fit(s: StudyResult) -> list[str]:
    fit = s.fit
    if fit is None:
        return ["S(B) = S_min (1 + B_crit / B) was not fitted: too few batch sizes reached the target."]
    quality = f"chi2/dof {fit.chi2_per_dof:.2g}" if fit.chi2_per_dof is not None else f"rms {fit.rms_log_residual:.2g}"
    if not fit.describes:  # its B_crit is no finding: say so, and quote none of its parameters
        return [f"S(B) = S_min (1 + B_crit / B), fitted in log space: {fit.note}."]
    fitted = [e.batch_size for e in s.batch_sizes if decides(e)]
    inside = bool(fitted) and min(fitted) <= fit.b_crit <= max(fitted)
    line = (f"Fitted S(B) = S_min (1 + B_crit / B): S_min = {fmt(fit.s_min)} steps, B_crit = {fmt(fit.b_crit)}, "
            f"E_min = {fmt(fit.e_min)} samples ({quality}): {fit.note}")
    if inside:
        line += f"; the model's sqrt(B_crit alpha / beta) = {fmt(s.model_b_star)}"
    return [line + "."]


def _flags(s: StudyResult) -> list[str]:
    per_b = {e.batch_size: e for e in s.batch_sizes}
    lines = []
    if s.lr_at_edge:
        # Bracketed at the study's seed, the seeds' choice can still be the neighbour at the edge: the search
        # extends from the study's seed alone.
        lines.append(f"The learning rate the answer uses sat at an edge of the range tried for B = {s.lr_at_edge} "
                     "(marked ^ or v in the table; where that B is bracketed, the other seeds chose the study "
                     "seed's best's neighbour at the edge): a better one may lie beyond it; widen --lr_factors "
                     "(e.g. [0.25, 0.5, 1, 2, 4]).")
    for b in s.unbracketed:
        lines.append(f"Unbracketed at B = {b}: {per_b[b].unbracketed_reason}.")
    if s.re_searched:
        lines.append(f"Re-searched B = {s.re_searched}: their steps exceeded a smaller B's beyond the noise, so more "
                     "LRs were tried there.")
    if s.inconsistent:
        lines.append(f"Inconsistent B = {s.inconsistent}: still more steps than a smaller B after the re-search; the "
                     "answer pools them with their neighbours (steps made non-increasing in B).")
    failed = [e for e in s.batch_sizes if e.seeds_failed]
    if failed:
        which = ", ".join(f"B = {e.batch_size} ({e.seeds_failed} of {len(e.steps_by_seed or [])})" for e in failed)
        lines.append(f"Seeds failed at the chosen LR: {which}: counted at their budget, and left out of the band "
                     "and the fit.")
    never: dict[str, list[int]] = {}
    for e in s.batch_sizes:
        if e.never_reached:
            never.setdefault(", ".join(ENDED.get(x, x) for x in e.never_reached), []).append(e.batch_size)
    if never:
        which = "; ".join(f"B = {', '.join(map(str, bs))} ({why})" for why, bs in never.items())
        lines.append(f"Never reached the target: {which}.")
    return lines


# How the trials of a batch size that never reached the target ended (``results.Status``).
ENDED = {"slow": "stopped once too slow to enter the band", "budget": "ran out of --max_steps",
         "pruned": "stopped at a better LR's steps", "stalled": "stalled", "diverged": "diverged"}


def gradients(method: str, preconditioner: str) -> str:
    """Which gradients the noise scale was measured on, in words."""
    if preconditioner == "adam":
        return f"{method} gradients, preconditioned by Adam's second moment"
    return f"raw {method} gradients"


def details(result: StudyResult) -> list[str]:
    """How the answer was chosen, and the measurements behind it."""
    s = result
    lines = [] if s.quick or s.recommended_batch_size is None else [f"Chosen by {s.recommended_by}."]
    lines.append(f"Gradient noise scale B_simple = {fmt(s.b_simple)} "
                 f"({gradients(s.b_simple_method, s.b_simple_preconditioner)}); "
                 f"step time t(B) = {fmt(s.alpha_s * 1e3)} ms + {fmt(s.beta_s * 1e6)} us x B; "
                 f"quick answer sqrt(B_simple alpha / beta) = {fmt(s.quick_b_star)} -> "
                 f"{s.quick_recommended_batch_size}"
                 + (f", regret {fmt(s.quick_regret, 3)}" if s.quick_regret is not None else "") + ".")
    if s.b_simple_method_reason:
        lines.append(f"Per-example gradients were not used: {s.b_simple_method_reason}; gradient norms at two "
                     "batch sizes stand in (the same quantity, a noisier estimate).")
    diverged, steps = s.reference_diverged_at, s.b_simple_steps
    if diverged is not None or steps == [0]:
        why, fix = ((f"the noise scale's reference run diverged at step {diverged}", "lower --base_lr")
                    if diverged is not None else
                    ("the noise scale's reference run ended before its first point of training", "lower --gns_steps"))
        where = ("from the initial weights alone, not from training" if steps == [0]
                 else f"from the points before it (steps {steps})")
        lines.append(f"Warning: {why}, so B_simple is {where}: {fix} for a trustworthy quick answer.")
    if s.b_simple_ranks is not None and s.b_simple_method != "ranks":
        lines.append(f"From the DDP ranks' gradient norms alone (B_small = one rank's batch): B_simple = "
                     f"{fmt(s.b_simple_ranks)}, a far noisier estimate of the same quantity.")
    memory = (f"memory allows up to {s.memory_max_batch_size}" if s.memory_bound
              else "memory did not bound the grid (not memory-bound on this device)")
    ranks = s.world_size
    device = f"{s.device} x {ranks} ranks (DDP: every B is global, B / {ranks} per rank)" if ranks > 1 else s.device
    lines.append(f"Device {device}; {memory}; {s.train_samples} training samples.")
    if not s.quick:
        per_b = {e.batch_size: e for e in s.batch_sizes}
        common = [f"B={b}: " + (f"{fmt(per_b[b].regret, 3)}x" if per_b[b].regret is not None else "never reached")
                  for b in (2, 32) if b in per_b]
        if common:
            lines.append("Regret T(B)/T(best) of common choices: " + ", ".join(common) + ".")
    return lines


def headline(result: StudyResult) -> list[str]:
    """Every line of the answer, in the order they are read."""
    return answer(result) + notes(result) + details(result)


def flags(e: BatchSizeResult) -> list[str]:
    """What is doubtful about one batch size's number (the table's flag column, the plots' hollow markers)."""
    out = []
    if e.unbracketed_reason:
        out.append(f"unbracketed ({e.unbracketed_reason.split(':')[0]})")
    if e.re_searched:
        out.append("re-searched")
    if e.inconsistent:
        out.append("inconsistent")
    if e.seeds_failed:
        out.append(f"{e.seeds_failed}/{len(e.steps_by_seed or [])} seeds failed")
    return out


def rows(result: StudyResult) -> list[dict[str, str]]:
    """The table's cells, one row per batch size, as text."""
    band, chosen = set(result.within_10_percent), result.recommended_batch_size
    out = []
    for e in result.batch_sizes:
        edge = {"up": " ^", "down": " v"}.get(e.lr_at_edge or "", "")
        if e.steps is None:
            steps = "never (" + ", ".join(e.never_reached or []) + ")" if e.never_reached else "-"
        else:
            steps = fmt(e.steps) + (f" ±{e.spread:.2f}" if e.spread is not None else "")
        regret = fmt(e.regret, 3)
        if e.regret_low is not None and e.regret_high is not None and e.regret_low != e.regret_high:
            regret += f" [{e.regret_low:.3g}-{e.regret_high:.3g}]"
        seeds = ", ".join("-" if n is None else str(n) for n in e.steps_by_seed or [])
        out.append({
            "B": str(e.batch_size), "lr": fmt(e.lr) + edge, "steps": steps, "seeds": seeds,
            "samples": count(e.samples) if e.samples else "-", "ms": f"{e.step_s * 1e3:.3f}",
            "samples_s": count(e.samples_per_s),
            "time": fmt(e.time_to_target_s), "regret": regret,
            "measured_fitted": f"{fmt(e.measured_regret, 3)} / {fmt(e.fitted_regret, 3)}",
            "band": "chosen" if e.batch_size == chosen else "yes" if e.batch_size in band else "",
            "flags": ", ".join(flags(e)),
        })
    return out
