"""What a batch-size study writes into its folder once it completes, and what it prints.

``write_report(result)`` writes, from a ``StudyResult``:

- ``results.csv``: one row per trial (batch size, LR, status, steps and samples to target, time per step...);
- ``summary.json``: the recommendation and every fitted quantity (the ``StudyResult`` less its measurements);
- ``report.md``: the table, the noise-scale trajectory and the plots (``batchlab.study.plots``);
- ``tensorboard/bs<B>``: one TensorBoard run per batch size at its best LR, the monitored metric with samples
  seen as its step (so ``tensorboard --logdir <study>`` overlays them) and its HParams against the results.

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
from batchlab.study.plots import best_trials, fmt, write_plots
from batchlab.study.results import BatchSizeResult, StudyResult

TRIAL_COLUMNS = ["batch_size", "lr", "lr_factor", "seed", "status", "steps", "samples", "seconds_to_target", "steps_run",
                 "max_steps", "wall_s", "best_value", "final_value"]


def write_report(result: StudyResult) -> list[Path]:
    """Write every output of a study into its folder; returns the paths written."""
    root = Path(result.folder)
    written = []
    if not result.quick:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TRIAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for t in sorted(result.trials, key=lambda t: (t.batch_size, t.lr)):
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
        written += _tensorboard(result)
    return written


def _edge_mark(entry: BatchSizeResult) -> str:
    """`` ^`` or `` v`` beside a best LR that sat at the top or bottom edge of the range tried (``lr_at_edge``)."""
    return {"up": " ^", "down": " v"}.get(entry.lr_at_edge or "", "")


def headline(result: StudyResult) -> list[str]:
    """The answer in a few lines, for the terminal and the top of the report."""
    s = result
    lines = []
    if s.recommended_batch_size is None:
        lines.append(f"No recommendation: {s.recommended_by}.")
    else:
        lines.append(f"Recommended batch size: {s.recommended_batch_size} at lr {fmt(s.recommended_lr)} "
                     f"({s.recommended_by}).")
    if not s.quick and s.within_10_percent:
        lines.append(f"Within 10% of the best time to target: {s.within_10_percent}.")
    if not s.quick and s.lr_at_edge:
        lines.append(f"The best learning rate sat at an edge of the range tried for B = {s.lr_at_edge} (marked ^ "
                     "or v in the table): a better one may lie beyond it; widen --lr_factors or raise --lr_extend.")
    if not s.quick and s.b_crit is not None:
        lines.append(f"Fitted S(B) = S_min (1 + B_crit / B): S_min = {fmt(s.s_min)} steps, "
                     f"B_crit = {fmt(s.b_crit)}, E_min = {fmt(s.e_min)} samples; "
                     f"the model's sqrt(B_crit alpha / beta) = {fmt(s.model_b_star)}.")
    lines.append(f"Gradient noise scale B_simple = {fmt(s.b_simple)} ({s.b_simple_method} gradients); "
                 f"step time t(B) = {fmt(s.alpha_s * 1e3)} ms + {fmt(s.beta_s * 1e6)} us x B; "
                 f"quick answer sqrt(B_simple alpha / beta) = {fmt(s.quick_b_star)} -> "
                 f"{s.quick_recommended_batch_size}"
                 + (f", regret {fmt(s.quick_regret, 3)}" if s.quick_regret is not None else "") + ".")
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
        regret = s.regret or {}
        seeds = [f"B={b}: {fmt(regret[b], 3)}x" for b in (2, 32) if b in regret]
        if seeds:
            lines.append("Regret T(B)/T(best) of common choices: " + ", ".join(seeds) + ".")
    return lines


def markdown(result: StudyResult, plots: list[str]) -> str:
    s, gns = result, result.noise_scale
    out = ["# Batch-size study" + (" (quick)" if s.quick else ""), ""]
    out += [f"- {line}" for line in headline(s)]
    out += ["", f"Target: `{s.monitor}` {'<=' if s.mode == 'min' else '>='} {fmt(s.target)}; "
                f"learning rate centred by the `{s.lr_rule}` rule from lr {fmt(s.base_lr)} at batch size "
                f"{s.base_batch_size}.", ""]
    if not s.quick:
        out += ["| B | best lr | steps to target | samples | ms/step | samples/s | time to target (s) | regret |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in s.batch_sizes:
            mark = " **best**" if e.batch_size == s.recommended_batch_size else ""
            steps = fmt(e.steps) if e.steps is not None else "never (" + ", ".join(e.never_reached or []) + ")"
            out.append(f"| {e.batch_size}{mark} | {fmt(e.lr)}{_edge_mark(e)} | {steps} | {fmt(e.samples)} | "
                       f"{fmt(e.step_s * 1e3)} | {fmt(e.samples_per_s)} | {fmt(e.time_to_target_s)} | "
                       f"{fmt(e.regret, 3)} |")
        out.append("")
    out += ["## Gradient noise scale along the reference run", "",
            f"Reference run at batch size {gns.reference_batch_size}, lr {fmt(gns.reference_lr)}; each "
            f"point averages {gns.batches_per_point} batches of {gns.estimate_batch_size} "
            f"({gns.method} gradients). B_simple = {fmt(gns.b_simple)} averages |G|^2 and tr(Sigma) "
            f"separately over the points at steps {gns.averaged_steps}: the initial weights (step 0) "
            "are shown but left out where later points exist, their |G|^2 being far above any later one. Near the "
            "target |G|^2 shrinks and B_simple grows large and noisy: read the early points and the averaged "
            "value.", "",
            "| step | samples seen | monitored | B_simple | B_simple (EMA) |", "|---:|---:|---:|---:|---:|"]
    ranks = gns.has_rank_estimate
    if ranks:  # under DDP, the ranks' own estimate beside the study's
        out[-2:] = [out[-2] + " B_simple (ranks' norms) |", out[-1] + "---:|"]
    for p in gns.points:
        out.append(f"| {p.step} | {p.samples_seen} | {fmt(p.value)} | {fmt(p.b_simple)} | "
                   f"{fmt(p.b_simple_ema)} |" + (f" {fmt(p.ranks_b_simple)} |" if ranks else ""))
    out.append("")
    for name in plots:
        out += [f"![{name}]({name})", ""]
    return "\n".join(out)


def _tensorboard(result: StudyResult) -> list[Path]:
    """One run per (B, best LR), written once: a run folder that exists already is left as it is."""
    from lightning.pytorch.loggers import TensorBoardLogger

    root = Path(result.folder)
    written = []
    per_b = {e.batch_size: e for e in result.batch_sizes}
    for t in best_trials(result):
        version = f"bs{t.batch_size:07d}"
        if (root / "tensorboard" / version).exists():
            continue
        logger = TensorBoardLogger(str(root), name="tensorboard", version=version, default_hp_metric=False)
        for p in t.curve:
            if p.value is not None:
                logger.log_metrics({f"{result.monitor}_vs_samples": p.value}, step=p.samples)
                logger.log_metrics({f"{result.monitor}_vs_steps": p.value}, step=p.step)
        e = per_b[t.batch_size]
        logger.log_hyperparams(
            {"batch_size": t.batch_size, "lr": t.lr, "lr_factor": t.lr_factor},
            metrics={"hp/steps_to_target": e.steps, "hp/time_to_target_s": e.time_to_target_s,
                     "hp/samples_per_s": e.samples_per_s, "hp/regret": e.regret},
        )
        logger.finalize("success")
        written.append(root / "tensorboard" / version)
    return written


def format_study(result: StudyResult) -> str:
    """What ``batchlab study`` prints at the end."""
    lines = ["", "batchlab study" + (" (quick)" if result.quick else "")]
    lines += [f"  {line}" for line in headline(result)]
    if not result.quick:
        lines.append("  B        lr          steps    ms/step   time to target   regret")
        for e in result.batch_sizes:
            lr = fmt(e.lr) + _edge_mark(e)
            lines.append(f"  {e.batch_size:<8} {lr:<11} {fmt(e.steps):<8} "
                         f"{e.step_s * 1e3:<9.3f} {fmt(e.time_to_target_s):<16} {fmt(e.regret, 3)}")
    lines.append(f"  folder   {result.folder}")
    if not result.quick:
        lines.append(f"  report   {result.folder}/report.md; tensorboard --logdir {result.folder}")
    return "\n".join(lines)
