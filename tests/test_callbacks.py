"""``NoiseScaleMonitor`` and ``BatchSizeWarmup`` in real Lightning fits on one CPU: the monitor's estimates
against the closed form of a linear model with label noise, a monitored fit trained exactly as an unmonitored one,
the warmup's batch sizes and learning rates at the steps its rule says, a resumed fit going on mid-schedule, and
the one-line errors. Under DDP: tests/test_ddp.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from study_models import Blobs, Classifier, NormedClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from batchlab.callbacks import BatchSizeWarmup, NoiseScaleMonitor
from batchlab.data import ToyRegressionData
from batchlab.errors import ConfigError
from batchlab.model import MLPRegressor


def _trainer(tmp_path, callbacks, max_steps, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return Trainer(default_root_dir=tmp_path, max_steps=max_steps, callbacks=callbacks, accelerator="cpu",
                   devices=1, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, **kw)


class Recorder(Callback):
    """Per optimizer step: the batch's rows, the LR the optimizer steps with (first param group), and the loss."""

    def __init__(self):
        self.sizes, self.lrs, self.losses = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.setdefault(trainer.global_step, 0)
        self.sizes[trainer.global_step] += len(batch[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = float(loss)


# The closed form: a bias-free linear model at w* + delta, x ~ N(0, I), y = w*.x + N(0, sigma^2), mean squared
# error: B_simple = (d + 1) + d sigma^2 / |delta|^2 (tests/test_scaling.py derives it). The LR is 0, so the
# weights stay where the closed form holds and every measurement estimates the same B_simple.
D, SIGMA, DISTANCE = 4, 1.0, 1.0
CLOSED_FORM = (D + 1) + D * SIGMA**2 / DISTANCE**2


class _Regression(LightningModule):
    """``self.net`` under the mean squared error, logging ``train/loss`` as a user's module would."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss


class LinearProblem(_Regression):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_star = torch.randn(D, 1, generator=g, dtype=torch.float64)
        delta = torch.randn(D, 1, generator=g, dtype=torch.float64)
        self.net = nn.Linear(D, 1, bias=False).double()
        with torch.no_grad():
            self.net.weight.copy_((self.w_star + delta / delta.norm() * DISTANCE).T)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class LinearData(LightningDataModule):
    def __init__(self, w_star, batch_size, n=2**17, sigma=SIGMA):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, D, generator=g, dtype=torch.float64)
        self.rows = TensorDataset(x, x @ w_star + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=True)


@pytest.mark.parametrize("estimator, accumulate, tolerance", [
    ("per_example", 1, 0.1), ("two_batch", 1, 0.2), ("micro_batches", 4, 0.2),
])
def test_the_monitors_estimates_match_the_closed_form_of_a_linear_model(tmp_path, estimator, accumulate, tolerance):
    seed_everything(0)
    model = LinearProblem()
    monitor = NoiseScaleMonitor(every_n_steps=1, decay=0.99, estimator=estimator)
    _trainer(tmp_path, [monitor], 400, accumulate_grad_batches=accumulate).fit(
        model, LinearData(model.w_star, 256 // accumulate))
    assert monitor.method == estimator and len(monitor.readings) == 400
    last = monitor.readings[-1]
    assert last.b_simple == pytest.approx(CLOSED_FORM, rel=tolerance)
    assert last.grad_sq == pytest.approx(4 * DISTANCE**2, rel=tolerance), "|G|^2 = |2 delta|^2"
    assert last.b_simple_adam is None, "SGD: the raw gradient only"


class Regularised(_Regression):
    """Dropout (the RNG) and batch norm (buffers updated in place): what a measurement beside the fit could
    disturb."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _regularised_run(tmp_path, callbacks, estimator_used=None):
    seed_everything(3)
    model = Regularised()
    recorder = Recorder()
    data = ToyRegressionData(n_samples=1024, noise=1.0, batch_size=32)
    _trainer(tmp_path, [recorder, *callbacks], 40).fit(model, data)
    return model, recorder


@pytest.mark.parametrize("estimator", ["auto", "two_batch"])
def test_a_monitored_fit_trains_exactly_as_an_unmonitored_one(tmp_path, estimator):
    plain, plain_rec = _regularised_run(tmp_path / "plain", [])
    monitor = NoiseScaleMonitor(every_n_steps=3, estimator=estimator)
    watched, watched_rec = _regularised_run(tmp_path / "watched", [monitor])
    assert len(monitor.readings) == 13 and monitor.method == "two_batch"  # batch norm: torch.func cannot vmap it
    assert watched_rec.losses == plain_rec.losses
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name  # weights, and the batch norm's running statistics
    assert all(r.b_simple_adam is not None for r in monitor.readings[1:]), "Adam: the preconditioned estimate too"


def test_per_example_monitoring_leaves_the_seed_model_unchanged_and_logs_its_metrics(tmp_path):
    def run(callbacks, logger=False):
        seed_everything(0)
        model, recorder = MLPRegressor(lr=0.01, momentum=0.9), Recorder()
        data = ToyRegressionData(n_samples=2048, noise=1.0, batch_size=32)
        _trainer(tmp_path, [recorder, *callbacks], 60, logger=logger).fit(model, data)
        return model, recorder

    plain, plain_rec = run([])
    monitor = NoiseScaleMonitor(every_n_steps=10)
    logger = CSVLogger(tmp_path, name="csv")
    watched, watched_rec = run([monitor], logger)
    assert monitor.method == "per_example" and [r.step for r in monitor.readings] == [9, 19, 29, 39, 49, 59]
    assert watched_rec.losses == plain_rec.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), watched.state_dict().values()))
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    logged = {int(r["step"]): float(r["noise_scale/b_simple"]) for r in rows if r.get("noise_scale/b_simple")}
    assert logged == pytest.approx({r.step: r.b_simple for r in monitor.readings})
    assert all(r.get("noise_scale/grad_sq") for r in rows if r.get("noise_scale/b_simple"))
    # The averages are of numerator and denominator apart: their ratio is the logged B_simple.
    assert all(r.b_simple == pytest.approx(r.trace / r.grad_sq) for r in monitor.readings)


def test_adam_gets_the_preconditioned_estimate_and_the_warmup_follows_it(tmp_path):
    seed_everything(0)
    monitor = NoiseScaleMonitor(every_n_steps=5)
    _trainer(tmp_path, [monitor], 30).fit(Classifier(), Blobs(batch_size=16))
    assert monitor.method == "per_example"
    assert monitor.readings[0].b_simple_adam is not None
    assert monitor.b_simple == monitor.readings[-1].b_simple_adam


# The warmup.
def _toy_warmup(tmp_path, warmup, steps, batch_size=8, callbacks=(), **kw):
    seed_everything(0)
    model, recorder = MLPRegressor(lr=0.001, momentum=0.9), Recorder()
    data = ToyRegressionData(n_samples=4096, noise=1.0, batch_size=batch_size)
    trainer = _trainer(tmp_path, [recorder, *callbacks, warmup], steps, **kw)
    trainer.fit(model, data)
    return trainer, data, recorder


def test_a_step_schedule_grows_the_batch_and_the_lr_at_exactly_its_steps(tmp_path):
    warmup = BatchSizeWarmup(schedule=[10, 25], max_batch_size=1024)
    _, data, rec = _toy_warmup(tmp_path, warmup, 40)
    assert [rec.sizes[s] for s in (0, 9, 10, 24, 25, 39)] == [8, 8, 16, 16, 32, 32]
    assert rec.lrs[9] == pytest.approx(0.001) and rec.lrs[10] == pytest.approx(0.002), "SGD: linear"
    assert rec.lrs[25] == pytest.approx(0.004)
    assert [(c.step, c.batch_size, c.reason) for c in warmup.changes] == [
        (0, 8, "start"), (10, 16, "schedule: steps 10"), (25, 32, "schedule: steps 25")]
    assert warmup.changes[2].samples == 10 * 8 + 15 * 16
    assert data.batch_size == 32, "the batch size's one place follows the warmup"


def test_a_samples_schedule_and_the_max_batch_size_on_a_plain_dataloader_with_adam(tmp_path):
    seed_everything(0)
    recorder = Recorder()
    warmup = BatchSizeWarmup(schedule=[100, 200, 400], schedule_unit="samples", max_batch_size=32)
    _trainer(tmp_path, [recorder, warmup], 20).fit(Classifier(learning_rate=1e-3), Blobs(batch_size=16))
    # 16 per step: 100 samples are passed after 7 steps; the next growth would make 64 > 32.
    assert [rec for rec in (recorder.sizes[6], recorder.sizes[7], recorder.sizes[19])] == [16, 32, 32]
    assert recorder.lrs[7] == pytest.approx(1e-3 * math.sqrt(2)), "Adam: sqrt"
    assert len(warmup.changes) == 2


def test_the_noise_scale_grows_the_batch_while_it_exceeds_factor_x_b(tmp_path):
    # With label noise sigma = 4.61 the linear problem holds B_simple at (d + 1) + d sigma^2 / |delta|^2 = 90: from
    # B=16 the batch doubles while 90 > 2 x B, to 32 and 64, and there it stays (90 < 2 x 64).
    seed_everything(0)
    model, recorder = LinearProblem(), Recorder()
    monitor = NoiseScaleMonitor(every_n_steps=2)
    warmup = BatchSizeWarmup(max_batch_size=1024, min_readings=20)
    _trainer(tmp_path, [recorder, monitor, warmup], 600).fit(model, LinearData(model.w_star, 16, sigma=4.61))
    grown = warmup.changes[1:]
    assert [c.batch_size for c in grown] == [32, 64] and all(c.reason.startswith("noise scale") for c in grown)
    measured = {r.step for r in monitor.readings}
    for c in grown:
        assert float(c.reason.split()[2]) > c.batch_size, "grown only once B_simple passed 2 x the old batch"
        # Decided at the end of a measured step, from the first batch the loader had not cut: the next one here.
        assert c.step - 1 in measured
        assert recorder.sizes[c.step] == c.batch_size and recorder.sizes[c.step - 1] == c.batch_size // 2
    assert grown[0].step >= 20 * 2 and grown[1].step - grown[0].step >= 20 * 2, "min_readings at each size"
    assert max(recorder.sizes.values()) == 64


def test_a_resumed_fit_goes_on_mid_schedule(tmp_path):
    full = BatchSizeWarmup(schedule=[10, 20, 30], max_batch_size=1024)
    _, _, whole = _toy_warmup(tmp_path / "whole", full, 40)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1)
    first = BatchSizeWarmup(schedule=[10, 20, 30], max_batch_size=1024)
    _toy_warmup(tmp_path / "a", first, 15, callbacks=[ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=0-step=15.ckpt"
    assert path.exists()
    seed_everything(0)
    second = BatchSizeWarmup(schedule=[10, 20, 30], max_batch_size=1024)
    model, rec = MLPRegressor(lr=0.001, momentum=0.9), Recorder()
    data = ToyRegressionData(n_samples=4096, noise=1.0, batch_size=8)
    _trainer(tmp_path / "b", [rec, second], 40).fit(model, data, ckpt_path=path)
    assert {s: rec.sizes[s] for s in range(15, 40)} == {s: whole.sizes[s] for s in range(15, 40)}
    assert {s: rec.lrs[s] for s in range(15, 40)} == pytest.approx({s: whole.lrs[s] for s in range(15, 40)})
    assert [(c.step, c.batch_size) for c in second.changes] == [(c.step, c.batch_size) for c in full.changes]


@pytest.mark.parametrize("make, message", [
    (lambda: NoiseScaleMonitor(every_n_steps=0), "every_n_steps"),
    (lambda: NoiseScaleMonitor(decay=1.0), "decay"),
    (lambda: BatchSizeWarmup(factor=1), "factor=1"),
    (lambda: BatchSizeWarmup(schedule=[20, 10]), "schedule=[20, 10]"),
])
def test_bad_arguments_are_refused_at_construction(make, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make()


@pytest.mark.parametrize("callbacks, model, message", [
    (lambda: [NoiseScaleMonitor(preconditioned=True)], lambda: MLPRegressor(), "needs an Adam-family optimizer"),
    (lambda: [BatchSizeWarmup(schedule=[5], max_batch_size=4)], lambda: MLPRegressor(), "max_batch_size=4 is below"),
    (lambda: [BatchSizeWarmup()], lambda: MLPRegressor(), "add batchlab.callbacks.NoiseScaleMonitor"),
    (lambda: [NoiseScaleMonitor(estimator="ranks")], lambda: MLPRegressor(), "needs DDP"),
])
def test_what_the_fit_cannot_do_is_refused_before_the_first_step(tmp_path, callbacks, model, message):
    recorder = Recorder()
    with pytest.raises(ConfigError, match=message):
        _trainer(tmp_path, [recorder, *callbacks()], 10).fit(model(), ToyRegressionData(n_samples=256, batch_size=8))
    assert recorder.losses == {}


def test_normed_classifier_is_monitored_by_two_batch_with_the_reason(tmp_path):
    monitor = NoiseScaleMonitor(every_n_steps=4)
    _trainer(tmp_path, [monitor], 12).fit(NormedClassifier(), Blobs(batch_size=32))
    assert monitor.method == "two_batch" and monitor.method_reason and len(monitor.readings) == 3


class Stream(LightningDataModule):
    def train_dataloader(self):
        class Rows(torch.utils.data.IterableDataset):
            def __iter__(self):
                for _ in range(64):
                    x = torch.rand(2)
                    yield x, x.sum(0, keepdim=True)

        return DataLoader(Rows(), batch_size=8)


def test_a_loader_the_warmup_cannot_resize_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="cannot change the batch size of a Rows: it needs a train_dataloader"):
        _trainer(tmp_path, [BatchSizeWarmup(schedule=[2])], 5).fit(MLPRegressor(), Stream())


def test_after_a_batch_size_finder_the_warmup_starts_at_its_size_and_stops_at_its_limit(tmp_path):
    from lightning.pytorch.callbacks import BatchSizeFinder

    finder = BatchSizeFinder(mode="power", init_val=8, max_trials=2, steps_per_trial=2)
    warmup, monitor = BatchSizeWarmup(schedule=[5, 10, 15]), NoiseScaleMonitor(every_n_steps=5)
    seed_everything(0)
    recorder = Recorder()
    data = ToyRegressionData(n_samples=4096, noise=1.0, batch_size=8)
    _trainer(tmp_path, [recorder, monitor, warmup, finder], 20).fit(MLPRegressor(), data)
    found = finder.optimal_batch_size
    assert found == 16, "max_trials=2 from 8: one doubling (CPU memory never runs out)"
    assert recorder.sizes[0] == found and recorder.sizes[5] == found, "the finder's size, and no room above it"
    assert [(c.step, c.batch_size) for c in warmup.changes] == [(0, found)]
    assert [r.step for r in monitor.readings] == [4, 9, 14, 19], "the finder's trials are not the fit"
