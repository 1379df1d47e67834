"""What a batch-size study writes into its folder, and what it prints.

``write_report(folder, summary, trials, gns)`` writes, from the study's finished measurements:

- ``results.csv``: one row per trial (batch size, LR, status, steps and samples to target, time per step...);
- ``summary.json``: the recommendation and every fitted quantity (``batchlab.study.summarise``);
- ``report.md``: the table, the noise-scale trajectory and the plots;
- plots: ``steps_to_target.png`` (log-log, fitted S(B) and perfect scaling), ``throughput.png``,
  ``time_to_target.png`` (recommendation marked), ``curves.png`` (the monitored metric against samples seen),
  ``noise_scale.png``;
- ``tensorboard/bs<B>``: one TensorBoard run per batch size at its best LR, the monitored metric with samples
  seen as its step (so ``tensorboard --logdir <study>`` overlays them) and its HParams against the results.

A quick study (``--quick``) writes ``quick.json`` and ``quick.md`` instead, so a full study in the same folder
keeps both. These files are derived from the measurements and rewritten whole (atomically) when the study
completes again; the measurements themselves are never rewritten. matplotlib draws the plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from batchlab.files import jsonable, write_atomically

TRIAL_COLUMNS = ["batch_size", "lr", "lr_factor", "status", "steps", "samples", "seconds_to_target", "steps_run",
                 "max_steps", "wall_s", "best_value", "final_value"]


def write_report(root: Path, summary: dict[str, Any], trials: list[dict[str, Any]], gns: dict[str, Any]) -> list[Path]:
    """Write every output of a study into ``root``; returns the paths written."""
    root = Path(root)
    stem = "quick" if summary["quick"] else "summary"
    written = []
    if not summary["quick"]:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TRIAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for t in sorted(trials, key=lambda t: (t["batch_size"], t["lr"])):
            writer.writerow(t)
        write_atomically(root / "results.csv", buf.getvalue())
        written.append(root / "results.csv")
    write_atomically(root / f"{stem}.json", json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    written.append(root / f"{stem}.json")
    plots = _plots(root, summary, trials, gns)
    written += plots
    md = root / ("quick.md" if summary["quick"] else "report.md")
    write_atomically(md, markdown(summary, gns, [p.name for p in plots]))
    written.append(md)
    if not summary["quick"]:
        written += _tensorboard(root, summary, trials)
    return written


def _finite(value: Any) -> bool:
    """A finite number: measurements keep NaN and infinity as null (strict JSON)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    return str(value)


def _edge_mark(entry: dict[str, Any]) -> str:
    """`` ^`` or `` v`` beside a best LR that sat at the top or bottom edge of the range tried (``lr_at_edge``)."""
    return {"up": " ^", "down": " v"}.get(entry.get("lr_at_edge") or "", "")


def headline(summary: dict[str, Any]) -> list[str]:
    """The answer in a few lines, for the terminal and the top of the report."""
    s = summary
    lines = []
    if s["recommended_batch_size"] is None:
        lines.append(f"No recommendation: {s['recommended_by']}.")
    else:
        lines.append(f"Recommended batch size: {s['recommended_batch_size']} at lr {_fmt(s['recommended_lr'])} "
                     f"({s['recommended_by']}).")
    if not s["quick"] and s.get("within_10_percent"):
        lines.append(f"Within 10% of the best time to target: {s['within_10_percent']}.")
    if not s["quick"] and s.get("lr_at_edge"):
        lines.append(f"The best learning rate sat at an edge of the range tried for B = {s['lr_at_edge']} (marked ^ "
                     "or v in the table): a better one may lie beyond it; widen --lr_factors or raise --lr_extend.")
    if not s["quick"] and s.get("b_crit") is not None:
        lines.append(f"Fitted S(B) = S_min (1 + B_crit / B): S_min = {_fmt(s['s_min'])} steps, "
                     f"B_crit = {_fmt(s['b_crit'])}, E_min = {_fmt(s['e_min'])} samples; "
                     f"the model's sqrt(B_crit alpha / beta) = {_fmt(s['model_b_star'])}.")
    lines.append(f"Gradient noise scale B_simple = {_fmt(s['b_simple'])} ({s['b_simple_method']} gradients); "
                 f"step time t(B) = {_fmt(s['alpha_s'] * 1e3)} ms + {_fmt(s['beta_s'] * 1e6)} us x B; "
                 f"quick answer sqrt(B_simple alpha / beta) = {_fmt(s['quick_b_star'])} -> "
                 f"{s['quick_recommended_batch_size']}"
                 + (f", regret {_fmt(s['quick_regret'], 3)}" if s.get("quick_regret") is not None else "") + ".")
    diverged, steps = s.get("reference_diverged_at"), s.get("b_simple_steps")
    if diverged is not None or steps == [0]:
        why, fix = ((f"the noise scale's reference run diverged at step {diverged}", "lower --base_lr")
                    if diverged is not None else
                    ("the noise scale's reference run ended before its first point of training", "lower --gns_steps"))
        where = ("from the initial weights alone, not from training" if steps == [0]
                 else f"from the points before it (steps {steps})")
        lines.append(f"Warning: {why}, so B_simple is {where}: {fix} for a trustworthy quick answer.")
    if s.get("b_simple_ranks") is not None and s["b_simple_method"] != "ranks":
        lines.append(f"From the DDP ranks' gradient norms alone (B_small = one rank's batch): B_simple = "
                     f"{_fmt(s['b_simple_ranks'])}, a far noisier estimate of the same quantity.")
    memory = (f"memory allows up to {s['memory_max_batch_size']}" if s["memory_bound"]
              else "memory did not bound the grid (not memory-bound on this device)")
    ranks = s.get("world_size", 1)
    device = f"{s['device']} x {ranks} ranks (DDP: every B is global, B / {ranks} per rank)" if ranks > 1 else s["device"]
    lines.append(f"Device {device}; {memory}; {s['train_samples']} training samples.")
    if not s["quick"]:
        regret = s.get("regret", {})
        seeds = [f"B={b}: {_fmt(regret.get(str(b)), 3)}x" for b in (2, 32) if str(b) in regret]
        if seeds:
            lines.append("Regret T(B)/T(best) of common choices: " + ", ".join(seeds) + ".")
    return lines


def markdown(summary: dict[str, Any], gns: dict[str, Any], plots: list[str]) -> str:
    s = summary
    out = ["# Batch-size study" + (" (quick)" if s["quick"] else ""), ""]
    out += [f"- {line}" for line in headline(s)]
    out += ["", f"Target: `{s['monitor']}` {'<=' if s['mode'] == 'min' else '>='} {_fmt(s['target'])}; "
                f"learning rate centred by the `{s['lr_rule']}` rule from lr {_fmt(s['base_lr'])} at batch size "
                f"{s['base_batch_size']}.", ""]
    if not s["quick"]:
        out += ["| B | best lr | steps to target | samples | ms/step | samples/s | time to target (s) | regret |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in s["batch_sizes"]:
            mark = " **best**" if e["batch_size"] == s["recommended_batch_size"] else ""
            steps = _fmt(e["steps"]) if e["steps"] is not None else "never (" + ", ".join(e["never_reached"]) + ")"
            out.append(f"| {e['batch_size']}{mark} | {_fmt(e['lr'])}{_edge_mark(e)} | {steps} | {_fmt(e['samples'])} | "
                       f"{_fmt(e['step_s'] * 1e3)} | {_fmt(e['samples_per_s'])} | {_fmt(e['time_to_target_s'])} | "
                       f"{_fmt(e.get('regret'), 3)} |")
        out.append("")
    out += ["## Gradient noise scale along the reference run", "",
            f"Reference run at batch size {gns['reference_batch_size']}, lr {_fmt(gns['reference_lr'])}; each "
            f"point averages {gns['batches_per_point']} batches of {gns['estimate_batch_size']} "
            f"({gns['method']} gradients). B_simple = {_fmt(gns['b_simple'])} averages |G|^2 and tr(Sigma) "
            f"separately over the points at steps {gns.get('averaged_steps', '-')}: the initial weights (step 0) "
            "are shown but left out where later points exist, their |G|^2 being far above any later one. Near the "
            "target |G|^2 shrinks and B_simple grows large and noisy: read the early points and the averaged "
            "value.", "",
            "| step | samples seen | monitored | B_simple | B_simple (EMA) |", "|---:|---:|---:|---:|---:|"]
    ranks = "ranks_b_simple" in gns["points"][0] if gns["points"] else False
    if ranks:  # under DDP, the ranks' own estimate beside the study's
        out[-2:] = [out[-2] + " B_simple (ranks' norms) |", out[-1] + "---:|"]
    for p in gns["points"]:
        out.append(f"| {p['step']} | {p['samples_seen']} | {_fmt(p['value'])} | {_fmt(p['b_simple'])} | "
                   f"{_fmt(p['b_simple_ema'])} |" + (f" {_fmt(p['ranks_b_simple'])} |" if ranks else ""))
    out.append("")
    for name in plots:
        out += [f"![{name}]({name})", ""]
    return "\n".join(out)


def _best_trials(summary: dict[str, Any], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    chosen = {(e["batch_size"], e["lr"]) for e in summary.get("batch_sizes", []) if e["lr"] is not None}
    return sorted((t for t in trials if (t["batch_size"], t["lr"]) in chosen), key=lambda t: t["batch_size"])


def _plots(root: Path, summary: dict[str, Any], trials: list[dict[str, Any]], gns: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary
    written = []

    def save(fig: Any, name: str) -> None:
        path = root / name
        tmp = root / f".{name}.tmp{os.getpid()}.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)

    grid = s["grid"]
    throughput = {e["batch_size"]: e for e in s.get("batch_sizes", [])}
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [b for b in grid]
    ts = [s["alpha_s"] + s["beta_s"] * b for b in xs]
    if throughput:
        ax.plot(list(throughput), [e["samples_per_s"] for e in throughput.values()], "o", label="measured")
    ax.plot(xs, [b / t for b, t in zip(xs, ts)], "-", label="fit B / (alpha + beta B)")
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="samples / s", title="Throughput")
    ax.legend()
    save(fig, "throughput.png")

    if not s["quick"]:
        reached = [e for e in s["batch_sizes"] if e["steps"] is not None]
        if reached:
            fig, ax = plt.subplots(figsize=(6, 4))
            bs = [e["batch_size"] for e in reached]
            ax.plot(bs, [e["steps"] for e in reached], "o", label="measured (best lr per B)")
            if s["b_crit"] is not None and s["s_min"] > 0:
                fine = [grid[0] * (grid[-1] / grid[0]) ** (i / 100) for i in range(101)]
                ax.plot(fine, [s["s_min"] * (1 + s["b_crit"] / b) for b in fine], "-",
                        label=f"S_min(1 + B_crit/B), B_crit = {_fmt(s['b_crit'], 3)}")
                if grid[0] <= s["b_crit"] <= grid[-1]:
                    ax.axvline(s["b_crit"], color="gray", ls=":", lw=1)
            # Perfect scaling from the smallest batch size, drawn only while it stays near the measured range.
            floor = min(e["steps"] for e in reached) / 3
            anchor = reached[0]["steps"] * reached[0]["batch_size"]
            ideal = [b for b in bs if anchor / b >= floor]
            ax.plot(ideal, [anchor / b for b in ideal], "--", color="gray", label="perfect scaling S ~ 1/B")
            ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="steps to target",
                   title=f"Steps to {s['monitor']} {'<=' if s['mode'] == 'min' else '>='} {_fmt(s['target'])}")
            ax.legend(fontsize=8)
            save(fig, "steps_to_target.png")

            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(bs, [e["time_to_target_s"] for e in reached], "o-", label="S(B) t(B)")
            best = s["recommended_batch_size"]
            t_best = s["time_to_target_s"]
            ax.axhspan(t_best, 1.1 * t_best, color="green", alpha=0.15, label="within 10% of best")
            ax.plot([best], [t_best], "*", ms=16, color="red", label=f"recommended B = {best}")
            quick = s.get("quick_recommended_batch_size")
            if quick in throughput and throughput[quick]["time_to_target_s"] is not None:
                ax.plot([quick], [throughput[quick]["time_to_target_s"]], "s", mfc="none", ms=11, color="purple",
                        label=f"quick answer B = {quick}")
            ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="time to target (s)",
                   title="Time to target")
            ax.legend(fontsize=8)
            save(fig, "time_to_target.png")

            fig, ax = plt.subplots(figsize=(6, 4))
            best_trials = _best_trials(s, trials)
            colours = plt.cm.viridis([i / max(1, len(best_trials) - 1) for i in range(len(best_trials))])
            for t, colour in zip(best_trials, colours):
                curve = [p for p in t["curve"] if _finite(p["value"]) and p["samples"] > 0]
                ax.plot([p["samples"] for p in curve], [p["value"] for p in curve], color=colour,
                        label=f"B={t['batch_size']}")
            ax.axhline(s["target"], color="black", ls=":", lw=1, label="target")
            ax.set(xscale="log", yscale="log", xlabel="samples seen", ylabel=s["monitor"],
                   title="Validation against samples seen")
            ax.legend(fontsize=6, ncol=2)
            save(fig, "curves.png")

    points = [p for p in gns["points"] if _finite(p["b_simple"]) and p["b_simple"] > 0]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["step"] for p in points], [p["b_simple"] for p in points], "o", label="per point")
        ema_points = [p for p in gns["points"] if _finite(p["b_simple_ema"]) and p["b_simple_ema"] > 0]
        ax.plot([p["step"] for p in ema_points], [p["b_simple_ema"] for p in ema_points], "-", label="EMA")
        ax.axhline(gns["b_simple"], color="gray", ls=":", label=f"averaged: {_fmt(gns['b_simple'], 3)}")
        ax.set(yscale="log", xlabel="step of the reference run", ylabel="B_simple", title="Gradient noise scale")
        ax.legend(fontsize=8)
        save(fig, "noise_scale.png")
    return written


def _tensorboard(root: Path, summary: dict[str, Any], trials: list[dict[str, Any]]) -> list[Path]:
    """One run per (B, best LR), written once: a run folder that exists already is left as it is."""
    from lightning.pytorch.loggers import TensorBoardLogger

    written = []
    per_b = {e["batch_size"]: e for e in summary["batch_sizes"]}
    for t in _best_trials(summary, trials):
        version = f"bs{t['batch_size']:07d}"
        if (root / "tensorboard" / version).exists():
            continue
        logger = TensorBoardLogger(str(root), name="tensorboard", version=version, default_hp_metric=False)
        for p in t["curve"]:
            if _finite(p["value"]):
                logger.log_metrics({f"{summary['monitor']}_vs_samples": p["value"]}, step=p["samples"])
                logger.log_metrics({f"{summary['monitor']}_vs_steps": p["value"]}, step=p["step"])
        e = per_b[t["batch_size"]]
        logger.log_hyperparams(
            {"batch_size": t["batch_size"], "lr": t["lr"], "lr_factor": t["lr_factor"]},
            metrics={"hp/steps_to_target": e["steps"], "hp/time_to_target_s": e["time_to_target_s"],
                     "hp/samples_per_s": e["samples_per_s"], "hp/regret": e["regret"]},
        )
        logger.finalize("success")
        written.append(root / "tensorboard" / version)
    return written


def format_study(summary: dict[str, Any], written: Optional[list[Path]] = None) -> str:
    """What ``batchlab study`` prints at the end."""
    lines = ["", "batchlab study" + (" (quick)" if summary["quick"] else "")]
    lines += [f"  {line}" for line in headline(summary)]
    if not summary["quick"]:
        lines.append("  B        lr          steps    ms/step   time to target   regret")
        for e in summary["batch_sizes"]:
            lr = _fmt(e["lr"]) + _edge_mark(e)
            lines.append(f"  {e['batch_size']:<8} {lr:<11} {_fmt(e['steps']):<8} "
                         f"{e['step_s'] * 1e3:<9.3f} {_fmt(e['time_to_target_s']):<16} {_fmt(e.get('regret'), 3)}")
    lines.append(f"  folder   {summary['folder']}")
    if not summary["quick"]:
        lines.append(f"  report   {summary['folder']}/report.md; tensorboard --logdir {summary['folder']}")
    return "\n".join(lines)
