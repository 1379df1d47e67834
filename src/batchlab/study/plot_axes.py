"""How the study's plots draw what they share: the title naming the target, the band and the recommendation on
a batch-size axis, points with their standard error (hollow where ``doubts`` puts them in doubt), every grid
batch size on a log axis with plain numbers, and the legend outside the axes; and ``fmt``, the number format the
plots share with the report.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

from batchlab.study.results import BatchSizeResult, StudyResult

SPAN = 1.12  # the band's shading reaches this factor beyond its end points, so a band of one B still shows


def fmt(value: Any, digits: int = 4) -> str:
    """A number as the report and the printout show it: 4 significant digits, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    return str(value)


def doubts(e: BatchSizeResult) -> list[str]:
    """What puts a batch size's number in doubt (a point drawn hollow; ``answer.flags`` says more)."""
    return [kind for kind, on in (("unbracketed", e.unbracketed_reason), ("re-searched", e.re_searched),
                                  ("inconsistent", e.inconsistent), ("seeds failed", e.seeds_failed)) if on]


def target_text(s: StudyResult) -> str:
    return f"{s.monitor} {'<=' if s.mode == 'min' else '>='} {fmt(s.target)}"


def title(ax: Any, s: StudyResult, what: str) -> None:
    ax.set_title(what + (f"\ntarget {target_text(s)}" if s.target is not None else ""), fontsize=10)


def mark_answer(ax: Any, s: StudyResult) -> None:
    """The band as a shaded span over B, the recommendation as a dashed line."""
    if s.within_10_percent:
        lo, hi = s.within_10_percent[0], s.within_10_percent[-1]
        label = f"band [{lo}..{hi}]" if lo != hi else f"band [{lo}]"
        ax.axvspan(lo / SPAN, hi * SPAN, color="tab:green", alpha=0.13, lw=0, zorder=0, label=label)
    if s.recommended_batch_size is not None:
        ax.axvline(s.recommended_batch_size, color="tab:red", ls="--", lw=1,
                   label=f"recommended B = {s.recommended_batch_size}")


def log_se(s: StudyResult, e: BatchSizeResult) -> float:
    """The standard error of log(steps) at a batch size, from the study's spread."""
    n = len(e.steps_by_seed or []) or 1
    return (s.spread or 0.0) / math.sqrt(n)


def points(ax: Any, s: StudyResult, entries: list[BatchSizeResult], values: list[float], colour: str,
            label: str) -> None:
    """Points with error bars of one standard error either way (log space); flagged ones hollow."""
    for hollow in (False, True):
        pick = [(e, v) for e, v in zip(entries, values) if bool(doubts(e)) == hollow]
        if not pick:
            continue
        xs, ys = [e.batch_size for e, _ in pick], [v for _, v in pick]
        se = [log_se(s, e) for e, _ in pick]
        err = [[y * (1 - math.exp(-d)) for y, d in zip(ys, se)], [y * (math.exp(d) - 1) for y, d in zip(ys, se)]]
        kinds = sorted({kind for e, _ in pick for kind in doubts(e)})
        ax.errorbar(xs, ys, yerr=err if any(se) else None, fmt="o", color=colour, ms=7, capsize=3,
                    mfc="white" if hollow else colour, zorder=3,
                    label="flagged: " + ", ".join(kinds) if hollow else label)


def log_b_axis(ax: Any, s: StudyResult, never_reached: bool = True) -> None:
    """Every batch size of the grid on a log axis, labelled as it is; the grid's batch sizes that never reached
    the target marked along the bottom (on a plot of steps or time); numbers, not powers of ten, on the y axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    grid = s.grid
    never = [e.batch_size for e in s.batch_sizes if e.never_reached]
    if never and never_reached:
        ax.plot(never, [0.04] * len(never), "x", color="dimgray", ms=7, transform=ax.get_xaxis_transform(),
                label="never reached the target")
    ax.set_xscale("log")
    ax.set_xlim(grid[0] / 1.4, grid[-1] * 1.4)
    ax.xaxis.set_major_locator(FixedLocator(grid))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # A long grid's labels would run into each other (16384, 32768): slanted, they do not.
    ax.tick_params(axis="x", labelsize=8, labelrotation=40 if len(grid) > 10 else 0)
    ax.set_xlabel("batch size B")
    plain_numbers(ax.yaxis)


def plain_numbers(axis: Any) -> None:
    """A log axis's ticks as plain numbers (0.08, 20, 1,000, 20k), its minor ones too where the axis spans under
    a decade, those of 2, 3 and 5 under two, of 2 and 5 under three."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        decades = math.log10(hi / lo) if lo > 0 else math.inf
        digit = f"{v:.0e}"[0]
        shown = decades < 1 or (decades < 2 and digit in "235") or (decades < 3 and digit in "25")
        return _plain(v) if shown else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
    axis.set_minor_formatter(FuncFormatter(minor))
    axis.set_tick_params(which="both", labelsize=8)


def _plain(v: float) -> str:
    """A tick's number without powers of ten: 0.08, 0.5, 20, 1,000, 20k, 3M."""
    for above, unit, suffix in ((1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if v >= above:
            return f"{v / unit:g}{suffix}"
    return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def legend(ax: Any) -> None:
    """Outside the axes, on the right, the measured points first (matplotlib lists error bars last)."""
    from matplotlib.container import ErrorbarContainer

    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(handles)), key=lambda i: not isinstance(handles[i], ErrorbarContainer))
    labels = [textwrap.fill(label, 34, subsequent_indent="  ", break_on_hyphens=False) for label in labels]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
