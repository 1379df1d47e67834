"""``batchlab tune``, the finder inside ``fit`` and ``find_batch_size``: Lightning's search, its trials and why it
stopped, the batch size recorded everywhere it is reported, a search that changes nothing but the batch size, and
``BatchSizeSearch`` as a drop-in for Lightning's ``BatchSizeFinder``."""

import json
import math

import pytest
import yaml
from conftest import (CONFIGS, DEVICES, QUIET, SEED, hparams_plugin, load_summary, plain_trainer, run_dirs,
                      scalars)

from batchlab.data import ToyRegressionData
from batchlab.model import MLPRegressor
from batchlab.trials import Trial
from batchlab.tune import BatchSizeSearch, run_tune
from batchlab.tune_result import stop_reason

FIND = str(CONFIGS / "find_batch_size.yaml")
N1000 = ["--data.n_samples", "1000"]


def _tune(batchlab, tmp_path, *args):
    result = batchlab("tune", "-c", SEED, *QUIET, *args)
    assert result.code == 0, result.err
    log_dir = run_dirs(tmp_path)[-1]
    return json.loads((log_dir / "tune.json").read_text()), result.out


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_power_search_on_a_cpu_stops_at_the_dataset_and_says_memory_did_not_limit_it(batchlab, tmp_path):
    tune, out = _tune(batchlab, tmp_path, *N1000)
    assert tune["mode"] == "power" and tune["stopped_because"] == "dataset_size"
    assert [t["batch_size"] for t in tune["trials"]] == [2**k for k in range(1, 11)]
    assert all(t["ok"] for t in tune["trials"])
    assert tune["batch_size"] == 1024 and tune["effective_batch_size"] == 1000 and tune["dataset_size"] == 1000
    assert tune["device"] == "cpu" and tune["memory_limited"] is False
    assert "batch size found   1024" in out and "stopped because    dataset_size" in out
    assert "did not limit this search" in out and "largest batch tried was 1024" in out
    assert "batchlab study" in out


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_binsearch_applies_the_margin(batchlab, tmp_path):
    tune, out = _tune(batchlab, tmp_path, *N1000, "--mode", "binsearch", "--margin", "0.1")
    assert tune["mode"] == "binsearch" and tune["before_margin"] == 1024
    assert tune["batch_size"] == int(1024 * 0.9) == 921
    assert "1024 less the 10% margin gives 921" in out
    assert "batch size found   921 (--mode binsearch, starting at 2)" in out


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_tune_logs_the_size_found_to_tensorboards_hparams_against_what_the_search_measured(batchlab, tmp_path):
    tune, _ = _tune(batchlab, tmp_path, *N1000, "--mode", "binsearch", "--margin", "0.1")
    log_dir = run_dirs(tmp_path)[-1]
    params, metric_tags = hparams_plugin(log_dir)
    assert params["batch_size"] == tune["batch_size"] == 921 and params["batch_size_initial"] == 2
    assert params["n_samples"] == 1000
    assert {"hp/largest_batch_tried", "hp/trials"} <= set(metric_tags) and "hp_metric" not in metric_tags
    assert scalars(log_dir)["hp/largest_batch_tried"] == [(0, 1024.0)]
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["batch_size"] == 921 and hparams["batch_size_initial"] == 2


def test_a_max_val_stop_is_reported_as_such_and_the_untried_cap_is_replaced_by_the_largest_tried(batchlab, tmp_path):
    tune, out = _tune(batchlab, tmp_path, *N1000, "--max_val", "64")
    assert tune["stopped_because"] == "max_val" and tune["untried_corrected_from"] == 64
    assert [t["batch_size"] for t in tune["trials"]] == [2, 4, 8, 16, 32]
    assert tune["batch_size"] == 32 and tune["found_was_tried"]
    assert "Lightning's finder returned 64 but never tried it" in out and "32, the largest size tried" in out
    assert "to have 64 tried, raise --max_val above it" in out


def test_a_size_lightning_returns_above_max_val_untried_is_replaced_by_the_largest_tried(batchlab, tmp_path):
    tune, out = _tune(batchlab, tmp_path, *N1000, "--max_val", "100")
    assert tune["stopped_because"] == "max_val" and tune["untried_corrected_from"] == 128
    assert tune["batch_size"] == 64 == max(t["batch_size"] for t in tune["trials"])
    assert "Lightning's finder returned 128 but never tried it (above max_val=100)" in out


def test_binsearch_takes_its_margin_off_the_largest_size_tried_not_off_an_untried_cap(batchlab, tmp_path):
    # Lightning returns 100 (max_val, never run) less 20% = 80, above the largest size that ran.
    tune, out = _tune(batchlab, tmp_path, *N1000, "--mode", "binsearch", "--margin", "0.2", "--max_val", "100")
    assert max(t["batch_size"] for t in tune["trials"]) == 64 and tune["untried_corrected_from"] == 100
    assert tune["before_margin"] == 64 and tune["batch_size"] == int(64 * 0.8) == 51
    assert "Lightning's finder returned 100 but never tried it" in out
    assert "64 less the 20% margin gives 51" in out


def test_a_configured_batch_that_covers_the_data_is_one_trial_not_two(batchlab, tmp_path):
    tune, out = _tune(batchlab, tmp_path, *N1000, "--data.batch_size", "1024")
    assert tune["trials"] == [{"batch_size": 1024, "ok": True, "steps": 3, "peak_memory_bytes": None}]
    assert tune["stopped_because"] == "dataset_size"
    assert "(--mode power, starting at 1024)" in out


def test_binsearch_searches_beyond_lightnings_power_cap(batchlab, tmp_path):
    tune, _ = _tune(batchlab, tmp_path, "--data.n_samples", "20000", "--mode", "binsearch", "--margin", "0",
                    "--max_val", "100000", "--steps_per_trial", "1", "--init_val", "4096")
    assert [t["batch_size"] for t in tune["trials"]] == [4096, 8192, 16384, 32768]
    assert tune["stopped_because"] == "dataset_size" and tune["effective_batch_size"] == 20000


def test_a_max_trials_stop_is_reported_as_such_with_every_trial(batchlab, tmp_path):
    tune, _ = _tune(batchlab, tmp_path, *N1000, "--max_trials", "3", "--init_val", "4")
    assert tune["stopped_because"] == "max_trials" and tune["batch_size"] == 16
    assert [t["batch_size"] for t in tune["trials"]] == [4, 8, 16] and tune["found_was_tried"]


def test_a_lone_first_trial_is_recorded_and_is_the_size_found(batchlab, tmp_path):
    # Lightning says nothing of a search's last trial when max_trials ends it: here its only one.
    tune, out = _tune(batchlab, tmp_path, "--data.n_samples", "64", "--max_trials", "1")
    assert tune["trials"] == [{"batch_size": 2, "ok": True, "steps": 3, "peak_memory_bytes": None}]
    assert tune["batch_size"] == 2 and tune["found_was_tried"] and tune["stopped_because"] == "max_trials"
    assert "never tried" not in out and "the largest batch tried was 2" in out


def test_tune_never_overwrites_an_earlier_tune(batchlab, tmp_path):
    _tune(batchlab, tmp_path, *N1000, "--max_val", "8")
    first = run_dirs(tmp_path)[0] / "tune.json"
    before = first.read_text()
    _tune(batchlab, tmp_path, *N1000, "--max_val", "16")
    assert first.read_text() == before and len(run_dirs(tmp_path)) == 2


class RunsOutOfMemory(MLPRegressor):
    """Raises the allocator's own out-of-memory error above a batch size, as a GPU would."""

    limit = 100

    def training_step(self, batch, batch_idx):
        if len(batch[0]) > self.limit:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 12345 bytes.")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("mode", "found"), [("power", 64), pytest.param("binsearch", 100, marks=pytest.mark.slow)])
def test_an_out_of_memory_error_ends_the_search_and_is_named(tmp_path, mode, found):
    finder = BatchSizeSearch(mode=mode, margin=0.0)
    result = run_tune(plain_trainer(tmp_path), RunsOutOfMemory(), ToyRegressionData(n_samples=4096), finder)
    assert result.stopped_because == "out_of_memory" and result.memory_limited
    assert result.batch_size == found
    failed = [t.batch_size for t in result.trials if not t.ok]
    assert failed and min(failed) > RunsOutOfMemory.limit
    assert all(t.ok and t.steps == 3 for t in result.trials if t.batch_size <= RunsOutOfMemory.limit)
    assert all(t.steps is None for t in result.trials if not t.ok)


def test_the_reason_a_search_stopped_comes_from_its_trials_and_settings():
    ok, failed = Trial(2, ok=True, steps=3), Trial(4, ok=False, steps=None)
    assert stop_reason([ok, failed], "power", 25, None) == "out_of_memory"
    assert stop_reason([ok, Trial(4, ok=True, steps=3)], "power", 25, 4) == "dataset_size"
    assert stop_reason([ok], "power", 25, 100) == "max_val"
    assert stop_reason([ok], "power", 1, 100) == "max_trials"
    assert stop_reason([], "power", 0, 100) == "max_trials"
    # binsearch counts the trials that fit against max_trials, and always runs one.
    assert stop_reason([ok], "binsearch", 0, 100) == "max_trials"


def _fit_losses(batchlab, tmp_path, *args, n_samples=256, epochs=20):
    result = batchlab("fit", "-c", SEED, *QUIET, "--data.n_samples", str(n_samples), "--data.noise", "1",
                      "--trainer.max_epochs", str(epochs), *args)
    assert result.code == 0, result.err
    log_dir = run_dirs(tmp_path)[-1]
    return [v for _, v in scalars(log_dir)["train/loss"]], log_dir, result.out


def _finder(tmp_path, **init_args):
    """A config overlay like configs/find_batch_size.yaml with the finder's ``init_args``."""
    path = tmp_path / "finder.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "batchlab.tune.BatchSizeSearch", "init_args": init_args}]}}))
    return str(path)


def test_a_fit_after_a_corrected_search_trains_with_the_size_it_reports(batchlab, tmp_path):
    # Lightning builds the fit's dataloaders from its own answer, 100 (never run) less 20%: 80.
    finder = _finder(tmp_path, mode="binsearch", margin=0.2, max_val=100)
    _, log_dir, _ = _fit_losses(batchlab, tmp_path, "-c", finder, n_samples=1000, epochs=1)
    summary = load_summary(log_dir)
    assert summary["batch_size"] == 51 and summary["batch_size_search"]["untried_corrected_from"] == 100
    assert summary["steps"] == math.ceil(1000 / 51), "one epoch at the batch size reported"


def test_fit_with_the_finder_trains_with_the_size_found_and_reports_both_sizes(batchlab, tmp_path):
    _, log_dir, out = _fit_losses(batchlab, tmp_path, "-c", FIND)
    summary = load_summary(log_dir)
    assert summary["batch_size"] == 256 and summary["batch_size_initial"] == 2
    assert summary["steps"] == 20 and summary["samples_seen"] == 20 * 256
    assert summary["batch_size_search"]["stopped_because"] == "dataset_size"
    assert "from 2 to 256" in out and "256 per device, 256 global" in out
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["batch_size"] == 256 and hparams["batch_size_initial"] == 2
    params, _ = hparams_plugin(log_dir)
    assert params["batch_size"] == 256 and params["batch_size_initial"] == 2


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_a_search_changes_nothing_but_the_batch_size_and_repeats_exactly(batchlab, tmp_path):
    # Capped below the data so that the fit shuffles: each epoch's order is drawn from the global random state,
    # which the search's own trials draw from too.
    finder = _finder(tmp_path, max_val=32)
    fit = {"n_samples": 300, "epochs": 3}
    searched, log_dir, _ = _fit_losses(batchlab, tmp_path, "-c", finder, **fit)
    found = load_summary(log_dir)["batch_size"]
    assert found == 16 and len(searched) == 3 * math.ceil(300 / 16), "several shuffled batches per epoch"
    again, _, _ = _fit_losses(batchlab, tmp_path, "-c", finder, **fit)
    plain, _, _ = _fit_losses(batchlab, tmp_path, "--data.batch_size", str(found), **fit)
    assert searched == again
    assert searched == plain, "same initial weights and same shuffles as a fit without the search"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "foo"], "mode='foo'"),
        (["--max_val", "0"], "max_val=0"),
        (["--init_val", "100", "--max_val", "50"], "init_val=100 is not below max_val=50"),
        (["--init_val", "64", "--max_val", "64"], "init_val=64 is not below max_val=64"),
        (["--max_val", "100000"], "Lightning's power search stops at 8192"),
        (["--margin", "1.5"], "margin=1.5"),
        (["--max_trials", "-1"], "max_trials=-1"),
        (["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
         "does not run under strategy='ddp' (DDPStrategy, devices=2,"),
        (["--trainer.strategy", "ddp_spawn", "--trainer.accelerator", "cpu"],
         "does not run under strategy='ddp_spawn' (DDPStrategy, devices=1,"),
        (["--trainer.devices", "2", "--trainer.accelerator", "cpu"],
         "does not run under strategy='auto' (DDPStrategy, devices=2,"),
    ],
)
def test_bad_tune_input_is_a_one_line_error(batchlab, args, message):
    result = batchlab("tune", "-c", SEED, *QUIET, *args)
    assert result.code == 2
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("batchlab: error: ") and message in last, last
    assert "Traceback" not in result.err


def test_the_finder_inside_a_ddp_fit_is_refused_before_launch(batchlab):
    result = batchlab("fit", "-c", SEED, *QUIET, "-c", FIND, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--trainer.accelerator", "cpu")
    assert result.code == 2 and "does not run under strategy='ddp' (DDPStrategy" in result.err


@pytest.mark.parametrize("device", [d for d in DEVICES if not isinstance(d, str)])
def test_on_a_gpu_the_search_stops_on_out_of_memory_and_the_size_found_trains(batchlab, tmp_path, device):
    big = ["--model.hidden_sizes", "[8192, 8192]", "--data.n_samples", "2000000", "--trainer.accelerator", "gpu"]
    tune, out = _tune(batchlab, tmp_path, *big, "--mode", "binsearch", "--margin", "0", "--max_val", "4194304",
                      "--steps_per_trial", "1")
    assert tune["stopped_because"] == "out_of_memory", out
    assert all(t["peak_memory_bytes"] for t in tune["trials"])
    assert "hp/peak_memory_mib" in hparams_plugin(run_dirs(tmp_path)[-1])[1]
    found = str(tune["batch_size"])
    result = batchlab("fit", "-c", SEED, *QUIET, *big, "--data.batch_size", found, "--trainer.max_epochs", "1",
                      "--trainer.log_every_n_steps", "1")
    assert result.code == 0, result.err
    assert math.isfinite(load_summary(run_dirs(tmp_path)[-1])["train_loss"])
