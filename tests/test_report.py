"""What a study's user reads: the printout and report.md open with the answer, the band and the cost, then the
target, the fit and the flags; results.csv has every trial's seed; TensorBoard shows the curves first and one
HParams session per trial; the plots mark the answer and draw doubtful points hollow.

Every test builds a ``StudyResult`` by hand (no training), with one batch size of each kind: never reached,
re-searched, unbracketed, the best, and one where a seed failed and the steps were inconsistent.
"""

import csv
import re
from dataclasses import replace

import pytest
from conftest import hparams_plugin, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from batchlab.study import answer, board, plots
from batchlab.study.report import TRIAL_COLUMNS, format_study, write_report
from batchlab.study.results import (BatchSizeResult, CurvePoint, NoisePoint, NoiseScale, ScalingFitResult,
                                    StudyCost, StudyResult, Trial)

SEEDS = [0, 1000, 2000]
REC_LR = 0.004


def _trial(b, lr, seed, status, steps=None):
    curve = [CurvePoint(step=k * 20, samples=k * 20 * b, seconds=k * 0.1, value=2.0 / (1 + k)) for k in range(1, 6)]
    return Trial(batch_size=b, lr=lr, lr_factor=lr / 0.002, seed=seed, status=status, steps=steps,
                 samples=steps * b if steps else None, seconds_to_target=steps * 1e-3 if steps else None,
                 steps_run=steps or 300, max_steps=300, wall_s=0.5, best_value=0.3, final_value=0.31, curve=curve)


def _entry(b, steps, by_seed, **kw):
    step_s = 1e-3 * (1 + b / 256)
    e = BatchSizeResult(batch_size=b, step_s=step_s, samples_per_s=b / step_s, lr_trials=3, re_searched=False,
                        inconsistent=False)
    if steps is None:
        e.never_reached = ["budget"]
        return replace(e, **kw)
    e = replace(e, steps=steps, measured_steps=steps, samples=steps * b, lr=kw.pop("lr", 0.002),
                time_to_target_s=steps * step_s, trial_wall_s=0.5, steps_by_seed=by_seed, spread=0.1,
                seeds_failed=0, bracketed=True, unbracketed_reason=None, fitted_steps=steps * 1.05)
    return replace(e, **kw)


def _result(tmp_path, **kw):
    batch_sizes = [
        _entry(2, None, None),
        _entry(8, 400.0, [400, 440, 380], re_searched=True),
        _entry(32, 56.0, [52, 60, 56], lr=0.003, bracketed=False, lr_at_edge="up",
               unbracketed_reason="cap: --lr_extend 3 more LRs tried upward, the best still at that edge"),
        _entry(128, 40.0, [40, 45, 36], lr=REC_LR),
        _entry(512, 30.0, [28, None, 31], seeds_failed=1, inconsistent=True, fitted_steps=None),
    ]
    best = batch_sizes[3].time_to_target_s
    for e in batch_sizes:
        if e.time_to_target_s is not None and not e.seeds_failed:  # a failed seed's B decides nothing
            e.regret = e.measured_regret = e.time_to_target_s / best
            e.regret_low, e.regret_high = e.regret * 0.9, e.regret * 1.1
            e.fitted_regret = e.regret * 1.05
    trials = [_trial(2, 0.001, 0, "budget"), _trial(2, 0.002, 0, "budget")]
    for e in batch_sizes[1:]:
        trials.append(_trial(e.batch_size, e.lr / 2, 0, "pruned"))
        trials += [_trial(e.batch_size, e.lr, seed, "reached" if n else "budget", n)
                   for seed, n in zip(SEEDS, e.steps_by_seed)]
    noise = NoiseScale(b_simple=50.0, method="per_example", reference_batch_size=32, reference_lr=0.002,
                       estimate_batch_size=256, batches_per_point=2, averaged_steps=[20, 40],
                       reference_diverged_at=None,
                       points=[NoisePoint(0, 0, None, 10.0, 5.0, 0.5),
                               NoisePoint(20, 640, 1.0, 1.0, 40.0, 40.0, b_simple_ema=40.0),
                               NoisePoint(40, 1280, 0.5, 0.5, 30.0, 60.0, b_simple_ema=50.0)])
    result = StudyResult(
        quick=False, target=0.35, monitor="val/loss", mode="min", grid=[2, 8, 32, 128, 512], train_samples=4096,
        device="cpu", world_size=1, memory_max_batch_size=None, memory_bound=False, alpha_s=1e-3, beta_s=4e-6,
        b_simple=50.0, b_simple_method="per_example", b_simple_ranks=None, b_simple_steps=[20, 40],
        reference_diverged_at=None, quick_b_star=15.8, quick_recommended_batch_size=32, lr_rule="sqrt",
        base_lr=0.002, base_batch_size=32, folder=tmp_path, batch_sizes=batch_sizes, recommended_batch_size=128,
        recommended_lr=REC_LR, recommended_by="least estimated time to target", trials=trials, noise_scale=noise,
        cost=StudyCost(samples=1_234_567, steps=20_800, wall_s=22.4, trials=len(trials), fits=40,
                       samples_x=1_234_567 / (40 * 128), steps_x=20_800 / 40, wall_x=22.4 / best),
        seeds=SEEDS, spread=0.15,
        fit=ScalingFitResult(s_min=25.0, e_min=250.0, b_crit=24.5, rms_log_residual=0.05, chi2_per_dof=0.8,
                             describes=True, note="the model describes the points within their noise"),
        s_min=25.0, e_min=250.0, b_crit=24.5, model_b_star=15.0, time_to_target_s=best,
        within_10_percent=[32, 128], lr_at_edge=[32], unbracketed=[32], re_searched=[8], inconsistent=[512],
        regret={e.batch_size: e.regret for e in batch_sizes}, quick_regret=batch_sizes[2].regret,
        best_value_reached=0.3, target_note="the best val/loss any trial reached was 0.3 (target 0.35)",
    )
    return replace(result, **kw)


def test_the_printout_opens_with_the_answer_its_band_and_the_cost(tmp_path):
    lines = format_study(_result(tmp_path)).splitlines()
    assert lines[1] == "batchlab study"
    assert lines[2] == ("  Recommended batch size: 128 at lr 0.004; band [32..128] (within 10% of the best time to "
                        "target, allowing for a spread of 0.15 in log steps over 3 seeds).")
    # 1,234,567 samples / (40 steps x 128) = 241x; 20,800 / 40 = 520x; 22.4 s / 0.06 s = 373x: 2 digits each.
    assert lines[3] == ("  Cost: 1.23M samples, 20,800 steps, 22.4 s in 18 trials (40 fits): 240x / 520x / 370x one "
                        "run to target at the recommendation (samples / steps / time).")
    assert lines[4].startswith("  Target val/loss <= 0.35: the best val/loss any trial reached was 0.3")
    assert lines[5].startswith("  Fitted S(B) = S_min (1 + B_crit / B): S_min = 25 steps, B_crit = 24.5")


def test_the_flags_follow_the_fit_and_each_batch_size_row_carries_its_own(tmp_path):
    text = format_study(_result(tmp_path))
    fit = text.index("Fitted S(B)")
    for flag in ("Unbracketed at B = 32: cap: --lr_extend 3 more LRs tried upward", "Re-searched B = [8]",
                 "Inconsistent B = [512]", "Seeds failed at the chosen LR: B = 512 (1 of 3)",
                 "Never reached the target: B = 2 (ran out of --max_steps)"):
        assert text.index(flag) > fit, flag
    assert text.index("Never reached") < text.index("Gradient noise scale")  # flags before the details
    rows = {r["B"]: r for r in answer.rows(_result(tmp_path))}
    assert rows["8"]["flags"] == "re-searched" and rows["32"]["flags"] == "unbracketed (cap)"
    assert rows["512"]["flags"] == "inconsistent, 1/3 seeds failed" and rows["128"]["flags"] == ""
    assert rows["128"]["band"] == "chosen" and rows["32"]["band"] == "yes" and rows["8"]["band"] == ""
    assert rows["8"]["steps"] == "400 ±0.10" and rows["8"]["seeds"] == "400, 440, 380"
    assert rows["512"]["seeds"] == "28, -, 31" and rows["32"]["lr"] == "0.003 ^"
    # 400 steps x 1.03 ms over the best's 0.06 s, one standard error either way.
    assert rows["8"]["regret"] == "6.88 [6.19-7.56]" and rows["512"]["regret"] == "-"
    assert rows["2"]["steps"] == "never (budget)"
    table = text[text.index("  B       lr"):].splitlines()
    assert [line.split()[0] for line in table[1:6]] == ["2", "8", "32", "128", "512"]
    assert table[3].rstrip().endswith("unbracketed (cap)")


def test_a_fit_that_does_not_describe_the_points_quotes_no_b_crit(tmp_path):
    fit = ScalingFitResult(s_min=25.0, e_min=250.0, b_crit=24.5, rms_log_residual=0.6, chi2_per_dof=12.0,
                           describes=False, note="the model does not describe the points (chi2/dof 12, worst point "
                                                 "2.1x the fit): B_crit is not a finding")
    text = format_study(_result(tmp_path, fit=fit))
    assert "B_crit is not a finding" in text and "24.5" not in text and "B_crit = " not in text


def test_one_seed_allows_for_no_spread_and_a_quick_study_prints_no_seconds(tmp_path):
    one = format_study(_result(tmp_path, seeds=[0], spread=None)).splitlines()[2]
    assert one.endswith("band [32..128] (within 10% of the best time to target, one seed, so no spread between "
                        "seeds allowed for).")
    quick = _result(tmp_path, quick=True, recommended_by="quick: sqrt(B_simple * alpha / beta)",
                    cost=StudyCost(samples=50_000, steps=300, wall_s=3.3, trials=0, fits=16))
    lines = format_study(quick).splitlines()
    assert lines[2].startswith("  Recommended batch size: 128 at lr 0.004 (quick: ")
    assert lines[3] == "  Cost: 50k samples, 300 steps in 16 short fits (no steps-to-target trials)."


def test_report_md_puts_the_answer_first_and_each_plot_under_its_paragraph(tmp_path):
    result = _result(tmp_path)
    write_report(result)
    md = (tmp_path / "report.md").read_text()
    order = ["**Recommended batch size: 128", "**Cost: 1.23M samples", "- Target val/loss <= 0.35", "- Fitted S(B)",
             "- Unbracketed at B = 32", "- Seeds failed", "| B | best lr |"]
    at = [md.index(s) for s in order]
    assert at == sorted(at)
    sections = re.findall(r"^## (.+)$", md, flags=re.M)
    assert sections == ["Time to target", "Steps to target", "Throughput", "Validation curves",
                        "Gradient noise scale along the reference run"]
    for section, png in zip(sections, ["time_to_target", "steps_to_target", "throughput", "curves", "noise_scale"]):
        body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert f"![{png}.png]({png}.png)" in body, section
        assert body.strip().split("\n")[0] and not body.strip().startswith("!"), "a paragraph before the plot"
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000


def test_results_csv_has_every_trials_seed(tmp_path):
    result = _result(tmp_path)
    write_report(result)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert list(rows[0]) == TRIAL_COLUMNS and "seed" in TRIAL_COLUMNS
    assert sorted((int(r["batch_size"]), float(r["lr"]), int(r["seed"])) for r in rows) == sorted(
        (t.batch_size, t.lr, t.seed) for t in result.trials)
    assert {int(r["seed"]) for r in rows if r["batch_size"] == "128"} == set(SEEDS)


def _sessions(root):
    """Every HParams session under the study's tensorboard folder: {run folder: hyperparameters}."""
    out = {}
    for events in root.rglob("events.out.tfevents.*"):
        try:
            params, _ = hparams_plugin(events.parent)
        except KeyError:  # a curve's run, no session
            continue
        out[events.parent] = params
    return out


def test_tensorboard_shows_the_curves_first_and_one_hparams_session_per_trial(tmp_path):
    result = _result(tmp_path)
    write_report(result)
    tb, every = tmp_path / "tensorboard", tmp_path / "tensorboard_trials"
    curve = scalars(tb / "bs0000128")
    trial = next(t for t in result.trials if (t.batch_size, t.lr, t.seed) == (128, REC_LR, 0))
    assert curve["val/loss"] == [(p.step, pytest.approx(p.value)) for p in trial.curve]
    assert [s for s, _ in curve["val/loss_vs_samples"]] == [p.samples for p in trial.curve]
    # The curves' folder holds one run per batch size that reached the target (TensorBoard selects none of a
    # folder's runs by default beyond 40), each its chosen trial's session; every trial is in the other folder.
    assert sorted(p.name for p in tb.iterdir()) == ["bs0000008", "bs0000032", "bs0000128", "bs0000512"]
    assert "val/loss" not in scalars(every / "bs0000002/lr0.001_seed0")
    chosen = _sessions(tb)
    assert sorted((p["batch_size"], p["lr"], p["seed"], p["chosen"]) for p in chosen.values()) == sorted(
        (t.batch_size, t.lr, t.seed, True) for t in plots.best_trials(result))
    assert [p["recommended"] for p in chosen.values()].count(True) == 1

    sessions = _sessions(every)
    assert len(sessions) == len(result.trials)
    assert sorted((p["batch_size"], p["lr"], p["seed"]) for p in sessions.values()) == sorted(
        (t.batch_size, t.lr, t.seed) for t in result.trials)
    for params in sessions.values():
        assert {"batch_size", "lr", "seed", "status", "recommended", "bracketed", "in_band"} <= set(params)
        assert params["recommended"] == (params["batch_size"] == 128 and params["lr"] == REC_LR)
        assert params["in_band"] == (params["batch_size"] in (32, 128))
        assert params["bracketed"] == (params["batch_size"] in (8, 128, 512))
    assert sum(p["recommended"] for p in sessions.values()) == len(SEEDS)
    failed = next(run for run, p in sessions.items() if p["batch_size"] == 512 and p["status"] == "budget")
    assert "zz_hparams/steps_to_target" not in scalars(failed) and "zz_hparams/steps_run" in scalars(failed)

    # One experiment per folder names every column; every scalar sorts after the curves in TensorBoard's card order.
    for folder in (tb, every):
        experiments, tags = [], set()
        for run in {e.parent for e in folder.rglob("events.out.tfevents.*")}:
            acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
            acc.Reload()
            if "_hparams_/experiment" in acc.Tags()["tensors"]:
                experiments.append(run)
            tags |= set(acc.Tags()["scalars"])
        assert len(experiments) == 1, folder
        _, metric_tags = hparams_plugin(experiments[0])
        assert metric_tags == [f"zz_hparams/{m}" for m in ("steps_to_target", "time_to_target_s", "regret",
                                                          "best_value", "steps_run")]
        assert {t.split("/")[0] for t in tags} == ({"val", "zz_hparams"} if folder == tb else {"zz_hparams"})
        assert all(t.startswith("val/loss") or t.split("/")[0] > "val" for t in tags)


def test_rewriting_the_report_replaces_the_tensorboard_runs(tmp_path):
    write_report(_result(tmp_path))
    write_report(_result(tmp_path, recommended_batch_size=32, recommended_lr=0.003))
    sessions = _sessions(tmp_path / "tensorboard_trials")
    assert len(sessions) == len(_result(tmp_path).trials)
    assert {p["batch_size"] for p in sessions.values() if p["recommended"]} == {32}
    assert {p["batch_size"] for p in _sessions(tmp_path / "tensorboard").values() if p["recommended"]} <= {32}
    assert not list(tmp_path.glob(".tensorboard*"))


def test_the_plots_mark_the_band_and_the_recommendation_and_draw_flagged_points_hollow(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = _result(tmp_path)
    reached = [e for e in result.batch_sizes if e.time_to_target_s is not None]
    for draw in (plots._time_to_target, plots._steps_to_target):
        fig, ax = plt.subplots()
        draw(ax, result, reached)
        labels = [" ".join(t.get_text().split()) for t in ax.get_legend().get_texts()]
        assert "band [32..128]" in labels and "recommended B = 128" in labels
        assert "flagged: inconsistent, re-searched, seeds failed, unbracketed" in labels
        assert "target val/loss <= 0.35" in ax.get_title()
        hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white" and line.get_marker() == "o"]
        assert sorted(x for line in hollow for x in line.get_xdata()) == [8, 32, 512]
        bars = [c for c in ax.containers if c.has_yerr]
        assert bars, "error bars from the spread"
        never = [line for line in ax.lines if line.get_marker() == "x"]
        assert [list(line.get_xdata()) for line in never] == [[2]]
        plt.close(fig)

    fig, ax = plt.subplots()
    plots._noise_scale(ax, result)
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("step 0: initial weights") for t in texts)
    assert "left out of the average" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)

    fig, ax = plt.subplots()
    plots._curves(fig, ax, result)
    lines = [line for line in ax.lines if len(line.get_xdata()) > 1]
    colours = {tuple(line.get_color()) for line in lines if line.get_linewidth() > 1}
    assert len(colours) == 4, "one colour per batch size that reached the target, from a colormap"
    assert len(fig.axes) == 2, "a colorbar, not a legend of batch sizes"
    plt.close(fig)


def test_board_hparams_of_a_trial_at_a_batch_size_that_never_reached(tmp_path):
    result = _result(tmp_path)
    params = board.hparams_of(result, result.trials[0])
    assert params == {"batch_size": 2, "lr": 0.001, "lr_factor": 0.5, "seed": 0, "status": "budget",
                      "recommended": False, "chosen": False, "bracketed": False, "in_band": False}
    assert [answer.times(x) for x in (6_712.0, 41.2, 1.26)] == ["6,700x", "41x", "1.3x"]
    assert [answer.count(n) for n in (19_200_000, 556_134, 950)] == ["19.2M", "556k", "950"]
