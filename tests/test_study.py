"""``batchlab study`` end to end on tiny studies: every output written, resume without repeating a trial, a
different config refused, divergence recorded, the quick mode, and a second, different model and data."""

import csv
import json
import math
import signal

import pytest
import torch
from conftest import STUDY, scalars, signal_a_study

from batchlab import scaling
from batchlab.study import Study, StudySettings, fitting, noise, search, sweep
from batchlab.study import throughput as timing
from batchlab.study.results import Trial

# The tiny studies keep the notebook's positive features (the default study's are centred): their paths (which
# best LR sits at an edge, which B is cut for time) were laid out on that workload.
TINY = [
    "study", "-c", STUDY, "--data.x_range", "[0, 10]", "--data.n_samples", "2304", "--data.val_fraction", "0.111111", "--data.eval_batch_size",
    "256", "--grid", "[8, 64, 256]", "--target", "1.5", "--max_steps", "300", "--lr_factors", "[1, 2]",
    "--lr_extend", "0", "--gns_steps", "40", "--gns_points", "3", "--gns_batch_size", "256", "--gns_batches", "2",
    "--throughput_steps", "5", "--throughput_rounds", "1", "--warmup_steps", "2", "--seeds", "2", "--out", "study",
]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
SUMMARY_KEYS = {
    "recommended_batch_size", "recommended_lr", "b_crit", "s_min", "e_min", "b_simple", "alpha_s", "beta_s",
    "memory_max_batch_size", "target", "monitor", "grid", "quick_recommended_batch_size", "quick_regret",
    "within_10_percent", "regret",
}


@pytest.fixture
def steady_steps(monkeypatch):
    """Step times of a steady machine: which trials a study cuts for time follows the step times measured, so on a
    busy one the tiny study's path (not its mechanisms) would change from run to run."""
    monkeypatch.setattr(timing, "StepTimer", _synthetic_step_times(1e-3, 1e-6))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_tiny_study_writes_every_output(batchlab, tmp_path, steady_steps):
    result = batchlab(*TINY)
    assert result.code == 0, result.err
    root = tmp_path / "study"
    summary = json.loads((root / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["grid"] == [2, 8, 32, 64, 256], "2 and 32 are always measured"
    assert summary["memory_max_batch_size"] is None and summary["memory_bound"] is False
    best = summary["recommended_batch_size"]
    band = summary["within_10_percent"]
    assert best in band and 1.0 in [summary["regret"][str(b)] for b in band], "the fastest is in the band too"
    lo, hi = math.log(band[0]), math.log(band[-1])
    assert all(abs(math.log(best) - (lo + hi) / 2) <= abs(math.log(b) - (lo + hi) / 2) for b in band), "its middle"
    assert all(r is None or r >= 1.0 for r in summary["regret"].values())
    assert summary["alpha_s"] >= 0 and summary["beta_s"] >= 0 and summary["b_simple"] > 0
    entry = next(e for e in summary["batch_sizes"] if e["batch_size"] == best)
    # --lr_extend 0 and two factors: a best LR at an edge stays there, and is flagged as such.
    for e in summary["batch_sizes"]:
        lrs = sorted(float(r["lr"]) for r in csv.DictReader((root / "results.csv").open())
                     if int(r["batch_size"]) == e["batch_size"])
        if e.get("lr_at_edge") == "down":
            assert e["lr"] == pytest.approx(lrs[0])
        elif e.get("lr_at_edge") == "up":
            assert e["lr"] == pytest.approx(lrs[-1])
    assert summary["lr_at_edge"] == [e["batch_size"] for e in summary["batch_sizes"] if e.get("lr_at_edge")]
    assert summary["lr_at_edge"], "with two LRs per B and no extension some best LR sits at an edge"
    assert f"an edge of the range tried for B = {summary['lr_at_edge']}" in result.out
    assert entry["time_to_target_s"] == pytest.approx(entry["steps"] * entry["step_s"])
    assert entry["lr"] == summary["recommended_lr"]

    # The cost: every fit's steps and samples, counted as they ran, each a multiple of one run to target.
    cost, trials = summary["cost"], [json.loads(p.read_text()) for p in (root / "trials").glob("*.json")]
    assert cost["trials"] == len(trials) and cost["fits"] > cost["trials"]  # + throughput and reference runs
    assert cost["steps"] > sum(t["steps_run"] for t in trials) and cost["samples"] > cost["steps"]
    assert cost["samples"] == pytest.approx(
        sum(t["_cost"]["samples"] for t in trials) + json.loads((root / "gns.json").read_text())["_cost"]["samples"]
        + sum(json.loads(p.read_text())["_cost"]["samples"] for p in (root / "throughput").glob("*.json"))
        + 3 * 2 * 256)  # the noise estimates: three points of two batches of 256
    assert cost["samples_x"] == pytest.approx(cost["samples"] / (entry["steps"] * best))
    assert cost["steps_x"] == pytest.approx(cost["steps"] / entry["steps"])
    assert cost["wall_x"] == pytest.approx(cost["wall_s"] / entry["time_to_target_s"])
    trial_files = list((root / "trials").glob("*.json"))
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert len(rows) == len(trial_files)
    assert {int(r["seed"]) for r in rows} == set(summary["seeds"]) == {0, 1000}
    for b in summary["grid"]:
        # Two factors and no extension: at most the two LRs at the study's seed, unless the consistency step
        # re-searched this B around its neighbours' best LRs.
        here = [r for r in rows if int(r["batch_size"]) == b and r["seed"] == "0"]
        assert 1 <= len(here) <= (5 if b in summary["re_searched"] else 2), (b, here)
    assert {r["status"] for r in rows} <= {"reached", "budget", "pruned", "slow", "stalled", "diverged"}
    for row in rows:
        if row["status"] == "reached":
            assert int(row["steps"]) % 5 == 0 and int(row["samples"]) >= int(row["steps"]) * int(row["batch_size"]) - 256
    for plot in ("steps_to_target.png", "throughput.png", "time_to_target.png", "curves.png", "noise_scale.png"):
        assert (root / plot).stat().st_size > 1000, plot
    report = (root / "report.md").read_text()
    assert "| B | best lr |" in report and "![time_to_target.png](time_to_target.png)" in report
    assert "Recommended batch size" in result.out and "studies" not in summary["folder"]

    runs = sorted((root / "tensorboard").iterdir())
    reached = [e["batch_size"] for e in summary["batch_sizes"] if e["steps"] is not None]
    assert [r.name for r in runs] == [f"bs{b:07d}" for b in reached]
    tags = scalars(runs[0])
    curve = tags["val/loss_vs_samples"]
    assert [s for s, _ in curve] == sorted(s for s, _ in curve) and curve[-1][1] <= 1.5
    # One HParams session per trial, every LR and seed, holding that trial's own steps to target.
    sessions = sorted((root / "tensorboard_trials").glob("bs*/*"))
    assert len(sessions) == len(rows)
    some = next(r for r in rows if r["status"] == "reached")
    run = root / "tensorboard_trials" / f"bs{int(some['batch_size']):07d}" / \
        f"lr{float(some['lr']):.4g}_seed{some['seed']}"
    assert scalars(run)["zz_hparams/steps_to_target"][-1][1] == float(some["steps"])


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_rerunning_a_finished_study_repeats_no_measurement(batchlab, tmp_path, steady_steps, monkeypatch):
    assert batchlab(*TINY).code == 0
    summary = (tmp_path / "study" / "summary.json").read_text()
    measurements = {k: v for k, v in _files(tmp_path / "study").items() if k.parts[0] in ("trials", "throughput")}

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished measurement was repeated")

    monkeypatch.setattr(fitting.Fitter, "fit", no_fit)
    result = batchlab(*TINY)
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "study" / "summary.json").read_text()) == json.loads(summary)
    after = {k: v for k, v in _files(tmp_path / "study").items() if k.parts[0] in ("trials", "throughput")}
    assert after == measurements


def test_an_interrupted_study_keeps_finished_trials_and_runs_only_the_rest(batchlab, tmp_path, steady_steps, monkeypatch):
    real = sweep._run_trial
    calls = []

    def interrupted_after_three(study, batch_size, lr, factor, seed, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((batch_size, round(lr, 12), seed))
        return real(study, batch_size, lr, factor, seed, *args)

    monkeypatch.setattr(sweep, "_run_trial", interrupted_after_three)
    assert batchlab(*TINY).code == 130
    assert len(list((tmp_path / "study" / "trials").glob("*.json"))) == 3
    first = list(calls)
    calls.clear()

    def counted(study, batch_size, lr, factor, seed, *args):
        calls.append((batch_size, round(lr, 12), seed))
        return real(study, batch_size, lr, factor, seed, *args)

    monkeypatch.setattr(sweep, "_run_trial", counted)
    assert batchlab(*TINY).code == 0
    assert not set(calls) & set(first), "no finished trial ran again"
    assert len(calls) == len(list((tmp_path / "study" / "trials").glob("*.json"))) - 3


def test_a_folder_of_the_old_format_is_refused_with_one_line_naming_fresh(batchlab, tmp_path):
    assert batchlab(*TINY, "--quick").code == 0
    root = tmp_path / "study"
    fingerprint = json.loads((root / "study.json").read_text())
    del fingerprint["format"]  # as batchlab wrote it before the format was named
    (root / "study.json").write_text(json.dumps(fingerprint))
    before = _files(root)
    result = batchlab(*TINY)
    assert result.code == 2
    last = result.err.strip().splitlines()
    assert len(last) == 1 and "older batchlab (folder format 1" in last[0] and "--fresh" in last[0], result.err
    assert "Traceback" not in result.err and _files(root) == before


def test_a_folder_made_with_another_config_is_refused_and_kept(batchlab, tmp_path):
    # Quick studies: their measurements (noise scale, throughput) belong to the configuration as a full study's do.
    assert batchlab(*TINY, "--quick").code == 0
    before = _files(tmp_path / "study")
    changed = [a if a != "1.5" else "1.4" for a in TINY]
    for args in (changed, [*changed, "--quick"]):
        result = batchlab(*args)
        assert result.code == 2
        last = result.err.strip().splitlines()[-1]
        assert "different configuration (changed: study.target)" in last and "--fresh" in last
        assert _files(tmp_path / "study") == before
    result = batchlab(*changed, "--fresh", "--quick")
    assert result.code == 0, result.err
    assert _files(tmp_path / "study") == before
    assert json.loads((tmp_path / "study-2" / "quick.json").read_text())["target"] == 1.4


def test_a_diverging_learning_rate_is_recorded_not_a_crash(batchlab, tmp_path):
    args = [a for a in TINY]
    args[args.index("[8, 64, 256]")] = "[8]"
    result = batchlab(*args, "--base_lr", "5.0", "--base_batch_size", "8", "--lr_factors", "[1]")
    assert result.code == 0, result.err
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert {r["status"] for r in rows} == {"diverged"}
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["recommended_batch_size"] is None and "nothing reached the target" in summary["recommended_by"]
    # The noise scale's reference run diverged too: its B_simple can only come from the initial weights, and the
    # answer says so instead of passing it off as a measurement of training.
    assert summary["reference_diverged_at"] is not None and summary["b_simple_steps"] == [0]
    assert "reference run diverged at step" in result.out and "initial weights alone" in result.out


def _synthetic_step_times(alpha, beta):
    """A StepTimer that records every timed step as exactly alpha + beta B seconds: the quick answer then depends
    on the noise scale and these numbers only, not on how fast or busy the machine is."""

    class SyntheticStepTimer(timing.StepTimer):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self.warmup:
                self.times.append(alpha + beta * len(batch[0]))

    return SyntheticStepTimer


@pytest.mark.parametrize("beta", [1e-5, 0.0], ids=["per-sample-cost", "flat"])
def test_quick_mode_recommends_from_noise_scale_and_throughput_alone(batchlab, tmp_path, monkeypatch, beta):
    alpha = 2e-3
    monkeypatch.setattr(timing, "StepTimer", _synthetic_step_times(alpha, beta))
    result = batchlab(*TINY, "--quick")
    assert result.code == 0, result.err
    root = tmp_path / "study"
    quick = json.loads((root / "quick.json").read_text())
    assert quick["quick"] is True and not (root / "trials").exists() and not (root / "summary.json").exists()
    assert [e["step_s"] for e in quick["batch_sizes"]] == pytest.approx([alpha + beta * b for b in quick["grid"]])
    assert quick["alpha_s"] == pytest.approx(alpha) and quick["beta_s"] == pytest.approx(beta, abs=1e-12)
    if beta > 0:
        expected = math.sqrt(quick["b_simple"] * alpha / beta)
        assert quick["quick_b_star"] == pytest.approx(expected)
        assert quick["quick_recommended_batch_size"] == scaling.nearest_in_grid(expected, quick["grid"])
    else:
        # A flat step time makes B* unbounded: JSON null, and the quick answer is the largest batch of the grid.
        assert quick["beta_s"] == 0.0 and quick["quick_b_star"] is None
        assert quick["quick_recommended_batch_size"] == max(quick["grid"])
    assert quick["recommended_batch_size"] == quick["quick_recommended_batch_size"] in quick["grid"]
    gns = json.loads((root / "gns.json").read_text())
    assert gns["method"] == "per_example" and len(gns["points"]) == 3
    assert [p["step"] for p in gns["points"]] == [0, 20, 40]
    # B_simple pools the points of training, numerator and denominator apart; the initial weights are only shown.
    assert gns["averaged_steps"] == [20, 40] and gns["reference_diverged_at"] is None
    later = gns["points"][1:]
    assert gns["b_simple"] == pytest.approx(sum(p["trace"] for p in later) / sum(p["g2"] for p in later))
    assert gns["points"][0]["b_simple_ema"] is None and gns["points"][1]["b_simple_ema"] == pytest.approx(
        later[0]["b_simple"])
    assert (root / "quick.md").is_file() and "(quick)" in result.out
    if beta > 0:
        # A full study in the same folder reuses the noise scale and the throughput already measured.
        throughput = {k: v for k, v in _files(root).items() if k.parts[0] == "throughput"}
        assert batchlab(*TINY).code == 0
        assert json.loads((root / "gns.json").read_text()) == gns
        assert {k: v for k, v in _files(root).items() if k.parts[0] == "throughput"} == throughput
        summary = json.loads((root / "summary.json").read_text())
        assert summary["quick_recommended_batch_size"] == quick["quick_recommended_batch_size"]


def test_any_lightning_module_and_datamodule_by_class_path(batchlab, tmp_path, steady_steps):
    result = batchlab(
        "study", "--model.class_path", "study_models.Classifier", "--data.class_path", "study_models.Blobs",
        # Blobs close enough (Bayes accuracy ~0.79) that the target takes tens of steps, more at small B: the fit
        # and the recommendation get real work, not a target every B reaches at its first check.
        "--data.separation", "0.4", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--monitor",
        "val/acc", "--mode", "max", "--target", "0.77", "--grid", "[4, 64]", "--max_steps", "300", "--lr_factors",
        "[1, 3]", "--lr_extend", "0",
        # No cut for time: which trials a cut stops depends on the step times measured, so on the machine.
        "--stop_regret", "1000",
        "--lr_rule", "none", "--gns_steps", "20", "--gns_points", "2", "--gns_batch_size", "128",
        "--throughput_steps", "5", "--throughput_rounds", "1", "--warmup_steps", "2", "--out", "other",
    )
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "other" / "summary.json").read_text())
    assert summary["monitor"] == "val/acc" and summary["mode"] == "max"
    assert summary["base_lr"] == 1e-3 and summary["base_batch_size"] == 16
    assert summary["recommended_batch_size"] in (2, 4, 32, 64)
    assert summary["b_simple_method"] == "per_example"
    rows = list(csv.DictReader((tmp_path / "other" / "results.csv").open()))
    # No scaling rule and no extension: 1e-3 and 3e-3 at the first B, the ridge (a neighbour's best) times them
    # at the next ones, and the consistency step's LRs around a neighbour's best: all 1e-3 x 3^k.
    assert {1e-3, 3e-3} <= {float(r["lr"]) for r in rows}
    assert all(math.log(float(r["lr"]) / 1e-3, 3) == pytest.approx(round(math.log(float(r["lr"]) / 1e-3, 3)))
               for r in rows)
    assert any(r["status"] == "reached" and float(r["best_value"]) >= 0.77 for r in rows)
    steps = {e["batch_size"]: e["steps"] for e in summary["batch_sizes"]}
    reached = [steps[b] for b in sorted(steps) if steps[b] is not None]
    assert steps[64] is not None and reached == sorted(reached, reverse=True), steps  # never more at a larger B
    # The fit's parameters, and a word on whether they describe the points (model_b_star also needs t(B) to grow:
    # timing, not asserted).
    assert summary["b_crit"] >= 0 and summary["s_min"] > 0 and summary["fit"]["note"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "null"], "--target is required"),
        (["--grid", "[0, 8]"], "grid=0 is not allowed: use a positive integer"),
        (["--grid", "[2.5]"], "grid=2.5 is not allowed: use a positive integer"),
        (["--grid", "[1048576]"], "above the cap of 2048"),
        (["--lr_factors", "[]"], "lr_factors=[]"),
        (["--max_steps", "0"], "max_steps=0"),
        (["--seeds", "0"], "seeds=0 is not allowed: use a positive integer"),
        (["--seeds", "-1"], "seeds=-1 is not allowed: use a positive integer"),
        (["--seeds", "abc"], "seeds='abc' is not allowed: use a positive integer"),
        (["--stop_regret", "1.05"], "stop_regret=1.05 is not allowed: use a number above 1.1"),
        (["--lr_rule", "cubic"], "lr_rule='cubic'"),
        (["--monitor", "val/nope"], "does not log monitor='val/nope'"),
        (["--target", "nan"], "target=nan is not allowed"),
        (["--gns_batch_size", "1"], "gns_batch_size=1 is not allowed"),
        (["--gns_batch_size", "100000"], "gns_batch_size=100000 is not allowed"),
        (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches=2 is not allowed in a study"),
        (["--model.class_path", "study_models.ManualClassifier", "--data.class_path", "study_models.Blobs",
          "--monitor", "val/acc"], "uses manual optimization"),
        # Under DDP batch sizes are global; these are refused before any rank is started.
        ([*DDP, "--grid", "[3, 8]"], "grid entries [3] are not allowed on 2 devices: batch sizes are global, use "
                                     "multiples of 2"),
        ([*DDP, "--gns_batch_size", "255"], "gns_batch_size=255 is not allowed on 2 devices"),
        ([*DDP, "--base_batch_size", "5"], "base_batch_size=5 is not allowed on 2 devices"),
        (["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
         "strategy=ddp_spawn is not allowed in a study on 2 devices: use ddp"),
    ],
)
def test_bad_study_input_is_a_one_line_error(batchlab, tmp_path, args, message):
    result = batchlab(*TINY, *args)
    assert result.code == 2, result.err[-500:]
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("batchlab: error: ") and message in last, last
    assert "Traceback" not in result.err
    assert not (tmp_path / "study").exists(), "refused before anything is written"


def test_a_study_folder_that_cannot_be_made_is_a_one_line_error(batchlab, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = batchlab(*[a if a != "study" or i == 0 else "taken/study" for i, a in enumerate(TINY)])
    assert result.code == 2 and "cannot create the study folder taken/study" in result.err.strip().splitlines()[-1]
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


@pytest.mark.slow
def test_the_default_study_shows_the_regimes_with_b_crit_inside_the_grid(batchlab, tmp_path):
    result = batchlab("study", "-c", STUDY)
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "studies" / "toy" / "summary.json").read_text())
    assert min(summary["grid"]) < summary["b_crit"] < max(summary["grid"])
    assert summary["recommended_batch_size"] is not None and summary["quick_regret"] is not None


def test_a_rejected_configuration_leaves_no_folder_behind(batchlab, tmp_path):
    result = batchlab(*TINY, "--monitor", "val/typo")
    assert result.code == 2 and "does not log monitor='val/typo'" in result.err
    assert not (tmp_path / "study").exists()
    assert batchlab(*TINY, "--quick").code == 0, "the corrected command runs in the same folder"


def test_a_model_torch_func_cannot_vmap_gets_the_two_batch_noise_estimate(batchlab, tmp_path):
    result = batchlab(
        "study", "--model.class_path", "study_models.NormedClassifier", "--data.class_path", "study_models.Blobs",
        "--trainer.accelerator", "cpu", "--monitor", "val/acc", "--mode", "max", "--quick", "--grid", "[4, 64]",
        "--gns_steps", "20", "--gns_points", "2", "--gns_batch_size", "256", "--throughput_steps", "3", "--throughput_rounds", "1",
        "--warmup_steps", "1", "--out", "normed",
    )
    assert result.code == 0, result.err
    gns = json.loads((tmp_path / "normed" / "gns.json").read_text())
    assert gns["method"] == "two_batch" and math.isfinite(gns["b_simple"])
    assert "two_batch gradients" in result.out


def _result(factor, status, best_value, steps=None):
    return Trial(batch_size=8, lr=1e-3 * factor, lr_factor=factor, seed=0, status=status, steps=steps, samples=None,
                 seconds_to_target=None, steps_run=steps or 100, max_steps=100, wall_s=1.0, best_value=best_value,
                 final_value=best_value, curve=[])


@pytest.mark.parametrize(
    ("results", "direction"),
    [
        ([_result(0.5, "reached", 1.0, 90), _result(1, "reached", 1.0, 80), _result(2, "reached", 1.0, 70)], "up"),
        ([_result(0.5, "reached", 1.0, 60), _result(1, "reached", 1.0, 80), _result(2, "stalled", 3.0)], "down"),
        ([_result(0.5, "reached", 1.0, 90), _result(1, "reached", 1.0, 60), _result(2, "reached", 1.0, 70)], None),
        ([_result(0.5, "stalled", 2.4), _result(1, "stalled", 16.0), _result(2, "stalled", 8.8)], "down"),
        ([_result(0.5, "budget", 1.3), _result(1, "budget", 1.2), _result(2, "budget", 1.1)], "up"),
        ([_result(0.5, "diverged", None), _result(1, "diverged", None)], "down"),
        ([_result(0.5, "stalled", 1.4), _result(1, "stalled", 1.2), _result(2, "stalled", 3.0)], "down"),
        ([_result(0.5, "budget", 1.4), _result(1, "stalled", 1.2)], None),
    ],
)
def test_the_lr_grid_is_extended_towards_the_open_edge(results, direction):
    assert search.BatchSizeSearch(8, trials=results).open_side() == direction


def test_the_best_lr_among_equal_step_counts_is_the_one_tried_first_not_the_faster_wall_clock():
    tried_first, later = _result(1, "reached", 1.0, 80), _result(2, "reached", 1.0, 80)
    later.wall_s = 0.5  # noise: the same steps at the same batch size
    assert sweep.best_trial([tried_first, later]) is tried_first
    assert sweep.best_trial([later, tried_first]) is tried_first
    below = _result(0.5, "reached", 1.0, 80)
    assert sweep.best_trial([below, tried_first, later]) is tried_first
    assert sweep.best_trial([below, later]) is below, "0.5 and 2 are as near 1: the smaller LR"
    assert sweep.best_trial([later, _result(0.5, "reached", 1.0, 75)]).lr_factor == 0.5, "fewer steps win"


@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_real_signal_stops_a_study_cleanly_and_a_rerun_repeats_no_trial(batchlab, tmp_path, signum):
    """Sent to ``batchlab study`` running as a subprocess once three trials are written."""
    trials = tmp_path / "study" / "trials"
    code, out, err = signal_a_study(tmp_path, TINY, trials, signum)
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-2000:]
    assert "Traceback" not in err and f"study interrupted by {name}" in err.strip().splitlines()[-1]
    kept = {p.name: p.read_bytes() for p in trials.glob("*.json")}
    assert 3 <= len(kept) and not list(trials.glob(".*tmp*")), "finished trials kept, no half-written one"
    rerun = batchlab(*TINY)
    assert rerun.code == 0, rerun.err[-2000:]
    after = {p.name: p.read_bytes() for p in trials.glob("*.json")}
    rows = list(csv.DictReader((tmp_path / "study" / "results.csv").open()))
    assert len(after) == len(rows) > len(kept) and all(after[name] == data for name, data in kept.items())


def test_an_infinite_noise_scale_is_kept_as_null_and_a_resumed_study_reads_it_alike(batchlab, tmp_path, monkeypatch):
    """Where the mean gradient is lost in the noise, B_simple is infinite: stored as null, it must give the first
    run and a resumed one the same answer (the largest grid batch), and the report must draw without it."""
    monkeypatch.setattr(noise.scaling, "b_simple", lambda samples: math.inf)
    assert batchlab(*TINY, "--quick").code == 0
    root = tmp_path / "study"
    first = json.loads((root / "quick.json").read_text())
    assert first["b_simple"] is None and first["quick_b_star"] is None
    assert first["recommended_batch_size"] == max(first["grid"])
    gns = json.loads((root / "gns.json").read_text())
    assert gns["points"] and all(p["b_simple"] is None for p in gns["points"])
    assert batchlab(*TINY, "--quick").code == 0
    assert json.loads((root / "quick.json").read_text()) == first


def test_a_ddp_study_fingerprints_its_world_size(tmp_path):
    """Under torchrun or SLURM `devices` may read `auto` whatever the world size: the fingerprint names it, so that
    a folder measured on one device is not resumed on several (its batch sizes and base LR would mean others)."""
    from batchlab.data import ToyRegressionData
    from batchlab.model import MLPRegressor

    settings = StudySettings(target=1.5, out=str(tmp_path / "s"))
    one = Study(MLPRegressor(), ToyRegressionData(n_samples=64), {"accelerator": "cpu"}, settings)
    two = Study(MLPRegressor(), ToyRegressionData(n_samples=64),
                {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, settings)
    assert "world_size" not in one.fingerprint["machine"], "one-device folders made before keep matching"
    assert two.fingerprint["machine"]["world_size"] == 2
    assert two.base_batch_size == 2 * one.base_batch_size, "the configured batch size is per device"


def test_other_seeds_draw_their_own_initial_weights_without_touching_the_global_generator():
    from batchlab.model import MLPRegressor

    def weights(seed):
        model = MLPRegressor()
        fitting.reinitialise(model, seed)
        return [p.detach().clone() for p in model.parameters()]

    first, again, other = weights(1000), weights(1000), weights(2000)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "a seed's weights are the same every time"
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    model = MLPRegressor()
    before = torch.random.get_rng_state()
    fitting.reinitialise(model, 1000)
    assert torch.equal(torch.random.get_rng_state(), before), "the study's own data order is left as it was"
