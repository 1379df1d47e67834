"""``batchlab fit`` under Lightning's DDP on two CPU processes (gloo), run for real as a subprocess: each rank
trains on its own shard of every epoch, the shuffle is ``DistributedSampler``'s, and rank 0 alone writes and
reports, with the global batch size = per device x devices x accumulated batches.

Lightning starts rank 1 by re-running the command line, so these tests run ``python -m batchlab.cli`` in a
subprocess and observe the ranks through ``probes.RecordSeenRows``, a callback named on the command line.
"""

import re

import pytest
import torch
from conftest import QUIET, SEED, hparams_plugin, load_summary, run_command, run_dirs, scalars, snapshot
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
    writers = {re.fullmatch(r"events\.out\.tfevents\.\d+\..+\.(\d+)\.\d+(\.scalars)?", n).group(1) for n in names}
    assert len(names) >= 2 and len(writers) == 1, names
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
