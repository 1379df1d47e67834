"""How good is the default study's answer? Runs ``batchlab study`` (configs/study.yaml) for several seeds, full
and ``--quick``, and scores the recommendations against each other and against the study's own fit (issue 11).

    python scripts/study_quality.py --out /tmp/quality --json /tmp/quality.json     # runs 3 full + 3 quick
    python scripts/study_quality.py --pythonpath /work/before11/src --out /tmp/q0   # another tree's code
    python scripts/study_quality.py --out /tmp/quality --from-folders               # re-summarise, run nothing
    python scripts/study_quality.py --out /tmp/tiny -- --grid "[4,16]" --max_steps 200   # flags after -- go to study
    python scripts/study_quality.py --baseline /tmp/old/src --out /tmp/q   # the cost beside an older tree's, seed by seed

Each study runs as its own ``python -m batchlab.cli study --seed_everything N --out <out>/seed<N>/{full,quick}``
subprocess (``--python`` picks the interpreter, ``--pythonpath`` puts a source tree first, so one venv runs old
code too); its wall time and log go beside it (``<out>/runs.json``, ``<out>/seed<N>/*.log``). The table, per seed:
the recommendation and band (``within_10_percent``), whether the recommendation lies in every other seed's band,
the quick answer and its regret in that seed's full study, the worst measured/fitted regret ratio over the B that
reached the target, the B whose best LR is unbracketed (and why), and the cost. Then the goals, pass or fail.
Reads both summary.json formats: the reworked study's (``cost``, ``unbracketed``, ``measured_regret``) and the
older one (``lr_at_edge``, no cost: summed from results.csv, so trial fits only). Exits 1 when a goal fails.

The cost goal is in samples (a quarter of the study before issue 11's 117.6M, at seed 0) and, with ``--baseline``,
in wall time: each seed's full study runs right after the baseline tree's, so that the two see the same machine,
and must take no longer. Without one, wall times are shown but not judged: they are the machine's as much as the
study's (the same seed's study took 46 s and 82 s on one quiet 2-core VM).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

SEEDS = [0, 1, 2]
MAX_QUICK_REGRET = 1.25
MAX_RATIO = 2.0
MAX_SAMPLES = 29e6


@dataclass
class SeedRow:
    """One seed's full and quick study, as the table shows them."""

    seed: int
    format: str = "missing"  # new (the reworked summary.json), old, or missing
    recommended: Optional[int] = None
    band: list[int] = field(default_factory=list)
    outside_bands_of: list[int] = field(default_factory=list)  # the other seeds whose band misses this answer
    quick_b: Optional[int] = None  # the --quick run's answer
    full_quick_b: Optional[int] = None  # the same answer from the full study's own throughput and noise runs
    quick_regret: Optional[float] = None
    quick_regret_from: str = ""  # which field gave it
    worst_ratio: Optional[float] = None  # max over B of measured regret / fitted regret
    worst_ratio_b: Optional[int] = None
    unbracketed: dict[int, str] = field(default_factory=dict)  # B -> why
    trials: Optional[int] = None
    samples: Optional[float] = None
    steps: Optional[int] = None
    wall_s: Optional[float] = None  # as the study counted it (summed from the trials in the old format)
    cost_from: str = ""
    full_run_s: Optional[float] = None  # the subprocess, measured here
    quick_run_s: Optional[float] = None
    baseline_run_s: Optional[float] = None  # --baseline's full study of the same seed, run just before
    baseline_samples: Optional[float] = None


@dataclass
class Goal:
    key: str  # bands, quick, ratio, unbracketed or cost
    name: str
    passed: bool
    detail: str


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _regret_of(summary: dict[str, Any], b: Optional[int]) -> Optional[float]:
    if b is None:
        return None
    regret = summary.get("regret") or {}
    if str(b) in regret:
        return regret[str(b)]
    entry = next((e for e in summary.get("batch_sizes", []) if e.get("batch_size") == b), None)
    return entry.get("regret") if entry else None


def worst_ratio(summary: dict[str, Any]) -> tuple[Optional[float], Optional[int]]:
    """The largest measured regret over fitted regret, and its B. The new format stores both; the old one has
    steps and S_min, B_crit, from which both are computed over the best measured time to target."""
    entries = summary.get("batch_sizes", [])
    ratios = {}
    if any("measured_regret" in e for e in entries):
        for e in entries:
            if e.get("measured_regret") and e.get("fitted_regret"):
                ratios[e["batch_size"]] = e["measured_regret"] / e["fitted_regret"]
    elif summary.get("s_min") and summary.get("b_crit") is not None:
        reached = [e for e in entries if e.get("steps") and e.get("step_s")]
        if reached:
            best = min(e["steps"] * e["step_s"] for e in reached)
            for e in reached:
                fitted = summary["s_min"] * (1 + summary["b_crit"] / e["batch_size"]) * e["step_s"] / best
                ratios[e["batch_size"]] = (e["steps"] * e["step_s"] / best) / fitted
    if not ratios:
        return None, None
    b = max(ratios, key=ratios.get)
    return ratios[b], b


def unbracketed(summary: dict[str, Any]) -> dict[int, str]:
    """The B whose best LR is not bracketed, each with its reason. The old format's ``lr_at_edge`` is set only
    once its sweep had spent --lr_extend beyond the edge, so each is a cap."""
    entries = {e.get("batch_size"): e for e in summary.get("batch_sizes", [])}
    if "unbracketed" in summary:
        return {b: (entries.get(b, {}).get("unbracketed_reason") or "no reason given") for b in summary["unbracketed"]}
    return {b: f"cap (old: best LR at the {entries.get(b, {}).get('lr_at_edge') or '?'} edge after --lr_extend)"
            for b in summary.get("lr_at_edge") or []}


def trial_cost(folder: Path) -> Optional[tuple[int, int, int, float]]:
    """Trials, optimizer steps, samples and seconds of the trial fits, from results.csv (throughput and noise
    fits not included)."""
    try:
        rows = list(csv.DictReader((folder / "results.csv").open()))
    except OSError:
        return None
    steps = sum(int(r["steps_run"]) for r in rows)
    samples = sum(int(r["steps_run"]) * int(r["batch_size"]) for r in rows)
    return len(rows), steps, samples, sum(float(r["wall_s"]) for r in rows)


def seed_row(seed: int, out: Path, runs: dict[str, Any]) -> SeedRow:
    """One seed's row from its folders (and the wall times the runs recorded)."""
    row = SeedRow(seed)
    full_dir, quick_dir = out / f"seed{seed}" / "full", out / f"seed{seed}" / "quick"
    row.full_run_s = runs.get(f"seed{seed}/full", {}).get("wall_s")
    row.quick_run_s = runs.get(f"seed{seed}/quick", {}).get("wall_s")
    row.baseline_run_s = runs.get(f"seed{seed}/baseline", {}).get("wall_s")
    if (base := seed_row_baseline(out, seed)) is not None:
        row.baseline_samples = base
    full, quick = _read_json(full_dir / "summary.json"), _read_json(quick_dir / "quick.json")
    if quick is not None:
        row.quick_b = quick.get("quick_recommended_batch_size")
    if full is None:
        return row
    row.format = "new" if "cost" in full or "unbracketed" in full else "old"
    row.recommended = full.get("recommended_batch_size")
    row.band = list(full.get("within_10_percent") or [])
    # The quick run's own B where it ran, else the one the full study measured alongside (same seed, same data).
    row.full_quick_b = full.get("quick_recommended_batch_size")
    row.quick_b = row.quick_b if row.quick_b is not None else row.full_quick_b
    row.quick_regret, row.quick_regret_from = _regret_of(full, row.quick_b), "full study's regret[B]"
    if row.quick_regret is None and row.quick_b == row.full_quick_b:
        row.quick_regret, row.quick_regret_from = full.get("quick_regret"), "full study's quick_regret"
    row.worst_ratio, row.worst_ratio_b = worst_ratio(full)
    row.unbracketed = unbracketed(full)
    cost = full.get("cost")
    if cost:
        row.trials, row.samples, row.steps, row.wall_s = (cost.get("trials"), cost.get("samples"),
                                                          cost.get("steps"), cost.get("wall_s"))
        row.cost_from = "summary.json cost (all fits)"
    elif (spent := trial_cost(full_dir)) is not None:
        row.trials, row.steps, row.samples, row.wall_s = spent
        row.cost_from = "results.csv (trial fits only)"
    return row


def seed_row_baseline(out: Path, seed: int) -> Optional[float]:
    """The samples the baseline's full study of ``seed`` spent, where one ran."""
    folder = out / f"seed{seed}" / "baseline"
    summary = _read_json(folder / "summary.json")
    if summary is None:
        return None
    if summary.get("cost"):
        return summary["cost"].get("samples")
    spent = trial_cost(folder)
    return spent[2] if spent else None


def cross_check(rows: list[SeedRow]) -> None:
    """Fill in, for each seed, the other seeds whose band does not hold its recommendation."""
    for row in rows:
        row.outside_bands_of = [o.seed for o in rows if o is not row
                                and (row.recommended is None or row.recommended not in o.band)]


def goals(rows: list[SeedRow]) -> list[Goal]:
    def seeds(bad: list[SeedRow]) -> str:
        return "seeds " + ", ".join(str(r.seed) for r in bad) if bad else "all seeds"

    out = []
    bad = [r for r in rows if r.outside_bands_of or r.recommended is None]
    out.append(Goal("bands", "every seed's recommendation inside the other seeds' bands", len(rows) > 1 and not bad,
                    "; ".join(f"seed {r.seed}: B={r.recommended} not in the band of seed(s) {r.outside_bands_of}"
                              for r in bad) or ("all inside" if len(rows) > 1 else "needs two seeds")))
    bad = [r for r in rows if r.quick_regret is None or r.quick_regret > MAX_QUICK_REGRET]
    out.append(Goal("quick", f"quick regret <= {MAX_QUICK_REGRET} for every seed", not bad,
                    ", ".join(f"seed {r.seed}: {_f(r.quick_regret, 3)}" for r in rows)))
    bad = [r for r in rows if r.worst_ratio is None or r.worst_ratio > MAX_RATIO]
    out.append(Goal("ratio", f"no B with measured/fitted regret > {MAX_RATIO:g}", not bad,
                    ", ".join(f"seed {r.seed}: " + (f"{_f(r.worst_ratio, 3)} at B={r.worst_ratio_b}"
                                                    if r.worst_ratio is not None else "no fit") for r in rows)))
    bad = [r for r in rows if r.format == "missing" or any(not why.startswith("cap") for why in r.unbracketed.values())]
    out.append(Goal("unbracketed", "zero unbracketed best LRs, or each explained by a cap", not bad,
                    seeds(bad) + (" have an unexplained one or no study" if bad else " fine")))
    bad = [r for r in rows if r.samples is None or r.samples > MAX_SAMPLES
           or (r.baseline_run_s is not None and (r.full_run_s is None or r.full_run_s > r.baseline_run_s))]
    judged = all(r.baseline_run_s is not None for r in rows)
    out.append(Goal("cost", f"full study samples <= {MAX_SAMPLES / 1e6:g}M" + (
        " and wall <= the baseline's, run beside it" if judged else " (wall not judged: no --baseline)"), not bad,
        ", ".join(f"seed {r.seed}: {_f(r.samples and r.samples / 1e6)}M, {_f(r.full_run_s)} s"
                  + (f" (baseline {_f(r.baseline_samples and r.baseline_samples / 1e6)}M, {_f(r.baseline_run_s)} s)"
                     if r.baseline_run_s is not None else "") for r in rows)))
    return out


def _f(x: Optional[float], digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def table(rows: list[SeedRow], results: list[Goal]) -> str:
    lines_ = {
        "format": [r.format for r in rows],
        "recommended B": [str(r.recommended) for r in rows],
        "band (within 10%)": [",".join(map(str, r.band)) or "-" for r in rows],
        "in every other band": ["no answer" if r.recommended is None else "yes" if not r.outside_bands_of
                                else f"no: {r.outside_bands_of}" for r in rows],
        "quick B": [str(r.quick_b) for r in rows],
        "quick regret": [_f(r.quick_regret, 3) for r in rows],
        "max measured/fitted": ["-" if r.worst_ratio is None else f"{_f(r.worst_ratio, 3)} (B={r.worst_ratio_b})"
                                for r in rows],
        "unbracketed": [str(len(r.unbracketed)) + (f": {sorted(r.unbracketed)}" if r.unbracketed else "")
                        for r in rows],
        "trials": [str(r.trials) for r in rows],
        "steps": ["-" if r.steps is None else f"{r.steps:,}" for r in rows],
        "samples": ["-" if r.samples is None else f"{r.samples / 1e6:.1f}M" for r in rows],
        "study's own wall s": [_f(r.wall_s, 3) for r in rows],
        "full run wall s": [_f(r.full_run_s, 3) for r in rows],
        "quick run wall s": [_f(r.quick_run_s, 3) for r in rows],
    }
    if any(r.baseline_run_s is not None for r in rows):
        lines_["baseline samples"] = ["-" if r.baseline_samples is None else f"{r.baseline_samples / 1e6:.1f}M"
                                      for r in rows]
        lines_["baseline wall s"] = [_f(r.baseline_run_s, 3) for r in rows]
    width = max(14, *(len(v) + 2 for vals in lines_.values() for v in vals))
    out = [f"{'':<22}" + "".join(f"{'seed ' + str(r.seed):<{width}}" for r in rows)]
    out += [f"{name:<22}" + "".join(f"{v:<{width}}" for v in vals) for name, vals in lines_.items()]
    notes = sorted({f"cost from {r.cost_from}" for r in rows if r.cost_from})
    notes += [f"seed {r.seed} B={b} unbracketed: {why}" for r in rows for b, why in sorted(r.unbracketed.items())]
    # The quick answer rests on timings: on a busy machine the two runs of the same seed may differ.
    notes += [f"seed {r.seed}: the quick run chose B={r.quick_b}, the full study's own throughput and noise runs "
              f"B={r.full_quick_b}" for r in rows if r.full_quick_b is not None and r.quick_b != r.full_quick_b]
    notes += [f"seed {r.seed} quick regret from the {r.quick_regret_from}" for r in rows
              if r.quick_regret is not None and "quick_regret" in r.quick_regret_from]
    out += ["", *notes, "", "GOALS"]
    out += [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in results]
    passed = sum(g.passed for g in results)
    out.append(f"  {passed}/{len(results)} passed")
    return "\n".join(out)


def run_one(python: str, env: dict[str, str], seed: int, folder: Path, quick: bool, extra: list[str]) -> dict:
    """One ``batchlab study`` subprocess into ``folder``; its output goes to ``<folder>.log``."""
    cmd = [python, "-m", "batchlab.cli", "study", "--seed_everything", str(seed), "--out", str(folder),
           *(["--quick"] if quick else []), *extra]
    print(f"study_quality: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(f"{folder}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    print(f"study_quality:   rc {rc}, {wall:.1f} s", file=sys.stderr, flush=True)
    if rc:
        print(Path(f"{folder}.log").read_text()[-2000:], file=sys.stderr)
    return {"wall_s": wall, "rc": rc, "cmd": cmd}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="studies/quality", help="Folder of the seeds' study folders.")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--python", default=sys.executable, help="Interpreter that runs the studies.")
    parser.add_argument("--pythonpath", help="Source tree put first on the studies' PYTHONPATH (e.g. old code).")
    parser.add_argument("--json", help="Where the rows and goals go as JSON.")
    parser.add_argument("--from-folders", action="store_true", help="Summarise the folders under --out; run none.")
    parser.add_argument("--baseline", help="Source tree whose full study of each seed runs just before this one's, "
                                           "to judge the wall time side by side.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs_file = out / "runs.json"
    runs = _read_json(runs_file) or {}
    if not args.from_folders:
        kinds = ("baseline", "full", "quick") if args.baseline else ("full", "quick")
        folders = [out / f"seed{s}" / kind for s in args.seeds for kind in kinds]
        taken = [str(f) for f in folders if f.exists()]
        if taken:  # a study resumes from its folder: a rerun there would time nothing
            parser.error(f"{', '.join(taken)} exist: use another --out, or --from-folders to summarise them")
        env = dict(os.environ)
        if args.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(args.pythonpath).resolve()),
                                                            env.get("PYTHONPATH")) if p)
        # Which batchlab the studies import: the point of --pythonpath, so checked, not assumed.
        code = subprocess.run([args.python, "-c", "import batchlab; print(batchlab.__file__)"], env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
        print(f"study_quality: batchlab from {code}", file=sys.stderr)
        runs = {"code": code, "extra": extra, "baseline": args.baseline}
        base_env = dict(env)
        if args.baseline:
            base_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(args.baseline).resolve()),
                                                                 os.environ.get("PYTHONPATH")) if p)
        for seed in args.seeds:
            (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            for kind in kinds:
                runs[f"seed{seed}/{kind}"] = run_one(args.python, base_env if kind == "baseline" else env, seed,
                                                     out / f"seed{seed}" / kind, kind == "quick", extra)
                runs_file.write_text(json.dumps(runs, indent=2))
    rows = [seed_row(s, out, runs) for s in args.seeds]
    cross_check(rows)
    results = goals(rows)
    text = table(rows, results)
    print((f"batchlab from {runs['code']}\n" if runs.get("code") else "") + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"code": runs.get("code"), "extra": runs.get("extra"),
                                               "rows": [asdict(r) for r in rows],
                                               "goals": [asdict(g) for g in results],
                                               "all_passed": all(g.passed for g in results)}, indent=2))
    return 0 if all(g.passed for g in results) else 1


if __name__ == "__main__":
    sys.exit(main())
