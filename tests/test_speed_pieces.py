"""The speed pieces change how a step runs, never what it computes: the compiled network and the data path's
shortcuts (sliced batches, the packed copy, the device shuffle), each against the plain path."""

import json
import math

import pytest
import torch
from conftest import QUIET, SEED, load_summary, run_dirs, scalars
from lightning.pytorch import Trainer

from batchlab.data import TensorBatches, ToyRegressionData, make_synthetic
from batchlab.model import MLPRegressor
from batchlab.summary import RunSummary


def _fit(batchlab, tmp_path, *args):
    result = batchlab("fit", "-c", SEED, *QUIET, *args)
    assert result.code == 0, result.err
    log_dir = run_dirs(tmp_path)[-1]
    return log_dir, scalars(log_dir), load_summary(log_dir)


def test_a_fit_that_stops_early_still_logs_every_loss_against_samples_seen(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(
        max_steps=7, logger=logger, log_every_n_steps=1, callbacks=[RunSummary(verbose=False)],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(MLPRegressor(), ToyRegressionData(n_samples=64, batch_size=4))
    tags = scalars(logger.log_dir)
    assert [s for s, _ in tags["train/loss"]] == list(range(7))
    assert [s for s, _ in tags["train/loss_vs_samples"]] == [4 * k for k in range(1, 8)]
    assert [v for _, v in tags["train/loss_vs_samples"]] == [v for _, v in tags["train/loss"]]


def test_compiled_network_trains_like_the_eager_one():
    """``compile`` on the CPU (inductor); on a GPU the same flag with ``reduce-overhead`` adds CUDA graphs."""
    x, y = make_synthetic(64)
    results = []
    for compile_mode in (None, "default"):
        torch.manual_seed(0)
        model = MLPRegressor(compile=compile_mode)
        opt = model.configure_optimizers()
        losses = []
        for step in range(5):
            xb, yb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (eager, eager_state), (compiled, compiled_state) = results
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert eager_state.keys() == compiled_state.keys(), "checkpoints keep the eager parameter names"
    for k in eager_state:
        torch.testing.assert_close(compiled_state[k], eager_state[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_network_with_cuda_graphs_matches_eager_on_the_gpu(batchlab, tmp_path):
    data = ["--data.n_samples", "4096", "--data.batch_size", "1024", "--trainer.max_epochs", "3",
            "--trainer.accelerator", "gpu"]  # fmt: skip
    _, eager, _ = _fit(batchlab, tmp_path, *data)
    _, compiled, _ = _fit(batchlab, tmp_path, "--model.compile", "reduce-overhead", *data)
    a = [v for _, v in eager["train/loss"]]
    b = [v for _, v in compiled["train/loss"]]
    assert len(a) == len(b) == 12
    assert all(math.isclose(p, q, rel_tol=1e-4, abs_tol=1e-5) for p, q in zip(a, b))


def test_three_tensor_batches_match_the_two_tensor_fast_path():
    x, y = make_synthetic(37)
    w = torch.arange(37.0).unsqueeze(1)
    torch.manual_seed(5)
    two = [b for _ in range(2) for b in TensorBatches((x, y), 8, shuffle=True)]
    torch.manual_seed(5)
    three = [b for _ in range(2) for b in TensorBatches((x, y, w), 8, shuffle=True)]
    assert len(two) == len(three) == 10
    for (x2, y2), (x3, y3, w3) in zip(two, three):
        assert torch.equal(x2, x3) and torch.equal(y2, y3)
        assert torch.equal(x[w3.squeeze(1).long()], x3), "the third tensor is gathered with the same rows"


def test_large_data_gathered_from_one_packed_copy_gives_the_same_batches(monkeypatch):
    from batchlab import data

    x, y = make_synthetic(101)
    w = torch.arange(101.0).unsqueeze(1)
    for tensors in ((x, y), (x, y, w), (x, y.squeeze(1))):
        runs = []
        for threshold in (1 << 60, 0):  # never packed, always packed where it applies
            monkeypatch.setattr(data, "PACK_MIN_BYTES", threshold)
            torch.manual_seed(7)
            batches = TensorBatches(tensors, 16, shuffle=True)
            runs.append(([b for _ in range(2) for b in batches], torch.get_rng_state(), batches._rows is not None))
        (plain, plain_rng, _), (packed, packed_rng, was_packed) = runs
        assert was_packed == (tensors[-1].dim() == 2), "only 2-D tensors of one dtype are packed"
        assert torch.equal(plain_rng, packed_rng) and len(plain) == len(packed) == 14
        for a, b in zip(plain, packed):
            assert all(torch.equal(s, t) and s.shape == t.shape and t.is_contiguous() for s, t in zip(a, b))


def test_synthetic_data_is_the_documented_formula():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(500, 3, generator=g) * (5.0 - -2.0) + -2.0
    y = x.sum(dim=1, keepdim=True) + 0.5 * torch.randn(500, 1, generator=g)
    x2, y2 = make_synthetic(500, 3, 0.5, (-2.0, 5.0), seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_without_held_out_splits_training_uses_the_data_without_a_copy():
    dm = ToyRegressionData(n_samples=100)
    dm.setup("fit")
    x, y = dm.splits["train"]
    full_x, full_y = dm.full_data()
    assert torch.equal(x, full_x) and torch.equal(y, full_y)
    assert x.is_contiguous() and x._base is None, "the generated tensor itself, not an index copy"


def test_device_shuffle_changes_nothing_on_the_cpu():
    x, y = make_synthetic(50)
    torch.manual_seed(3)
    plain = [b for _ in range(3) for b in TensorBatches((x, y), 8, shuffle=True)]
    state = torch.get_rng_state()
    torch.manual_seed(3)
    on_device = [b for _ in range(3) for b in TensorBatches((x, y), 8, shuffle=True, shuffle_on_device=True)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, on_device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_shuffle_draws_a_permutation_on_the_gpu_and_keeps_the_cpu_rng_stream():
    x = torch.arange(1000.0, device="cuda").unsqueeze(1)
    torch.manual_seed(3)
    for _ in TensorBatches((x,), 64, shuffle=True):
        pass
    state = torch.get_rng_state()
    torch.manual_seed(3)
    rows = torch.cat([b[0] for b in TensorBatches((x,), 64, shuffle=True, shuffle_on_device=True)])
    assert torch.equal(torch.get_rng_state(), state), "the CPU stream advances as with a DataLoader"
    assert rows.device.type == "cuda" and torch.equal(rows.sort(0).values, x)


def test_a_fit_without_a_logger_writes_its_summary_into_a_root_dir_nothing_made_yet(tmp_path):
    root = tmp_path / "new" / "root"
    trainer = Trainer(
        max_steps=6, logger=False, callbacks=[RunSummary(verbose=False)], enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", default_root_dir=root,
    )  # fmt: skip
    trainer.fit(MLPRegressor(), ToyRegressionData(n_samples=24, batch_size=4))
    assert json.loads((root / "summary.json").read_text())["steps"] == 6
