"""The plots of a batch-size study, drawn by matplotlib into its folder, and the number format they share with
the report (``fmt``):

- ``time_to_target.png``: S(B) t(B) with its standard error, the 10% line, the recommendation and the quick answer;
- ``steps_to_target.png``: steps to target against B (log-log), each seed's, the fitted S(B) and perfect scaling;
- ``throughput.png``: samples per second against B, measured and fitted;
- ``curves.png``: the monitored metric against samples seen at each B's chosen LR, coloured by B;
- ``noise_scale.png``: B_simple along the reference run, the initial weights' point set apart.

Every plot against B marks the band (a shaded span) and the recommendation (a dashed line), and draws a point
whose number is in doubt (re-searched, unbracketed, inconsistent, seeds failed: ``plot_axes.doubts``) hollow, with
error bars of one standard error from the seeds' spread. Every title names the target. A quick study draws
throughput and the noise scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from batchlab.files import replace_atomically
from batchlab.study import plot_axes as axes
from batchlab.study.plot_axes import fmt, target_text  # the report's too
from batchlab.study.results import BatchSizeResult, StudyResult, Trial


def decides(e: BatchSizeResult) -> bool:
    """Whether a batch size's time to target takes part in the answer: reached from every seed (a failed seed
    counts at its budget, a lower bound that decides nothing)."""
    return e.time_to_target_s is not None and not e.seeds_failed


def best_trials(result: StudyResult) -> list[Trial]:
    """Each batch size's trial at its chosen LR from the study's own seed (the one its curve shows), by B."""
    chosen = {(e.batch_size, e.lr) for e in result.batch_sizes if e.lr is not None}
    seed = result.seeds[0] if result.seeds else None
    out: dict[int, Trial] = {}
    for t in result.trials:
        if (t.batch_size, t.lr) in chosen and (t.batch_size not in out or t.seed == seed):
            out[t.batch_size] = t
    return [out[b] for b in sorted(out)]


def _positive(value: Optional[float]) -> bool:
    """A finite number above 0: measurements keep NaN and infinity as null (strict JSON)."""
    return value is not None and math.isfinite(value) and value > 0


def write_plots(result: StudyResult) -> list[Path]:
    """Draw the study's plots into its folder; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result
    root = Path(s.folder)
    written = []

    def save(fig: Any, name: str) -> None:
        path = root / name
        fig.tight_layout()
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))
        plt.close(fig)
        written.append(path)

    reached = [e for e in s.batch_sizes if e.time_to_target_s is not None]
    if not s.quick and reached:
        fig, ax = plt.subplots(figsize=(8, 4))
        _time_to_target(ax, s, reached)
        save(fig, "time_to_target.png")
        fig, ax = plt.subplots(figsize=(8, 4))
        _steps_to_target(ax, s, reached)
        save(fig, "steps_to_target.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    _throughput(ax, s)
    save(fig, "throughput.png")

    if not s.quick and reached:
        fig, ax = plt.subplots(figsize=(8, 4))
        _curves(fig, ax, s)
        save(fig, "curves.png")

    if any(_positive(p.b_simple) for p in s.noise_scale.points):
        fig, ax = plt.subplots(figsize=(8, 4))
        _noise_scale(ax, s)
        save(fig, "noise_scale.png")
    return written


def _time_to_target(ax: Any, s: StudyResult, reached: list[BatchSizeResult]) -> None:
    ax.plot([e.batch_size for e in reached], [e.time_to_target_s for e in reached], "-", color="tab:blue", lw=1,
            alpha=0.6)
    axes.points(ax, s, reached, [e.time_to_target_s for e in reached], "tab:blue", "S(B) t(B), ±1 SE")
    best, t_best = s.recommended_batch_size, s.time_to_target_s
    if t_best is not None:
        ax.axhline(1.1 * t_best, color="tab:green", ls=":", lw=1, label="10% above the best")
        ax.plot([best], [t_best], "*", ms=15, color="tab:red", zorder=4)
    fitted = [e for e in reached if e.fitted_regret is not None]
    if s.fit is not None and s.fit.describes and fitted and t_best is not None:
        ax.plot([e.batch_size for e in fitted], [e.fitted_regret * t_best for e in fitted], "--", color="gray",
                lw=1, label="fitted S(B) x t(B)")
    per_b = {e.batch_size: e for e in reached}
    quick = s.quick_recommended_batch_size
    if quick in per_b:
        ax.plot([quick], [per_b[quick].time_to_target_s], "s", mfc="none", ms=12, color="purple", zorder=4,
                label=f"quick answer B = {quick}")
    ax.set(yscale="log", ylabel="time to target (s)")
    axes.log_b_axis(ax, s)
    axes.mark_answer(ax, s)
    axes.title(ax, s, "Time to target S(B) x t(B)")
    axes.legend(ax)


def _steps_to_target(ax: Any, s: StudyResult, reached: list[BatchSizeResult]) -> None:
    for e in reached:  # every seed's own steps, failed seeds (null) left out
        seeds = [n for n in e.steps_by_seed or [] if n]
        ax.plot([e.batch_size] * len(seeds), seeds, "_", color="gray", ms=9, alpha=0.8, zorder=2)
    ax.plot([], [], "_", color="gray", ms=9, label="one seed")
    measured = [e.measured_steps or e.steps for e in reached]
    axes.points(ax, s, reached, measured, "tab:blue", "geometric mean over seeds, ±1 SE")
    grid, fit = s.grid, s.fit
    if fit is not None and fit.s_min > 0:
        fitted = [e.batch_size for e in reached if decides(e)] or [e.batch_size for e in reached]
        inside = min(fitted) <= fit.b_crit <= max(fitted)
        if not fit.describes:  # no B_crit quoted: it is no finding
            label = "fitted S(B): does not describe the points"
        else:
            label = f"S_min(1 + B_crit/B), B_crit = {fmt(fit.b_crit, 3)}" + ("" if inside else " (not pinned down)")
        # Solid over the batch sizes it was fitted to, dotted where it extrapolates.
        fine = [grid[0] * (grid[-1] / grid[0]) ** (i / 200) for i in range(201)]
        parts = ([b for b in fine if min(fitted) <= b <= max(fitted)], [b for b in fine if b <= min(fitted)],
                 [b for b in fine if b >= max(fitted)])
        for i, part in enumerate(parts):
            ax.plot(part, [fit.s_min * (1 + fit.b_crit / b) for b in part], "-" if i == 0 and fit.describes else ":",
                    color="tab:orange", label=None if i else label)
        if fit.describes and inside:
            ax.axvline(fit.b_crit, color="tab:orange", ls=":", lw=1)
    # Perfect scaling from the smallest batch size, drawn only while it stays near the measured range.
    floor = min(measured) / 3
    anchor = measured[0] * reached[0].batch_size
    ideal = [b for b in grid if b >= reached[0].batch_size and anchor / b >= floor]
    ax.plot(ideal, [anchor / b for b in ideal], "--", color="gray", lw=1, label="perfect scaling S ~ 1/B")
    ax.set(yscale="log", ylabel="steps to target")
    axes.log_b_axis(ax, s)
    axes.mark_answer(ax, s)
    axes.title(ax, s, "Steps to target")
    axes.legend(ax)


def _throughput(ax: Any, s: StudyResult) -> None:
    grid = s.grid
    fine = [grid[0] * (grid[-1] / grid[0]) ** (i / 100) for i in range(101)]
    ax.plot(fine, [b / (s.alpha_s + s.beta_s * b) for b in fine], "-", color="tab:orange",
            label="fit B / (alpha + beta B)")
    ax.plot([e.batch_size for e in s.batch_sizes], [e.samples_per_s for e in s.batch_sizes], "o",
            color="tab:blue", label="measured (fastest round)")
    ax.set(yscale="log", ylabel="samples / s")
    axes.log_b_axis(ax, s, never_reached=False)
    axes.mark_answer(ax, s)
    axes.title(ax, s, "Throughput")
    axes.legend(ax)


def _curves(fig: Any, ax: Any, s: StudyResult) -> None:
    """One colour per B on a log scale (a colorbar, not a legend of look-alike lines); the study's seed drawn
    solid, the other seeds at the same LR thin."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    chosen = {t.batch_size: t for t in best_trials(s)}
    shown = sorted(chosen)
    norm = LogNorm(vmin=shown[0], vmax=max(shown[-1], shown[0] * 2))
    cmap = plt.get_cmap("viridis")
    lrs = {e.batch_size: e.lr for e in s.batch_sizes}
    for t in s.trials:
        if t.batch_size not in chosen or t.lr != lrs[t.batch_size]:
            continue
        curve = [p for p in t.curve if _positive(p.value) and p.samples > 0]
        main = t is chosen[t.batch_size]
        ax.plot([p.samples for p in curve], [p.value for p in curve], color=cmap(norm(t.batch_size)),
                lw=1.6 if main else 0.6, alpha=1.0 if main else 0.35, zorder=3 if main else 2)
    ax.axhline(s.target, color="black", ls=":", lw=1)
    ax.plot([], [], color="gray", lw=1.6, label="study's seed")
    ax.plot([], [], color="gray", lw=0.6, alpha=0.35, label="other seeds")
    ax.plot([], [], color="black", ls=":", lw=1, label="target")
    ax.set(xscale="log", yscale="log", xlabel="samples seen", ylabel=s.monitor)
    axes.plain_numbers(ax.xaxis)
    axes.plain_numbers(ax.yaxis)
    axes.title(ax, s, "Validation at each B's chosen LR")
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    bar.set_label("batch size B", fontsize=8)
    bar.set_ticks(shown)
    bar.set_ticklabels([str(b) for b in shown], fontsize=7)
    bar.ax.minorticks_off()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)


def _noise_scale(ax: Any, s: StudyResult) -> None:
    gns = s.noise_scale
    averaged = set(gns.averaged_steps)
    points = [p for p in gns.points if _positive(p.b_simple)]
    used = [p for p in points if p.step in averaged]
    apart = [p for p in points if p.step not in averaged]
    ax.plot([p.step for p in used], [p.b_simple for p in used], "o", color="tab:blue", label="per point (averaged)")
    for p in apart:  # the initial weights: their |G|^2 far above any later one, so left out of the average
        what = "initial weights" if p.step == 0 else "not averaged"
        ax.plot([p.step], [p.b_simple], "D", mfc="white", color="tab:gray", ms=8)
        ax.annotate(f"step {p.step}: {what},\nleft out of the average", (p.step, p.b_simple), fontsize=7,
                    xytext=(10, 6), textcoords="offset points", va="bottom", color="dimgray")
    if apart:
        ax.plot([], [], "D", mfc="white", color="tab:gray", label="left out of the average")
    ema = [p for p in gns.points if _positive(p.b_simple_ema)]
    ax.plot([p.step for p in ema], [p.b_simple_ema for p in ema], "-", color="tab:orange", label="EMA")
    if _positive(gns.b_simple):
        ax.axhline(gns.b_simple, color="gray", ls=":", label=f"averaged: {fmt(gns.b_simple, 3)}")
    ax.set(yscale="log", xlabel="step of the reference run", ylabel="B_simple")
    axes.plain_numbers(ax.yaxis)
    axes.title(ax, s, f"Gradient noise scale (reference run: B = {gns.reference_batch_size}, "
                  f"lr {fmt(gns.reference_lr, 3)})")
    axes.legend(ax)
