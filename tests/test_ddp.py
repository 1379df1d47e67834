"""``batchlab fit`` under Lightning's DDP on two CPU processes (gloo), run for real as a subprocess: each rank
trains on its own shard of every epoch, the shuffle is ``DistributedSampler``'s, and rank 0 alone writes and
reports, with the global batch size = per device x devices x accumulated batches.

Lightning starts rank 1 by re-running the command line, so these tests run ``python -m batchlab.cli`` in a
subprocess and observe the ranks through ``probes.RecordSeenRows`` (or ``probes.RecordBatchSizes``, for
``NoiseScaleMonitor`` and ``BatchSizeWarmup``), a callback named on the command line.
"""

import csv
import json
import math
import re
import signal

import pytest
import torch
from conftest import (
    QUIET, SEED, STUDY, hparams_plugin, load_summary, run_command, run_dirs, scalars, signal_a_study, snapshot,
)
from torch.utils.data import DistributedSampler

from batchlab.data import ToyRegressionData

N, BATCH, EPOCHS = 256, 32, 3
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def _ddp_fit(tmp_path, seed, *args):
    seen = tmp_path / f"seen-{len(run_dirs(tmp_path))}"
    proc = run_command(
        tmp_path, "fit", "-c", SEED, *QUIET, *DDP, "--seed_everything", str(seed), "--data.n_samples", str(N),
        "--data.batch_size", str(BATCH), "--trainer.max_epochs", str(EPOCHS),
        "--trainer.callbacks+=probes.RecordSeenRows", f"--trainer.callbacks.out_dir={seen}", *args,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc, _seen_indices(seen)


def _seen_indices(seen) -> list[dict[int, list[int]]]:
    """Per rank, per epoch: the row numbers of the full data set that the rank trained on, in order."""
    x, _ = ToyRegressionData(n_samples=N).full_data()
    row_number = {tuple(row): i for i, row in enumerate(x.tolist())}
    assert len(row_number) == N  # the rows are distinct, so a row names its index
    ranks = [torch.load(seen / f"rank{rank}.pt") for rank in (0, 1)]
    return [{epoch: [row_number[tuple(r)] for r in rows.tolist()] for epoch, rows in by_epoch.items()}
            for by_epoch in ranks]


def _distributed_sampler_order(seed, epoch, rank) -> list[int]:
    sampler = DistributedSampler(range(N), num_replicas=2, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_ddp_ranks_see_disjoint_shards_that_cover_the_data_reshuffled_per_epoch_and_report_once(tmp_path):
    proc, seen = _ddp_fit(tmp_path, 0, "--trainer.accumulate_grad_batches", "2")
    for epoch in range(EPOCHS):
        rank0, rank1 = seen[0][epoch], seen[1][epoch]
        assert len(rank0) == len(rank1) == N // 2
        assert set(rank0).isdisjoint(rank1) and sorted(rank0 + rank1) == list(range(N))
        # Exactly DistributedSampler's order: a function of the seed and the epoch only, so reproducible.
        assert rank0 == _distributed_sampler_order(0, epoch, 0) and rank1 == _distributed_sampler_order(0, epoch, 1)
    assert seen[0][0] != seen[0][1] != seen[0][2]

    # One run folder, written by rank 0 alone: one summary, event files from one process, the summary printed once.
    (log_dir,) = run_dirs(tmp_path)
    assert sorted(p.name for p in log_dir.iterdir() if p.is_file() and not p.name.startswith("events")) == [
        "config.yaml", "hparams.yaml", "summary.json"]
    # The writing process' pid, read from the end of the name: the host name before it may hold dots.
    names = [p.name for p in log_dir.glob("events.out.tfevents.*")]
    writers = {re.fullmatch(r"events\.out\.tfevents\.\d+\..+\.(\d+)\.\d+", n).group(1) for n in names}
    assert names and len(writers) == 1, names
    assert proc.stdout.count("batchlab fit summary") == 1
    assert "32 per device, 128 global (x2 accumulated)" in proc.stdout
    assert "2 device(s) x 1 node(s)" in proc.stdout

    summary = load_summary(log_dir)
    steps_per_epoch = N // 2 // BATCH // 2  # rows per rank / batch / accumulated batches per step
    assert summary["global_batch_size"] == BATCH * 2 * 2 and summary["batch_size"] == BATCH
    assert summary["devices"] == 2 and summary["num_nodes"] == 1 and summary["accumulate_grad_batches"] == 2
    assert summary["steps"] == EPOCHS * steps_per_epoch and summary["samples_seen"] == EPOCHS * N
    assert summary["log_dir"] == str(log_dir.relative_to(tmp_path))
    (ckpt,) = (log_dir / "checkpoints").glob("*.ckpt")
    assert summary["checkpoint"] == str(ckpt.relative_to(tmp_path))

    params, _ = hparams_plugin(log_dir)
    assert params["global_batch_size"] == 128 and params["batch_size"] == 32 and params["devices"] == 2
    tags = scalars(log_dir)
    assert len(tags["train/loss"]) == summary["steps"]
    assert tags["train/loss_vs_samples"][-1][0] == EPOCHS * N


@pytest.mark.slow
def test_ddp_shuffle_is_reproducible_per_seed_and_a_second_run_leaves_the_first_untouched(tmp_path):
    _, first = _ddp_fit(tmp_path, 1)
    (first_dir,) = run_dirs(tmp_path)
    before = snapshot(first_dir)
    proc, again = _ddp_fit(tmp_path, 1)
    _, other_seed = _ddp_fit(tmp_path, 2)
    assert again == first and other_seed != first
    assert first[0][0] == _distributed_sampler_order(1, 0, 0)
    assert snapshot(first_dir) == before
    assert [d.name for d in run_dirs(tmp_path)] == ["version_0", "version_1", "version_2"]
    assert "32 per device, 64 global" in proc.stdout


# A study under DDP: every rank runs the same fits in step, B is global, rank 0's measurements count and rank 0
# alone writes.
STUDY_TINY = [
    "study", "-c", STUDY, "--data.n_samples", "2304", "--data.val_fraction", "0.111111", "--data.eval_batch_size",
    "256", "--target", "1.5", "--max_steps", "300", "--lr_extend", "0", "--gns_steps", "40", "--gns_points", "3",
    "--gns_batch_size", "256", "--gns_batches", "2", "--throughput_steps", "5", "--throughput_rounds", "1",
    "--warmup_steps", "2", "--base_batch_size", "32", "--seeds", "2",
]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_a_study_under_ddp_trains_global_batches_and_estimates_the_noise_as_one_device_does(batchlab, tmp_path):
    """(That a rerun under DDP repeats nothing is tested with the interrupted study, below.)"""
    args = [*STUDY_TINY, "--grid", "[8, 64]", "--lr_factors", "[1]"]
    proc = _ok(run_command(tmp_path, *args, "--out", "ddp", *DDP))
    assert proc.stdout.count("batchlab study\n") == 1 and "x 2 ranks (DDP" in proc.stdout
    root = tmp_path / "ddp"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grid"] == [2, 8, 32, 64]
    assert summary["recommended_batch_size"] in summary["grid"]
    assert f"Recommended batch size: {summary['recommended_batch_size']} " in proc.stdout
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {int(r["batch_size"]) for r in rows if r["seed"] == "0"} == set(summary["grid"])
    assert any(r["status"] == "reached" for r in rows)
    for row in rows:
        if row["status"] == "reached":  # B is global: B / 2 per rank on each of 2 ranks, every step
            assert int(row["samples"]) == int(row["steps"]) * int(row["batch_size"])

    assert batchlab(*args, "--quick", "--out", "one").code == 0  # the noise scale on one device
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"], "rank 1 made no folder of its own"
    gns, alone = (json.loads((tmp_path / d / "gns.json").read_text()) for d in ("ddp", "one"))
    assert gns["method"] == alone["method"] == "per_example"
    assert gns["estimate_batch_size"] == 256 and gns["rank_batch_size"] == 128
    # At step 0 both start from the same weights: each rank's per-example gradients of its half of the batch,
    # averaged over the ranks, are one device's per-example gradients of the whole batch.
    assert gns["points"][0]["step"] == alone["points"][0]["step"] == 0
    for key in ("g2", "trace"):
        assert gns["points"][0][key] == pytest.approx(alone["points"][0][key], rel=1e-4)
    # The ranks' own norms (B_small = 128) estimate the same quantities, with far more noise.
    assert gns["points"][0]["ranks_g2"] == pytest.approx(alone["points"][0]["g2"], rel=0.05)
    assert summary["b_simple_ranks"] == gns["b_simple_ranks"] and math.isfinite(gns["b_simple_ranks"])


@pytest.mark.slow
def test_sigterm_to_the_launching_rank_stops_every_rank_of_a_study_and_a_rerun_repeats_no_trial(tmp_path):
    """As a scheduler may: SIGTERM to rank 0 only, once three trials are written. Without agreement the ranks stop
    at different steps and wait for each other for ever."""
    args = [*STUDY_TINY, "--grid", "[8, 64]", "--lr_factors", "[1, 2]", "--out", "ddp", *DDP]
    trials = tmp_path / "ddp" / "trials"
    code, out, err = signal_a_study(tmp_path, args, trials, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert "Traceback" not in err and err.count("study interrupted by SIGTERM") == 1, err[-2000:]
    kept = {p.name: p.read_bytes() for p in trials.glob("*.json")}
    assert 3 <= len(kept)
    _ok(run_command(tmp_path, *args, timeout=120))
    after = {p.name: p.read_bytes() for p in trials.glob("*.json")}
    rows = list(csv.DictReader((tmp_path / "ddp" / "results.csv").open()))
    assert len(after) == len(rows) > len(kept) and all(after[name] == data for name, data in kept.items())


@pytest.mark.slow
def test_a_loss_that_is_not_finite_on_one_rank_alone_stops_every_rank_of_a_study(tmp_path):
    """Each rank's training loss is its own shard's: at the edge of divergence one rank's can overflow a step
    before the others'. The reference run's divergence check must stop every rank, not that one alone (which left
    the other waiting in its next collective for ever)."""
    args = [*STUDY_TINY, "--grid", "[8]", "--quick", "--out", "ddp", *DDP,
            "--model.class_path", "probes.NonFiniteOnOneRank", "--model.init_args.at_step", "30"]
    _ok(run_command(tmp_path, *args, timeout=120))
    gns = json.loads((tmp_path / "ddp" / "gns.json").read_text())
    assert [p["step"] for p in gns["points"]] == [0, 20]  # stopped at step 31, before the snapshot at 40


# The callbacks under DDP: NoiseScaleMonitor and BatchSizeWarmup work on the global batch, and every rank trains
# each step at the same batch size and LR and holds the same noise-scale readings.
def _callbacks_fit(tmp_path, *args):
    """A DDP ``batchlab fit`` of ``args`` (a ``-c`` config first: after the DDP arguments it would put back its own
    devices) with ``probes.RecordBatchSizes`` last in its callbacks; returns the summary and, per rank, the record:
    ``sizes`` and ``lrs`` by step, ``readings`` and ``changes``."""
    out = tmp_path / "sizes"
    proc = run_command(tmp_path, "fit", *args, *QUIET, *DDP, "--trainer.callbacks+=probes.RecordBatchSizes",
                       f"--trainer.callbacks.out_dir={out}", timeout=120)
    _ok(proc)
    assert "2 device(s) x 1 node(s)" in proc.stdout
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        record["sizes"] = {int(k): v for k, v in record["sizes"].items()}
        record["lrs"] = {int(k): v for k, v in record["lrs"].items()}
    (log_dir,) = run_dirs(tmp_path)
    return load_summary(log_dir), records


def _monitor(every, *more):
    return ["--trainer.callbacks+=batchlab.callbacks.NoiseScaleMonitor", f"--trainer.callbacks.every_n_steps={every}",
            *more]


def _warmup(*more):
    return ["--trainer.callbacks+=batchlab.callbacks.BatchSizeWarmup", *more]


def _same_on_both_ranks(records):
    rank0, rank1 = records
    assert rank0["sizes"] == rank1["sizes"] and rank0["lrs"] == rank1["lrs"]
    assert rank0["readings"] == rank1["readings"] and rank0["changes"] == rank1["changes"]
    return rank0


def test_a_schedule_under_ddp_grows_every_ranks_batch_and_lr_at_its_steps_and_the_monitor_agrees(tmp_path):
    """batchlab's own loader (``TensorBatches``, sharded by itself), SGD, per-example gradients all-reduced."""
    summary, records = _callbacks_fit(
        tmp_path, "-c", SEED, "--data.n_samples", "2048", "--data.batch_size", "8", "--trainer.max_steps", "60",
        *_monitor(5), *_warmup("--trainer.callbacks.schedule=[10, 20]", "--trainer.callbacks.max_batch_size=1024"))
    rank = _same_on_both_ranks(records)
    # 1024 rows per rank: 10 x 8 + 10 x 16 + 24 x 32 leave 16 for the epoch's last batch (step 44), then epoch 2.
    expected = {s: 8 if s < 10 else 16 if s < 20 else 16 if s == 44 else 32 for s in range(60)}
    assert rank["sizes"] == expected
    assert rank["lrs"] == pytest.approx({s: 0.001 if s < 10 else 0.002 if s < 20 else 0.004 for s in range(60)})
    assert rank["changes"] == [[0, 16, "start"], [10, 32, "schedule: steps 10"], [20, 64, "schedule: steps 20"]]
    # The summary's schedule is of global batches (per device x 2 ranks), with the samples of all ranks.
    assert [(c["step"], c["samples"], c["batch_size"], c["reason"]) for c in summary["batch_size_schedule"]] == [
        (0, 0, 16, "start"), (10, 160, 32, "schedule: steps 10"), (20, 480, 64, "schedule: steps 20")]
    assert [c["lr"] for c in summary["batch_size_schedule"]] == pytest.approx([0.001, 0.002, 0.004])
    assert summary["samples_seen"] == 2 * sum(expected.values()) and summary["global_batch_size"] == 64

    assert [r[0] for r in rank["readings"]] == list(range(4, 60, 5))
    assert all(r[2] == "per_example" and math.isfinite(r[1]) for r in rank["readings"])
    # auto hooks DDP's all-reduce too, in case per-example gradients fail; it reads the buckets on measured steps
    # only (it once went on reading every step after the first, for nothing).
    assert rank["hook_reads"] == [r[0] for r in rank["readings"]]
    assert summary["noise_scale"]["method"] == "per_example" and summary["noise_scale_readings"] == 12
    assert summary["noise_scale"]["step"] == 59 and summary["noise_scale"]["b_simple"] == rank["readings"][-1][1]


# slow: the default suite must stay under 5 minutes on 2 cores; the others cover this path there too.
@pytest.mark.slow
def test_the_noise_scale_grows_every_ranks_batch_at_the_same_step_on_a_dataloader(tmp_path):
    """``probes.NoisyLinear`` holds B_simple near 5 + 4 x 10^2 = 405 (LR 0): from 16 global the batch doubles to 32
    and 64 (max_batch_size), each decided on rank 0 once 10 readings at the size pass 2 x the batch. Its data is a
    plain shuffled DataLoader, which Lightning rebuilds around a DistributedSampler with the warmup's
    GrowingBatchSampler kept."""
    summary, records = _callbacks_fit(
        tmp_path, "--model.class_path=probes.NoisyLinear", "--data.class_path=probes.NoisyLinearData",
        "--data.init_args.sigma=10", "--data.init_args.batch_size=8", "--trainer.max_steps=150",
        *_monitor(2), *_warmup("--trainer.callbacks.max_batch_size=64", "--trainer.callbacks.min_readings=10"))
    rank = _same_on_both_ranks(records)
    grown = summary["batch_size_schedule"][1:]
    assert [c["batch_size"] for c in grown] == [32, 64] and all(c["reason"].startswith("noise scale") for c in grown)
    assert rank["changes"][1:] == [[c["step"], c["batch_size"], c["reason"]] for c in grown]
    measured = {r[0] for r in rank["readings"]}
    for c in grown:
        # Decided at the end of a measured step; from the next batch on, every rank trains half the global batch.
        assert c["step"] - 1 in measured and float(c["reason"].split()[2]) > c["batch_size"]
        assert rank["sizes"][c["step"] - 1] == c["batch_size"] // 4 and rank["sizes"][c["step"]] == c["batch_size"] // 2
    assert grown[0]["step"] >= 2 * 10 and grown[1]["step"] - grown[0]["step"] >= 2 * 10, "min_readings at each size"
    assert set(rank["sizes"].values()) == {8, 16, 32} and set(rank["lrs"].values()) == {0.0}
    assert all(r[2] == "per_example" for r in rank["readings"]) and len(rank["readings"]) == 75


@pytest.mark.parametrize("model, estimator", [pytest.param("Classifier", "ranks", marks=pytest.mark.slow),
                                              pytest.param("NormedClassifier", "auto", marks=pytest.mark.slow)])
def test_the_ranks_estimator_measures_through_ddps_all_reduce_alike_on_every_rank(tmp_path, model, estimator):
    """``estimator=ranks``: each rank's gradient read by a DDP communication hook before the all-reduce; ``auto``
    takes it where torch.func cannot vmap the model (batch norm). With a step schedule on a plain DataLoader and
    Adam (the LR x sqrt 2 at each doubling), over an epoch's end."""
    summary, records = _callbacks_fit(
        tmp_path, f"--model.class_path=study_models.{model}", "--data.class_path=study_models.Blobs",
        "--data.init_args.batch_size=8", "--trainer.max_steps=60", "--trainer.limit_val_batches=0",
        *_monitor(5, f"--trainer.callbacks.estimator={estimator}"),
        *_warmup("--trainer.callbacks.schedule=[10, 20]", "--trainer.callbacks.max_batch_size=1024"))
    rank = _same_on_both_ranks(records)
    # 768 training rows per rank (DistributedSampler's shard): 10 x 8 + 10 x 16 + 16 x 32 leave 16 at step 36.
    assert rank["sizes"] == {s: 8 if s < 10 else 16 if s < 20 or s == 36 else 32 for s in range(60)}
    assert rank["lrs"] == pytest.approx({s: 1e-3 * math.sqrt(2) ** ((s >= 10) + (s >= 20)) for s in range(60)})
    assert [c["batch_size"] for c in summary["batch_size_schedule"]] == [16, 32, 64]
    assert [r[0] for r in rank["readings"]] == list(range(4, 60, 5))
    assert all(r[2] == "ranks" and math.isfinite(r[1]) and r[1] > 0 for r in rank["readings"])
    assert rank["hook_reads"] == [r[0] for r in rank["readings"]]
    assert summary["noise_scale"]["method"] == "ranks" and summary["noise_scale"]["b_simple_adam"] is not None
