"""A study's TensorBoard runs, in two folders, because TensorBoard selects no run when a folder holds more than
40 (its MAX_NUM_RUNS_TO_ENABLE_BY_DEFAULT), so a study's hundred trials would open on empty charts:

- ``tensorboard/`` (``tensorboard --logdir <study>/tensorboard``, what the study prints first): ``bs<B>``, the
  curve of each batch size at its chosen LR, from the study's seed: the monitored metric under its own name
  against optimizer steps, and ``<monitor>_vs_samples`` against samples seen, so that batch sizes compare at equal
  data. Each is also that trial's HParams session, so the HParams table there has one row per batch size.
- ``tensorboard_trials/`` (``tensorboard --logdir <study>/tensorboard_trials``): ``bs<B>/lr<LR>_seed<S>``, one
  HParams session per trial, every LR and seed at every B.

A session's hyperparameters are batch_size, lr, lr_factor, seed, status, recommended, chosen, bracketed and in_band,
and the trial's results are its metrics: scalars (TensorBoard's HParams reads their last value) under
``zz_hparams/``, because TensorBoard sorts its cards by name, and a single point per trial is not what a user should
see first (Lightning's ``log_hyperparams`` logs them as ``hp/*``, which sorts before ``val/*``). The experiment,
which names the columns and their values, is written once per folder, in its first session: Lightning's writes one
per run, and TensorBoard takes any one of them, so a run without some metric would hide that column for every run.

Both folders are rewritten when the study completes again (built beside them and swapped in), so that a resumed
study's runs match its answer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from batchlab.study.plots import best_trials
from batchlab.study.results import StudyResult, Trial

GROUP = "zz_hparams"
CURVES, TRIALS = "tensorboard", "tensorboard_trials"  # the two folders under the study's


def _metrics(result: StudyResult) -> list[tuple[str, str]]:
    """The HParams metrics, as (tag, the column's name)."""
    # Five: TensorBoard shows the first five metrics by default (the trial's wall time is in results.csv).
    return [(f"{GROUP}/steps_to_target", "steps to target"), (f"{GROUP}/time_to_target_s", "time to target (s)"),
            (f"{GROUP}/regret", "regret T / T(best)"), (f"{GROUP}/best_value", f"best {result.monitor}"),
            (f"{GROUP}/steps_run", "steps run")]


def hparams_of(result: StudyResult, t: Trial) -> dict[str, Any]:
    """One trial's row of the HParams table."""
    e = next(e for e in result.batch_sizes if e.batch_size == t.batch_size)
    return {"batch_size": t.batch_size, "lr": t.lr, "lr_factor": t.lr_factor, "seed": t.seed, "status": t.status,
            "recommended": t.batch_size == result.recommended_batch_size and t.lr == result.recommended_lr,
            "chosen": t.lr == e.lr, "bracketed": bool(e.bracketed), "in_band": t.batch_size in result.within_10_percent}


def _values(result: StudyResult, t: Trial) -> dict[str, float]:
    """One trial's metrics: its own steps to target, and its time to target at the measured step time (as the
    answer's are), over the best's."""
    step_s = next(e.step_s for e in result.batch_sizes if e.batch_size == t.batch_size)
    out = {"steps_run": float(t.steps_run)}
    if t.best_value is not None:
        out["best_value"] = t.best_value
    if t.steps is not None:
        out["steps_to_target"] = float(t.steps)
        out["time_to_target_s"] = t.steps * step_s
        if result.time_to_target_s:
            out["regret"] = t.steps * step_s / result.time_to_target_s
    return {f"{GROUP}/{k}": v for k, v in out.items()}


def _experiment(result: StudyResult) -> Any:
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp  # .api needs TensorFlow; this part does not

    trials = result.trials
    flags = hp.Discrete([False, True])
    lrs = [t.lr for t in trials]
    params = [
        hp.HParam("batch_size", hp.Discrete(sorted({t.batch_size for t in trials})), display_name="batch size"),
        hp.HParam("lr", hp.RealInterval(min(lrs), max(lrs))),
        hp.HParam("lr_factor", hp.RealInterval(min(t.lr_factor for t in trials), max(t.lr_factor for t in trials)),
                  description="the LR over the scaling rule's centre at this B"),
        hp.HParam("seed", hp.Discrete(sorted({t.seed for t in trials}))),
        hp.HParam("status", hp.Discrete(sorted({t.status for t in trials}))),
        hp.HParam("recommended", flags, description="the recommended batch size and LR"),
        hp.HParam("chosen", flags, description="the LR this batch size's answer uses"),
        hp.HParam("bracketed", flags, description="a worse LR ran on each side of this B's best"),
        hp.HParam("in_band", flags, display_name="in band",
                  description="this B's time to target is within 10% of the best's, within the noise"),
    ]
    # TensorBoard ticks the first five of these by default, ordered by (not differs, name): the trial's identity
    # and outcome first; the rest are a tick away.
    first = {"batch_size", "lr", "seed", "status", "recommended"}
    pb = hp.hparams_config_pb(params, [hp.Metric(tag, display_name=name) for tag, name in _metrics(result)])
    plugin_data = pb.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in first
    plugin_data.content = data.SerializeToString()
    return pb, hp


def write_tensorboard(result: StudyResult) -> list[Path]:
    """Write the study's TensorBoard runs (both folders); returns the run folders written."""
    if not result.trials:
        return []
    from torch.utils.tensorboard import SummaryWriter

    root = Path(result.folder)
    experiment, hp = _experiment(result)
    builds = {name: root / f".{name}.tmp{os.getpid()}" for name in (CURVES, TRIALS)}
    for build in builds.values():
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()  # a study where no B reached the target still gets (empty) curves
    runs = []
    for i, t in enumerate(best_trials(result)):
        run = builds[CURVES] / f"bs{t.batch_size:07d}"
        with SummaryWriter(str(run)) as w:
            for p in t.curve:
                if p.value is not None:
                    w.add_scalar(result.monitor, p.value, p.step)
                    w.add_scalar(f"{result.monitor}_vs_samples", p.value, p.samples)
            _session(w, result, t, f"bs{t.batch_size:07d}", experiment if i == 0 else None, hp)
        runs.append(run)
    names: set[Path] = set()
    for i, t in enumerate(sorted(result.trials, key=lambda t: (t.batch_size, t.lr, t.seed))):
        again = ""
        while (run := builds[TRIALS] / f"bs{t.batch_size:07d}" / f"lr{t.lr:.4g}_seed{t.seed}{again}") in names:
            again += "_again"  # the same LR and seed twice (a resumed search): keep both
        names.add(run)
        with SummaryWriter(str(run)) as w:
            # The table's first column, sorted as text and cut short in the browser: B first, padded.
            _session(w, result, t, f"bs{t.batch_size:07d} lr{t.lr:.4g} seed{t.seed}{again}",
                     experiment if i == 0 else None, hp)
        runs.append(run)
    written = []
    for name, build in builds.items():
        final, old = root / name, root / f".{name}.old{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(build, final)
        shutil.rmtree(old, ignore_errors=True)
        written += [final / r.relative_to(build) for r in runs if build in r.parents]
    return written


def _session(writer: Any, result: StudyResult, t: Trial, trial_id: str, experiment: Any, hp: Any) -> None:
    """``t`` as an HParams session in ``writer``'s run (with the folder's experiment, where given)."""
    if experiment is not None:
        writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(hp.hparams_pb(hparams_of(result, t), trial_id=trial_id))
    for tag, value in _values(result, t).items():
        writer.add_scalar(tag, value, 0)
