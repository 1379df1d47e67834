"""The plots of a batch-size study, drawn by matplotlib into its folder, and the number format they share with
the report (``fmt``):

- ``throughput.png``: samples per second against B, measured and fitted;
- ``steps_to_target.png``: steps to target against B (log-log), the fitted S(B) and perfect scaling;
- ``time_to_target.png``: S(B) t(B), the recommendation and the quick answer marked;
- ``curves.png``: the monitored metric against samples seen, at each B's best LR;
- ``noise_scale.png``: B_simple along the reference run.

A quick study draws the first and the last.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from batchlab.files import replace_atomically
from batchlab.study.results import StudyResult, Trial


def fmt(value: Any, digits: int = 4) -> str:
    """A number as the report and the printout show it: 4 significant digits, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    return str(value)


def best_trials(result: StudyResult) -> list[Trial]:
    """Each batch size's best trial (the one its time to target comes from), by batch size."""
    chosen = {(e.batch_size, e.lr) for e in result.batch_sizes if e.lr is not None}
    return sorted((t for t in result.trials if (t.batch_size, t.lr) in chosen), key=lambda t: t.batch_size)


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

    grid = s.grid
    throughput = {e.batch_size: e for e in s.batch_sizes}
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [s.alpha_s + s.beta_s * b for b in grid]
    if throughput:
        ax.plot(list(throughput), [e.samples_per_s for e in throughput.values()], "o", label="measured")
    ax.plot(grid, [b / t for b, t in zip(grid, ts)], "-", label="fit B / (alpha + beta B)")
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="samples / s", title="Throughput")
    ax.legend()
    save(fig, "throughput.png")

    reached = [e for e in s.batch_sizes if e.steps is not None]
    if not s.quick and reached:
        fig, ax = plt.subplots(figsize=(6, 4))
        bs = [e.batch_size for e in reached]
        ax.plot(bs, [e.steps for e in reached], "o", label="measured (best lr per B)")
        if s.b_crit is not None and s.s_min > 0:
            fine = [grid[0] * (grid[-1] / grid[0]) ** (i / 100) for i in range(101)]
            ax.plot(fine, [s.s_min * (1 + s.b_crit / b) for b in fine], "-",
                    label=f"S_min(1 + B_crit/B), B_crit = {fmt(s.b_crit, 3)}")
            if grid[0] <= s.b_crit <= grid[-1]:
                ax.axvline(s.b_crit, color="gray", ls=":", lw=1)
        # Perfect scaling from the smallest batch size, drawn only while it stays near the measured range.
        floor = min(e.steps for e in reached) / 3
        anchor = reached[0].steps * reached[0].batch_size
        ideal = [b for b in bs if anchor / b >= floor]
        ax.plot(ideal, [anchor / b for b in ideal], "--", color="gray", label="perfect scaling S ~ 1/B")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="steps to target",
               title=f"Steps to {s.monitor} {'<=' if s.mode == 'min' else '>='} {fmt(s.target)}")
        ax.legend(fontsize=8)
        save(fig, "steps_to_target.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(bs, [e.time_to_target_s for e in reached], "o-", label="S(B) t(B)")
        best, t_best = s.recommended_batch_size, s.time_to_target_s
        ax.axhspan(t_best, 1.1 * t_best, color="green", alpha=0.15, label="within 10% of best")
        ax.plot([best], [t_best], "*", ms=16, color="red", label=f"recommended B = {best}")
        quick = s.quick_recommended_batch_size
        if quick in throughput and throughput[quick].time_to_target_s is not None:
            ax.plot([quick], [throughput[quick].time_to_target_s], "s", mfc="none", ms=11, color="purple",
                    label=f"quick answer B = {quick}")
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="time to target (s)",
               title="Time to target")
        ax.legend(fontsize=8)
        save(fig, "time_to_target.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        chosen = best_trials(s)
        colours = plt.cm.viridis([i / max(1, len(chosen) - 1) for i in range(len(chosen))])
        for t, colour in zip(chosen, colours):
            curve = [p for p in t.curve if p.value is not None and math.isfinite(p.value) and p.samples > 0]
            ax.plot([p.samples for p in curve], [p.value for p in curve], color=colour, label=f"B={t.batch_size}")
        ax.axhline(s.target, color="black", ls=":", lw=1, label="target")
        ax.set(xscale="log", yscale="log", xlabel="samples seen", ylabel=s.monitor,
               title="Validation against samples seen")
        ax.legend(fontsize=6, ncol=2)
        save(fig, "curves.png")

    points = [p for p in s.noise_scale.points if _positive(p.b_simple)]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p.step for p in points], [p.b_simple for p in points], "o", label="per point")
        ema_points = [p for p in s.noise_scale.points if _positive(p.b_simple_ema)]
        ax.plot([p.step for p in ema_points], [p.b_simple_ema for p in ema_points], "-", label="EMA")
        ax.axhline(s.noise_scale.b_simple, color="gray", ls=":", label=f"averaged: {fmt(s.noise_scale.b_simple, 3)}")
        ax.set(yscale="log", xlabel="step of the reference run", ylabel="B_simple", title="Gradient noise scale")
        ax.legend(fontsize=8)
        save(fig, "noise_scale.png")
    return written
