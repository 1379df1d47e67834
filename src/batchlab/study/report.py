"""What a batch-size study writes into its folder once it completes, and what it prints.

``write_report(result)`` writes, from a ``StudyResult``:

- ``results.csv``: one row per trial (batch size, LR, seed, status, steps and samples to target, ...);
- ``summary.json``: the recommendation and every fitted quantity (the ``StudyResult`` less its measurements);
- ``report.md``: the answer, its band and its cost first, then what they rest on (``batchlab.study.answer``),
  the table, and each plot (``batchlab.study.plots``) under the paragraph that reads it;
- ``tensorboard/``: the curves, one HParams row per batch size; ``tensorboard_trials/``: one HParams session per
  trial (``batchlab.study.board``).

A quick study (``--quick``) writes ``quick.json`` and ``quick.md`` instead, so a full study in the same folder
keeps both. These files are derived from the measurements and rewritten whole (atomically) when the study
completes again; the measurements themselves are never rewritten. ``format_study(result)`` is the printout.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

from batchlab.files import dumps, write_atomically
from batchlab.study import answer
from batchlab.study.board import write_tensorboard
from batchlab.study.plots import fmt, target_text, write_plots
from batchlab.study.results import StudyResult

TRIAL_COLUMNS = ["batch_size", "lr", "lr_factor", "seed", "status", "steps", "samples", "seconds_to_target",
                 "steps_run", "max_steps", "wall_s", "best_value", "final_value"]

headline = answer.headline  # the answer's lines, as the report and the printout show them


def write_report(result: StudyResult) -> list[Path]:
    """Write every output of a study into its folder; returns the paths written."""
    root = Path(result.folder)
    written = []
    if not result.quick:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TRIAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for t in sorted(result.trials, key=lambda t: (t.batch_size, t.lr, t.seed)):
            writer.writerow(dataclasses.asdict(t))
        write_atomically(root / "results.csv", buf.getvalue())
        written.append(root / "results.csv")
    summary = root / ("quick.json" if result.quick else "summary.json")
    write_atomically(summary, dumps(result))
    written.append(summary)
    plots = write_plots(result)
    written += plots
    md = root / ("quick.md" if result.quick else "report.md")
    write_atomically(md, markdown(result, [p.name for p in plots]))
    written.append(md)
    if not result.quick:
        written += write_tensorboard(result)
    return written


TABLE = [("B", "B"), ("best lr", "lr"), ("steps to target ±sd(log)", "steps"), ("seeds' steps", "seeds"),
         ("samples", "samples"), ("ms/step", "ms"), ("samples/s", "samples_s"), ("time to target (s)", "time"),
         ("regret [low-high]", "regret"), ("measured / fitted regret", "measured_fitted"), ("band", "band"),
         ("flags", "flags")]


def _table(result: StudyResult) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in TABLE) + " |", "|" + "---:|" * (len(TABLE) - 2) + ":---|:---|"]
    for row in answer.rows(result):
        out.append("| " + " | ".join(row[k] for _, k in TABLE) + " |")
    return out + ["", "Steps to target: the geometric mean over the seeds at the chosen LR, made non-increasing in "
                      "B, ± the seeds' standard deviation in log steps (each seed's own luck taken out); a seed's "
                      "steps are - where it did not reach the target (stopped early, or failed). Regret: time to "
                      "target over the best's, and one standard error either way; measured from the seeds' steps "
                      "as they were, fitted from S(B). An lr marked ^ or v sat at the top or bottom of the LRs "
                      "tried.", ""]


def _figure(name: str, plots: list[str]) -> list[str]:
    return [f"![{name}]({name})", ""] if name in plots else []


def markdown(result: StudyResult, plots: list[str]) -> str:
    s, gns = result, result.noise_scale
    out = ["# Batch-size study" + (" (quick)" if s.quick else ""), ""]
    out += [f"- **{line}**" for line in answer.answer(s)]
    out += [f"- {line}" for line in answer.notes(s) + answer.details(s)]
    out += ["", f"Target: `{target_text(s)}`; learning rate centred by the `{s.lr_rule}` rule from lr "
                f"{fmt(s.base_lr)} at batch size {s.base_batch_size}.", ""]
    if not s.quick:
        out += ["## Time to target", "",
                "Time to target T(B) = S(B) x t(B): steps to target at each batch size's chosen LR times its time "
                "per step. The shaded span is the band, the batch sizes within 10% of the best time within one "
                "standard error; hollow points are flagged (see the table).", ""]
        out += _figure("time_to_target.png", plots)
        out += _table(s)
        out += ["## Steps to target", "",
                "Each seed's steps to target (grey ticks), their geometric mean with one standard error, and "
                "S(B) = S_min (1 + B_crit / B) fitted in log space: "
                + (s.fit.note if s.fit is not None else "not fitted") + ".", ""]
        out += _figure("steps_to_target.png", plots)
    out += ["## Throughput", "",
            f"Time per step t(B) = alpha + beta B, alpha = {fmt(s.alpha_s * 1e3)} ms, beta = {fmt(s.beta_s * 1e6)} "
            "us per sample, fitted to the fastest round of each batch size.", ""]
    out += _figure("throughput.png", plots)
    if not s.quick:
        out += ["## Validation curves", "",
                f"`{s.monitor}` against samples seen at each batch size's chosen LR, coloured by B: the study's "
                "seed solid, the other seeds thin; the dotted line is the target.", ""]
        out += _figure("curves.png", plots)
    out += ["## Gradient noise scale along the reference run", "",
            f"Reference run at batch size {gns.reference_batch_size}, lr {fmt(gns.reference_lr)}; each "
            f"point averages {gns.batches_per_point} batches of {gns.estimate_batch_size} "
            f"({answer.gradients(gns.method, gns.preconditioner)}). B_simple = {fmt(gns.b_simple)} averages "
            f"|G|^2 and tr(Sigma) separately over the points at steps {gns.averaged_steps}: the initial weights "
            "(step 0) are shown but left out where later points exist, their |G|^2 being far above any later one. "
            "Near the target |G|^2 shrinks and B_simple grows large and noisy: read the early points and the "
            "averaged value.", ""]
    out += _figure("noise_scale.png", plots)
    out += ["| step | samples seen | monitored | B_simple | B_simple (EMA) |", "|---:|---:|---:|---:|---:|"]
    ranks = gns.has_rank_estimate
    if ranks:  # under DDP, the ranks' own estimate beside the study's
        out[-2:] = [out[-2] + " B_simple (ranks' norms) |", out[-1] + "---:|"]
    for p in gns.points:
        out.append(f"| {p.step} | {p.samples_seen} | {fmt(p.value)} | {fmt(p.b_simple)} | "
                   f"{fmt(p.b_simple_ema)} |" + (f" {fmt(p.ranks_b_simple)} |" if ranks else ""))
    out.append("")
    return "\n".join(out)


PRINTED = [("B", "B", 7), ("lr", "lr", 11), ("steps ±sd", "steps", 14), ("ms/step", "ms", 8),
           ("time (s)", "time", 9), ("regret [low-high]", "regret", 20), ("band", "band", 5), ("flags", "flags", 0)]


def format_study(result: StudyResult) -> str:
    """What ``batchlab study`` prints at the end: the answer, band and cost first, then the table."""
    lines = ["", "batchlab study" + (" (quick)" if result.quick else "")]
    lines += [f"  {line}" for line in answer.headline(result)]
    if not result.quick:
        lines.append("  " + " ".join(f"{h:<{w}}" for h, _, w in PRINTED).rstrip())
        for row in answer.rows(result):
            lines.append("  " + " ".join(f"{row[k]:<{w}}" for _, k, w in PRINTED).rstrip())
    lines.append(f"  folder   {result.folder}")
    if not result.quick:
        lines.append(f"  report   {result.folder}/report.md")
        lines.append(f"  curves   tensorboard --logdir {result.folder}/tensorboard")
        lines.append(f"  trials   tensorboard --logdir {result.folder}/tensorboard_trials   (every trial, HParams)")
    return "\n".join(lines)
